//! The shim is static and runs where there is nothing else: a root directory holding only the
//! shim, a static busybox as the worker and `/etc/passwd` — no shell, no libc, no `/proc`.

mod common;

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use common::*;

/// The built shim binaries to check: the one cargo built for this run, and the release one
/// `make build` produced (what ships), when it exists.
fn built_shims() -> Vec<PathBuf> {
    let mut paths = vec![shim_path()];
    let release = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-gnu/release/secretd-shim");
    let from_env =
        std::env::var_os("SECRETD_BIN_DIR").map(|d| PathBuf::from(d).join("secretd-shim"));
    for p in [Some(release), from_env].into_iter().flatten() {
        if p.exists() && !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

#[test]
fn the_shim_has_no_program_interpreter() {
    for path in built_shims() {
        assert_eq!(
            has_interpreter(&path),
            Ok(false),
            "{} is dynamically linked (PT_INTERP): build with +crt-static for an explicit --target",
            path.display()
        );
    }
}

/// A root directory for `chroot`, removed on drop.
fn image(busybox: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in ["app", "etc"] {
        std::fs::create_dir(root.path().join(dir)).unwrap();
    }
    install_shim(&root.path().join("secretd-shim"));
    // Debian's busybox picks its applet from argv[0] when that is not "busybox", so the
    // worker keeps the name busybox: `/app/busybox env` is the worker running `env`.
    std::fs::copy(busybox, root.path().join("app/busybox")).unwrap();
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n",
    )
    .unwrap();
    root
}

/// `chroot ROOT program args…` with the platform's secrets in the environment.
fn chrooted(root: &Path, program: &str, args: &[&str]) -> Command {
    let mut cmd = command(program);
    cmd.args(args);
    let root = root.to_owned();
    // SAFETY (test): chroot and chdir are async-signal-safe syscalls.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(&root)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    cmd
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn runs_in_a_root_with_no_shell_and_no_libc() {
    require_root("runs_in_a_root_with_no_shell_and_no_libc");
    let busybox = match static_busybox() {
        Ok(p) => p,
        Err(why) => panic!("runs_in_a_root_with_no_shell_and_no_libc cannot run: {why}"),
    };
    let root = image(&busybox);
    let out = run(chrooted(
        root.path(),
        "/secretd-shim",
        &["--user", "nonroot", "--", "/app/busybox", "env"],
    ));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("SECRETD_SOCKET={DEFAULT_SOCKET}\nPATH={SAFE_PATH}\n")
    );

    let out = run(chrooted(
        root.path(),
        "/secretd-shim",
        &["--user", "nonroot", "--", "/app/busybox", "id"],
    ));
    // No /etc/group in the image, no supplementary groups: busybox prints none.
    assert_eq!(stdout(&out).trim(), "uid=65532(nonroot) gid=65532");
}

/// The article's installation: the shim in place of the interpreter, the real program beside
/// it, and `/etc/secretd/shim.toml` — inside an image with no shell and no libc.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn interpreter_mode_in_a_bare_image() {
    require_root("interpreter_mode_in_a_bare_image");
    let busybox = match static_busybox() {
        Ok(p) => p,
        Err(why) => panic!("interpreter_mode_in_a_bare_image cannot run: {why}"),
    };
    let root = image(&busybox);
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.path().join("etc/secretd")).unwrap();
    install_shim(&root.path().join("usr/bin/worker"));
    std::fs::write(
        root.path().join("etc/secretd/shim.toml"),
        "[program.worker]\nexec = \"/app/busybox\"\nuser = \"nonroot\"\nkeep = [\"LANG\"]\nset = { MODE = \"interp\" }\n",
    )
    .unwrap();
    let out = run(chrooted(root.path(), "/usr/bin/worker", &["env"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("SECRETD_SOCKET={DEFAULT_SOCKET}\nPATH={SAFE_PATH}\nLANG=C.UTF-8\nMODE=interp\n")
    );
}
