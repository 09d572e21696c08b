//! Test harness: a real `secretd serve` process on a temp socket, and real clients — the
//! in-process tonic client (as root) or the `secretd` CLI run as another uid.
#![allow(dead_code, unsafe_code)]

use std::{
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use secretd_proto::v1::{self as pb, admin_client::AdminClient, secrets_client::SecretsClient};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_secretd");

/// Uids/gids the tests switch to. Not in /etc/passwd: the kernel does not care.
pub const UID_ORDERS: u32 = 64201;
pub const UID_OTHER: u32 = 64202;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Root tests are `#[ignore = "needs root…"]`: they run only when asked for (`make test` asks
/// when it runs as root or under CI=true), and then a missing root fails them — a test that
/// did not run never reports ok.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            common::is_root(),
            "this test needs root (it switches uids / reads other processes' /proc): run it as root"
        );
    };
}

/// A value unlikely to appear anywhere by chance.
pub fn unique_value(tag: &str) -> String {
    let mut buf = [0u8; 16];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
    format!("{tag}-{hex}")
}

/// A temp directory every uid can traverse, holding a copy of the binary other uids can run.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("secretd-test-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.path().join("secretd");
        fs::copy(BIN, &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("run/secretd.sock")
    }

    pub fn audit(&self) -> PathBuf {
        self.path().join("audit.jsonl")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("secretd.toml")
    }

    /// Write the config; `{socket}`, `{audit}` and `{dir}` are substituted.
    pub fn write_config(&self, body: &str) {
        let body = body
            .replace("{socket}", &self.socket().display().to_string())
            .replace("{audit}", &self.audit().display().to_string())
            .replace("{dir}", &self.path().display().to_string());
        fs::write(self.config_path(), body).unwrap();
    }

    pub fn bin(&self) -> PathBuf {
        self.path().join("secretd")
    }
}

pub struct Broker {
    pub child: Option<Child>,
    pub pid: u32,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

/// Start `secretd serve` with exactly `env` as its environment; wait for READY.
pub fn start(sb: &Sandbox, env: &[(&str, &str)]) -> Broker {
    match try_start(sb, env, &[]) {
        Ok(b) => b,
        Err(out) => panic!("broker failed to start: {out}"),
    }
}

/// Like [`start`], returning the broker's stderr when it exits before READY.
pub fn try_start(
    sb: &Sandbox,
    env: &[(&str, &str)],
    extra_args: &[&str],
) -> Result<Broker, String> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let stderr_path = sb
        .path()
        .join(format!("broker-{}.log", unique_value("log")));
    let stderr = fs::File::create(&stderr_path).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--config")
        .arg(sb.config_path())
        .arg("--socket")
        .arg(sb.socket())
        .args(["--ready-fd", "3"])
        .args(extra_args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let raw = write_end.as_raw_fd();
    // SAFETY: between fork and exec we only call dup2, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(write_end);
    let ready = wait_ready(read_end, Duration::from_secs(30));
    if !ready {
        // The ready pipe closes before the error is printed: let the broker finish exiting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        return Err(fs::read_to_string(&stderr_path).unwrap_or_default());
    }
    Ok(Broker {
        pid: child.id(),
        child: Some(child),
        socket: sb.socket(),
        stderr: stderr_path,
    })
}

fn wait_ready(fd: OwnedFd, limit: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut file = fs::File::from(fd);
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&file),
            PollFlags::POLLIN,
        )];
        if poll(&mut fds, PollTimeout::from(500u16)).unwrap_or(0) == 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        match file.read(&mut buf) {
            Ok(0) | Err(_) => return got == b"READY\n",
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.ends_with(b"\n") {
            return got == b"READY\n";
        }
    }
    false
}

impl Broker {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig).unwrap();
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.take().unwrap().wait().unwrap()
    }

    /// SIGKILL and wait (a crash).
    pub fn crash(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn channel(socket: &Path) -> Channel {
    secretd::client::connect(socket).await.unwrap()
}

pub async fn secrets(socket: &Path) -> SecretsClient<Channel> {
    SecretsClient::new(channel(socket).await)
}

pub async fn admin(socket: &Path) -> AdminClient<Channel> {
    AdminClient::new(channel(socket).await)
}

/// Open a `WatchSecret` stream for `name` on `client`'s connection.
pub async fn open_watch(
    client: &mut SecretsClient<Channel>,
    name: &str,
) -> tonic::Streaming<pb::Secret> {
    client
        .watch_secret(pb::WatchSecretRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// `GetSecret(name)` on `client`'s connection, which must succeed: the value.
pub async fn value_of(client: &mut SecretsClient<Channel>, name: &str) -> Vec<u8> {
    client
        .get_secret(pb::GetSecretRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .value
}

/// `SetSecret` over a fresh admin connection, closed at once (as `secretd set` does).
pub async fn set_value(socket: &Path, name: &str, value: &[u8]) {
    admin(socket)
        .await
        .set_secret(pb::SetSecretRequest {
            name: name.into(),
            value: value.to_vec(),
        })
        .await
        .unwrap();
}

/// Run the `secretd` CLI as `uid`/`gid` (a real process of another user).
pub fn cli_as(sb: &Sandbox, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new(sb.bin())
        .args(args)
        .arg("--socket")
        .arg(sb.socket())
        .env_clear()
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Hand every readable mapping of `pid` to `f` (read through `/proc/<pid>/mem`; needs root).
pub fn for_each_mapping(pid: u32, mut f: impl FnMut(&[u8])) {
    use std::os::unix::fs::FileExt;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_ok() {
            f(&buf);
        }
    }
}

/// Count occurrences of `needle` in the memory of `pid` (needs root).
pub fn count_in_memory(pid: u32, needle: &[u8]) -> usize {
    counts_in_memory(pid, &[needle])[0]
}

/// For each of `needles`, how often it occurs in the memory of `pid` (needs root); one pass.
pub fn counts_in_memory(pid: u32, needles: &[impl AsRef<[u8]>]) -> Vec<usize> {
    let ac = aho_corasick::AhoCorasick::new(needles).unwrap();
    let mut counts = vec![0; needles.len()];
    for_each_mapping(pid, |buf| {
        for m in ac.find_iter(buf) {
            counts[m.pattern().as_usize()] += 1;
        }
    });
    counts
}

/// Poll `f` until it returns true (eventual consistency, not a timing assertion).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never happened: {what}");
}

/// Poll `f` until it returns `expected`; if it never does, fail showing the last value.
pub fn eventually_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    expected: T,
    mut f: impl FnMut() -> T,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = f();
        if got == expected || Instant::now() >= deadline {
            assert_eq!(got, expected, "{what}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
