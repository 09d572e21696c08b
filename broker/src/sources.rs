//! Where secrets come from: the broker's own start-up environment and secret directories.
//!
//! `[sources.env]`: variables captured (and wiped) by `scrub` whose name matches `include` and
//! not `exclude`, and is a valid secret name. Read once at start-up: the environment no longer
//! exists afterwards.
//!
//! `[sources.files]`: each regular file directly inside a configured directory is one secret
//! named by its file name — Docker secrets, Kubernetes secret volumes, systemd credentials.
//! Every directory and file must be trusted (`secretd_trust`: owned by root or the broker's uid,
//! not writable by group/other unless on a read-only mount, nor any directory above): an
//! untrusted one is an error, so a start-up, `check` or reload refuses it and a re-read keeps
//! the last good values. Symlinks are followed only when they resolve inside the same directory
//! (Kubernetes' `KEY -> ..data/KEY`); one leading elsewhere (`/etc/shadow`), a FIFO, socket or
//! device is skipped with a warning and never blocks. Names starting with `.` (`..data`,
//! `..2024_01_01…`) and sub-directories are skipped; a file whose name is not a valid secret
//! name is skipped with a warning. Files larger than [`MAX_SECRET_FILE`] are an error.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use secrecy::SecretBox;
use secretd_trust::{Entry, Trust, TrustError};

use crate::{config::EnvSource, name::SecretName, store::secret};

/// Named secret values, as a source produces them.
pub type Secrets = Vec<(SecretName, SecretBox<[u8]>)>;

/// Largest secret file read (1 MiB): a secret bigger than that is almost surely a mistake.
pub const MAX_SECRET_FILE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("failed to read secret directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read secret file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A directory or file that an unprivileged uid could have written (contract §7).
    #[error("{0}")]
    Untrusted(TrustError),
    #[error("secret file {path} is larger than {MAX_SECRET_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("secret name {name} is provided by both {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("source task failed: {0}")]
    Task(String),
    #[error("OpenBao: {0}")]
    OpenBao(String),
}

/// Drop the secrets whose names `[sources.openbao]` maps: that source wins, with a warning, so
/// two sources never fight over one name (each refresh would flip its value and version).
pub fn without_openbao(config: &crate::config::Config, secrets: Secrets, what: &str) -> Secrets {
    let Some(o) = &config.openbao else {
        return secrets;
    };
    secrets
        .into_iter()
        .filter(|(name, _)| {
            let mapped = o.maps(name);
            if mapped {
                tracing::warn!(name = %name, "secret from {what} is ignored: [sources.{}] maps the same name", o.section);
            }
            !mapped
        })
        .collect()
}

/// Keep the selected variables as secrets; drop (zeroize) the rest.
pub fn select_env(source: &EnvSource, vars: Vec<(String, SecretBox<[u8]>)>) -> Secrets {
    vars.into_iter()
        .filter(|(name, _)| source.selects(name))
        .filter_map(|(name, value)| match SecretName::parse(&name) {
            Ok(n) => Some((n, value)),
            Err(_) => {
                tracing::warn!(variable = %name, "environment variable selected by [sources.env] is not a valid secret name; skipped");
                None
            }
        })
        .collect()
}

/// Read every secret file of `dirs`. Each directory, every directory above it and every file
/// read must be trusted (see `secretd_trust`): anything else is an error and nothing is read.
/// Symlinks are followed only inside their own directory; FIFOs, sockets, devices and symlinks
/// leading out are skipped with a warning (never opened in a way that could block).
pub fn read_files(dirs: &[PathBuf]) -> Result<Secrets, SourceError> {
    let mut out: Secrets = Vec::new();
    walk_files(dirs, |name, path, file| {
        out.push((name, read_limited(path, file)?));
        Ok(())
    })?;
    Ok(out)
}

/// What `secretd check` says about the file sources: every directory and file is judged as
/// [`read_files`] would, no value is read. Returns one warning line per skipped entry. A
/// directory that does not exist here is a warning, not an error: a config is often checked
/// on another machine than the one that serves it (`serve` still refuses to start without it).
pub fn check_files(dirs: &[PathBuf]) -> Result<Vec<String>, SourceError> {
    let mut warnings = Vec::new();
    let mut present = Vec::new();
    for dir in dirs {
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => warnings.push(format!(
                "{}: does not exist here; `serve` refuses to start without it",
                dir.display()
            )),
            _ => present.push(dir.clone()),
        }
    }
    walk(&present, &mut |_, _, _| Ok(()), &mut |w| warnings.push(w))?;
    Ok(warnings)
}

fn walk_files(
    dirs: &[PathBuf],
    mut each: impl FnMut(SecretName, &Path, std::fs::File) -> Result<(), SourceError>,
) -> Result<(), SourceError> {
    walk(dirs, &mut each, &mut |w| tracing::warn!("{w}"))
}

/// Visit every trusted secret file of `dirs`, opened, in name order per directory.
fn walk(
    dirs: &[PathBuf],
    each: &mut dyn FnMut(SecretName, &Path, std::fs::File) -> Result<(), SourceError>,
    warn: &mut dyn FnMut(String),
) -> Result<(), SourceError> {
    let trust = Trust::process();
    // Which file provided each name, to report duplicates across directories.
    let mut seen: std::collections::HashMap<SecretName, PathBuf> = std::collections::HashMap::new();
    for dir in dirs {
        let read_dir = |source| SourceError::ReadDir {
            path: dir.clone(),
            source,
        };
        let trusted = trust.open_dir(dir).map_err(|e| match e {
            TrustError::Open { source, .. } => read_dir(source),
            untrusted => SourceError::Untrusted(untrusted),
        })?;
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            names.push(entry.map_err(read_dir)?.file_name());
        }
        names.sort();
        for file_name in names {
            let path = dir.join(&file_name);
            let Some(file_name) = file_name.to_str().map(str::to_owned) else {
                warn(format!(
                    "{}: file name is not UTF-8; skipped",
                    path.display()
                ));
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            let file = match trusted.open_entry(file_name.as_ref()) {
                Ok(Entry::File(f)) => f,
                Ok(Entry::Directory) => continue,
                Ok(Entry::Skipped(why)) => {
                    warn(why);
                    continue;
                }
                Err(TrustError::Open { source, .. }) => {
                    return Err(SourceError::ReadFile { path, source });
                }
                Err(untrusted) => return Err(SourceError::Untrusted(untrusted)),
            };
            let Ok(name) = SecretName::parse(&file_name) else {
                warn(format!(
                    "{}: file name is not a valid secret name; skipped",
                    path.display()
                ));
                continue;
            };
            if let Some(first) = seen.get(&name) {
                return Err(SourceError::Duplicate {
                    name: file_name,
                    first: first.clone(),
                    second: path,
                });
            }
            each(name.clone(), &path, file)?;
            seen.insert(name, path);
        }
    }
    Ok(())
}

fn read_limited(path: &Path, file: std::fs::File) -> Result<SecretBox<[u8]>, SourceError> {
    let mut buf = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|source| SourceError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
    if buf.len() as u64 > MAX_SECRET_FILE {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(secret(buf))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn reads_kubernetes_style_volume() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_11_28_00_00_00.1");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("DB_URL"), b"postgres://x").unwrap();
        std::os::unix::fs::symlink("..2026_11_28_00_00_00.1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/DB_URL", dir.path().join("DB_URL")).unwrap();
        std::fs::write(dir.path().join("plain"), b"v").unwrap();
        std::fs::write(dir.path().join("bad name"), b"v").unwrap();
        std::fs::create_dir(dir.path().join("subdir")).unwrap();
        let got = read_files(&[dir.path().to_owned()]).unwrap();
        let got: Vec<(String, Vec<u8>)> = got
            .iter()
            .map(|(n, v)| (n.to_string(), v.expose_secret().to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                ("DB_URL".to_owned(), b"postgres://x".to_vec()),
                ("plain".to_owned(), b"v".to_vec())
            ]
        );
    }

    #[test]
    fn untrusted_dirs_are_errors_and_odd_entries_warnings() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("KEY"), b"v").unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("PIPE"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("OUT")).unwrap();
        let missing = PathBuf::from("/nonexistent/secretd");
        let warnings = check_files(&[missing, dir.path().to_owned()]).unwrap();
        let d = dir.path().display();
        assert_eq!(
            warnings,
            [
                "/nonexistent/secretd: does not exist here; `serve` refuses to start without it"
                    .to_owned(),
                format!("{d}/OUT: symlink to /etc/passwd leads outside {d}; not followed"),
                format!("{d}/PIPE: not a regular file (FIFO); skipped"),
            ]
        );
        let got = read_files(&[dir.path().to_owned()]).unwrap();
        assert_eq!(got.len(), 1);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = read_files(&[dir.path().to_owned()])
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("{d}: writable by group/other (mode 0777)"));
        let e = check_files(&[dir.path().to_owned()])
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("{d}: writable by group/other (mode 0777)"));
    }

    #[test]
    fn missing_dir_and_huge_file_are_errors() {
        let e = read_files(&[PathBuf::from("/nonexistent/secretd")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "failed to read secret directory /nonexistent/secretd: No such file or directory (os error 2)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("BIG"),
            vec![b'x'; (MAX_SECRET_FILE + 1) as usize],
        )
        .unwrap();
        let e = read_files(&[dir.path().to_owned()])
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("BIG is larger than 1048576 bytes"), "{e}");
    }
}
