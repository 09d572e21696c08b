//! Interpreter mode: the shim copied under another name (as it would be installed as
//! `/usr/bin/python3`) runs `[program.<name>]` of its config with the original arguments.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use common::*;

/// A world-readable temp dir holding the shim as `python3` (and `ruby`) and `shim.toml`.
struct Install {
    dir: tempfile::TempDir,
}

impl Install {
    fn new(config: &str) -> Install {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["python3", "ruby"] {
            install_shim(&dir.path().join(name));
        }
        let install = Install { dir };
        std::fs::write(install.config(), config).unwrap();
        install
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("shim.toml")
    }

    /// Runs the installed `name` with SECRETD_SHIM_CONFIG pointing at the temp config.
    fn command(&self, name: &str) -> Command {
        let mut cmd = command(self.path(name));
        cmd.env("SECRETD_SHIM_CONFIG", self.config());
        cmd
    }
}

const CONFIG: &str = r#"
[program.python3]
exec = "/bin/sh"
user = "nobody"
keep = ["LANG", "ABSENT"]
set = { PYTHONUNBUFFERED = "1" }
socket = "/run/test/secretd.sock"
"#;

/// Prints the program's argv (NUL-separated args shown space-separated), uid and environment.
const PROBE: &str = r#"tr '\0' ' ' </proc/$$/cmdline; echo; id -u; env | sort"#;

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn runs_the_configured_program_with_the_original_arguments() {
    require_root("runs_the_configured_program_with_the_original_arguments");
    let install = Install::new(CONFIG);
    let out = run(install
        .command("python3")
        .args(["-c", PROBE, "name", "arg1"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("/bin/sh -c {PROBE} name arg1 ").replace('\n', " "),
        "argv[0] is the configured exec, then the original arguments"
    );
    assert_eq!(lines.next().unwrap(), "65534");
    let env: Vec<&str> = lines.collect();
    // `env | sort` also shows PWD, which sh itself exports; the initial block is checked by
    // the /proc/<pid>/environ test of the normal mode.
    let env: Vec<&str> = env.into_iter().filter(|l| !l.starts_with("PWD=")).collect();
    assert_eq!(
        env,
        [
            "LANG=C.UTF-8",
            &format!("PATH={SAFE_PATH}"),
            "PYTHONUNBUFFERED=1",
            "SECRETD_SOCKET=/run/test/secretd.sock"
        ]
    );
    assert_no_secret(&text);
    assert!(!text.contains("SECRETD_SHIM_CONFIG"));
}

/// A worker that starts `python3` again (the shim, as installed) runs it as itself: the
/// nested shim passes through without switching users or registering.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn a_worker_can_start_the_interpreter_again() {
    require_root("a_worker_can_start_the_interpreter_again");
    let install = Install::new(&CONFIG.replace("socket = ", "function = \"orders\"\nsocket = "));
    // The worker's environment is clean, so the temp config is named again (an image uses
    // /etc/secretd/shim.toml and needs nothing).
    let nested = format!(
        "SECRETD_SHIM_CONFIG={} {} -c 'id -u; env | grep -c SECRETD_SOCKET'",
        install.config().display(),
        install.path("python3").display()
    );
    // The outer run registers and fails (no broker at /run/test), so test the nested run on
    // its own, as the worker would start it: as nobody, with the worker's environment.
    let mut cmd = install.command("python3");
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    let out = run(cmd.args(["-c", &nested]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "65534\n1\n");
}

/// Installed as a symbolic link, the name in argv[0] (the link's) selects the section.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn a_symlink_name_selects_the_section() {
    require_root("a_symlink_name_selects_the_section");
    let install = Install::new("[program.node]\nexec = \"/bin/sh\"\nuser = \"nobody\"\n");
    std::os::unix::fs::symlink(shim_path(), install.path("node")).unwrap();
    let out = run(install.command("node").args(["-c", "id -u"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "65534\n");
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn config_flag_runs_a_section_like_interpreter_mode() {
    require_root("config_flag_runs_a_section_like_interpreter_mode");
    let install = Install::new(CONFIG);
    let out = run(shim().arg("--config").arg(install.config()).args([
        "--",
        "python3",
        "-c",
        "id -u; echo $0",
        "zero",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "65534\nzero\n");
}

#[test]
fn config_errors_are_125_and_name_the_cause() {
    // These fail before any privileged step, so they run unprivileged too.
    let install = Install::new(CONFIG);
    let config = install.config().display().to_string();

    let out = run(install.command("ruby").arg("-e").arg("puts 1"));
    assert_shim_error(
        &out,
        125,
        &format!("{config} has no [program.ruby] section (this binary was invoked as \"ruby\")"),
    );

    std::fs::write(
        install.config(),
        "[program.python3]\nexec = \"/bin/sh\"\nuser = \"nobody\"\nenvironment = []\n",
    )
    .unwrap();
    let out = run(install.command("python3"));
    assert_shim_error(
        &out,
        125,
        &format!("{config}:4:1: unknown field `environment`, expected one of"),
    );

    std::fs::remove_file(install.config()).unwrap();
    let out = run(install.command("python3"));
    assert_shim_error(
        &out,
        125,
        &format!("cannot read {config}: No such file or directory"),
    );

    // The default config path is used when SECRETD_SHIM_CONFIG is unset (absent here).
    if !Path::new("/etc/secretd/shim.toml").exists() {
        let out = run(command(install.path("python3")).arg("-V"));
        assert_shim_error(
            &out,
            125,
            "cannot read /etc/secretd/shim.toml: No such file or directory",
        );
    }
}

#[test]
fn an_exec_pointing_at_the_shim_is_refused() {
    let install = Install::new("");
    let me = install.path("python3");
    std::fs::write(
        install.config(),
        format!(
            "[program.python3]\nexec = {:?}\nuser = \"nobody\"\n",
            me.display().to_string()
        ),
    )
    .unwrap();
    let out = run(install.command("python3"));
    assert_shim_error(
        &out,
        125,
        &format!(
            "{} [program.python3]: exec {} is this shim itself",
            install.config().display(),
            me.display()
        ),
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn root_is_refused_in_interpreter_mode_too() {
    require_root("root_is_refused_in_interpreter_mode_too");
    let install = Install::new("[program.python3]\nexec = \"/bin/true\"\n");
    let out = run(install.command("python3"));
    assert_shim_error(&out, 125, "refusing to run /bin/true as root (uid 0)");
    assert!(stderr(&out).contains("`allow_root` in "));
}
