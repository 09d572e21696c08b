//! Every syscall of the privileged sequence, behind the [`Sys`] trait so that
//! [`crate::launch`] can be tested with a recording fake. The only module allowed `unsafe`;
//! each block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

use nix::{
    errno::Errno,
    sys::signal::{SigHandler, SigSet, SigmaskHow, Signal},
    unistd::{Gid, Uid},
};

/// The operations of the privileged sequence, in the order [`crate::launch::launch`] calls them.
pub trait Sys {
    /// `Admin.RegisterWorker(pid 0, function)` over `socket`; the error is a one-line reason.
    fn register_worker(&mut self, socket: &str, function: &str) -> Result<(), String>;
    /// Close every fd above 2.
    fn close_fds_above_stderr(&mut self) -> Result<(), Errno>;
    /// `setgroups([])`.
    fn clear_groups(&mut self) -> Result<(), Errno>;
    /// `setresgid(gid, gid, gid)`.
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno>;
    /// `setresuid(uid, uid, uid)`.
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno>;
    fn getresuid(&mut self) -> Result<[u32; 3], Errno>;
    fn getresgid(&mut self) -> Result<[u32; 3], Errno>;
    /// The permitted and effective capability sets, or-ed together (`capget`).
    fn capabilities(&mut self) -> Result<u64, Errno>;
    /// `setresuid(0, 0, 0)`: must fail once privileges are dropped.
    fn regain_root(&mut self) -> Result<(), Errno>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&mut self) -> Result<(), Errno>;
    /// Empty signal mask; SIGPIPE back to its default action.
    fn reset_signals(&mut self) -> Result<(), Errno>;
    /// `execve(path, argv, envp)`. Returns only when it failed, with the reason.
    fn execve(&mut self, path: &CStr, argv: &[CString], envp: &[CString]) -> Errno;
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct` (linux/capability.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, two `CapData`.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The real process.
#[derive(Debug)]
pub struct RealSys;

/// The shim's (real, effective, saved) uids and gids. getresuid/getresgid cannot fail with
/// valid pointers; should they, the effective ids stand in for all three.
pub fn current_ids() -> ([u32; 3], [u32; 3]) {
    let uids = RealSys
        .getresuid()
        .unwrap_or([nix::unistd::geteuid().as_raw(); 3]);
    let gids = RealSys
        .getresgid()
        .unwrap_or([nix::unistd::getegid().as_raw(); 3]);
    (uids, gids)
}

impl Sys for RealSys {
    fn register_worker(&mut self, socket: &str, function: &str) -> Result<(), String> {
        crate::register::register_worker(socket, function, crate::register::TIMEOUT)
    }

    fn close_fds_above_stderr(&mut self) -> Result<(), Errno> {
        // SAFETY: close_range takes plain integers and touches no memory. Closing fds this
        // process's Rust code still owns is sound here: none is used after this point (the
        // registration runtime and its socket were dropped before), and PROGRAM replaces us.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        if rc == 0 {
            return Ok(());
        }
        match Errno::last() {
            // Kernels before 5.9: close one by one up to the fd limit.
            Errno::ENOSYS => {
                let (soft, _) =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
                let last = i32::try_from(soft).unwrap_or(i32::MAX);
                for fd in 3..last {
                    // SAFETY: as above; EBADF for fds that are not open is expected.
                    unsafe { libc::close(fd) };
                }
                Ok(())
            }
            e => Err(e),
        }
    }

    fn clear_groups(&mut self) -> Result<(), Errno> {
        nix::unistd::setgroups(&[])
    }

    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        let gid = Gid::from_raw(gid);
        nix::unistd::setresgid(gid, gid, gid)
    }

    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        let uid = Uid::from_raw(uid);
        nix::unistd::setresuid(uid, uid, uid)
    }

    fn getresuid(&mut self) -> Result<[u32; 3], Errno> {
        let ids = nix::unistd::getresuid()?;
        Ok([
            ids.real.as_raw(),
            ids.effective.as_raw(),
            ids.saved.as_raw(),
        ])
    }

    fn getresgid(&mut self) -> Result<[u32; 3], Errno> {
        let ids = nix::unistd::getresgid()?;
        Ok([
            ids.real.as_raw(),
            ids.effective.as_raw(),
            ids.saved.as_raw(),
        ])
    }

    fn capabilities(&mut self) -> Result<u64, Errno> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: with version 3 the kernel reads `header` and writes exactly two `CapData`
        // (the low and high 32 capability bits) into `data`, which is that long and lives
        // across the call; both types are `repr(C)` as the kernel declares them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Errno::last());
        }
        let word = |d: CapData| u64::from(d.permitted | d.effective);
        Ok(word(data[0]) | (word(data[1]) << 32))
    }

    fn regain_root(&mut self) -> Result<(), Errno> {
        self.setresuid(0)
    }

    fn set_no_new_privs(&mut self) -> Result<(), Errno> {
        nix::sys::prctl::set_no_new_privs()
    }

    fn reset_signals(&mut self) -> Result<(), Errno> {
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
        // SAFETY: installs SIG_DFL, not a handler, so no code can run in signal context.
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) }?;
        Ok(())
    }

    fn execve(&mut self, path: &CStr, argv: &[CString], envp: &[CString]) -> Errno {
        match nix::unistd::execve::<CString, CString>(path, argv, envp) {
            Ok(never) => match never {},
            Err(errno) => errno,
        }
    }
}
