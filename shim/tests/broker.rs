//! Registration against the real broker (`secretd serve`): the shim's `--function` gives the
//! worker and a child it spawns the function's scope; the same uid launched without
//! `--function` gets none. Needs root (the broker and the uid switch) and the `secretd` binary
//! built beside the shim (`make build`, or `cargo build --workspace`); skips with the reason
//! otherwise. The e2e suite (tests/, pytest) covers the broker side in depth.
#![allow(unsafe_code)] // one pre_exec dup2 that hands the broker its ready pipe

mod common;

use std::{
    io::{BufRead, BufReader},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use common::*;

const SECRET_VALUE: &str = "broker-held-orders-db-value";

/// The broker binary of the same build as the shim under test.
fn broker_binary() -> Result<PathBuf, String> {
    let path = shim_path().with_file_name("secretd");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not built (cargo build --workspace, or make build)",
            path.display()
        ))
    }
}

/// A running broker in a temp dir, stopped (SIGTERM, then reaped) on drop.
struct Broker {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Broker {
    fn start(binary: &Path) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("run/secretd.sock");
        let config = dir.path().join("secretd.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nsocket = {socket:?}\naudit_log = {audit:?}\n\n\
                 [sources.env]\ninclude = [\"ORDERS_*\"]\n\n\
                 [[scope]]\nname = \"orders\"\nfunction = \"orders\"\nsecrets = [\"ORDERS_*\"]\n",
                socket = socket.display().to_string(),
                audit = dir.path().join("audit.jsonl").display().to_string(),
            ),
        )
        .unwrap();
        // Close-on-exec, so that no other process (the broker's original fds, children of
        // tests running in parallel) keeps the write end open; fd 3 in the broker is a dup2.
        let (ready_read, ready_write): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let write_fd = ready_write.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.args(["serve", "--config"])
            .arg(&config)
            .args(["--ready-fd", "3"])
            .env("ORDERS_DB", SECRET_VALUE)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("broker.log")).unwrap());
        // SAFETY (test): dup2 is async-signal-safe; fd 3 is the broker's --ready-fd.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(write_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start secretd serve");
        drop(ready_write);
        // "READY\n" once accepting; EOF (empty) if the broker exited first.
        let mut ready = String::new();
        BufReader::new(std::fs::File::from(ready_read))
            .read_line(&mut ready)
            .unwrap();
        let broker = Broker { child, socket, dir };
        assert_eq!(
            ready,
            "READY\n",
            "broker did not start: {}",
            std::fs::read_to_string(broker.dir.path().join("broker.log")).unwrap_or_default()
        );
        broker
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// The value after `field` in `secretd whoami`'s "field value" pairs
/// ("pid 1 uid 2 gid 3\nexe …\nfunction orders\nscopes orders").
fn whoami_field(text: &str, field: &str) -> String {
    text.lines()
        .flat_map(|l| {
            let words: Vec<&str> = l.split(' ').collect();
            words
                .chunks(2)
                .filter(|pair| pair.len() == 2 && pair[0] == field)
                .map(|pair| pair[1].to_owned())
                .collect::<Vec<_>>()
        })
        .next()
        .unwrap_or_else(|| panic!("no {field} in {text:?}"))
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn registration_gives_the_worker_and_its_child_the_function_scope() {
    require_root("registration_gives_the_worker_and_its_child_the_function_scope");
    let secretd = match broker_binary() {
        Ok(p) => p,
        Err(why) => panic!(
            "registration_gives_the_worker_and_its_child_the_function_scope cannot run: {why}"
        ),
    };
    let broker = Broker::start(&secretd);
    let socket = broker.socket.display().to_string();
    let secretd = secretd.display().to_string();
    let launch = |function: Option<&str>, program: &[&str]| {
        let mut cmd = shim();
        cmd.args(["--user", "nobody", "--socket", &socket]);
        if let Some(f) = function {
            cmd.args(["--function", f]);
        }
        let out = run(cmd.arg("--").args(program));
        (out.status.code(), stdout(&out), stderr(&out))
    };

    // The registered worker itself.
    let (code, out, err) = launch(Some("orders"), &[&secretd, "whoami"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(whoami_field(&out, "uid"), "65534");
    assert_eq!(whoami_field(&out, "function"), "orders");
    assert_eq!(whoami_field(&out, "scopes"), "orders");

    // A child of the registered worker (sh forks secretd: `; true` keeps sh from exec'ing it).
    let (code, out, err) = launch(
        Some("orders"),
        &["/bin/sh", "-c", &format!("{secretd} whoami; true")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(whoami_field(&out, "function"), "orders");
    let (code, out, err) = launch(
        Some("orders"),
        &["/bin/sh", "-c", &format!("{secretd} get ORDERS_DB; true")],
    );
    assert_eq!((code, out.as_str()), (Some(0), SECRET_VALUE), "{err}");

    // The same uid, not registered: no function, no scope, denied.
    let (code, out, err) = launch(None, &[&secretd, "whoami"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(whoami_field(&out, "function"), "-");
    assert_eq!(whoami_field(&out, "scopes"), "-");
    let (code, out, err) = launch(None, &[&secretd, "get", "ORDERS_DB"]);
    assert_ne!(code, Some(0));
    assert!(!out.contains(SECRET_VALUE) && !err.contains(SECRET_VALUE));
    assert!(err.contains("PERMISSION_DENIED"), "{err}");

    // A caller outside admin_uids cannot register: 125, with the broker's reason.
    let mut cmd = shim();
    cmd.uid(65534).gid(65534).args([
        "--function",
        "orders",
        "--socket",
        &socket,
        "--",
        "/bin/true",
    ]);
    let out = run(&mut cmd);
    assert_shim_error(
        &out,
        125,
        &format!(
            "cannot register as function \"orders\" with the broker at {socket}: PERMISSION_DENIED: "
        ),
    );
}
