//! The secret values, and the only place they are exposed.
//!
//! Values live in [`SecretBox<[u8]>`], which zeroizes on drop; replacing or deleting a secret
//! drops the old box. `expose_secret` appears in this file only: [`Store::read`] lends a value to
//! a closure (the gRPC encoder, the scanner) and nothing else can reach the bytes.
//!
//! Versions: a process-wide counter seeded from the wall clock (microseconds) at start-up and
//! bumped on every change, so a version never repeats for a name across broker restarts
//! (unless the clock goes backwards by more than the restart took).
//!
//! Every change is announced on a broadcast channel ([`Event`]) that watchers subscribe to; the
//! event carries names only.
//!
//! Consistency (contract §7): a change to several secrets at once — a files reload, one OpenBao
//! refresh cycle, [`Store::apply`] — is made under one write lock, so no reader sees part of
//! it; [`Store::read_many`] reads several secrets under one read lock, so `GetSecrets` returns
//! one snapshot. Events for a batch are sent once all of it is visible.

use std::{
    collections::BTreeMap,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use secrecy::{ExposeSecret, SecretBox};
use tokio::sync::broadcast;

use crate::name::SecretName;

/// Where a secret came from. Shown in Status; decides what a reload or refresh replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Env,
    File,
    Admin,
    /// `[sources.openbao]` (or its alias `[sources.vault]`).
    OpenBao,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Env => "env",
            Origin::File => "files",
            Origin::Admin => "admin",
            Origin::OpenBao => "openbao",
        }
    }
}

struct Entry {
    value: SecretBox<[u8]>,
    version: u64,
    origin: Origin,
}

/// A change, as watchers see it: names, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Changed(SecretName),
    Deleted(SecretName),
    /// The policy was replaced: every watcher re-checks its scope.
    PolicyReloaded,
    /// The broker is stopping: watchers end their streams.
    ShuttingDown,
}

/// One change of a batch ([`Store::apply`]).
pub enum Change {
    Put(SecretName, SecretBox<[u8]>),
    Delete(SecretName),
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Put(n, _) => write!(f, "Put({n}, [REDACTED])"),
            Change::Delete(n) => write!(f, "Delete({n})"),
        }
    }
}

/// Read-mostly map of secrets. Cheap reads under an `RwLock` (reads never block each other;
/// writes are rare: start-up, reload, rotation, admin set/delete).
pub struct Store {
    entries: RwLock<BTreeMap<SecretName, Entry>>,
    next_version: AtomicU64,
    events: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("secrets", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Store {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        let (events, _) = broadcast::channel(1024);
        Store {
            entries: RwLock::new(BTreeMap::new()),
            next_version: AtomicU64::new(seed),
            events,
        }
    }

    fn bump(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Insert or replace in `entries` (the caller holds the write lock). An unchanged value
    /// keeps its version and yields no event, so a periodic re-read of the same data does not
    /// wake every watcher.
    fn put_locked(
        &self,
        entries: &mut BTreeMap<SecretName, Entry>,
        name: SecretName,
        value: SecretBox<[u8]>,
        origin: Origin,
    ) -> (u64, Option<Event>) {
        if let Some(old) = entries.get_mut(&name) {
            if old.value.expose_secret() == value.expose_secret() {
                old.origin = origin;
                return (old.version, None);
            }
            let version = self.bump();
            // The old box is dropped (and zeroized) by this assignment.
            *old = Entry {
                value,
                version,
                origin,
            };
            return (version, Some(Event::Changed(name)));
        }
        let version = self.bump();
        entries.insert(
            name.clone(),
            Entry {
                value,
                version,
                origin,
            },
        );
        (version, Some(Event::Changed(name)))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<SecretName, Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    fn send_all(&self, events: Vec<Event>) {
        for event in events {
            let _ = self.events.send(event);
        }
    }

    /// Insert or replace one secret; returns its version.
    pub fn put(&self, name: SecretName, value: SecretBox<[u8]>, origin: Origin) -> u64 {
        let (version, event) = self.put_locked(&mut self.write(), name, value, origin);
        self.send_all(event.into_iter().collect());
        version
    }

    /// Remove (and zeroize). Returns whether it existed.
    pub fn delete(&self, name: &SecretName) -> bool {
        let removed = self.write().remove(name);
        if removed.is_some() {
            let _ = self.events.send(Event::Deleted(name.clone()));
        }
        removed.is_some()
    }

    /// Apply several changes as one: readers see all of them or none (one write lock), and
    /// watchers hear of them once all are visible. Returns how many secrets changed.
    pub fn apply(&self, origin: Origin, changes: Vec<Change>) -> usize {
        let mut events = Vec::with_capacity(changes.len());
        {
            let mut entries = self.write();
            for change in changes {
                match change {
                    Change::Put(name, value) => {
                        let (_, event) = self.put_locked(&mut entries, name, value, origin);
                        events.extend(event);
                    }
                    Change::Delete(name) => {
                        if entries.remove(&name).is_some() {
                            events.push(Event::Deleted(name));
                        }
                    }
                }
            }
        }
        let changed = events.len();
        self.send_all(events);
        changed
    }

    /// Replace every secret of `origin` with `fresh`, as one change ([`Store::apply`]): new
    /// names are added, changed values get a new version, names no longer present are deleted.
    /// Secrets of other origins are kept.
    pub fn replace_origin(&self, origin: Origin, fresh: Vec<(SecretName, SecretBox<[u8]>)>) {
        let keep: std::collections::BTreeSet<SecretName> =
            fresh.iter().map(|(n, _)| n.clone()).collect();
        let mut events = Vec::new();
        {
            let mut entries = self.write();
            let stale: Vec<SecretName> = entries
                .iter()
                .filter(|(n, e)| e.origin == origin && !keep.contains(*n))
                .map(|(n, _)| n.clone())
                .collect();
            for name in stale {
                entries.remove(&name);
                events.push(Event::Deleted(name));
            }
            for (name, value) in fresh {
                let (_, event) = self.put_locked(&mut entries, name, value, origin);
                events.extend(event);
            }
        }
        self.send_all(events);
    }

    /// Lend several values to `f`, one at a time, all read under one lock: a consistent
    /// snapshot (no batch is half-visible). `None` if any name is missing.
    pub fn read_many<R>(
        &self,
        names: &[SecretName],
        mut f: impl FnMut(&SecretName, &[u8], u64) -> R,
    ) -> Option<Vec<R>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .map(|n| {
                entries
                    .get(n)
                    .map(|e| f(n, e.value.expose_secret(), e.version))
            })
            .collect()
    }

    /// Lend a value to `f`. The only exposure point of the broker.
    pub fn read<R>(&self, name: &SecretName, f: impl FnOnce(&[u8], u64) -> R) -> Option<R> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(name)
            .map(|e| f(e.value.expose_secret(), e.version))
    }

    /// Names, sorted.
    pub fn names(&self) -> Vec<SecretName> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Names of the secrets that came from `origin`, sorted.
    pub fn names_of(&self, origin: Origin) -> Vec<SecretName> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.origin == origin)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many secrets each origin holds (for Status).
    pub fn count_by_origin(&self) -> BTreeMap<Origin, usize> {
        let mut counts = BTreeMap::new();
        for e in self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *counts.entry(e.origin).or_insert(0) += 1;
        }
        counts
    }

    /// Lend every (name, value) to `f` at once, under one read lock (for Scan).
    pub fn with_all<R>(&self, f: impl FnOnce(&[(&str, &[u8])]) -> R) -> R {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let all: Vec<(&str, &[u8])> = entries
            .iter()
            .map(|(n, e)| (n.as_str(), e.value.expose_secret()))
            .collect();
        f(&all)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn announce(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Zeroize and drop every secret (shutdown).
    pub fn clear(&self) {
        self.write().clear();
    }
}

/// A secret box from plain bytes (intake: files, admin requests). The caller's buffer is moved.
pub fn secret(bytes: Vec<u8>) -> SecretBox<[u8]> {
    SecretBox::new(bytes.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> SecretName {
        SecretName::parse(s).unwrap()
    }

    #[test]
    fn versions_change_only_with_values() {
        let s = Store::new();
        let v1 = s.put(n("A"), secret(b"one".to_vec()), Origin::Env);
        assert_eq!(s.put(n("A"), secret(b"one".to_vec()), Origin::Env), v1);
        let v2 = s.put(n("A"), secret(b"two".to_vec()), Origin::Env);
        assert!(v2 > v1);
        assert_eq!(
            s.read(&n("A"), |v, ver| (v.to_vec(), ver)),
            Some((b"two".to_vec(), v2))
        );
        assert!(s.delete(&n("A")));
        assert!(!s.delete(&n("A")));
        let v3 = s.put(n("A"), secret(b"one".to_vec()), Origin::Env);
        assert!(v3 > v2, "a re-created secret never reuses an old version");
    }

    #[test]
    fn replace_origin_keeps_other_origins() {
        let s = Store::new();
        s.put(n("E"), secret(b"e".to_vec()), Origin::Env);
        s.put(n("F1"), secret(b"f".to_vec()), Origin::File);
        s.put(n("F2"), secret(b"f".to_vec()), Origin::File);
        s.replace_origin(
            Origin::File,
            vec![
                (n("F2"), secret(b"g".to_vec())),
                (n("F3"), secret(b"h".to_vec())),
            ],
        );
        let names: Vec<String> = s.names().iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["E", "F2", "F3"]);
    }

    #[test]
    fn events_carry_names() {
        let s = Store::new();
        let mut rx = s.subscribe();
        s.put(n("A"), secret(b"x".to_vec()), Origin::Admin);
        s.delete(&n("A"));
        assert_eq!(rx.try_recv().unwrap(), Event::Changed(n("A")));
        assert_eq!(rx.try_recv().unwrap(), Event::Deleted(n("A")));
        assert!(format!("{s:?}").contains("secrets: 0"));
    }

    /// A certificate and its key rotated together (one files reload, one OpenBao cycle) are
    /// never read half-rotated. A concurrent check, not a proof: the guarantee itself is that
    /// both are written under one lock and read under one lock; this catches a regression to
    /// name-by-name writes or reads (which fails it within a few hundred rotations here).
    #[test]
    fn a_batch_is_seen_whole_by_readers() {
        use std::sync::{Arc, atomic::AtomicBool};
        let store = Arc::new(Store::new());
        let pair = |i: u32| {
            vec![
                (n("TLS_CERT"), secret(format!("cert-{i}").into_bytes())),
                (n("TLS_KEY"), secret(format!("key-{i}").into_bytes())),
            ]
        };
        store.replace_origin(Origin::File, pair(0));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, done) = (Arc::clone(&store), Arc::clone(&done));
            std::thread::spawn(move || {
                for i in 1..=20_000 {
                    if i % 2 == 0 {
                        store.replace_origin(Origin::File, pair(i));
                    } else {
                        let batch = pair(i)
                            .into_iter()
                            .map(|(k, v)| Change::Put(k, v))
                            .collect();
                        store.apply(Origin::File, batch);
                    }
                }
                done.store(true, Ordering::Release);
            })
        };
        let names = [n("TLS_CERT"), n("TLS_KEY")];
        let mut reads = 0u64;
        while !done.load(Ordering::Acquire) {
            let got = store
                .read_many(&names, |_, v, _| String::from_utf8(v.to_vec()).unwrap())
                .unwrap();
            let cert = got[0].strip_prefix("cert-").unwrap();
            let key = got[1].strip_prefix("key-").unwrap();
            assert_eq!(cert, key, "read a certificate with another rotation's key");
            reads += 1;
        }
        writer.join().unwrap();
        assert!(reads > 0);
    }

    #[test]
    fn a_batch_is_announced_once_it_is_all_visible() {
        let s = Store::new();
        s.put(n("OLD"), secret(b"x".to_vec()), Origin::OpenBao);
        let mut rx = s.subscribe();
        let changed = s.apply(
            Origin::OpenBao,
            vec![
                Change::Put(n("A"), secret(b"1".to_vec())),
                Change::Put(n("B"), secret(b"2".to_vec())),
                Change::Delete(n("OLD")),
                Change::Delete(n("NEVER_THERE")),
            ],
        );
        assert_eq!(changed, 3);
        assert_eq!(rx.try_recv().unwrap(), Event::Changed(n("A")));
        assert_eq!(rx.try_recv().unwrap(), Event::Changed(n("B")));
        assert_eq!(rx.try_recv().unwrap(), Event::Deleted(n("OLD")));
        assert!(rx.try_recv().is_err());
        assert!(s.read_many(&[n("A"), n("OLD")], |_, _, _| ()).is_none());
        assert_eq!(
            s.read_many(&[n("A"), n("B")], |_, v, _| v.to_vec()),
            Some(vec![b"1".to_vec(), b"2".to_vec()])
        );
        assert!(
            format!("{:?}", Change::Put(n("A"), secret(b"hunter2".to_vec()))).contains("REDACTED")
        );
    }
}
