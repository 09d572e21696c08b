//! The command line: which mode the shim runs in and, in the normal mode, its flags.
//!
//! A small hand parser (no clap): the shim is on the start-up path of every worker, so it stays
//! small and starts fast. Invoked under any name other than `secretd-shim` the shim is in
//! interpreter mode and parses nothing: every argument belongs to the configured program.

use std::{ffi::OsString, path::PathBuf};

use crate::{
    error::ShimError,
    plan::{Launch, Origin},
};

/// The binary's own name; any other `argv[0]` basename selects interpreter mode.
pub const SHIM_NAME: &str = "secretd-shim";
/// The shim config read in interpreter mode (contract §1).
pub const DEFAULT_CONFIG: &str = "/etc/secretd/shim.toml";
/// Points interpreter mode at another config file.
pub const CONFIG_ENV: &str = "SECRETD_SHIM_CONFIG";

pub const USAGE: &str = "\
usage: secretd-shim [--user USER|UID] [--group GROUP|GID] [--keep VAR]... [--set VAR=VALUE]...
                    [--socket PATH] [--function NAME] [--allow-root] -- PROGRAM [ARG]...
       secretd-shim --config PATH -- NAME [ARG]...
       secretd-shim --help | --version

Replaces itself (execve, same pid) with PROGRAM, started with an environment holding only
SECRETD_SOCKET, a fixed safe PATH and what --keep/--set name, after registering with the
secretd broker (--function), closing inherited fds above 2, clearing supplementary groups,
switching to --user/--group, and setting no_new_privs.

  --user USER|UID      run PROGRAM as this user (name from /etc/passwd, or a number)
  --group GROUP|GID    primary group (default: the user's group in /etc/passwd); needs --user
  --keep VAR           copy VAR from the shim's environment when present (repeatable)
  --set VAR=VALUE      set VAR in PROGRAM's environment (repeatable; never for secrets)
  --socket PATH        broker socket, passed as SECRETD_SOCKET (default: $SECRETD_SOCKET,
                       else /run/secretd/secretd.sock)
  --function NAME      register PROGRAM's process with the broker as this function first
  --allow-root         allow PROGRAM to run as uid 0
  --config PATH        run [program.NAME] of this shim config, as interpreter mode would
  -h, --help           print this help
  -V, --version        print the version

Invoked under another name (e.g. installed as /usr/bin/python3) it runs [program.<name>] of
/etc/secretd/shim.toml (or $SECRETD_SHIM_CONFIG) with the original arguments.
Exit status: PROGRAM's own, or 125 (shim error), 126 (cannot execute), 127 (not found).
";

/// What this invocation asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Help,
    Version,
    /// Normal mode: everything came from flags.
    Launch(Launch),
    /// Interpreter mode, or `--config`: run `[program.<name>]` of `path` with `args`.
    FromConfig {
        path: PathBuf,
        name: String,
        args: Vec<OsString>,
    },
}

/// Decide the mode from `argv[0]` and parse the flags of the normal mode. `config_env` is the
/// value of `SECRETD_SHIM_CONFIG` (read by the caller, so this stays a pure function).
pub fn parse(argv: Vec<OsString>, config_env: Option<OsString>) -> Result<Invocation, ShimError> {
    let mut argv = argv.into_iter();
    let argv0 = argv.next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != SHIM_NAME {
        if name.is_empty() {
            return Err(ShimError::NoProgramName);
        }
        let path = config_env
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
        return Ok(Invocation::FromConfig {
            path,
            name,
            args: argv.collect(),
        });
    }
    parse_flags(argv)
}

fn parse_flags(mut argv: impl Iterator<Item = OsString>) -> Result<Invocation, ShimError> {
    let mut launch = Launch::new(Origin::Flags);
    let mut config: Option<PathBuf> = None;
    let mut used_launch_flag = false;
    let program = loop {
        let Some(arg) = argv.next() else {
            return Err(ShimError::Usage("no PROGRAM given".into()));
        };
        let Some(text) = arg.to_str() else {
            // Flags are ASCII; a non-UTF-8 word can only be PROGRAM.
            break arg;
        };
        if text == "--" {
            match argv.next() {
                Some(program) => break program,
                None => return Err(ShimError::Usage("no PROGRAM given after --".into())),
            }
        }
        if !text.starts_with('-') || text == "-" {
            break arg;
        }
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(OsString::from(value))),
            _ => (text, None),
        };
        let value = |argv: &mut dyn Iterator<Item = OsString>| -> Result<OsString, ShimError> {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| ShimError::Usage(format!("{flag} needs a value")))
        };
        let utf8 = |v: OsString| -> Result<String, ShimError> {
            v.into_string()
                .map_err(|_| ShimError::Usage(format!("the value of {flag} is not UTF-8")))
        };
        let once = |slot: &Option<String>| -> Result<(), ShimError> {
            match slot {
                Some(_) => Err(ShimError::Usage(format!("{flag} given twice"))),
                None => Ok(()),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "--allow-root" if inline.is_none() => launch.allow_root = true,
            "--user" => {
                once(&launch.user)?;
                launch.user = Some(utf8(value(&mut argv)?)?);
            }
            "--group" => {
                once(&launch.group)?;
                launch.group = Some(utf8(value(&mut argv)?)?);
            }
            "--socket" => {
                once(&launch.socket)?;
                launch.socket = Some(utf8(value(&mut argv)?)?);
            }
            "--function" => {
                once(&launch.function)?;
                launch.function = Some(utf8(value(&mut argv)?)?);
            }
            "--keep" => launch.keep.push(utf8(value(&mut argv)?)?),
            "--set" => {
                let pair = value(&mut argv)?;
                // The value may be any bytes; only the name must be text. The argument is
                // never echoed back: a mistyped --set could hold a value.
                let bytes = std::os::unix::ffi::OsStrExt::as_bytes(pair.as_os_str());
                let Some(eq) = bytes.iter().position(|&b| b == b'=') else {
                    return Err(ShimError::Usage("--set needs VAR=VALUE".into()));
                };
                let name = String::from_utf8(bytes[..eq].to_vec())
                    .map_err(|_| ShimError::Usage("--set: the name is not UTF-8".into()))?;
                let value: OsString =
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&bytes[eq + 1..])
                        .to_owned();
                launch.set.push((name, value));
            }
            "--config" => {
                if config.is_some() {
                    return Err(ShimError::Usage("--config given twice".into()));
                }
                config = Some(PathBuf::from(value(&mut argv)?));
                continue;
            }
            _ => return Err(ShimError::Usage(format!("unknown option {flag}"))),
        }
        used_launch_flag = true;
    };
    let args: Vec<OsString> = argv.collect();
    if let Some(path) = config {
        if used_launch_flag {
            return Err(ShimError::Usage(
                "--config takes every setting from the config file; combine it with no other option"
                    .into(),
            ));
        }
        let name = std::path::Path::new(&program)
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ShimError::Usage("--config needs a program NAME".into()))?
            .to_owned();
        return Ok(Invocation::FromConfig { path, name, args });
    }
    launch.argv0 = program.clone();
    launch.program = program;
    launch.args = args;
    Ok(Invocation::Launch(launch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn launch(words: &[&str]) -> Launch {
        match parse(argv(words), None).unwrap() {
            Invocation::Launch(l) => l,
            other => panic!("{words:?}: {other:?}"),
        }
    }

    fn usage_error(words: &[&str]) -> String {
        match parse(argv(words), None) {
            Err(e @ ShimError::Usage(_)) => e.to_string(),
            other => panic!("{words:?}: {other:?}"),
        }
    }

    #[test]
    fn every_flag_of_the_contract() {
        let l = launch(&[
            "/usr/bin/secretd-shim",
            "--user",
            "nobody",
            "--group=nogroup",
            "--keep",
            "LANG",
            "--keep=TZ",
            "--set",
            "A=1=2",
            "--set=B=",
            "--socket",
            "/run/s.sock",
            "--function",
            "orders",
            "--allow-root",
            "--",
            "/bin/echo",
            "--user",
            "x",
        ]);
        assert_eq!(l.user.as_deref(), Some("nobody"));
        assert_eq!(l.group.as_deref(), Some("nogroup"));
        assert_eq!(l.keep, ["LANG", "TZ"]);
        assert_eq!(
            l.set,
            [("A".into(), "1=2".into()), ("B".into(), OsString::new())]
        );
        assert_eq!(l.socket.as_deref(), Some("/run/s.sock"));
        assert_eq!(l.function.as_deref(), Some("orders"));
        assert!(l.allow_root);
        assert_eq!(l.program, "/bin/echo");
        assert_eq!(l.argv0, "/bin/echo");
        assert_eq!(l.args, argv(&["--user", "x"]));
        assert_eq!(l.origin, Origin::Flags);
    }

    #[test]
    fn program_starts_at_the_first_word_without_dashes() {
        let l = launch(&["secretd-shim", "--user", "1", "env", "-i", "--", "x"]);
        assert_eq!(l.program, "env");
        assert_eq!(l.args, argv(&["-i", "--", "x"]));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(
            parse(argv(&["secretd-shim", "--help"]), None).unwrap(),
            Invocation::Help
        );
        assert_eq!(
            parse(argv(&["secretd-shim", "-V"]), None).unwrap(),
            Invocation::Version
        );
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["secretd-shim"], "no PROGRAM given"),
            (&["secretd-shim", "--user", "1"], "no PROGRAM given"),
            (&["secretd-shim", "--"], "no PROGRAM given after --"),
            (&["secretd-shim", "--user"], "--user needs a value"),
            (&["secretd-shim", "--bogus", "x"], "unknown option --bogus"),
            (&["secretd-shim", "-x", "y"], "unknown option -x"),
            (
                &["secretd-shim", "--user", "a", "--user", "b", "x"],
                "--user given twice",
            ),
            (
                &["secretd-shim", "--set", "NOEQUALSIGN", "x"],
                "--set needs VAR=VALUE",
            ),
            (
                &["secretd-shim", "--allow-root=yes", "x"],
                "unknown option --allow-root",
            ),
            (
                &["secretd-shim", "--config", "/c", "--user", "1", "--", "p"],
                "--config takes every setting from the config file",
            ),
        ];
        for (words, want) in cases {
            let got = usage_error(words);
            assert!(got.starts_with(want), "{words:?}: {got}");
        }
    }

    #[test]
    fn a_mistyped_set_is_not_echoed() {
        let got = usage_error(&["secretd-shim", "--set", "hunter2", "x"]);
        assert!(!got.contains("hunter2"), "{got}");
    }

    #[test]
    fn another_name_is_interpreter_mode() {
        let got = parse(
            argv(&["/usr/bin/python3", "--user", "-c", "print(1)"]),
            None,
        )
        .unwrap();
        assert_eq!(
            got,
            Invocation::FromConfig {
                path: DEFAULT_CONFIG.into(),
                name: "python3".into(),
                args: argv(&["--user", "-c", "print(1)"]),
            }
        );
        let got = parse(argv(&["python3"]), Some("/tmp/shim.toml".into())).unwrap();
        assert_eq!(
            got,
            Invocation::FromConfig {
                path: "/tmp/shim.toml".into(),
                name: "python3".into(),
                args: vec![],
            }
        );
        assert!(matches!(
            parse(argv(&[""]), None),
            Err(ShimError::NoProgramName)
        ));
    }

    #[test]
    fn config_flag_selects_a_section_by_basename() {
        let got = parse(
            argv(&[
                "secretd-shim",
                "--config",
                "/c.toml",
                "--",
                "/x/python3",
                "-V",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(
            got,
            Invocation::FromConfig {
                path: "/c.toml".into(),
                name: "python3".into(),
                args: argv(&["-V"]),
            }
        );
    }
}
