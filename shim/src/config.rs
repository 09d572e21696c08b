//! The shim config (`/etc/secretd/shim.toml`): one `[program.<name>]` section per name the shim
//! is installed under. Parsed in two stages: a raw serde struct that rejects unknown keys, then
//! a [`Launch`] with the same meaning as the command-line flags.
//!
//! ```toml
//! [program.python3]
//! exec = "/usr/bin/python3.real"   # required, absolute; also argv[0] of the program
//! user = "www-data"                # optional; without it the caller's uid (never root unless allow_root)
//! group = "www-data"               # optional; default: the user's primary group
//! keep = ["LANG", "TZ"]
//! set = { PYTHONUNBUFFERED = "1" }
//! function = "orders"              # optional: register with the broker first
//! socket = "/run/secretd/secretd.sock"
//! allow_root = false
//! ```

use std::{collections::BTreeMap, ffi::OsString, io::Read, path::Path};

use secretd_trust::{Trust, TrustError};
use serde::Deserialize;

use crate::{
    error::ShimError,
    plan::{Launch, Origin},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    program: BTreeMap<String, RawProgram>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    exec: String,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    keep: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    function: Option<String>,
    socket: Option<String>,
    #[serde(default)]
    allow_root: bool,
}

/// Read `path` and return the settings of `[program.<name>]`, to run with `args`.
///
/// The file decides what runs, as whom: it is obeyed only when trusted (contract §7: owned by
/// root — or by the shim's own uid when it runs unprivileged —, not writable by group or other,
/// nor is any directory above it), judged on the opened descriptor.
pub fn load(path: &Path, name: &str, args: Vec<OsString>) -> Result<Launch, ShimError> {
    load_with(&Trust::process(), path, name, args)
}

/// [`load`] under an explicit trust rule (tests use another uid than their own).
fn load_with(
    trust: &Trust,
    path: &Path,
    name: &str,
    args: Vec<OsString>,
) -> Result<Launch, ShimError> {
    let read = |source| ShimError::ConfigRead {
        path: path.to_owned(),
        source,
    };
    let mut file = trust.open_file(path).map_err(|e| match e {
        TrustError::Open { source, .. } => read(source),
        untrusted => ShimError::Untrusted(untrusted),
    })?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    parse(&text, path, name, args)
}

/// The pure half of [`load`].
pub fn parse(
    text: &str,
    path: &Path,
    name: &str,
    args: Vec<OsString>,
) -> Result<Launch, ShimError> {
    let mut raw: RawConfig = toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        ShimError::ConfigParse {
            path: path.to_owned(),
            line,
            column,
            message: e.message().replace('\n', " "),
        }
    })?;
    let Some(program) = raw.program.remove(name) else {
        return Err(ShimError::ConfigNoProgram {
            path: path.to_owned(),
            name: name.to_owned(),
        });
    };
    if !program.exec.starts_with('/') {
        return Err(ShimError::ConfigInvalid {
            path: path.to_owned(),
            name: name.to_owned(),
            message: format!("exec must be an absolute path, got {:?}", program.exec),
        });
    }
    let mut launch = Launch::new(Origin::Config {
        path: path.display().to_string(),
        name: name.to_owned(),
    });
    launch.user = program.user;
    launch.group = program.group;
    launch.keep = program.keep;
    launch.set = program
        .set
        .into_iter()
        .map(|(k, v)| (k, OsString::from(v)))
        .collect();
    launch.function = program.function;
    launch.socket = program.socket;
    launch.allow_root = program.allow_root;
    launch.program = program.exec.clone().into();
    launch.argv0 = program.exec.into();
    launch.args = args;
    Ok(launch)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[program.python3]
exec = "/usr/bin/python3.real"
user = "www-data"
keep = ["LANG", "TZ", "FUNCTIONS_WORKER_RUNTIME"]
set = { PYTHONUNBUFFERED = "1" }
function = "orders"       # optional
socket = "/run/secretd/secretd.sock"

[program.node]
exec = "/usr/bin/node.real"
"#;

    fn parse_example(text: &str, name: &str) -> Result<Launch, ShimError> {
        parse(
            text,
            Path::new("/etc/secretd/shim.toml"),
            name,
            vec!["-c".into(), "print(1)".into()],
        )
    }

    #[test]
    fn the_contract_example_parses() {
        let l = parse_example(EXAMPLE, "python3").unwrap();
        assert_eq!(l.program, "/usr/bin/python3.real");
        assert_eq!(l.argv0, "/usr/bin/python3.real");
        assert_eq!(l.args, [OsString::from("-c"), "print(1)".into()]);
        assert_eq!(l.user.as_deref(), Some("www-data"));
        assert_eq!(l.keep, ["LANG", "TZ", "FUNCTIONS_WORKER_RUNTIME"]);
        assert_eq!(l.set, [("PYTHONUNBUFFERED".into(), "1".into())]);
        assert_eq!(l.function.as_deref(), Some("orders"));
        assert_eq!(l.socket.as_deref(), Some("/run/secretd/secretd.sock"));
        assert!(!l.allow_root);
        let node = parse_example(EXAMPLE, "node").unwrap();
        assert_eq!(node.user, None);
        assert!(node.keep.is_empty());
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[program.python3]\nexec = \"/x\"\nusr = \"a\"\n",
                "python3",
                "/etc/secretd/shim.toml:3:1: unknown field `usr`, expected one of",
            ),
            (
                "[programs.python3]\nexec = \"/x\"\n",
                "python3",
                "/etc/secretd/shim.toml:1:2: unknown field `programs`",
            ),
            (
                "[program.python3]\nuser = \"a\"\n",
                "python3",
                "/etc/secretd/shim.toml:1:1: missing field `exec`",
            ),
            (
                "[program.python3]\nexec = \"/x\"\nkeep = \"LANG\"\n",
                "python3",
                "/etc/secretd/shim.toml:3:8: invalid type: string \"LANG\", expected a sequence",
            ),
            ("[program.python3\n", "python3", "/etc/secretd/shim.toml:1:"),
            (
                EXAMPLE,
                "ruby",
                "/etc/secretd/shim.toml has no [program.ruby] section (this binary was invoked as \"ruby\")",
            ),
            (
                "[program.python3]\nexec = \"python3.real\"\n",
                "python3",
                "/etc/secretd/shim.toml [program.python3]: exec must be an absolute path, got \"python3.real\"",
            ),
        ];
        for (text, name, want) in cases {
            let got = parse_example(text, name).unwrap_err().to_string();
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
            assert_eq!(got.lines().count(), 1, "{got}");
        }
    }

    #[test]
    fn an_untrusted_config_is_refused_with_one_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&path, "python3", vec![]).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let got = load(&path, "python3", vec![]).unwrap_err();
        assert_eq!(
            got.to_string(),
            format!("{}: writable by group/other (mode 0666)", path.display())
        );
        assert_eq!(got.exit_code(), crate::error::EXIT_SHIM);
        // Owned by a uid the rule does not trust (ours, when we are not root; root is always
        // trusted, so as root the file is handed to another uid first).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let (trust, owner) = if me == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            (Trust::process(), 65534)
        } else {
            (Trust::with_owner(me.wrapping_add(1)), me)
        };
        let got = load_with(&trust, &path, "python3", vec![]).unwrap_err();
        assert_eq!(
            got.to_string(),
            format!("{}: owned by uid {owner}", path.display())
        );
    }

    #[test]
    fn a_fifo_config_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let got = load(&path, "python3", vec![]).unwrap_err().to_string();
        assert_eq!(
            got,
            format!("{}: not a regular file (FIFO)", path.display())
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let got = load(Path::new("/nonexistent/shim.toml"), "python3", vec![])
            .unwrap_err()
            .to_string();
        assert_eq!(
            got,
            "cannot read /nonexistent/shim.toml: No such file or directory"
        );
    }
}
