//! From settings (flags or a config section) to a [`Plan`]: who PROGRAM runs as, its exact
//! argv and envp, and whether to register with the broker.
//!
//! Pure apart from reading `<etc>/passwd` and `<etc>/group` (the directory is a parameter) and
//! the environment through the `getenv` callback, which is asked only for the `--keep` names
//! and `SECRETD_SOCKET`: the shim's environment holds the platform's secrets, and nothing else
//! is ever read from it.
//! Every check that can fail without touching the process happens here, before the first
//! privileged step.

use std::{
    ffi::{CString, OsStr, OsString},
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::Path,
};

use secretd_accounts::{lookup_group, lookup_user};

use crate::error::ShimError;

/// PATH given to PROGRAM unless it is kept (`--keep PATH`) or set (`--set PATH=…`).
pub const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The broker socket when neither `--socket` nor the config names one (contract §1).
pub const DEFAULT_SOCKET: &str = "/run/secretd/secretd.sock";
/// The variable through which PROGRAM finds the broker.
pub const SOCKET_VAR: &str = "SECRETD_SOCKET";

/// Where the settings came from, so that errors name the flag or the config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flags,
    Config { path: String, name: String },
}

impl Origin {
    /// How an operator spells setting `key` (`"keep"`, `"allow_root"`) at this origin.
    pub fn key(&self, key: &str) -> String {
        match self {
            Origin::Flags => format!("--{}", key.replace('_', "-")),
            Origin::Config { path, name } => format!("`{key}` in {path} [program.{name}]"),
        }
    }
}

/// The launch settings, from flags or from one `[program.<name>]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub origin: Origin,
    pub user: Option<String>,
    pub group: Option<String>,
    pub keep: Vec<String>,
    pub set: Vec<(String, OsString)>,
    pub socket: Option<String>,
    pub function: Option<String>,
    pub allow_root: bool,
    /// What to execute: a path, or a name looked up in PROGRAM's PATH.
    pub program: OsString,
    /// `argv[0]` given to PROGRAM.
    pub argv0: OsString,
    pub args: Vec<OsString>,
}

impl Launch {
    pub fn new(origin: Origin) -> Self {
        Launch {
            origin,
            user: None,
            group: None,
            keep: Vec::new(),
            set: Vec::new(),
            socket: None,
            function: None,
            allow_root: false,
            program: OsString::new(),
            argv0: OsString::new(),
            args: Vec::new(),
        }
    }
}

/// Who PROGRAM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// No `--user`: stay the current user (allowed for non-root callers, or with --allow-root).
    Keep { uid: u32 },
    /// Clear supplementary groups, then switch gid, then uid.
    Switch { uid: u32, gid: u32 },
}

impl Identity {
    pub fn uid(self) -> u32 {
        match self {
            Identity::Keep { uid } | Identity::Switch { uid, .. } => uid,
        }
    }
}

/// `Admin.RegisterWorker(pid 0, function)` over `socket`, done while still root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub socket: String,
    pub function: String,
}

/// Everything the privileged sequence needs, decided before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub registration: Option<Registration>,
    pub identity: Identity,
    /// PROGRAM as the operator wrote it, for messages.
    pub program: String,
    /// Paths to try in order: PROGRAM itself when it contains a `/`, else one per PATH entry.
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
}

/// What `build` may consult outside the settings.
pub struct Context<'a> {
    /// Directory holding `passwd` and `group` (normally `/etc`).
    pub etc: &'a Path,
    /// The shim's real, effective and saved uids.
    pub uids: [u32; 3],
    /// The shim's real, effective and saved gids.
    pub gids: [u32; 3],
    /// Reads one variable of the shim's environment; asked only for `--keep` names and, when
    /// no socket is configured, `SECRETD_SOCKET`.
    pub getenv: &'a dyn Fn(&str) -> Option<OsString>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("etc", &self.etc)
            .field("uids", &self.uids)
            .field("gids", &self.gids)
            .finish_non_exhaustive()
    }
}

pub fn build(launch: &Launch, ctx: &Context<'_>) -> Result<Plan, ShimError> {
    let origin = &launch.origin;
    let program = launch.program.to_string_lossy().into_owned();
    if launch.program.is_empty() {
        return Err(ShimError::Usage("PROGRAM is empty".into()));
    }

    let euid = ctx.uids[1];
    let mut identity = match &launch.user {
        Some(spec) => {
            let user = lookup_user(ctx.etc, spec).map_err(|source| ShimError::Account {
                what: "user",
                source,
            })?;
            let gid = match &launch.group {
                Some(spec) => {
                    lookup_group(ctx.etc, spec)
                        .map_err(|source| ShimError::Account {
                            what: "group",
                            source,
                        })?
                        .gid
                }
                None => user.gid.ok_or_else(|| ShimError::NoPrimaryGroup {
                    user: spec.clone(),
                    group_key: origin.key("group"),
                })?,
            };
            Identity::Switch { uid: user.uid, gid }
        }
        None if launch.group.is_some() => {
            return Err(ShimError::GroupWithoutUser {
                group_key: origin.key("group"),
                user_key: origin.key("user"),
            });
        }
        None => Identity::Keep { uid: euid },
    };
    // Re-entry: an unprivileged process that already is exactly the requested user and group
    // (a worker starting `python3` again, which is the shim once more) passes through. It could
    // not switch or register anyway, and needs neither: it gains nothing, and the broker's
    // descendant rule already gives it its parent worker's function, if any.
    let reentry = euid != 0
        && matches!(identity, Identity::Switch { uid, gid }
            if ctx.uids == [uid; 3] && ctx.gids == [gid; 3]);
    if reentry {
        identity = Identity::Keep {
            uid: identity.uid(),
        };
    }
    if identity.uid() == 0 && !launch.allow_root {
        return Err(ShimError::RefuseRoot {
            program,
            user_key: origin.key("user"),
            allow_key: origin.key("allow_root"),
        });
    }

    // The socket: --socket (or the config's `socket`), else SECRETD_SOCKET from the shim's own
    // environment (as the client and the `secretd` CLI do), else the default.
    let (socket, socket_key) = match &launch.socket {
        Some(s) => (s.clone(), origin.key("socket")),
        None => match (ctx.getenv)(SOCKET_VAR).filter(|v| !v.is_empty()) {
            Some(v) => (
                v.into_string().map_err(|_| {
                    ShimError::Usage(format!("{SOCKET_VAR} in the environment is not UTF-8"))
                })?,
                format!("{SOCKET_VAR} (from the environment)"),
            ),
            None => (DEFAULT_SOCKET.to_owned(), origin.key("socket")),
        },
    };
    if !socket.starts_with('/') || socket.contains('\0') {
        return Err(ShimError::SocketNotAbsolute {
            key: socket_key,
            path: socket,
        });
    }
    let registration = match &launch.function {
        Some(f) if f.is_empty() => {
            return Err(ShimError::EmptyFunction {
                key: origin.key("function"),
            });
        }
        Some(_) if reentry => None,
        Some(f) => Some(Registration {
            socket: socket.clone(),
            function: f.clone(),
        }),
        None => None,
    };

    // The environment, built from nothing. Later entries replace earlier ones of the same
    // name in place: SECRETD_SOCKET, PATH, then --keep, then --set.
    let mut env: Vec<(String, OsString)> = vec![
        (SOCKET_VAR.to_owned(), socket.into()),
        ("PATH".to_owned(), SAFE_PATH.into()),
    ];
    for name in &launch.keep {
        check_var_name(name, &origin.key("keep"))?;
        if let Some(value) = (ctx.getenv)(name) {
            put(&mut env, name, value);
        }
    }
    for (name, value) in &launch.set {
        check_var_name(name, &origin.key("set"))?;
        put(&mut env, name, value.clone());
    }

    let path_value = env
        .iter()
        .find(|(n, _)| n == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let candidates = candidates(&launch.program, &path_value)
        .into_iter()
        .map(cstring)
        .collect::<Result<_, _>>()?;
    let argv = std::iter::once(launch.argv0.clone())
        .chain(launch.args.iter().cloned())
        .map(cstring)
        .collect::<Result<_, _>>()?;
    let envp = env
        .into_iter()
        .map(|(name, value)| {
            let mut entry = name.into_bytes();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            cstring(OsString::from_vec(entry))
        })
        .collect::<Result<_, _>>()?;

    Ok(Plan {
        registration,
        identity,
        program,
        candidates,
        argv,
        envp,
    })
}

/// Names are portable shell names: `[A-Za-z_][A-Za-z0-9_]*`. `SECRETD_SOCKET` is the shim's.
fn check_var_name(name: &str, key: &str) -> Result<(), ShimError> {
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(ShimError::InvalidVarName {
            key: key.to_owned(),
            name: name.to_owned(),
        });
    }
    if name == SOCKET_VAR {
        return Err(ShimError::ReservedVar {
            key: key.to_owned(),
        });
    }
    Ok(())
}

fn put(env: &mut Vec<(String, OsString)>, name: &str, value: OsString) {
    match env.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value,
        None => env.push((name.to_owned(), value)),
    }
}

/// The paths execvp would try: PROGRAM itself when it contains a `/`; otherwise
/// `<dir>/PROGRAM` for each PATH entry, skipping empty entries (which would mean the current
/// directory).
fn candidates(program: &OsStr, path: &OsStr) -> Vec<OsString> {
    if program.as_bytes().contains(&b'/') {
        return vec![program.to_owned()];
    }
    path.as_bytes()
        .split(|&b| b == b':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| {
            let mut full = dir.to_vec();
            if !full.ends_with(b"/") {
                full.push(b'/');
            }
            full.extend_from_slice(program.as_bytes());
            OsString::from_vec(full)
        })
        .collect()
}

/// A NUL inside an argument or value cannot be passed to execve. The message names no value.
fn cstring(s: OsString) -> Result<CString, ShimError> {
    CString::new(s.into_vec())
        .map_err(|_| ShimError::Usage("an argument or variable contains a NUL byte".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn etc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65533::/home/nonroot:/sbin/nologin\n",
        )
        .unwrap();
        fs::write(dir.path().join("group"), "root:x:0:\nworkers:x:3000:\n").unwrap();
        dir
    }

    /// The shim's environment in these tests: it holds a secret that must never be copied.
    fn getenv(name: &str) -> Option<OsString> {
        match name {
            "LANG" => Some("C.UTF-8".into()),
            "PATH" => Some("/opt/bin:/usr/bin".into()),
            "DB_PASSWORD" => Some("hunter2".into()),
            _ => None,
        }
    }

    fn plan(euid: u32, edit: impl FnOnce(&mut Launch)) -> Result<Plan, ShimError> {
        let dir = etc();
        let mut launch = Launch::new(Origin::Flags);
        launch.program = "/app/worker".into();
        launch.argv0 = "/app/worker".into();
        launch.args = vec!["--port".into(), "8080".into()];
        edit(&mut launch);
        build(
            &launch,
            &Context {
                etc: dir.path(),
                uids: [euid; 3],
                gids: [euid; 3],
                getenv: &getenv,
            },
        )
    }

    fn strings(v: &[CString]) -> Vec<&str> {
        v.iter().map(|c| c.to_str().unwrap()).collect()
    }

    #[test]
    fn environment_starts_empty() {
        let p = plan(0, |l| l.user = Some("nonroot".into())).unwrap();
        assert_eq!(
            strings(&p.envp),
            [
                "SECRETD_SOCKET=/run/secretd/secretd.sock",
                "PATH=/usr/local/bin:/usr/bin:/bin"
            ]
        );
        assert_eq!(strings(&p.argv), ["/app/worker", "--port", "8080"]);
        assert_eq!(strings(&p.candidates), ["/app/worker"]);
        assert_eq!(
            p.identity,
            Identity::Switch {
                uid: 65532,
                gid: 65533
            }
        );
        assert_eq!(p.registration, None);
    }

    #[test]
    fn keep_copies_only_present_variables_and_set_wins() {
        let p = plan(0, |l| {
            l.user = Some("65532".into());
            l.socket = Some("/tmp/b.sock".into());
            l.keep = vec!["LANG".into(), "ABSENT".into(), "PATH".into(), "TZ".into()];
            l.set = vec![
                ("TZ".into(), "UTC".into()),
                ("LANG".into(), "C".into()),
                ("EMPTY".into(), "".into()),
            ];
        })
        .unwrap();
        assert_eq!(
            strings(&p.envp),
            [
                "SECRETD_SOCKET=/tmp/b.sock",
                "PATH=/opt/bin:/usr/bin",
                "LANG=C",
                "TZ=UTC",
                "EMPTY="
            ]
        );
    }

    #[test]
    fn a_program_name_is_searched_in_the_workers_path() {
        let p = plan(1000, |l| l.program = "python3".into()).unwrap();
        assert_eq!(
            strings(&p.candidates),
            ["/usr/local/bin/python3", "/usr/bin/python3", "/bin/python3"]
        );
        let p = plan(1000, |l| {
            l.program = "python3".into();
            l.set = vec![("PATH".into(), "::/opt/py/:rel".into())];
        })
        .unwrap();
        assert_eq!(strings(&p.candidates), ["/opt/py/python3", "rel/python3"]);
    }

    #[test]
    fn identity_rules() {
        // Group by name or number; default = passwd primary group.
        let p = plan(0, |l| {
            l.user = Some("nonroot".into());
            l.group = Some("workers".into());
        })
        .unwrap();
        assert_eq!(
            p.identity,
            Identity::Switch {
                uid: 65532,
                gid: 3000
            }
        );
        let p = plan(0, |l| {
            l.user = Some("4242".into());
            l.group = Some("4243".into());
        })
        .unwrap();
        assert_eq!(
            p.identity,
            Identity::Switch {
                uid: 4242,
                gid: 4243
            }
        );
        // A non-root caller without --user stays itself.
        assert_eq!(
            plan(1000, |_| {}).unwrap().identity,
            Identity::Keep { uid: 1000 }
        );
        // Root with --allow-root and no --user stays root.
        assert_eq!(
            plan(0, |l| l.allow_root = true).unwrap().identity,
            Identity::Keep { uid: 0 }
        );
    }

    #[test]
    fn reentry_as_the_same_unprivileged_user_passes_through() {
        let dir = etc();
        let mut launch = Launch::new(Origin::Flags);
        launch.program = "/app/worker".into();
        launch.argv0 = "/app/worker".into();
        launch.user = Some("nonroot".into());
        launch.function = Some("orders".into());
        let ctx = |uids, gids| Context {
            etc: dir.path(),
            uids,
            gids,
            getenv: &getenv,
        };
        // Already nonroot:nonroot, unprivileged: no switch, no registration.
        let p = build(&launch, &ctx([65532; 3], [65533; 3])).unwrap();
        assert_eq!(p.identity, Identity::Keep { uid: 65532 });
        assert_eq!(p.registration, None);
        // Any difference (a saved uid, another gid) means a real switch, which will fail
        // without privilege and say so.
        for (uids, gids) in [
            ([65532, 65532, 1000], [65533; 3]),
            ([65532; 3], [65532; 3]),
            ([1000; 3], [65533; 3]),
        ] {
            let p = build(&launch, &ctx(uids, gids)).unwrap();
            assert_eq!(
                p.identity,
                Identity::Switch {
                    uid: 65532,
                    gid: 65533
                },
                "{uids:?} {gids:?}"
            );
            assert!(p.registration.is_some());
        }
        // Root is never "re-entry": it always switches and registers.
        let mut as_root = launch.clone();
        as_root.user = Some("root".into());
        as_root.allow_root = true;
        let p = build(&as_root, &ctx([0; 3], [0; 3])).unwrap();
        assert_eq!(p.identity, Identity::Switch { uid: 0, gid: 0 });
        assert!(p.registration.is_some());
    }

    #[test]
    fn refusals_name_the_cause() {
        type Edit = Box<dyn FnOnce(&mut Launch)>;
        let cases: Vec<(Edit, u32, &str)> = vec![
            (
                Box::new(|_| {}),
                0,
                "refusing to run /app/worker as root (uid 0): choose an unprivileged user (--user) or allow it explicitly (--allow-root)",
            ),
            (
                Box::new(|l| l.user = Some("root".into())),
                1000,
                "refusing to run /app/worker as root (uid 0)",
            ),
            (
                Box::new(|l| l.user = Some("0".into())),
                0,
                "refusing to run /app/worker as root (uid 0)",
            ),
            (
                Box::new(|l| l.user = Some("4242".into())),
                0,
                "user 4242 has no passwd entry, so no primary group: give --group explicitly",
            ),
            (
                Box::new(|l| l.user = Some("ghost".into())),
                0,
                "cannot resolve user: no user named \"ghost\" in ",
            ),
            (
                Box::new(|l| {
                    l.user = Some("nonroot".into());
                    l.group = Some("ghosts".into());
                }),
                0,
                "cannot resolve group: no group named \"ghosts\" in ",
            ),
            (
                Box::new(|l| l.group = Some("workers".into())),
                1000,
                "--group needs --user",
            ),
            (
                Box::new(|l| l.keep = vec!["1BAD".into()]),
                1000,
                "invalid variable name \"1BAD\" in --keep",
            ),
            (
                Box::new(|l| l.set = vec![("A-B".into(), "x".into())]),
                1000,
                "invalid variable name \"A-B\" in --set",
            ),
            (
                Box::new(|l| l.set = vec![("".into(), "x".into())]),
                1000,
                "invalid variable name \"\" in --set",
            ),
            (
                Box::new(|l| l.set = vec![("SECRETD_SOCKET".into(), "/x".into())]),
                1000,
                "SECRETD_SOCKET cannot be given with --set",
            ),
            (
                Box::new(|l| l.keep = vec!["SECRETD_SOCKET".into()]),
                1000,
                "SECRETD_SOCKET cannot be given with --keep",
            ),
            (
                Box::new(|l| l.socket = Some("relative.sock".into())),
                1000,
                "--socket must be an absolute path, got \"relative.sock\"",
            ),
            (
                Box::new(|l| l.function = Some(String::new())),
                1000,
                "--function must not be empty",
            ),
        ];
        for (edit, euid, want) in cases {
            let got = plan(euid, edit).unwrap_err().to_string();
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
            assert_eq!(got.lines().count(), 1, "{got}");
        }
    }

    #[test]
    fn config_origin_names_config_keys() {
        let got = plan(0, |l| {
            l.origin = Origin::Config {
                path: "/etc/secretd/shim.toml".into(),
                name: "python3".into(),
            }
        })
        .unwrap_err()
        .to_string();
        assert!(
            got.contains("(`user` in /etc/secretd/shim.toml [program.python3])")
                && got.contains("(`allow_root` in /etc/secretd/shim.toml [program.python3])"),
            "{got}"
        );
    }

    #[test]
    fn registration_uses_the_socket_passed_to_the_worker() {
        let p = plan(0, |l| {
            l.user = Some("nonroot".into());
            l.function = Some("orders".into());
            l.socket = Some("/run/x.sock".into());
        })
        .unwrap();
        assert_eq!(
            p.registration,
            Some(Registration {
                socket: "/run/x.sock".into(),
                function: "orders".into()
            })
        );
        assert_eq!(strings(&p.envp)[0], "SECRETD_SOCKET=/run/x.sock");
    }

    /// The socket: flag (or config key) > SECRETD_SOCKET in the shim's environment > default.
    #[test]
    fn socket_from_flag_then_environment_then_default() {
        let dir = etc();
        let with_env = |socket: Option<&str>, env: Option<&str>| {
            let mut launch = Launch::new(Origin::Flags);
            launch.program = "/app/worker".into();
            launch.user = Some("nonroot".into());
            launch.function = Some("orders".into());
            launch.socket = socket.map(str::to_owned);
            let getenv = |name: &str| match name {
                SOCKET_VAR => env.map(OsString::from),
                _ => getenv(name),
            };
            build(
                &launch,
                &Context {
                    etc: dir.path(),
                    uids: [0; 3],
                    gids: [0; 3],
                    getenv: &getenv,
                },
            )
        };
        #[rustfmt::skip]
        let rows = [
            (Some("/run/flag.sock"), Some("/run/env.sock"), "/run/flag.sock"),
            (None, Some("/run/env.sock"), "/run/env.sock"),
            (None, Some(""), DEFAULT_SOCKET),
            (None, None, DEFAULT_SOCKET),
        ];
        for (flag, env, want) in rows {
            let p = with_env(flag, env).unwrap();
            assert_eq!(strings(&p.envp)[0], format!("SECRETD_SOCKET={want}"));
            assert_eq!(p.registration.unwrap().socket, want, "{flag:?} {env:?}");
        }
        assert_eq!(
            with_env(None, Some("run/env.sock"))
                .unwrap_err()
                .to_string(),
            "SECRETD_SOCKET (from the environment) must be an absolute path, got \"run/env.sock\""
        );
    }

    #[test]
    fn nothing_unkept_reaches_the_plan() {
        let p = plan(0, |l| {
            l.user = Some("nonroot".into());
            l.keep = vec!["LANG".into()];
        })
        .unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
