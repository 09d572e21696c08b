//! The real `secretd-shim` binary, run as real processes: environment, identity, fds, exit
//! codes, refusal of root and registration failure. Tests that switch users need root (CI runs
//! as root) and are `#[ignore]`d with the reason otherwise.
//!
//! `unsafe` appears only in `pre_exec` hooks that set up what a platform leaks into the shim
//! (blocked signals, extra groups, non-CLOEXEC fds).
#![allow(unsafe_code)]

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::Stdio,
};

use common::*;

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn worker_environment_holds_only_socket_path_kept_and_set() {
    require_root("worker_environment_holds_only_socket_path_kept_and_set");
    let out = run(shim().args([
        "--user",
        "nobody",
        "--keep",
        "LANG",
        "--keep",
        "NOT_IN_THE_ENVIRONMENT",
        "--set",
        "GREETING=hello world",
        "--",
        "/usr/bin/env",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "SECRETD_SOCKET={DEFAULT_SOCKET}\nPATH={SAFE_PATH}\nLANG=C.UTF-8\nGREETING=hello world\n"
        )
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn keep_path_socket_and_set_path() {
    require_root("keep_path_socket_and_set_path");
    let out = run(shim()
        .env("PATH", "/opt/custom/bin:/usr/bin:/bin")
        .args([
            "--user",
            "nobody",
            "--keep",
            "PATH",
            "--socket",
            "/tmp/other.sock",
        ])
        .args(["--", "env"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "SECRETD_SOCKET=/tmp/other.sock\nPATH=/opt/custom/bin:/usr/bin:/bin\n"
    );
    let out = run(shim().args(["--user", "nobody", "--set", "PATH=/bin", "--", "env"]));
    assert_eq!(
        stdout(&out),
        format!("SECRETD_SOCKET={DEFAULT_SOCKET}\nPATH=/bin\n")
    );
}

/// What the kernel shows for the running worker: its initial environment block, and the same
/// pid the shim was started with.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn proc_environ_of_a_running_worker() {
    require_root("proc_environ_of_a_running_worker");
    let mut child = shim()
        .args(["--user", "nobody", "--keep", "TZ", "--"])
        .args(["/bin/sh", "-c", "echo ready; read line; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut ready = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n");
    // Read while the worker waits on stdin: exec already happened (it printed), same pid.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let code = child.wait().unwrap().code();

    let vars: Vec<String> = environ
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(
        vars,
        [
            format!("SECRETD_SOCKET={DEFAULT_SOCKET}"),
            format!("PATH={SAFE_PATH}"),
            "TZ=UTC".to_owned()
        ]
    );
    assert_no_secret(&String::from_utf8_lossy(&environ));
    assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
    assert!(
        exe.ends_with("dash") || exe.ends_with("sh") || exe.ends_with("bash"),
        "{exe:?}"
    );
    assert_eq!(code, Some(3));
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn privileges_are_dropped_and_no_new_privs_set() {
    require_root("privileges_are_dropped_and_no_new_privs_set");
    let (uid, gid) = passwd_entry("nobody").expect("nobody in /etc/passwd");
    let mut cmd = shim();
    cmd.args(["--user", "nobody", "--", "/bin/cat", "/proc/self/status"]);
    // SAFETY (test): block SIGUSR1 and give the shim supplementary groups; both must be gone
    // in the worker. Only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(nix::sys::signal::Signal::SIGUSR1);
            set.thread_block()?;
            nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(1), 4.into()])?;
            Ok(())
        });
    }
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = stdout(&out);
    assert_eq!(
        status_field(&status, "Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(
        status_field(&status, "Gid"),
        format!("{gid}\t{gid}\t{gid}\t{gid}")
    );
    assert_eq!(status_field(&status, "Groups"), "");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "SigBlk"), "0000000000000000");
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm"), "0000000000000000");
    // The Rust runtime ignores SIGPIPE; the worker must get the default action back.
    let ignored = u64::from_str_radix(status_field(&status, "SigIgn"), 16).unwrap();
    assert_eq!(
        ignored & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE still ignored"
    );
}

/// A platform that set SECBIT_NO_SETUID_FIXUP keeps capabilities across the uid switch: the
/// shim must notice and refuse, not start PROGRAM with them.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn capabilities_kept_across_the_switch_are_refused() {
    require_root("capabilities_kept_across_the_switch_are_refused");
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    let mut cmd = shim();
    cmd.args(["--user", "nobody", "--", "/bin/true"]);
    // SAFETY (test): prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!(
            "capabilities_kept_across_the_switch_are_refused cannot run: cannot set securebits here ({e})"
        ),
    };
    assert_shim_error(&out, 125, "capabilities 0x");
    assert!(
        stderr(&out).contains("are still held after switching to uid 65534; refusing to continue"),
        "{}",
        stderr(&out)
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn users_and_groups_by_name_or_number() {
    require_root("users_and_groups_by_name_or_number");
    let ids = |args: &[&str]| {
        let out = run(shim()
            .args(args)
            .args(["--", "/bin/cat", "/proc/self/status"]));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let s = stdout(&out);
        (
            status_field(&s, "Uid")
                .split('\t')
                .next()
                .unwrap()
                .to_owned(),
            status_field(&s, "Gid")
                .split('\t')
                .next()
                .unwrap()
                .to_owned(),
        )
    };
    let (daemon_uid, daemon_gid) = passwd_entry("daemon").expect("daemon in /etc/passwd");
    assert_eq!(
        ids(&["--user", "daemon"]),
        (daemon_uid.to_string(), daemon_gid.to_string())
    );
    let daemon_group = group_gid("daemon").expect("daemon in /etc/group");
    assert_eq!(
        ids(&["--user", "65534", "--group", "daemon"]),
        ("65534".into(), daemon_group.to_string())
    );
    assert_eq!(
        ids(&["--user=4242", "--group=4343"]),
        ("4242".into(), "4343".into())
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn inherited_fds_are_closed() {
    require_root("inherited_fds_are_closed");
    let listing = |through_shim: bool| {
        let file = std::fs::File::open("/etc/passwd").unwrap();
        let mut cmd = if through_shim {
            let mut c = shim();
            c.args(["--user", "nobody", "--"]);
            c
        } else {
            command("/usr/bin/env")
        };
        cmd.args(["/bin/ls", "/proc/self/fd"]);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY (test): dup2 is async-signal-safe; the copies are not close-on-exec, like
        // fds a platform leaks into its children.
        unsafe {
            cmd.pre_exec(move || {
                for target in [7, 100] {
                    if libc::dup2(raw, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = run(&mut cmd);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
            .split_whitespace()
            .map(|s| s.parse::<i32>().unwrap())
            .collect::<Vec<_>>()
    };
    // Control: without the shim, the leaked fds reach the program.
    let direct = listing(false);
    assert!(direct.contains(&7) && direct.contains(&100), "{direct:?}");
    // Through the shim only stdio remains (plus the fd ls uses to read the directory).
    let fds = listing(true);
    assert!(!fds.contains(&7) && !fds.contains(&100), "{fds:?}");
    assert!(fds.iter().all(|&fd| fd <= 3), "{fds:?}");
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn exit_status_and_pid_are_the_workers() {
    require_root("exit_status_and_pid_are_the_workers");
    let out = run(shim().args(["--user", "nobody", "--", "/bin/sh", "-c", "exit 42"]));
    assert_eq!(out.status.code(), Some(42));
    assert!(out.stderr.is_empty());

    let child = shim()
        .args(["--user", "nobody", "--", "/bin/sh", "-c", "echo $$"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        stdout(&out).trim(),
        pid.to_string(),
        "exec in place keeps the pid"
    );

    let out = run(shim().args(["--user", "nobody", "--", "/bin/sh", "-c", "kill -TERM $$"]));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGTERM)
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn shim_failures_exit_125_126_127_with_one_line() {
    require_root("shim_failures_exit_125_126_127_with_one_line");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let not_executable = dir.path().join("worker");
    std::fs::write(&not_executable, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let no_format = dir.path().join("garbage");
    std::fs::write(&no_format, "not an executable format\n").unwrap();
    std::fs::set_permissions(&no_format, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nx = not_executable.display().to_string();
    let garbage = no_format.display().to_string();

    let cases: Vec<(Vec<&str>, i32, String)> = vec![
        (
            vec!["--user", "nobody", "--", "/app/nope"],
            127,
            "cannot execute /app/nope: No such file or directory".into(),
        ),
        (
            vec!["--user", "nobody", "--", "no-such-command-anywhere"],
            127,
            "cannot execute no-such-command-anywhere: not found in PATH".into(),
        ),
        (
            vec!["--user", "nobody", "--", &nx],
            126,
            format!("cannot execute {nx}: Permission denied"),
        ),
        (
            vec!["--user", "nobody", "--", &garbage],
            126,
            format!("cannot execute {garbage}: Exec format error"),
        ),
        (
            vec!["--user", "no-such-user", "--", "/bin/true"],
            125,
            "cannot resolve user: no user named \"no-such-user\" in /etc/passwd".into(),
        ),
        (
            vec![
                "--user",
                "nobody",
                "--group",
                "no-such-group",
                "--",
                "/bin/true",
            ],
            125,
            "cannot resolve group: no group named \"no-such-group\" in /etc/group".into(),
        ),
        (
            vec!["--user", "4242", "--", "/bin/true"],
            125,
            "user 4242 has no passwd entry, so no primary group: give --group explicitly".into(),
        ),
        (
            vec!["--bogus", "/bin/true"],
            125,
            "unknown option --bogus".into(),
        ),
        (vec!["--user", "nobody"], 125, "no PROGRAM given".into()),
        (
            vec![
                "--user",
                "nobody",
                "--set",
                "DB_PASSWORD",
                "--",
                "/bin/true",
            ],
            125,
            "--set needs VAR=VALUE".into(),
        ),
        (
            vec![
                "--user",
                "nobody",
                "--set",
                "SECRETD_SOCKET=/x",
                "--",
                "/bin/true",
            ],
            125,
            "SECRETD_SOCKET cannot be given with --set".into(),
        ),
        (
            vec!["--user", "nobody", "--keep", "BAD-NAME", "--", "/bin/true"],
            125,
            "invalid variable name \"BAD-NAME\" in --keep".into(),
        ),
    ];
    for (args, code, prefix) in cases {
        let out = run(shim().args(&args));
        assert_shim_error(&out, code, &prefix);
    }
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn root_is_refused_unless_allowed() {
    require_root("root_is_refused_unless_allowed");
    for args in [
        &["--"][..],
        &["--user", "0", "--"],
        &["--user", "root", "--"],
    ] {
        let out = run(shim().args(args).arg("/bin/true"));
        assert_shim_error(
            &out,
            125,
            "refusing to run /bin/true as root (uid 0): choose an unprivileged user (--user) or allow it explicitly (--allow-root)",
        );
    }
    for args in [
        &["--allow-root", "--"][..],
        &["--user", "root", "--allow-root", "--"],
    ] {
        let out = run(shim().args(args).args(["/usr/bin/id", "-u"]));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "0\n");
    }
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn an_unprivileged_caller_runs_as_itself() {
    require_root("an_unprivileged_caller_runs_as_itself");
    let as_nobody = |args: &[&str]| {
        let mut cmd = shim();
        cmd.uid(65534).gid(65534).args(args);
        // std's Command::uid also calls setgroups([]) when it can; the caller is plain nobody.
        run(&mut cmd)
    };
    let out = as_nobody(&["--", "/bin/cat", "/proc/self/status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = stdout(&out);
    assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    // Switching users needs privilege...
    let out = as_nobody(&["--user", "daemon", "--", "/bin/true"]);
    assert_shim_error(
        &out,
        125,
        "cannot clear supplementary groups: Operation not permitted",
    );
    // ...except on re-entry as exactly oneself, which passes through without registering
    // (the socket does not exist: an attempt would fail).
    let out = as_nobody(&[
        "--user",
        "nobody",
        "--function",
        "orders",
        "--socket",
        "/nonexistent/secretd.sock",
        "--",
        "/usr/bin/id",
        "-u",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "65534\n");
}

/// No broker on the socket (or a socket that is not a broker): an error, never a silent start
/// without the function's identity.
#[test]
fn registration_failure_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.sock");
    let user: &[&str] = if nix::unistd::geteuid().is_root() {
        &["--user", "nobody"]
    } else {
        &[]
    };
    let out = run(shim()
        .args(user)
        .args(["--function", "orders", "--socket"])
        .arg(&absent)
        .args(["--", "/bin/echo", "worker ran"]));
    assert_shim_error(
        &out,
        125,
        &format!(
            "cannot register as function \"orders\" with the broker at {}: ",
            absent.display()
        ),
    );
    assert!(
        stderr(&out).contains("No such file or directory"),
        "{}",
        stderr(&out)
    );

    // Something listens but hangs up at once: still an error.
    let path = dir.path().join("not-a-broker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let acceptor = std::thread::spawn(move || {
        if let Ok((conn, _)) = listener.accept() {
            drop(conn);
        }
    });
    let out = run(shim()
        .args(user)
        .args(["--function", "orders", "--socket"])
        .arg(&path)
        .args(["--", "/bin/echo", "worker ran"]));
    assert_shim_error(
        &out,
        125,
        &format!(
            "cannot register as function \"orders\" with the broker at {}: ",
            path.display()
        ),
    );
    acceptor.join().unwrap();
}

/// A socket that accepts and then never answers: the shim gives up after its bound (5 s) with
/// 125 instead of hanging the platform's start-up. (Asserts the outcome, not the duration.)
#[test]
fn a_silent_broker_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let user: &[&str] = if nix::unistd::geteuid().is_root() {
        &["--user", "nobody"]
    } else {
        &[]
    };
    // The connection is accepted by the kernel's backlog; nobody ever reads or answers.
    let out = run(shim()
        .args(user)
        .args(["--function", "orders", "--socket"])
        .arg(&path)
        .args(["--", "/bin/echo", "worker ran"]));
    drop(listener);
    assert_shim_error(
        &out,
        125,
        &format!(
            "cannot register as function \"orders\" with the broker at {}: no answer within 5 s",
            path.display()
        ),
    );
}

#[test]
fn help_and_version() {
    let out = run(shim().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for flag in [
        "--user",
        "--group",
        "--keep",
        "--set",
        "--socket",
        "--function",
        "--config",
        "--allow-root",
        "--help",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = run(shim().arg("--version"));
    assert_eq!(
        stdout(&out),
        format!("secretd-shim {}\n", env!("CARGO_PKG_VERSION"))
    );
}
