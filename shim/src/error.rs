//! `ShimError`: one variant per operation that can fail, each rendered as the one line an
//! operator reads on stderr (after the `secretd-shim: ` prefix), and mapped to the exit code of
//! contract §4: 127 when PROGRAM is not found, 126 when it cannot be executed, 125 otherwise.
//!
//! No variant carries a value from the shim's environment or a `--set` value: names only.

use std::path::PathBuf;

use nix::errno::Errno;
use secretd_accounts::AccountsError;

/// Exit status when PROGRAM was not found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status when PROGRAM was found but could not be executed.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit status for every other failure of the shim itself.
pub const EXIT_SHIM: i32 = 125;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0} (see secretd-shim --help)")]
    Usage(String),
    #[error("interpreter mode needs a program name in argv[0]")]
    NoProgramName,
    #[error("cannot read {path}: {}", io_desc(.source))]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config is not trusted (owner, mode, a directory above it): one line naming why.
    #[error(transparent)]
    Untrusted(secretd_trust::TrustError),
    #[error("{path}:{line}:{column}: {message}")]
    ConfigParse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path} has no [program.{}] section (this binary was invoked as {name:?})", name.escape_debug())]
    ConfigNoProgram { path: PathBuf, name: String },
    #[error("{path} [program.{name}]: {message}")]
    ConfigInvalid {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error(
        "{path} [program.{name}]: exec {exec} is this shim itself; point it at the real program"
    )]
    ExecIsShim {
        path: PathBuf,
        name: String,
        exec: String,
    },
    #[error("cannot resolve {what}: {source}")]
    Account {
        what: &'static str,
        source: AccountsError,
    },
    #[error("user {user} has no passwd entry, so no primary group: give {group_key} explicitly")]
    NoPrimaryGroup { user: String, group_key: String },
    #[error("{group_key} needs {user_key}: the group is only changed together with the user")]
    GroupWithoutUser { group_key: String, user_key: String },
    #[error(
        "invalid variable name {name:?} in {key}: expected letters, digits and '_', not starting with a digit"
    )]
    InvalidVarName { key: String, name: String },
    #[error("SECRETD_SOCKET cannot be given with {key}: the shim sets it from the socket path")]
    ReservedVar { key: String },
    #[error("{key} must be an absolute path, got {path:?}")]
    SocketNotAbsolute { key: String, path: String },
    #[error("{key} must not be empty")]
    EmptyFunction { key: String },
    #[error(
        "refusing to run {program} as root (uid 0): choose an unprivileged user ({user_key}) or allow it explicitly ({allow_key})"
    )]
    RefuseRoot {
        program: String,
        user_key: String,
        allow_key: String,
    },
    #[error("cannot register as function {function:?} with the broker at {socket}: {reason}")]
    Register {
        socket: String,
        function: String,
        reason: String,
    },
    #[error("cannot close inherited file descriptors: {}", .0.desc())]
    CloseFds(Errno),
    #[error("cannot clear supplementary groups: {}", .0.desc())]
    SetGroups(Errno),
    #[error("cannot switch to gid {gid}: {}", .errno.desc())]
    SetGid { gid: u32, errno: Errno },
    #[error("cannot switch to uid {uid}: {}", .errno.desc())]
    SetUid { uid: u32, errno: Errno },
    #[error("cannot read back the process identity: {}", .0.desc())]
    GetIds(Errno),
    #[error("identity check failed after the switch: {what} are {got:?}, expected all {want}")]
    IdentityMismatch {
        what: &'static str,
        got: [u32; 3],
        want: u32,
    },
    #[error(
        "capabilities {caps:#x} are still held after switching to uid {uid}; refusing to continue"
    )]
    CapabilitiesKept { uid: u32, caps: u64 },
    #[error("root could be regained after switching to uid {uid}; refusing to continue")]
    RootRegainable { uid: u32 },
    #[error("cannot set no_new_privs: {}", .0.desc())]
    NoNewPrivs(Errno),
    #[error("cannot reset the signal mask: {}", .0.desc())]
    Signals(Errno),
    #[error("cannot execute {program}: {}", .errno.desc())]
    Exec { program: String, errno: Errno },
    #[error("cannot execute {program}: not found in PATH")]
    NotInPath { program: String },
}

impl ShimError {
    /// The message as the shim prints it: one line whatever the error quotes (an argv[0], a
    /// path from `SECRETD_SHIM_CONFIG`): line breaks become spaces.
    pub fn line(&self) -> String {
        self.to_string().replace(['\n', '\r'], " ")
    }

    /// The process exit status for this error (contract §4).
    pub fn exit_code(&self) -> i32 {
        match self {
            ShimError::Exec {
                errno: Errno::ENOENT,
                ..
            }
            | ShimError::NotInPath { .. } => EXIT_NOT_FOUND,
            ShimError::Exec { .. } => EXIT_CANNOT_EXECUTE,
            _ => EXIT_SHIM,
        }
    }
}

/// `std::io::Error` without the trailing " (os error N)".
fn io_desc(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interpreter_name_with_line_breaks_stays_one_line() {
        // Found by the shim_args_config fuzz target: argv[0] is the caller's to choose.
        let e = ShimError::ConfigNoProgram {
            path: PathBuf::from("/etc/secretd/shim.toml\nforged"),
            name: "gunicorn\"\n# user = \"root\"".to_owned(),
        };
        assert!(!e.line().contains(['\n', '\r']), "{}", e.line());
        assert!(
            e.line()
                .contains(r#"[program.gunicorn\"\n# user = \"root\"]"#),
            "{}",
            e.line()
        );
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        let exec = |errno| ShimError::Exec {
            program: "/app/worker".into(),
            errno,
        };
        assert_eq!(exec(Errno::ENOENT).exit_code(), 127);
        assert_eq!(exec(Errno::EACCES).exit_code(), 126);
        assert_eq!(exec(Errno::ENOEXEC).exit_code(), 126);
        assert_eq!(
            ShimError::NotInPath {
                program: "nope".into()
            }
            .exit_code(),
            127
        );
        assert_eq!(ShimError::SetGroups(Errno::EPERM).exit_code(), 125);
        assert_eq!(
            exec(Errno::EACCES).to_string(),
            "cannot execute /app/worker: Permission denied"
        );
        assert_eq!(
            exec(Errno::ENOENT).to_string(),
            "cannot execute /app/worker: No such file or directory"
        );
    }
}
