//! Helpers shared by the shim's process tests: the real binary, a parent environment full of
//! secrets, root detection with a stated skip reason, and readers for `/proc` files.
#![allow(dead_code)]

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// Values that sit in the shim's own environment and must never reach a worker.
pub const SECRETS: &[(&str, &str)] = &[
    ("DB_PASSWORD", "hunter2-db-secret-value"),
    ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-aws-secret-value"),
    (
        "AzureWebJobsStorage",
        "DefaultEndpointsProtocol=https;AccountKey=azure-secret-value",
    ),
];

pub const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
pub const DEFAULT_SOCKET: &str = "/run/secretd/secretd.sock";

/// The binary cargo built for this test run.
pub fn shim_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_secretd-shim"))
}

/// Put the shim at `dest` (a hard link when on the same file system, else a copy: the debug
/// build is tens of MB). Nothing writes through it.
pub fn install_shim(dest: &Path) {
    if std::fs::hard_link(shim_path(), dest).is_err() {
        std::fs::copy(shim_path(), dest).unwrap();
    }
}

/// `secretd-shim` with the platform's secrets (and LANG) in its environment.
pub fn shim() -> Command {
    command(shim_path())
}

/// Any program, with the same secret-laden environment.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("LANG", "C.UTF-8").env("TZ", "UTC");
    for (k, v) in SECRETS {
        cmd.env(k, v);
    }
    cmd
}

/// Root tests are `#[ignore = "needs root…"]`, so they only run when asked for (`make test`
/// asks as root, or under CI=true): then a missing root is a failure, never a silent pass.
pub fn require_root(test: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root to switch users: run it as root (`make test` does when it is root or CI=true)"
    );
}

pub fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> Output {
    cmd.borrow_mut().output().expect("spawn")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that no secret value appears anywhere in `text`.
pub fn assert_no_secret(text: &str) {
    for (name, value) in SECRETS {
        assert!(!text.contains(value), "the value of {name} leaked: {text}");
    }
}

/// Asserts the shim failed with `code` and exactly one stderr line starting with `prefix`.
pub fn assert_shim_error(out: &Output, code: i32, prefix: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(
        err.starts_with(&format!("secretd-shim: {prefix}")),
        "got {err:?}, want prefix {prefix:?}"
    );
    assert_no_secret(&err);
    assert!(
        out.stdout.is_empty(),
        "no output expected: {:?}",
        stdout(out)
    );
}

/// `Key:\tvalue` of a `/proc/<pid>/status` text.
pub fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
}

/// uid and primary gid of `name` in /etc/passwd, read independently of the shim.
pub fn passwd_entry(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

/// gid of group `name` in /etc/group, read independently of the shim.
pub fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f[2].parse().unwrap())
    })
}

/// A statically linked busybox (Debian `busybox-static`), or why there is none.
pub fn static_busybox() -> Result<PathBuf, String> {
    let path = Path::new("/bin/busybox");
    if !path.exists() {
        return Err("/bin/busybox is absent (install Debian busybox-static; .ci/run does)".into());
    }
    match has_interpreter(path) {
        Ok(false) => Ok(path.to_owned()),
        Ok(true) => Err("/bin/busybox is dynamically linked (install busybox-static)".into()),
        Err(e) => Err(format!("cannot read /bin/busybox: {e}")),
    }
}

/// Whether an ELF64 file asks for a program interpreter (PT_INTERP), i.e. is dynamically
/// linked. Reads the program headers directly (no `file(1)` needed).
pub fn has_interpreter(path: &Path) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(format!(
            "{} is not a little-endian ELF64 file",
            path.display()
        ));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}
