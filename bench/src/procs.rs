//! The processes under test: a real `secretd serve` (config, secret files and socket in a temp
//! dir) and the echo floor (this binary's `echo` subcommand). Both report readiness through
//! `--ready-fd`, so start-up can be timed from exec to READY.

use std::{
    fmt::Write as _,
    fs,
    io::Read,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The secret every latency loop reads, and its value's size (a typical connection string).
pub const NAME: &str = "APP_DB";
pub const VALUE: &str = "postgres://orders:hunter2-s3cret-0123456789@db.internal:5432/orders";

/// A child process that said READY, and how long that took from `spawn`.
#[derive(Debug)]
pub struct Running {
    pub child: Child,
    pub socket: PathBuf,
    pub ready_after: Duration,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, `RssFile`, …).
    pub fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/<pid>/status"))
    }

    /// SIGTERM, then wait (SIGKILL after 5 s).
    pub fn stop(mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn `cmd` with `--ready-fd N` appended, N being the write end of a fresh pipe; wait for
/// `READY\n` on the read end.
pub fn spawn_ready(mut cmd: Command, socket: PathBuf, log: &Path) -> anyhow::Result<Running> {
    // Not CLOEXEC: the child inherits the write end under the same number. The read end is
    // made CLOEXEC so the child does not hold it. (The bench spawns one child at a time.)
    let (read_end, write_end) = nix::unistd::pipe()?;
    fcntl(&read_end, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    cmd.arg("--ready-fd")
        .arg(write_end.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?);
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning the server")?;
    drop(write_end);
    match wait_ready(&read_end, Duration::from_secs(60)) {
        Ok(()) => Ok(Running {
            child,
            socket,
            ready_after: start.elapsed(),
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = fs::read_to_string(log).unwrap_or_default();
            bail!("{e}; its stderr:\n{stderr}")
        }
    }
}

fn wait_ready(fd: &OwnedFd, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut file = fs::File::from(fd.try_clone()?);
    let mut got = Vec::new();
    while !got.ends_with(b"READY\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no READY within {timeout:?}");
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&file),
            PollFlags::POLLIN,
        )];
        if poll(&mut fds, PollTimeout::from(ms))? == 0 {
            continue;
        }
        let mut buf = [0u8; 16];
        let n = file.read(&mut buf)?;
        if n == 0 {
            bail!("the server exited before READY");
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// How the broker under test is set up.
#[derive(Debug, Clone, Copy)]
pub struct BrokerShape {
    /// Secret files (one of them is [`NAME`]).
    pub secrets: usize,
    /// Scopes in the policy.
    pub scopes: usize,
    /// How many of them the bench's uid matches (the last `matched` in config order; only the
    /// very last covers [`NAME`], so a scan over the caller's scopes visits all of them).
    pub matched: usize,
}

/// A temp dir holding a broker's config, secret files, socket and logs.
#[derive(Debug)]
pub struct BrokerDir {
    pub dir: tempfile::TempDir,
    /// The audit log goes to stderr, and stderr to `/dev/null` (what a call costs without its
    /// audit file).
    audit_nowhere: bool,
}

impl BrokerDir {
    pub fn new(shape: BrokerShape) -> anyhow::Result<BrokerDir> {
        BrokerDir::with_audit(shape, false)
    }

    /// `nowhere`: the audit log to stderr and stderr to `/dev/null`; else to `audit.jsonl`.
    pub fn with_audit(shape: BrokerShape, nowhere: bool) -> anyhow::Result<BrokerDir> {
        let dir = tempfile::Builder::new()
            .prefix("secretd-bench-")
            .tempdir_in("/tmp")?;
        let secrets = dir.path().join("secrets");
        fs::create_dir(&secrets)?;
        fs::write(secrets.join(NAME), VALUE)?;
        for i in 1..shape.secrets {
            // Names and values shaped like real ones; values all distinct.
            fs::write(
                secrets.join(format!("team{:04}_SECRET_{i:05}", i % 1000)),
                format!("value-{i:05}-{}", "v".repeat(40)),
            )?;
        }
        let uid = nix::unistd::geteuid().as_raw();
        let mut config = format!(
            "[server]\nsocket = \"{socket}\"\nsocket_mode = \"0666\"\nadmin_uids = [{uid}]\n\
             audit_log = \"{audit}\"\n\n[sources.env]\ninclude = []\n\n\
             [sources.files]\ndirs = [\"{secrets}\"]\n\n[log]\nlevel = \"info\"\n",
            socket = dir.path().join("run/secretd.sock").display(),
            audit = if nowhere {
                "stderr".to_owned()
            } else {
                dir.path().join("audit.jsonl").display().to_string()
            },
            secrets = secrets.display(),
        );
        for i in 0..shape.scopes {
            let last = i + 1 == shape.scopes;
            let mine = i + shape.matched >= shape.scopes;
            // Unmatched scopes belong to other uids; each scope grants its team's names.
            let who = if mine { uid } else { 100_000 + i as u32 };
            let mut patterns = format!("\"team{i:04}_*\", \"shared/team{i:04}/**\"");
            if last {
                let _ = write!(patterns, ", \"APP_*\"");
            }
            let _ = write!(
                config,
                "\n[[scope]]\nname = \"scope-{i:04}\"\nuid = {who}\nsecrets = [{patterns}]\n"
            );
        }
        fs::create_dir(dir.path().join("run"))?;
        fs::write(dir.path().join("secretd.toml"), config)?;
        Ok(BrokerDir {
            dir,
            audit_nowhere: nowhere,
        })
    }

    pub fn audit(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/secretd.sock")
    }

    /// Start `secretd serve` on this dir's config with an empty environment (on `cpu` only,
    /// if given).
    pub fn start(&self, secretd: &Path, cpu: Option<usize>) -> anyhow::Result<Running> {
        let mut cmd = command_on(secretd, cpu);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("secretd.toml"))
            .env_clear();
        let log = if self.audit_nowhere {
            PathBuf::from("/dev/null")
        } else {
            self.dir.path().join("broker.log")
        };
        spawn_ready(cmd, self.socket(), &log)
    }
}

/// Start this binary's echo floor on `socket`; `clearing` turns on the clearing allocator.
pub fn start_echo(
    socket: &Path,
    clearing: bool,
    log: &Path,
    cpu: Option<usize>,
) -> anyhow::Result<Running> {
    let mut cmd = command_on(&std::env::current_exe()?, cpu);
    cmd.arg("echo")
        .arg("--socket")
        .arg(socket)
        .arg("--value-len")
        .arg(VALUE.len().to_string());
    if clearing {
        cmd.arg("--clearing-alloc");
    }
    spawn_ready(cmd, socket.to_owned(), log)
}

/// `program`, run on one CPU through `taskset` when `cpu` is given (taskset execs it: same pid).
fn command_on(program: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(cpu.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Restrict the calling (main) thread to `cpus` (a taskset list such as `0` or `0-1`).
pub fn pin_main_thread(cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    anyhow::ensure!(status.success(), "taskset -p -c {cpus} failed");
    Ok(())
}
