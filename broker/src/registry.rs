//! Worker registrations: which live process runs which function.
//!
//! A registration binds (pid, start time) to a function name and holds a pidfd on the process;
//! a task waits on that pidfd and removes the registration the moment the process exits, so a
//! recycled pid never inherits it. A caller counts as a function's worker when it is the
//! registered process itself, or when its parent chain (read at accept time, checked by pid
//! *and* start time) reaches a registered process running under the caller's uid.
//!
//! Registrations are written to a root-only (0600) state file beside the socket, so a broker
//! restarted by its supervisor keeps serving running functions. On load, each entry is
//! revalidated: a pidfd is opened, the start time read through `/proc` must match the recorded
//! one, and the pidfd must still be alive after that read; anything else is dropped.

use std::{
    collections::HashMap,
    io,
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use secretd_trust::{Trust, TrustError};
use serde::{Deserialize, Serialize};

use crate::{
    peer::{Peer, pidfd_alive, pidfd_open},
    procfs::ProcFs,
};

/// Function names: what `secretd-shim --function` and policies use.
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub pid: u32,
    pub starttime: u64,
    pub function: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    workers: Vec<Registration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("process {pid} does not exist or cannot be opened: {source}")]
    NoProcess { pid: u32, source: io::Error },
    #[error("process {pid} exited while it was being registered")]
    Exited { pid: u32 },
    #[error("failed to read /proc for process {pid}: {reason}")]
    Proc { pid: u32, reason: String },
    #[error("failed to watch process {pid}: {source}")]
    Watch { pid: u32, source: io::Error },
}

#[derive(Debug)]
pub struct Registry {
    workers: Mutex<HashMap<u32, Registration>>,
    generation: AtomicU64,
    state_path: PathBuf,
    proc: ProcFs,
    persist_lock: Mutex<()>,
}

impl Registry {
    pub fn new(state_path: PathBuf, proc: ProcFs) -> Arc<Registry> {
        Arc::new(Registry {
            workers: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            state_path,
            proc,
            persist_lock: Mutex::new(()),
        })
    }

    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// Bumped on every change; callers cache per generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Registration>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the peer process itself (`RegisterWorker` with pid 0): bound to the pidfd taken
    /// at accept, so there is no window in which the pid could be recycled.
    pub fn register_peer(
        self: &Arc<Self>,
        peer: &Peer,
        function: &str,
    ) -> Result<Registration, RegistryError> {
        let pidfd = peer.pidfd().map_err(|source| RegistryError::NoProcess {
            pid: peer.pid,
            source,
        })?;
        let reg = Registration {
            pid: peer.pid,
            starttime: peer.starttime,
            function: function.to_owned(),
        };
        self.insert(reg, pidfd)
    }

    /// Register another process by pid (admin use): pidfd first, then the start time, then a
    /// liveness check so the start time is the pidfd's process's.
    pub fn register_pid(
        self: &Arc<Self>,
        pid: u32,
        function: &str,
    ) -> Result<Registration, RegistryError> {
        let (pidfd, starttime) = self.open_verified(pid)?;
        let reg = Registration {
            pid,
            starttime,
            function: function.to_owned(),
        };
        self.insert(reg, pidfd)
    }

    fn open_verified(&self, pid: u32) -> Result<(OwnedFd, u64), RegistryError> {
        let pidfd = pidfd_open(pid).map_err(|source| RegistryError::NoProcess { pid, source })?;
        let stat = self.proc.stat(pid).map_err(|e| RegistryError::Proc {
            pid,
            reason: e.to_string(),
        })?;
        if !pidfd_alive(&pidfd) {
            return Err(RegistryError::Exited { pid });
        }
        Ok((pidfd, stat.starttime))
    }

    fn insert(
        self: &Arc<Self>,
        reg: Registration,
        pidfd: OwnedFd,
    ) -> Result<Registration, RegistryError> {
        let pid = reg.pid;
        let watched = crate::sys::watch_readable(pidfd)
            .map_err(|source| RegistryError::Watch { pid, source })?;
        self.lock().insert(pid, reg.clone());
        self.changed();
        let registry = Arc::clone(self);
        let starttime = reg.starttime;
        tokio::spawn(async move {
            // Readable = the process has exited.
            let _ = watched.readable().await;
            registry.remove_if(pid, starttime);
        });
        Ok(reg)
    }

    fn remove_if(&self, pid: u32, starttime: u64) {
        let removed = {
            let mut workers = self.lock();
            match workers.get(&pid) {
                Some(r) if r.starttime == starttime => workers.remove(&pid),
                _ => None,
            }
        };
        if let Some(r) = removed {
            tracing::info!(pid, function = %r.function, "registered worker exited; registration ended");
            self.changed();
        }
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.persist() {
            tracing::warn!(path = %self.state_path.display(), error = %e, "failed to write the registration state file");
        }
    }

    /// The function of a caller: its own registration, else the nearest registered ancestor
    /// under the same uid. Pids and start times must both match.
    pub fn function_for(&self, peer: &Peer) -> Option<String> {
        let workers = self.lock();
        if let Some(r) = workers
            .get(&peer.pid)
            .filter(|r| r.starttime == peer.starttime)
        {
            return Some(r.function.clone());
        }
        peer.ancestors
            .iter()
            .filter(|a| a.uid == peer.uid)
            .find_map(|a| workers.get(&a.pid).filter(|r| r.starttime == a.starttime))
            .map(|r| r.function.clone())
    }

    /// Rewrite the state file (0600) in place: one line of JSON, then truncate to it.
    ///
    /// Not temp-file + rename: on ext4 a rename over an existing file forces the new data to
    /// disk (`auto_da_alloc`), which cost ~1 ms per registration on a disk-backed socket
    /// directory. The file only has to survive a broker crash (a `write` is never half-done by
    /// a dying process) and never a reboot (every registered process dies with it), so no
    /// fsync either. A crash between the write and the truncate leaves old bytes after the
    /// newline, which `load` ignores. Writers are serialized, each writing the newest state.
    fn persist(&self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let _one_writer = self.persist_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut workers: Vec<Registration> = self.lock().values().cloned().collect();
        workers.sort_by_key(|r| r.pid);
        let mut body = serde_json::to_vec(&StateFile {
            version: 1,
            workers,
        })?;
        body.push(b'\n');
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.state_path)?;
        f.write_all_at(&body, 0)?;
        f.set_len(body.len() as u64)
    }

    /// Load registrations left by a previous broker. Entries whose process is gone, or whose pid
    /// now belongs to a different process (start time differs), are dropped; an unreadable or
    /// garbled file is ignored with a warning. A state file that is not trusted — not owned by
    /// root or us, accessible to group/other, in a directory others can write (contract §7) —
    /// is an error: the registrations in it may have been planted.
    pub fn load(self: &Arc<Self>) -> Result<Vec<Registration>, TrustError> {
        let mut file = match Trust::process().open_private_file(&self.state_path) {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(TrustError::Open { source, .. }) => {
                tracing::warn!(path = %self.state_path.display(), error = %source, "cannot read the registration state file");
                return Ok(Vec::new());
            }
            Err(untrusted) => return Err(untrusted),
        };
        let mut bytes = Vec::new();
        let state: StateFile = match io::Read::read_to_end(&mut file, &mut bytes)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                // The first line is the state; anything after it is left over from a longer
                // earlier state (see `persist`).
                let line = bytes.split(|&c| c == b'\n').next().unwrap_or_default();
                serde_json::from_slice(line).map_err(|e| e.to_string())
            }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %self.state_path.display(), error = %e, "ignoring an unreadable registration state file");
                return Ok(Vec::new());
            }
        };
        let mut kept = Vec::new();
        for reg in state.workers {
            if !valid_function_name(&reg.function) {
                continue;
            }
            match self.open_verified(reg.pid) {
                Ok((pidfd, starttime)) if starttime == reg.starttime => {
                    if let Ok(r) = self.insert(reg, pidfd) {
                        kept.push(r);
                    }
                }
                _ => {
                    tracing::info!(pid = reg.pid, function = %reg.function, "dropped a stale registration (process gone or pid recycled)")
                }
            }
        }
        // Rewrite the file so dropped entries disappear from disk too.
        self.changed();
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn state_survives_leftovers_and_drops_dead_processes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secretd.sock.state");
        let me = std::process::id();
        let start = ProcFs::system().stat(me).unwrap().starttime;
        // A live registration (this test process), a recycled pid (wrong start time), and the
        // tail of a longer earlier state after the newline, as a crash mid-persist leaves it.
        let body = format!(
            "{{\"version\":1,\"workers\":[{{\"pid\":{me},\"starttime\":{start},\"function\":\"orders\"}},\
             {{\"pid\":1,\"starttime\":1,\"function\":\"stale\"}}]}}\n\"function\":\"leftover\"}}]}}"
        );
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let registry = Registry::new(path.clone(), ProcFs::system());
        let kept = registry.load().unwrap();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].function, "orders");
        // Rewritten in place: one line, the stale entry and the leftover gone.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("orders") && !text.contains("stale") && !text.contains("leftover"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn a_state_file_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.state");
        std::fs::write(&path, "{\"version\":1,\"workers\":[]}\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Registry::new(path.clone(), ProcFs::system())
            .load()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: writable by group/other (mode 0666)", path.display())
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Registry::new(path.clone(), ProcFs::system())
            .load()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("accessible to group/other (mode 0644)"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            Registry::new(path, ProcFs::system())
                .load()
                .unwrap()
                .is_empty()
        );
    }
}
