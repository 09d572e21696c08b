//! `secretd check`: every start-up check of `serve` that needs neither to bind the socket nor
//! to fetch from a remote store, run without changing anything on disk.
//!
//! Parsing and validating the file (users, groups, patterns, OpenBao paths and credential
//! files) is [`Config::load_or_default`]'s job and happens before this. Here come the checks
//! `serve` makes afterwards, through the same functions `serve` calls, so the two cannot
//! disagree: the socket path ([`server::check_socket_path`]), the file sources
//! ([`state::initial_secrets`], values read and zeroized at once) and the audit log's location.
//! What is left for `serve` alone: creating the socket directory, binding, the OpenBao
//! start-up fetch, and opening (creating) the audit log.

use std::path::Path;

use crate::{
    config::{AuditTarget, Config},
    server::{self, SocketPath},
    sources, state,
};

/// One finding of [`run`]: a problem makes `serve` fail; a note is worth knowing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Problem(String),
    Note(String),
    /// Something `serve` would skip with a warning (a files-source entry it will not read).
    Warning(String),
}

/// The start-up checks for `config` with the socket `serve` would use.
pub fn run(config: &Config, socket: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    match server::check_socket_path(socket) {
        Ok(SocketPath::Free) => {}
        Ok(SocketPath::Live) => out.push(Finding::Note(format!(
            "a broker is serving {} now: `serve` would refuse to start a second one there \
             (`secretd reload` applies this config to it)",
            socket.display()
        ))),
        Ok(SocketPath::Stale) => out.push(Finding::Note(format!(
            "{} is a stale socket: `serve` will replace it",
            socket.display()
        ))),
        Err(e) => out.push(Finding::Problem(e.to_string())),
    }
    // The same reader serve uses; the values are dropped (zeroized) straight away.
    match state::initial_secrets(config, Vec::new()) {
        Err(e) => out.push(Finding::Problem(e.to_string())),
        // What serve would skip with a warning (untrusted links, FIFOs, …), named here too.
        Ok(_) => match sources::check_files(&config.files.dirs) {
            Ok(warnings) => out.extend(warnings.into_iter().map(Finding::Warning)),
            Err(e) => out.push(Finding::Problem(e.to_string())),
        },
    }
    if let AuditTarget::File(path) = &config.server.audit_log
        && let Some(problem) = audit_location(path)
    {
        out.push(Finding::Problem(problem));
    }
    out
}

/// What `serve` would refuse about the audit log file, decided without creating it: an
/// existing path must be a regular file (not a symlink), an absent one needs its directory.
fn audit_location(path: &Path) -> Option<String> {
    let why = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            "it is a symbolic link; name the file itself".to_owned()
        }
        Ok(meta) if !meta.is_file() => "not a regular file".to_owned(),
        Ok(_) => return None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            match std::fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => return None,
                Ok(_) => format!("{} is not a directory", dir.display()),
                Err(e) => format!(
                    "its directory {} is missing or unreadable ({e}); create it first",
                    dir.display()
                ),
            }
        }
        Err(e) => e.to_string(),
    };
    Some(format!(
        "cannot use the audit log {}: {why}",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/x/secretd.toml"), Path::new("/etc")).unwrap()
    }

    fn problems(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter_map(|f| match f {
                Finding::Problem(p) => Some(p.as_str()),
                Finding::Note(_) | Finding::Warning(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_socket_in_a_world_writable_directory_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let socket = open.join("s.sock");
        let found = run(&Config::defaults(), &socket);
        assert_eq!(
            problems(&found),
            [format!(
                "refusing socket directory {}: mode 1777 lets others create or replace the \
                 socket; put the socket in a directory only root can write, such as /run/secretd",
                open.display()
            )]
        );
        // A directory that does not exist yet is fine: serve creates it 0755.
        assert!(problems(&run(&Config::defaults(), &dir.path().join("new/s.sock"))).is_empty());
    }

    #[test]
    fn a_missing_files_directory_and_audit_directory_are_problems() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(&format!(
            "[server]\naudit_log = \"{0}/nope/audit.jsonl\"\n[sources.files]\ndirs = [\"{0}/missing\"]\n",
            dir.path().display()
        ));
        let found = run(&c, &dir.path().join("s.sock"));
        let p = problems(&found);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains(&format!("{}/missing", dir.path().display())),
            "{p:?}"
        );
        assert!(
            p[1].starts_with(&format!(
                "cannot use the audit log {}/nope/audit.jsonl: its directory",
                dir.path().display()
            )),
            "{p:?}"
        );
        // Nothing was created.
        assert!(!dir.path().join("nope").exists());
    }
}
