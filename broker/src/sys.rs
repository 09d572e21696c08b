//! Raw system calls that `nix` 0.32 does not wrap. Each `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{BorrowedFd, FromRawFd, OwnedFd},
};

/// `pidfd_open(2)`: a handle on `pid` that cannot be confused with a later process that reuses
/// the number.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Take ownership of an inherited file descriptor given on the command line (`--ready-fd N`).
/// Fails if `fd` is not open, or is one of stdin/stdout/stderr.
pub fn inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "must be above 2",
        ));
    }
    // SAFETY: F_GETFD on an arbitrary number only reads the fd table; the borrow ends with the call.
    nix::fcntl::fcntl(
        unsafe { BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )?;
    // SAFETY: the fd is open (checked above) and was handed to us by our parent to own; no other
    // code in this process refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `munlockall(2)`.
pub fn munlockall() -> io::Result<()> {
    // SAFETY: munlockall takes no arguments; it only changes the paging of our own mappings.
    if unsafe { libc::munlockall() } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mlockall(2)` with the given `MCL_*` flags.
pub fn mlockall(flags: i32) -> io::Result<()> {
    // SAFETY: mlockall takes no pointers; it only changes the paging of our own mappings.
    if unsafe { libc::mlockall(flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Register an owned fd with the tokio reactor for readability (a pidfd becomes readable when
/// its process exits). Must be called inside a runtime.
pub fn watch_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns the descriptor for as long as the `AsyncFd` holds it, so it stays
    // open and `as_raw_fd` returns the same number for the whole registration.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_fd_rejects_closed_and_std_fds() {
        assert!(inherited_fd(1).is_err());
        assert!(inherited_fd(987_654).is_err());
    }
}
