//! Where secrets come from: the broker's own start-up environment and secret directories.
//!
//! `[sources.env]`: variables captured (and wiped) by `scrub` whose name matches `include` and
//! not `exclude`, and is a valid secret name. Read once at start-up: the environment no longer
//! exists afterwards.
//!
//! `[sources.files]`: each regular file directly inside a configured directory is one secret
//! named by its file name — Docker secrets, Kubernetes secret volumes, systemd credentials.
//! Symlinks are followed (Kubernetes' `KEY -> ..data/KEY`); names starting with `.` (`..data`,
//! `..2024_01_01…`) and sub-directories are skipped; a file whose name is not a valid secret
//! name is skipped with a warning. Files larger than [`MAX_SECRET_FILE`] are an error.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use secrecy::SecretBox;

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

/// Read every secret file of `dirs`.
pub fn read_files(dirs: &[PathBuf]) -> Result<Secrets, SourceError> {
    let mut out: Secrets = Vec::new();
    // Which file provided each name, to report duplicates across directories.
    let mut seen: std::collections::HashMap<SecretName, PathBuf> = std::collections::HashMap::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|source| SourceError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SourceError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            paths.push(entry.path());
        }
        paths.sort();
        for path in paths {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned)
            else {
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            // Follows symlinks: Kubernetes exposes each key as a link into `..data/`.
            let meta = std::fs::metadata(&path).map_err(|source| SourceError::ReadFile {
                path: path.clone(),
                source,
            })?;
            if !meta.is_file() {
                continue;
            }
            let Ok(name) = SecretName::parse(&file_name) else {
                tracing::warn!(path = %path.display(), "file name is not a valid secret name; skipped");
                continue;
            };
            if let Some(first) = seen.get(&name) {
                return Err(SourceError::Duplicate {
                    name: file_name,
                    first: first.clone(),
                    second: path,
                });
            }
            let value = read_limited(&path)?;
            seen.insert(name.clone(), path);
            out.push((name, value));
        }
    }
    Ok(out)
}

fn read_limited(path: &Path) -> Result<SecretBox<[u8]>, SourceError> {
    let file = std::fs::File::open(path).map_err(|source| SourceError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
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
