//! Watching `[sources.files]` directories with inotify, so a rotated secret file reaches the
//! store (and every `WatchSecret` stream) without a reload.
//!
//! What is watched: each configured directory itself (not the files): a file created, written
//! and closed, renamed in or out, deleted or re-permissioned there — and Kubernetes' atomic
//! update, which writes a new `..2024_…` directory and renames a `..data_tmp` symlink over
//! `..data` (an `IN_MOVED_TO` on the watched directory; the `KEY -> ..data/KEY` links stay).
//! A file reached through a symlink that points *outside* the directory is only re-read on a
//! refresh or reload.
//!
//! On any event the watcher waits for the burst to settle ([`DEBOUNCE`]), then re-reads every
//! directory with [`sources::read_files`] and replaces the file-origin secrets all at once
//! (`Store::replace_origin`): changed values get a new version, vanished files are deleted. A
//! read error keeps the last good values and is recorded for Status (source "files").
//! After a reload the watches are re-armed for the new directory list; a directory that does
//! not exist (yet) is retried every [`REARM`].

use std::{path::PathBuf, sync::Arc, time::Duration};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use crate::{state::Broker, store::Event};

/// Quiet time after the last event before the directories are re-read.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often a directory that could not be watched is tried again.
pub const REARM: Duration = Duration::from_secs(5);

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DONT_FOLLOW
        | AddWatchFlags::IN_ONLYDIR
}

/// Start watching the directories of the configuration in force (and of every reload).
pub fn spawn(broker: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(broker))
}

/// An inotify instance with every directory of `dirs` that could be watched, read by a thread
/// of its own (blocking `poll`, no unsafe fd registration) that sends one message per batch of
/// events — `true` if a watched directory itself went away. The thread ends within
/// [`POLL_TICK`] of the receiver being dropped. `complete` is false when some directory could
/// not be watched (missing, unreadable): the caller re-arms later.
fn arm(dirs: &[PathBuf]) -> std::io::Result<(mpsc::Receiver<bool>, bool)> {
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let mut complete = true;
    for dir in dirs {
        if let Err(e) = ino.add_watch(dir.as_path(), mask()) {
            complete = false;
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch secret directory; retrying every {}s", REARM.as_secs());
        }
    }
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("secretd-inotify".to_owned())
        .spawn(move || read_loop(&ino, &tx))?;
    Ok((rx, complete))
}

/// How often the reader thread checks that someone still listens.
const POLL_TICK: u16 = 250;

fn read_loop(ino: &Inotify, tx: &mpsc::Sender<bool>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    while !tx.is_closed() {
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(POLL_TICK)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "inotify poll failed");
                return;
            }
        }
        match ino.read_events() {
            Ok(evs) => {
                if tx.blocking_send(evs.iter().any(gone)).is_err() {
                    return;
                }
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "inotify read failed");
                return;
            }
        }
    }
}

async fn run(broker: Arc<Broker>) {
    let mut events = broker.store.subscribe();
    loop {
        let dirs = broker.config().files.dirs.clone();
        if dirs.is_empty() {
            // Nothing to watch until a reload adds directories.
            loop {
                match events.recv().await {
                    Ok(Event::PolicyReloaded) | Err(RecvError::Lagged(_)) => {
                        if !broker.config().files.dirs.is_empty() {
                            break;
                        }
                    }
                    Ok(Event::ShuttingDown) | Err(RecvError::Closed) => return,
                    Ok(_) => {}
                }
            }
            continue;
        }
        let (mut changes, complete) = match arm(&dirs) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "inotify unavailable: secret files are re-read only on refresh or reload");
                return;
            }
        };
        if !complete {
            // Something may have appeared in the meantime.
            reread(&broker).await;
        }
        let rearm = async {
            if complete {
                std::future::pending::<()>().await;
            } else {
                tokio::time::sleep(REARM).await;
            }
        };
        tokio::pin!(rearm);
        loop {
            tokio::select! {
                c = changes.recv() => {
                    let Some(mut self_gone) = c else { break };
                    // Let the burst settle (an editor's rename + chmod, Kubernetes' swap).
                    loop {
                        tokio::time::sleep(DEBOUNCE).await;
                        let mut more = false;
                        while let Ok(g) = changes.try_recv() {
                            self_gone |= g;
                            more = true;
                        }
                        if !more {
                            break;
                        }
                    }
                    reread(&broker).await;
                    if self_gone {
                        // The directory itself was removed or moved: watch it again by path.
                        break;
                    }
                }
                e = events.recv() => match e {
                    Ok(Event::PolicyReloaded) | Err(RecvError::Lagged(_)) => {
                        if broker.config().files.dirs != dirs {
                            break;
                        }
                    }
                    Ok(Event::ShuttingDown) | Err(RecvError::Closed) => return,
                    Ok(_) => {}
                },
                () = &mut rearm => break,
            }
        }
    }
}

fn gone(e: &nix::sys::inotify::InotifyEvent) -> bool {
    e.mask.intersects(
        AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED,
    )
}

/// Re-read the directories and replace the file secrets (errors: keep the old ones).
async fn reread(broker: &Broker) {
    match broker.reread_files().await {
        Ok(n) => tracing::debug!(secrets = n, "secret files changed; re-read"),
        Err(e) => {
            tracing::warn!(error = %e, "secret files changed but could not be re-read; serving the last good values");
        }
    }
}
