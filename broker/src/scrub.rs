//! Start-up hardening: take the secrets out of the process environment and make the process
//! hard to inspect.
//!
//! Trusts: nothing but the kernel's `/proc/self/stat` for where the environment block lives.
//! Guarantees, once [`capture_and_wipe`] returns: every environment variable's value has been
//! copied once into a [`SecretBox`], the original block (`env_start..env_end`, the bytes
//! `/proc/self/environ` shows, even to root) is all zeros, and `environ` is empty.
//! [`harden`] then sets the process non-dumpable, forbids core files and locks memory.
//!
//! The caller must run both while the process has exactly one thread: `clearenv` and the raw
//! writes race with any thread reading the environment (a `#[tokio::main]` body is already
//! too late — call from a plain `fn main`).
#![allow(unsafe_code)]

use std::{ffi::OsString, os::unix::ffi::OsStringExt};

use secrecy::SecretBox;

use crate::procfs::ProcFs;

/// Variables read from the environment at start-up, before it was wiped.
pub struct CapturedEnv {
    /// Every variable with a UTF-8 name, in the order the kernel gave them.
    pub vars: Vec<(String, SecretBox<[u8]>)>,
    /// `RUST_LOG`, kept as plain text: it configures logging and is never a secret.
    pub rust_log: Option<String>,
}

impl std::fmt::Debug for CapturedEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.vars.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("CapturedEnv")
            .field("names", &names)
            .field("rust_log", &self.rust_log)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("failed to locate the environment block in /proc/self/stat: {0}")]
    Locate(#[from] crate::procfs::ProcError),
    #[error("the environment block is still readable in /proc/self/environ after the wipe")]
    NotWiped,
}

/// Copy every variable out of the environment, then zero the original block and empty
/// `environ`. See the module docs for the single-thread requirement.
pub fn capture_and_wipe(proc: &ProcFs) -> Result<CapturedEnv, ScrubError> {
    let mut vars = Vec::new();
    let mut rust_log = None;
    for (name, value) in std::env::vars_os() {
        // The `OsString`s are freed right here; the global allocator clears them on free.
        let Ok(name) = name.into_string() else {
            continue;
        };
        if name == "RUST_LOG" {
            rust_log = value.to_str().map(str::to_owned);
        }
        vars.push((name, into_secret(value)));
    }

    let stat = proc.stat(std::process::id())?;
    let (start, end) = (stat.env_start as usize, stat.env_end as usize);
    if end > start {
        // SAFETY: the kernel reports `env_start..env_end` as the environment strings it copied
        // onto our stack at exec; that range is mapped read-write for the life of the process.
        // We are single-threaded (module contract), so no one reads it concurrently. Volatile
        // writes keep the compiler from treating the stores as dead.
        unsafe {
            let base = start as *mut u8;
            for i in 0..end - start {
                std::ptr::write_volatile(base.add(i), 0);
            }
        }
    }
    // SAFETY: single-threaded (module contract); `clearenv` only resets libc's `environ`
    // pointer, whose strings we have just zeroed, and nothing holds references into it.
    unsafe {
        libc::clearenv();
    }

    let shown = proc.environ(std::process::id())?;
    if shown.iter().any(|&b| b != 0) {
        return Err(ScrubError::NotWiped);
    }
    Ok(CapturedEnv { vars, rust_log })
}

fn into_secret(value: OsString) -> SecretBox<[u8]> {
    // `into_boxed_slice` may shrink (a realloc); the allocator clears the old block.
    SecretBox::new(value.into_vec().into_boxed_slice())
}

/// What [`harden`] could not do. Each is logged as a warning once logging is up.
#[derive(Debug, Default)]
pub struct HardenReport {
    pub warnings: Vec<String>,
    /// Whether memory is locked against swap, and how.
    pub memory_lock: &'static str,
}

/// Non-dumpable (other uids and the same uid lose `/proc/<pid>/{environ,mem}` and ptrace), no
/// core files, memory locked against swap when the limits allow it.
pub fn harden() -> HardenReport {
    let mut report = HardenReport::default();
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        report
            .warnings
            .push(format!("failed to set the process non-dumpable: {e}"));
    }
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0) {
        report
            .warnings
            .push(format!("failed to set RLIMIT_CORE to 0: {e}"));
    }
    report.memory_lock = lock_memory(&mut report.warnings);
    report
}

/// Whether our effective capabilities include `CAP_IPC_LOCK` (bit 14), which exempts us from
/// `RLIMIT_MEMLOCK`.
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The `MCL_*` flags memory was locked with at start-up (0: not locked).
static LOCKED_WITH: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Run `f` (a heap trim) with memory unlocked, then lock it again as at start-up. Locked pages
/// cannot be given back (`madvise(MADV_DONTNEED)` fails on them), so a trim must unlock first;
/// with `MCL_ONFAULT` the relock does not fault the released pages back in. For the
/// milliseconds in between, pages could in principle be swapped: acceptable for a best-effort
/// lock, and it happens only after connections have closed in numbers.
pub fn with_memory_unlocked(f: impl FnOnce()) {
    let flags = LOCKED_WITH.load(std::sync::atomic::Ordering::Relaxed);
    if flags == 0 || crate::sys::munlockall().is_err() {
        f();
        return;
    }
    f();
    if let Err(e) = crate::sys::mlockall(flags) {
        tracing::warn!(error = %e, "failed to lock memory again after a heap trim");
    }
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE)` only when the memlock limit is unlimited: with a finite
/// limit, MCL_FUTURE would make ordinary allocations fail once the limit is reached, which
/// would take the broker down. Otherwise lock what is mapped now (the secrets read from the
/// environment) and say that later allocations are not locked.
fn lock_memory(warnings: &mut Vec<String>) -> &'static str {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    // CAP_IPC_LOCK lifts the limit entirely (root usually has it).
    let unlimited = has_cap_ipc_lock()
        || match getrlimit(Resource::RLIMIT_MEMLOCK) {
            Ok((soft, _)) if soft == RLIM_INFINITY => true,
            Ok((_, hard)) if hard == RLIM_INFINITY => {
                setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok()
            }
            _ => false,
        };
    // MCL_ONFAULT: lock pages as they are touched instead of faulting in every mapping now —
    // plain MCL_CURRENT would read the whole binary (~10 MiB) into locked memory for nothing.
    // Secret pages are touched when written, so they are locked all the same.
    let flags = if unlimited {
        libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT
    } else {
        libc::MCL_CURRENT | libc::MCL_ONFAULT
    };
    if let Err(e) = crate::sys::mlockall(flags) {
        LOCKED_WITH.store(0, std::sync::atomic::Ordering::Relaxed);
        warnings.push(format!(
            "failed to lock memory against swap (mlockall): {e}; secrets may be swapped out \
             (raise LimitMEMLOCK/RLIMIT_MEMLOCK or grant CAP_IPC_LOCK)"
        ));
        return "none";
    }
    LOCKED_WITH.store(flags, std::sync::atomic::Ordering::Relaxed);
    if unlimited {
        "all"
    } else {
        warnings.push(
            "RLIMIT_MEMLOCK is finite: memory mapped at start-up is locked, later allocations \
             are not (set LimitMEMLOCK=infinity to lock everything)"
                .to_owned(),
        );
        "start-up only"
    }
}
