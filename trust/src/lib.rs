//! Trusted files: the one place that decides whether a file that steers a privileged process
//! (the broker's config, its secret directories and credential files, the shim's config) may be
//! believed (contract §7, "Files that decide who gets what").
//!
//! A file is trusted when no uid other than root — or the process's own effective uid, for an
//! unprivileged process — can have written it, or can replace it:
//! - it is owned by root or by that uid, and not writable by group or other;
//! - so is every directory on the way to it, both along the path as given and along the path
//!   its symlinks resolve to; an ancestor directory writable by group or other is accepted only
//!   with the sticky bit (as `/tmp` has: nobody can rename or remove another uid's entries);
//! - a write bit on an object that sits on a **read-only mount** is not counted: it cannot be
//!   used through that mount. This is what keeps Kubernetes secret volumes working: with a pod
//!   `fsGroup` the volume's root is `drwxrwsrwt root:<fsGroup>` and its files are group-owned,
//!   but the volume is mounted read-only. The owner rule still applies there.
//!
//! How: the ancestors are checked first, from `/` down (once a directory is trusted, nobody
//! untrusted can change what its entries point to); then the file is opened with
//! `O_NOFOLLOW | O_NONBLOCK` (a FIFO swapped in cannot block the open) and the checks that
//! matter are made on the opened descriptor (`fstat`, `fstatvfs`), never on the path again.
//! Non-regular files are refused (or, inside a directory of secrets, reported for skipping)
//! before and after the open.
//!
//! Every error is one line that names the path and what is wrong, as operators read it:
//! `/etc/secretd/shim.toml: writable by group/other (mode 0666)`,
//! `/etc/secretd/config.toml: owned by uid 1001`.

use std::{
    ffi::OsStr,
    fs::{File, Metadata, OpenOptions},
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use nix::sys::statvfs::{FsFlags, fstatvfs, statvfs};

/// Why a file is not trusted (or could not be looked at). Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file or one of its directories could not be opened or looked at.
    #[error("{}: {}", path.display(), io_text(source))]
    Open { path: PathBuf, source: io::Error },
    /// Owned by a uid that is neither root nor the process's own.
    #[error("{}: owned by uid {uid}", path.display())]
    Owner { path: PathBuf, uid: u32 },
    /// Writable by group or other (and not on a read-only mount; not a sticky ancestor).
    #[error("{}: writable by group/other (mode {mode:04o})", path.display())]
    Writable { path: PathBuf, mode: u32 },
    /// A FIFO, socket, device (or a directory where a file was expected).
    #[error("{}: not a regular file ({kind})", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    /// A file (or another non-directory) where a directory was expected.
    #[error("{}: not a directory ({kind})", path.display())]
    NotDirectory { path: PathBuf, kind: &'static str },
    /// A credential file that group or other may read.
    #[error(
        "{}: accessible to group/other (mode {mode:04o}): a credential file must be 0600 or 0400",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
}

impl TrustError {
    /// The file (or a directory on its path) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// `No such file or directory`, without Rust's ` (os error 2)` suffix.
fn io_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

/// Who may own a trusted file besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    owner: u32,
}

/// What a directory of secrets holds under one name, as [`TrustedDir::open_entry`] found it.
#[derive(Debug)]
pub enum Entry {
    /// A trusted regular file, opened (read it from this descriptor).
    File(File),
    /// A sub-directory (not a secret).
    Directory,
    /// Not read; the reason is one line for a warning (a FIFO, a symlink leading out, …).
    Skipped(String),
}

/// A trusted directory of secret files, with the path its symlinks resolve to.
#[derive(Debug)]
pub struct TrustedDir {
    trust: Trust,
    /// As configured (used in messages).
    path: PathBuf,
    /// Symlinks resolved: entries must resolve inside it.
    real: PathBuf,
}

impl Trust {
    /// The rule for this process: root, and its own effective uid.
    pub fn process() -> Trust {
        Trust {
            owner: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Root and `uid` (tests use an unrelated uid to see refusals without root).
    pub fn with_owner(uid: u32) -> Trust {
        Trust { owner: uid }
    }

    fn owner_ok(&self, uid: u32) -> bool {
        uid == 0 || uid == self.owner
    }

    /// Open `path` for reading if it is a trusted regular file.
    pub fn open_file(&self, path: &Path) -> Result<File, TrustError> {
        let real = self.check_ancestors(path)?;
        let before = lstat(&real)?;
        if !before.is_file() {
            return Err(TrustError::NotRegular {
                path: path.to_owned(),
                kind: kind(&before),
            });
        }
        let file = open_nofollow(&real, false)?;
        let meta = file.metadata().map_err(|source| TrustError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(TrustError::NotRegular {
                path: path.to_owned(),
                kind: kind(&meta),
            });
        }
        self.check_object(path, &file, &meta)?;
        Ok(file)
    }

    /// [`Trust::open_file`], and no access for group or other at all (credentials).
    pub fn open_private_file(&self, path: &Path) -> Result<File, TrustError> {
        let file = self.open_file(path)?;
        let mode = file
            .metadata()
            .map_err(|source| TrustError::Open {
                path: path.to_owned(),
                source,
            })?
            .mode();
        if mode & 0o077 != 0 {
            return Err(TrustError::Exposed {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        Ok(file)
    }

    /// Check a directory of secret files: trusted itself (not merely as an ancestor: a sticky
    /// world-writable directory is refused) and every ancestor.
    pub fn open_dir(&self, path: &Path) -> Result<TrustedDir, TrustError> {
        let real = self.check_ancestors(path)?;
        let dir = open_nofollow(&real, true)?;
        let meta = dir.metadata().map_err(|source| TrustError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(TrustError::NotDirectory {
                path: path.to_owned(),
                kind: kind(&meta),
            });
        }
        self.check_object(path, &dir, &meta)?;
        Ok(TrustedDir {
            trust: *self,
            path: path.to_owned(),
            real,
        })
    }

    /// Check every directory above `path`, along the path as given and along the path with its
    /// symlinks resolved. Returns the resolved path.
    fn check_ancestors(&self, path: &Path) -> Result<PathBuf, TrustError> {
        let given = if path.is_absolute() {
            path.to_owned()
        } else {
            std::env::current_dir()
                .map_err(|source| TrustError::Open {
                    path: path.to_owned(),
                    source,
                })?
                .join(path)
        };
        // A directory on the way that does not exist: the file does not (say so about it).
        let missing = |e: TrustError| match e {
            TrustError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                TrustError::Open {
                    path: path.to_owned(),
                    source,
                }
            }
            other => other,
        };
        self.check_dirs_above(&given).map_err(missing)?;
        let real = std::fs::canonicalize(&given).map_err(|source| TrustError::Open {
            path: path.to_owned(),
            source,
        })?;
        if real != given {
            self.check_dirs_above(&real).map_err(missing)?;
        }
        Ok(real)
    }

    /// The directories above `path`, from `/` down. A symlink on the way is not judged itself
    /// (nobody can modify a symlink; replacing it needs its directory, which is checked) — what
    /// it leads to is checked on the resolved path.
    fn check_dirs_above(&self, path: &Path) -> Result<(), TrustError> {
        let mut above: Vec<&Path> = path.ancestors().skip(1).collect();
        above.reverse();
        for dir in above {
            let meta = lstat(dir)?;
            if meta.file_type().is_symlink() {
                continue;
            }
            if !meta.is_dir() {
                return Err(TrustError::NotDirectory {
                    path: dir.to_owned(),
                    kind: kind(&meta),
                });
            }
            if !self.owner_ok(meta.uid()) {
                return Err(TrustError::Owner {
                    path: dir.to_owned(),
                    uid: meta.uid(),
                });
            }
            let mode = meta.mode();
            if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 && !read_only_path(dir) {
                return Err(TrustError::Writable {
                    path: dir.to_owned(),
                    mode: mode & 0o7777,
                });
            }
        }
        Ok(())
    }

    /// Owner and write bits of an opened file or directory, judged on its descriptor.
    fn check_object(&self, path: &Path, fd: &File, meta: &Metadata) -> Result<(), TrustError> {
        if !self.owner_ok(meta.uid()) {
            return Err(TrustError::Owner {
                path: path.to_owned(),
                uid: meta.uid(),
            });
        }
        let mode = meta.mode();
        if mode & 0o022 != 0 && !read_only_fd(fd) {
            return Err(TrustError::Writable {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        Ok(())
    }
}

impl TrustedDir {
    /// The directory as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the entry `name` of this directory, following a symlink only when it resolves
    /// inside this same directory (Kubernetes' `KEY -> ..data/KEY`, `..data -> ..2026_…`),
    /// every directory between here and the file being trusted too. A FIFO, socket, device, a
    /// dangling symlink or one leading outside is [`Entry::Skipped`], never opened in a way
    /// that could block. A regular file that is not trusted is an error.
    pub fn open_entry(&self, name: &OsStr) -> Result<Entry, TrustError> {
        let shown = self.path.join(name);
        let here = self.real.join(name);
        let mut meta = lstat(&here)?;
        let mut target = here;
        if meta.file_type().is_symlink() {
            let Ok(resolved) = std::fs::canonicalize(&target) else {
                return Ok(Entry::Skipped(format!(
                    "{}: dangling symlink; skipped",
                    shown.display()
                )));
            };
            if resolved == self.real || !resolved.starts_with(&self.real) {
                return Ok(Entry::Skipped(format!(
                    "{}: symlink to {} leads outside {}; not followed",
                    shown.display(),
                    resolved.display(),
                    self.path.display()
                )));
            }
            // The directories between this one and the file (`..2026_…`) are judged like
            // this one: a writable one would let its writers swap the file.
            let mut between: Vec<&Path> = resolved
                .ancestors()
                .skip(1)
                .take_while(|p| *p != self.real)
                .collect();
            between.reverse();
            for dir in between {
                let d = open_nofollow(dir, true)?;
                let m = d.metadata().map_err(|source| TrustError::Open {
                    path: dir.to_owned(),
                    source,
                })?;
                self.trust.check_object(dir, &d, &m)?;
            }
            meta = lstat(&resolved)?;
            target = resolved;
        }
        if meta.is_dir() {
            return Ok(Entry::Directory);
        }
        if !meta.is_file() {
            return Ok(Entry::Skipped(format!(
                "{}: not a regular file ({}); skipped",
                shown.display(),
                kind(&meta)
            )));
        }
        let file = open_nofollow(&target, false)?;
        let meta = file.metadata().map_err(|source| TrustError::Open {
            path: shown.clone(),
            source,
        })?;
        if !meta.is_file() {
            // Swapped between the lstat and the open: the non-blocking open did not wait.
            return Ok(Entry::Skipped(format!(
                "{}: not a regular file ({}); skipped",
                shown.display(),
                kind(&meta)
            )));
        }
        self.trust.check_object(&shown, &file, &meta)?;
        Ok(Entry::File(file))
    }
}

fn lstat(path: &Path) -> Result<Metadata, TrustError> {
    std::fs::symlink_metadata(path).map_err(|source| TrustError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Open read-only, never through a final symlink, never waiting (a FIFO opens at once).
fn open_nofollow(path: &Path, directory: bool) -> Result<File, TrustError> {
    let mut flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    if directory {
        flags |= libc::O_DIRECTORY;
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| TrustError::Open {
            path: path.to_owned(),
            source,
        })
}

fn read_only_fd(fd: &File) -> bool {
    fstatvfs(fd).is_ok_and(|s| s.flags().contains(FsFlags::ST_RDONLY))
}

fn read_only_path(path: &Path) -> bool {
    statvfs(path).is_ok_and(|s| s.flags().contains(FsFlags::ST_RDONLY))
}

fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_file() {
        "regular file"
    } else {
        "unknown type"
    }
}

#[cfg(test)]
mod tests;
