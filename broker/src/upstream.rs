//! The narrow interface between the broker and a background secret source (today OpenBao).
//!
//! Dependencies point one way: a source pushes what it read into a [`SecretSink`] (the broker
//! implements it) and is reached through a [`Control`] (a refresh-request channel and a
//! latest-wins configuration watch) whose receiving half, the [`Inbox`], it owns. This module
//! names neither side: the broker's state knows nothing of `openbao`, and `openbao` knows the
//! broker only as a sink.
//!
//! What it guarantees: a reload is never lost — [`Control::reconfigure`] replaces the value of
//! a `watch` channel (the source reads the newest configuration when it next looks), so a busy
//! source cannot make it drop one the way a full bounded queue would. Refresh requests are
//! queued (an `Admin.Refresh` caller waits for its answer); when the source has stopped the
//! caller gets an error, never a hang.

use std::{collections::BTreeSet, sync::Arc};

use secrecy::SecretBox;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{config::Config, name::SecretName, store::Origin};

/// One read of a source, to be published.
#[derive(Debug, Default)]
pub struct Update {
    /// Values read: each replaces the secret of that name (a changed value gets a new version
    /// and the old one is zeroized; an unchanged one keeps its version).
    pub values: Vec<(SecretName, SecretBox<[u8]>)>,
    /// `Some`: the complete set of names the source now provides; its other secrets are
    /// deleted. `None`: a partial read (one secret, or some failed) — nothing is deleted.
    pub provides: Option<BTreeSet<SecretName>>,
}

/// Which node of a cluster a source uses, for Status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInUse {
    /// The node's address as configured (`https://host:port`).
    pub address: String,
    /// How many times the source moved to another node since start-up.
    pub failovers: u64,
}

/// A dynamic secret as Status shows it: never a lease id, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    pub name: SecretName,
    /// The path its leases are read from.
    pub path: String,
    /// When the lease behind the current value expires (`None`: none held).
    pub expires: Option<std::time::Instant>,
}

/// Where a source delivers values and health. Implemented by the broker's state.
pub trait SecretSink: Send + Sync + 'static {
    /// Apply one read of `origin`.
    fn publish(&self, origin: Origin, update: Update);
    /// Record the outcome of a read (or of token upkeep) for Status.
    fn note(&self, source: &'static str, result: Result<(), String>);
    /// Record which node the source talks to.
    fn note_node(&self, source: &'static str, node: NodeInUse);
    /// Record the state of the source's dynamic secrets (replacing the previous one).
    fn note_leases(&self, leases: Vec<LeaseStatus>);
}

/// A request to re-read now: all secrets, or only `only`. The answer is how many were read.
#[derive(Debug)]
pub struct RefreshRequest {
    pub only: Option<SecretName>,
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// The broker's end: names only, never values.
#[derive(Debug, Clone)]
pub struct Control {
    refresh: mpsc::Sender<RefreshRequest>,
    config: Arc<watch::Sender<Arc<Config>>>,
    shutdown: mpsc::Sender<oneshot::Sender<()>>,
}

/// The source's end.
#[derive(Debug)]
pub struct Inbox {
    pub refresh: mpsc::Receiver<RefreshRequest>,
    /// The configuration in force; `changed()` fires after each reload (latest wins).
    pub config: watch::Receiver<Arc<Config>>,
    /// The broker is stopping: release what the source holds upstream (revoke leases), answer,
    /// and end.
    pub shutdown: mpsc::Receiver<oneshot::Sender<()>>,
}

/// A connected pair, starting from the configuration in force.
pub fn channel(config: Arc<Config>) -> (Control, Inbox) {
    let (refresh_tx, refresh_rx) = mpsc::channel(16);
    let (config_tx, mut config_rx) = watch::channel(config);
    config_rx.mark_unchanged();
    let (shutdown_tx, shutdown_rx) = mpsc::channel(1);
    (
        Control {
            refresh: refresh_tx,
            config: Arc::new(config_tx),
            shutdown: shutdown_tx,
        },
        Inbox {
            refresh: refresh_rx,
            config: config_rx,
            shutdown: shutdown_rx,
        },
    )
}

impl Control {
    /// Re-read now (all, or one secret); returns how many secrets were read.
    pub async fn refresh(&self, only: Option<SecretName>) -> Result<u64, String> {
        let stopped = || "the source's refresh task has stopped".to_owned();
        let (reply, rx) = oneshot::channel();
        self.refresh
            .send(RefreshRequest { only, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// The configuration was reloaded. Never blocks and never drops: the source sees the
    /// newest configuration however many reloads happened while it was busy.
    pub fn reconfigure(&self, config: Arc<Config>) {
        self.config.send_replace(config);
    }

    /// The broker is stopping: the source releases what it holds upstream (revokes its
    /// leases) and ends. Returns when it has, or at once if it has already stopped; the caller
    /// bounds the wait.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.shutdown.send(reply).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reconfigure_never_drops_the_latest_reload_while_the_source_is_busy() {
        let (control, mut inbox) = channel(Arc::new(Config::defaults()));
        assert!(!inbox.config.has_changed().unwrap());
        // Far more reloads than any queue bound, while nobody reads.
        let mut last = None;
        for i in 0..100u64 {
            let mut c = Config::defaults();
            c.limits.max_connections = 1000 + i as usize;
            let c = Arc::new(c);
            last = Some(Arc::clone(&c));
            control.reconfigure(c);
        }
        inbox.config.changed().await.unwrap();
        let seen = inbox.config.borrow_and_update().clone();
        assert!(
            Arc::ptr_eq(&seen, last.as_ref().unwrap()),
            "the newest wins"
        );
        assert_eq!(seen.limits.max_connections, 1099);
    }

    #[tokio::test]
    async fn refresh_fails_cleanly_when_the_source_is_gone() {
        let (control, inbox) = channel(Arc::new(Config::defaults()));
        drop(inbox);
        assert_eq!(
            control.refresh(None).await.unwrap_err(),
            "the source's refresh task has stopped"
        );
    }
}
