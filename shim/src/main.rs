//! `secretd-shim`: the launcher of contract §4. It replaces itself (execve, same pid) with
//! PROGRAM, started with an environment built from nothing, as an unprivileged user, after
//! registering with the broker when asked. Static binary: it runs in images with no libc and
//! no shell, and resolves users from `/etc/passwd` and `/etc/group` itself.
//!
//! Flow: [`args`] (or [`config`] in interpreter mode) → [`plan::Launch`] → [`plan::build`]
//! (pure checks) → [`launch::launch`] (the privileged sequence, over [`sys::Sys`]).
//!
//! Decisions where the contract is silent:
//! - The safe PATH is `/usr/local/bin:/usr/bin:/bin`. `--keep PATH` copies the shim's PATH
//!   when present (else the safe PATH stays); `--set PATH=…` replaces it.
//! - PROGRAM without a `/` is searched in the PATH PROGRAM will get, like execvp (empty
//!   entries are skipped, not taken as the current directory; no `/bin/sh` fallback on
//!   ENOEXEC). `argv[0]` is PROGRAM as written; in interpreter mode it is the `exec` path and
//!   the original `argv[1..]` follow.
//! - `--group` defaults to the user's primary group from passwd. A numeric `--user` with no
//!   passwd entry and no `--group` is an error (never a made-up gid, never gid 0).
//!   `--group` without `--user` is an error. Supplementary groups are always cleared.
//! - Without `--user` the shim runs PROGRAM as the caller (no switch): allowed for non-root
//!   callers; as root it is refused unless `--allow-root`. `--user` needs the privilege to
//!   switch (root, or CAP_SETUID + CAP_SETGID), except on re-entry: an unprivileged caller
//!   whose real/effective/saved uid and gid already are the requested ones (a worker running
//!   `python3` again, i.e. the shim in interpreter mode) passes through with no identity
//!   change and no registration (it could do neither; the broker's descendant rule already
//!   gives it its parent worker's function). Root never takes this path.
//! - `SECRETD_SOCKET` is always set (`--socket`, config `socket`, else `SECRETD_SOCKET` from
//!   the shim's own environment when non-empty, else `/run/secretd/secretd.sock`; it must be
//!   absolute) and registration uses the same socket; `--keep`/`--set` of it is refused.
//!   Variable names must match `[A-Za-z_][A-Za-z0-9_]*`. Environment order: SECRETD_SOCKET,
//!   PATH, kept variables, set variables (a later one replaces an earlier one in place).
//! - `--config PATH -- NAME [ARG]...` runs `[program.NAME]` of PATH exactly as interpreter mode
//!   invoked as NAME would; it cannot be combined with other launch flags.
//! - Interpreter mode refuses an `exec` that is the shim itself (an exec loop).
//! - Registration is bounded by 5 s; any failure is exit 125 with the gRPC code and message.
//! - The signal mask is emptied and SIGPIPE restored to default; ignored signals otherwise
//!   stay ignored (as execve passes them on). cwd, umask, rlimits and the controlling terminal
//!   are inherited unchanged.

mod args;
mod config;
mod error;
mod launch;
mod plan;
mod register;
mod sys;

use std::{io::Write, os::unix::fs::MetadataExt, path::Path};

use crate::{
    args::Invocation,
    error::ShimError,
    plan::{Context, Launch, Origin},
};

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            // One line, naming the cause; never a value from the environment.
            let _ = writeln!(std::io::stderr(), "secretd-shim: {}", e.line());
            e.exit_code()
        }
    };
    std::process::exit(code);
}

/// Returns only for --help/--version or on failure: otherwise PROGRAM has replaced us.
fn run() -> Result<(), ShimError> {
    let invocation = args::parse(
        std::env::args_os().collect(),
        std::env::var_os(args::CONFIG_ENV),
    )?;
    let launch: Launch = match invocation {
        Invocation::Help => {
            print!("{}", args::USAGE);
            return Ok(());
        }
        Invocation::Version => {
            println!("secretd-shim {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Invocation::Launch(launch) => launch,
        Invocation::FromConfig { path, name, args } => {
            let launch = config::load(&path, &name, args)?;
            refuse_exec_loop(&launch)?;
            launch
        }
    };
    let (uids, gids) = sys::current_ids();
    let plan = plan::build(
        &launch,
        &Context {
            etc: Path::new("/etc"),
            uids,
            gids,
            getenv: &|name| std::env::var_os(name),
        },
    )?;
    match launch::launch(&mut sys::RealSys, &plan) {
        Ok(never) => match never {},
        Err(e) => Err(e),
    }
}

/// `exec` pointing at the shim itself would re-run the shim forever.
fn refuse_exec_loop(launch: &Launch) -> Result<(), ShimError> {
    let (Ok(target), Ok(me)) = (
        std::fs::metadata(&launch.program),
        std::fs::metadata("/proc/self/exe"),
    ) else {
        return Ok(()); // no /proc (a bare chroot) or no target: execve reports the latter
    };
    if (target.dev(), target.ino()) == (me.dev(), me.ino()) {
        let Origin::Config { path, name } = &launch.origin else {
            return Ok(());
        };
        return Err(ShimError::ExecIsShim {
            path: path.into(),
            name: name.clone(),
            exec: launch.program.to_string_lossy().into_owned(),
        });
    }
    Ok(())
}
