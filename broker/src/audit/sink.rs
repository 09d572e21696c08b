//! Where audit lines go: a file (or a FIFO, for a log shipper), stderr, or memory (tests).
//!
//! A file is opened by the broker, as root: it is created `0600` if absent (an existing file
//! keeps its mode) and appended to; its directory must exist; it is reached without following a
//! symlink and must be a regular file or a FIFO (never a device: the broker must not be steered
//! into writing elsewhere). A FIFO must have a reader when it is opened (`ENXIO` otherwise);
//! after that, writes to it wait like writes to a slow disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::config::AuditTarget;

/// An open audit destination; the writer thread owns it.
pub enum Sink {
    Stderr,
    File {
        file: File,
        path: PathBuf,
        /// A regular file (synced with `fdatasync`); otherwise a FIFO.
        regular: bool,
    },
    /// Any writer (tests).
    Writer(Box<dyn Write + Send>, String),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl Sink {
    /// Open `target`. Errors say which rule failed.
    pub fn open(target: &AuditTarget) -> io::Result<Sink> {
        match target {
            AuditTarget::Stderr => Ok(Sink::Stderr),
            AuditTarget::File(path) => open_file(path),
        }
    }

    /// What the operator log and `secretd status` call it.
    pub fn label(&self) -> String {
        match self {
            Sink::Stderr => "stderr".to_owned(),
            Sink::File { path, .. } => path.display().to_string(),
            Sink::Writer(_, label) => label.clone(),
        }
    }

    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Stderr => io::stderr().write(buf),
            Sink::File { file, .. } => file.write(buf),
            Sink::Writer(w, _) => w.write(buf),
        }
    }

    /// Ask the kernel to put what was written on the disk (`fdatasync`): only this reports
    /// errors the disk returns after `write` has succeeded (`EIO` at write-back). Nothing to do
    /// for a FIFO or stderr.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::File {
                file,
                regular: true,
                ..
            } => file.sync_data(),
            Sink::Writer(w, _) => w.flush(),
            _ => Ok(()),
        }
    }

    pub(super) fn syncs(&self) -> bool {
        matches!(self, Sink::File { regular: true, .. } | Sink::Writer(_, _))
    }
}

fn open_file(path: &Path) -> io::Result<Sink> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        // O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of hanging the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                io::Error::new(e.kind(), "it is a symbolic link; name the file itself")
            }
            _ => e,
        })?;
    let kind = file.metadata()?.file_type();
    let regular = kind.is_file();
    if !regular && !kind.is_fifo() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or a FIFO",
        ));
    }
    // Writes block again (a full FIFO waits like a slow disk; the queue bound covers it).
    let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
    fcntl(&file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(Sink::File {
        file,
        path: path.to_owned(),
        regular,
    })
}

/// What an in-memory audit log has written (for tests).
#[derive(Debug, Clone, Default)]
pub struct MemorySink(Arc<Mutex<Vec<u8>>>);

impl MemorySink {
    /// Every complete line written so far. Call [`super::AuditLog::flush`] first to see all of
    /// them.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Every line parsed as JSON.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }
}

impl Write for MemorySink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
