//! Supervisor mode: `secretd serve [flags] -- PROGRAM [ARG]...` (contract §9), the container
//! entrypoint that needs no shell.
//!
//! Once the broker is READY it starts PROGRAM as its child with the environment the broker was
//! given minus every variable `[sources.env]` selects (brokered or not kept because its name is
//! not a valid secret name — a name the operator asked to broker never reaches the child), plus
//! `SECRETD_SOCKET`. Then it is PROGRAM's init:
//! - it is a child subreaper (`PR_SET_CHILD_SUBREAPER`; as PID 1 it is the namespace's reaper
//!   anyway) and reaps every child that exits — PROGRAM's orphans included — with
//!   `waitpid(-1, WNOHANG)` on each `SIGCHLD`, recording PROGRAM's own status;
//! - `SIGTERM`/`SIGINT` are forwarded to PROGRAM's pid (not its process group) and the broker
//!   keeps serving until PROGRAM has exited, so PROGRAM can still read secrets while it shuts
//!   down. The wait is bounded by whoever sent the signal (`docker stop`'s grace period, then
//!   `SIGKILL`; systemd's `TimeoutStopSec`), not by the broker;
//! - when PROGRAM exits, the broker stops as on `SIGTERM` (socket removed, secrets zeroized) and
//!   secretd exits with PROGRAM's status, `128 + N` when signal N killed it.
//!
//! Trusts: PROGRAM and its argv, which come from the operator (the command line). Guarantees:
//! PROGRAM's environment never holds a value `[sources.env]` selected; no brokered value is
//! ever copied out of its `SecretBox` (only variables the source did not select are).
//! The caller must handle: nothing else in this process may start or wait for child processes
//! — the reaper collects every child, so a `std::process::Child::wait` elsewhere would race it.
//! The broker starts no other process today; keep it that way or route it through here.

use std::{
    ffi::OsString,
    io,
    os::{fd::OwnedFd, unix::ffi::OsStringExt},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use secrecy::{ExposeSecret, SecretBox};
use tokio::{
    io::AsyncReadExt,
    signal::unix::{Signal as SignalStream, SignalKind, signal},
};

use crate::{config::EnvSource, server::BrokerError, state::Broker};

/// Exit status when PROGRAM exists but cannot be executed (as the shim and POSIX shells do).
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit status when PROGRAM is not found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// Set in PROGRAM's environment to the broker's socket (contract §1).
pub const SOCKET_VAR: &str = "SECRETD_SOCKET";

/// What supervisor mode runs once the broker is ready.
pub struct Program {
    /// PROGRAM and its arguments, exactly as given after `--`.
    pub argv: Vec<OsString>,
    /// The environment PROGRAM gets: the variables `[sources.env]` did not select.
    pub env: Vec<(OsString, OsString)>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.env.iter().map(|(n, _)| n).collect();
        f.debug_struct("Program")
            .field("argv", &self.argv)
            .field("env_names", &names)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("failed to install the {0} handler: {1}")]
    Signal(&'static str, io::Error),
    #[error("failed to create the readiness pipe: {0}")]
    Pipe(io::Error),
    #[error("failed to become a child subreaper: {0}")]
    Subreaper(Errno),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker task failed: {0}")]
    Task(String),
}

impl Program {
    /// PROGRAM with the environment left once every variable `source` selects is removed.
    /// Only unselected values are copied out of their `SecretBox`; brokered ones are not read.
    pub fn new(
        argv: Vec<OsString>,
        source: &EnvSource,
        vars: &[(String, SecretBox<[u8]>)],
    ) -> Program {
        let env = vars
            .iter()
            .filter(|(name, _)| !source.selects(name))
            .map(|(name, value)| {
                (
                    OsString::from(name),
                    OsString::from_vec(value.expose_secret().to_vec()),
                )
            })
            .collect();
        Program { argv, env }
    }

    fn display_name(&self) -> String {
        self.argv
            .first()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Serve until PROGRAM exits (or, before it started, until SIGTERM/SIGINT), then stop the broker
/// cleanly and return the status secretd should exit with.
pub async fn serve_and_supervise(
    broker: Arc<Broker>,
    listener: std::os::unix::net::UnixListener,
    ready: Option<std::fs::File>,
    program: Program,
) -> Result<ExitCode, SuperviseError> {
    // Every handler exists before the child can: no SIGCHLD or SIGTERM is lost.
    let mut signals = Signals::install()?;
    nix::sys::prctl::set_child_subreaper(true).map_err(SuperviseError::Subreaper)?;
    let (ready_rx, ready_tx) = std::io::pipe().map_err(SuperviseError::Pipe)?;
    let ready_rx = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(ready_rx))
        .map_err(SuperviseError::Pipe)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut served = tokio::spawn(crate::server::serve(
        Arc::clone(&broker),
        listener,
        async move {
            let _ = stop_rx.await;
        },
        Some(std::fs::File::from(OwnedFd::from(ready_tx))),
    ));

    let supervised = tokio::select! {
        r = wait_ready(ready_rx) => r,
        s = signals.stop() => {
            tracing::info!("{s} before PROGRAM was started: stopping without starting it");
            false
        }
        r = &mut served => {
            // The broker failed before READY: its error is the one to report.
            return finish(r).map(|()| ExitCode::FAILURE);
        }
    };
    let code = if supervised {
        if let Some(mut ready) = ready {
            use std::io::Write;
            if let Err(e) = ready.write_all(b"READY\n") {
                tracing::warn!(error = %e, "failed to write READY to --ready-fd");
            }
        }
        run(&program, &broker.socket, &mut signals, &mut served).await
    } else {
        Supervised::Status(0)
    };
    let _ = stop_tx.send(());
    match code {
        Supervised::Status(code) => finish(served.await).map(|()| ExitCode::from(code)),
        Supervised::BrokerEnded(r) => finish(r).map(|()| ExitCode::FAILURE),
    }
}

fn finish(
    joined: Result<Result<(), BrokerError>, tokio::task::JoinError>,
) -> Result<(), SuperviseError> {
    joined.map_err(|e| SuperviseError::Task(e.to_string()))??;
    Ok(())
}

/// Whether the broker wrote READY (EOF: it stopped before it was ready).
async fn wait_ready(mut rx: tokio::net::unix::pipe::Receiver) -> bool {
    let mut line = [0u8; 6];
    rx.read_exact(&mut line).await.is_ok() && &line == b"READY\n"
}

enum Supervised {
    /// PROGRAM ended (or was never started): exit with this status.
    Status(u8),
    /// The broker stopped on its own (an error) while PROGRAM ran; PROGRAM has been waited for.
    BrokerEnded(Result<Result<(), BrokerError>, tokio::task::JoinError>),
}

/// Start PROGRAM, reap every child, forward stop signals, until PROGRAM's status is known.
async fn run(
    program: &Program,
    socket: &Path,
    signals: &mut Signals,
    served: &mut tokio::task::JoinHandle<Result<(), BrokerError>>,
) -> Supervised {
    let name = program.display_name();
    // Spawned from this task, before the reaper below first runs: std's `spawn` waits for a
    // child whose exec failed, and nothing may reap that child under it.
    let pid = match spawn(program, socket) {
        Ok(pid) => pid,
        Err(e) => {
            let code = match e.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXECUTE,
            };
            tracing::error!(program = %name, error = %e, exit = code, "cannot start PROGRAM");
            eprintln!("secretd: cannot start PROGRAM {name}: {e}");
            return Supervised::Status(code);
        }
    };
    tracing::info!(program = %name, pid = pid.as_raw(), "PROGRAM started");
    let mut broker_ended = None;
    loop {
        if let Some(code) = reap(pid) {
            tracing::info!(program = %name, pid = pid.as_raw(), exit = code, "PROGRAM exited; stopping");
            return match broker_ended {
                Some(r) => Supervised::BrokerEnded(r),
                None => Supervised::Status(code),
            };
        }
        tokio::select! {
            event = signals.next() => {
                if let Some(s) = event {
                    forward(pid, s);
                }
            }
            r = &mut *served, if broker_ended.is_none() => {
                tracing::error!("the broker stopped while PROGRAM runs; sending it SIGTERM");
                broker_ended = Some(r);
                forward(pid, Signal::SIGTERM);
            }
        }
    }
}

fn spawn(program: &Program, socket: &Path) -> io::Result<Pid> {
    let Some((exe, args)) = program.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no PROGRAM given"));
    };
    // std resets SIGPIPE and the signal mask in the child; descriptors it or tokio opened are
    // close-on-exec, so PROGRAM inherits stdio and whatever secretd itself inherited.
    let child = std::process::Command::new(exe)
        .args(args)
        .env_clear()
        .envs(program.env.iter().map(|(n, v)| (n, v)))
        .env(SOCKET_VAR, socket_for_child(socket))
        .spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    // Dropping a `Child` neither kills nor waits for it: the reaper owns its exit status.
    drop(child);
    Ok(Pid::from_raw(pid))
}

/// Reap every child that has exited; PROGRAM's exit status if it was among them.
fn reap(program: Pid) -> Option<u8> {
    let mut status = None;
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                status = Some(u8::try_from(code & 0xff).unwrap_or(u8::MAX));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                status = Some(128u8.saturating_add(u8::try_from(sig as i32).unwrap_or(127)));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return status,
            Ok(other) => {
                tracing::debug!(pid = other.pid().map(Pid::as_raw), "reaped an orphan");
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return status;
            }
        }
    }
}

fn forward(pid: Pid, signal: Signal) {
    tracing::info!(pid = pid.as_raw(), "forwarding {signal} to PROGRAM");
    if let Err(e) = kill(pid, signal) {
        // ESRCH: PROGRAM is already gone; the next SIGCHLD reaps it.
        tracing::debug!(error = %e, "forwarding {signal} failed");
    }
}

struct Signals {
    child: SignalStream,
    term: SignalStream,
    int: SignalStream,
}

impl Signals {
    fn install() -> Result<Signals, SuperviseError> {
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|e| SuperviseError::Signal(name, e))
        };
        Ok(Signals {
            child: install(SignalKind::child(), "SIGCHLD")?,
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The next SIGCHLD (`None`: time to reap) or stop signal to forward.
    async fn next(&mut self) -> Option<Signal> {
        tokio::select! {
            _ = self.child.recv() => None,
            _ = self.term.recv() => Some(Signal::SIGTERM),
            _ = self.int.recv() => Some(Signal::SIGINT),
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn stop(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
        }
    }
}

/// The socket path PROGRAM is told about (as an absolute path when the broker's is relative).
pub fn socket_for_child(socket: &Path) -> PathBuf {
    std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(name: &str, value: &str) -> (String, SecretBox<[u8]>) {
        (
            name.to_owned(),
            SecretBox::new(value.as_bytes().to_vec().into_boxed_slice()),
        )
    }

    #[test]
    fn child_environment_drops_every_selected_variable() {
        let source = EnvSource::new(
            vec!["ORDERS_*".into(), "SHARED_*".into(), "bad name*".into()],
            vec!["ORDERS_PUBLIC".into()],
        )
        .unwrap();
        let vars = [
            var("PATH", "/usr/bin"),
            var("ORDERS_DB", "secret-1"),
            var("SHARED_KEY", "secret-2"),
            var("ORDERS_PUBLIC", "not-a-secret"),
            var("bad name x", "secret-3"),
            var("LANG", "C.UTF-8"),
        ];
        let program = Program::new(vec!["/bin/true".into()], &source, &vars);
        let env: Vec<(String, String)> = program
            .env
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        assert_eq!(
            env,
            [
                ("PATH".to_owned(), "/usr/bin".to_owned()),
                ("ORDERS_PUBLIC".to_owned(), "not-a-secret".to_owned()),
                ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ]
        );
        let shown = format!("{program:?}");
        assert!(
            !shown.contains("/usr/bin\"") && !shown.contains("C.UTF-8"),
            "{shown}"
        );
    }
}
