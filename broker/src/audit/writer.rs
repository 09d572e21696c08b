//! The bounded queue between the calls and the one thread that writes the audit log.
//!
//! **Queue.** A call appends its record to a queue under a mutex and goes on; it does not wake
//! the writer (a cross-CPU wake-up costs more than the rest of a call). The writer drains the
//! queue every [`LINGER`] while records keep coming and writes each batch with as few `write`s
//! as it can (64 KiB at a time); after [`PARK_AFTER`] empty ticks it sleeps until the next
//! record wakes it, so an idle broker does not tick. At most `[audit].max_queue` records are
//! *waiting* — accepted and not yet written, whether still queued or in the writer's hands —
//! so memory is bounded whatever the disk does; what the status calls `queue_depth`.
//!
//! **When a call is decided.** The record of a call is offered before its answer leaves the
//! broker (for `GetSecret`, before the value is released). With `on_failure = "deny"` it is
//! refused — the call answers `UNAVAILABLE` "audit log unavailable" — when
//! - the queue is full, or
//! - the writer's last attempt failed (`ENOSPC`, `EIO`, a failed `fdatasync`), until a later
//!   write (and, for a file, an `fdatasync`) succeeds. Such a refused call's record is still
//!   queued when there is room, as a denial with reason "audit log unavailable", and is
//!   written once the disk recovers.
//!
//! A call does not wait for its own record to reach the disk: that would put a disk round trip
//! (an `fsync` to learn of `EIO`) on every call. The window this leaves is documented: records
//! accepted while the log looked healthy are lost if the broker is killed before the writer
//! gets to them (at most [`LINGER`] of calls), and a disk that fails *after* accepting a write
//! reports it at the next `fdatasync` (every [`SYNC_EVERY`] while records flow); calls are
//! refused from then on. With `"serve"` every call is served; a record that finds the queue
//! full is dropped and counted.
//!
//! **Failures and recovery.** A failed write keeps its bytes: the writer retries every
//! [`RETRY_EVERY`] from the byte where the kernel stopped, so a record is neither lost nor
//! written twice across a full disk, and records keep waiting (up to `max_queue`) meanwhile.
//! Each failure episode — writes failing, or the queue full — is logged once when it starts
//! and once when it ends (with how many records were dropped and calls refused), counted, and
//! shown with the last error by `secretd status`. Recovery needs nobody: the retry that
//! succeeds ends the episode.
//!
//! **Reopening.** [`AuditLog::reopen`] (on `SIGHUP` and `Admin.Reload`) has the writer open the
//! path again: everything written before goes to the file that was renamed away, everything
//! after to the new one, nothing is lost or doubled (a record cut short by a failed write is
//! written whole to the new file). `reopen` resolves once the switch is done, so a
//! `postrotate secretd reload` returns only when the old file is complete.
//!
//! **Shutdown.** [`AuditLog::shutdown`] writes everything queued, retrying a failing disk until
//! its grace period ends; a writer blocked in a `write` that never returns (a FIFO whose reader
//! stopped) is abandoned after the grace period with an error line, so the broker still exits.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::denials::DenialLog;
use super::sink::{MemorySink, Sink};
use super::{AuditRecord, Outcome, UNAVAILABLE};
use crate::config::{AuditConfig, AuditTarget, OnFailure};

/// How long a record may wait in the queue while calls keep coming.
pub const LINGER: Duration = Duration::from_millis(10);
/// Empty ticks after which the writer sleeps until a record arrives (1 s of silence).
pub const PARK_AFTER: u32 = 100;
/// Queue length that wakes the writer before its tick (or half of `max_queue`, if smaller).
pub const HIGH_WATER: usize = 4096;
/// How often a failing write is retried.
pub const RETRY_EVERY: Duration = Duration::from_millis(250);
/// How often a file being written is synced (`fdatasync`) while records flow.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How long [`AuditLog::reopen`] waits for the writer before saying it is stalled.
pub const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// Bytes serialized per `write`.
const CHUNK: usize = 64 * 1024;

/// A call whose record could not be kept (`on_failure = "deny"`): answer `UNAVAILABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{UNAVAILABLE}")]
pub struct Unavailable;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReopenError {
    #[error("failed to open the audit log {target}: {error}; records still go to {current}")]
    Open {
        target: String,
        current: String,
        error: String,
    },
    #[error(
        "the audit writer is blocked in a write to {current} (a stalled disk, or a FIFO reader \
         that stopped reading); it reopens the file when that write returns"
    )]
    Stalled { current: String },
    #[error("the audit writer thread has stopped")]
    Gone,
}

/// What `secretd status` shows about the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditStats {
    /// The file (or `stderr`) being written.
    pub target: String,
    pub on_failure: OnFailure,
    pub max_queue: u64,
    /// Records accepted and not yet written.
    pub queue_depth: u64,
    /// The largest `queue_depth` seen.
    pub queue_peak: u64,
    pub written: u64,
    /// Records never written: the queue was full, or shutdown gave up on them.
    pub dropped: u64,
    /// Calls refused `UNAVAILABLE` because their record could not be kept.
    pub refused: u64,
    /// Episodes of failing writes / of a full queue.
    pub write_failures: u64,
    pub queue_full: u64,
    /// `ok`, `failing` (writes fail), `queue full`, `stopped` (the writer thread ended).
    pub state: &'static str,
    pub last_error: Option<(SystemTime, String)>,
    /// Times the file was reopened.
    pub reopens: u64,
}

/// The audit log's sending side; the writer thread owns the [`Sink`].
#[derive(Debug)]
pub struct AuditLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    /// The operator log's per-uid summaries of refused calls.
    pub denials: DenialLog,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The writer waits here (for its tick, or to be woken).
    wake: Condvar,
    /// Flushers and `shutdown` wait here for the writer's progress.
    progress: Condvar,
}

/// An episode of failure: when it began and the counters then, for the line that ends it.
#[derive(Debug, Clone, Copy)]
struct Episode {
    since: Instant,
    dropped: u64,
    refused: u64,
    /// The line that starts it was written (a full queue during failing writes is not logged
    /// separately: the failure explains it).
    logged: bool,
}

#[derive(Debug)]
struct State {
    records: Vec<AuditRecord>,
    /// Records ever accepted / ever settled (written, or given up at shutdown). The difference
    /// is the queue depth, which never exceeds `settings.max_queue`.
    accepted: u64,
    settled: u64,
    settings: AuditConfig,
    label: String,
    failing: Option<Episode>,
    full: Option<Episode>,
    written: u64,
    dropped: u64,
    refused: u64,
    write_failures: u64,
    queue_full: u64,
    peak: u64,
    reopens: u64,
    last_error: Option<(SystemTime, String)>,
    /// Someone waits in `flush`: write now rather than at the next tick.
    flush_wanted: bool,
    /// The writer sleeps without a timeout: the next record must wake it.
    parked: bool,
    /// Shutdown asked; pending records are given up at this instant if they cannot be written.
    closing: Option<Instant>,
    /// The writer thread has ended.
    gone: bool,
    reopen: Option<AuditTarget>,
    reopen_waiters: Vec<oneshot::Sender<Result<(), ReopenError>>>,
}

impl State {
    fn depth(&self) -> u64 {
        self.accepted - self.settled
    }

    fn has_room(&self) -> bool {
        !self.gone && self.depth() < self.settings.max_queue as u64
    }

    fn episode(&self, logged: bool) -> Episode {
        Episode {
            since: Instant::now(),
            dropped: self.dropped,
            refused: self.refused,
            logged,
        }
    }

    /// Queue length at which a record wakes the writer before its tick.
    fn high_water(&self) -> usize {
        HIGH_WATER.min((self.settings.max_queue / 2).max(1))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AuditLog {
    /// Open `target` (see [`Sink::open`] for the rules a file must meet) and start the writer.
    pub fn open(target: &AuditTarget, settings: AuditConfig) -> io::Result<AuditLog> {
        AuditLog::spawn(Sink::open(target)?, settings)
    }

    /// An audit log that writes to memory: returns the log and a handle to read the lines.
    pub fn in_memory() -> (AuditLog, MemorySink) {
        let sink = MemorySink::default();
        let log = AuditLog::spawn(
            Sink::Writer(Box::new(sink.clone()), "memory".to_owned()),
            AuditConfig::default(),
        )
        .expect("spawning the audit writer thread");
        (log, sink)
    }

    /// An audit log that writes to `sink` (which the writer thread owns).
    pub fn spawn(sink: Sink, settings: AuditConfig) -> io::Result<AuditLog> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                records: Vec::new(),
                accepted: 0,
                settled: 0,
                settings,
                label: sink.label(),
                failing: None,
                full: None,
                written: 0,
                dropped: 0,
                refused: 0,
                write_failures: 0,
                queue_full: 0,
                peak: 0,
                reopens: 0,
                last_error: None,
                flush_wanted: false,
                parked: false,
                closing: None,
                gone: false,
                reopen: None,
                reopen_waiters: Vec::new(),
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
        });
        let theirs = Arc::clone(&shared);
        let writer = thread::Builder::new()
            .name("secretd-audit".to_owned())
            .spawn(move || {
                // Set `gone` however the loop ends (even by a panic), so nobody waits forever.
                struct Gone<'a>(&'a Shared);
                impl Drop for Gone<'_> {
                    fn drop(&mut self) {
                        let mut s = self.0.lock();
                        s.gone = true;
                        s.reopen_waiters.clear(); // their receivers see the writer gone
                        drop(s);
                        self.0.progress.notify_all();
                    }
                }
                let _gone = Gone(&theirs);
                Writer::new(sink).run(&theirs);
            })?;
        Ok(AuditLog {
            shared,
            writer: Mutex::new(Some(writer)),
            denials: DenialLog::default(),
        })
    }

    /// Offer the record of a call whose answer is about to leave. `Err(Unavailable)`: with
    /// `on_failure = "deny"`, the record cannot be kept and the call must be refused
    /// `UNAVAILABLE` (the record, turned into that refusal, is still queued when there is room).
    /// Never blocks on the disk.
    pub fn record(&self, record: AuditRecord) -> Result<(), Unavailable> {
        self.admit(record, true)
    }

    /// Queue a record whose call is answered whatever happens to it (`Admin.Status` and
    /// `Admin.Reload`, which an operator needs most when the audit log fails, and requests
    /// tonic refused before any handler ran): kept if the queue has room, else counted as
    /// dropped.
    pub fn record_best_effort(&self, record: AuditRecord) {
        let _ = self.admit(record, false);
    }

    fn admit(&self, record: AuditRecord, enforce: bool) -> Result<(), Unavailable> {
        let s = self.shared.lock();
        let deny = enforce && s.settings.on_failure == OnFailure::Deny;
        if deny && (!s.has_room() || s.failing.is_some()) {
            self.refuse_locked(s, record);
            return Err(Unavailable);
        }
        if s.has_room() {
            self.push(s, record);
        } else {
            self.overflow(s);
        }
        Ok(())
    }

    /// Hold a place in the queue for the record of a call that changes something (a
    /// registration, a set, a delete), before it changes anything: the record is then kept
    /// whatever happens meanwhile. `Err`: the record could not be kept now and
    /// `on_failure = "deny"` — refuse the call ([`AuditLog::refuse`]) without doing anything.
    pub fn reserve(&self) -> Result<Reservation<'_>, Unavailable> {
        let mut s = self.shared.lock();
        if s.settings.on_failure == OnFailure::Deny && (!s.has_room() || s.failing.is_some()) {
            return Err(Unavailable);
        }
        let held = s.has_room();
        if held {
            s.accepted += 1;
            s.peak = s.peak.max(s.depth());
        }
        Ok(Reservation { log: self, held })
    }

    /// Record a call refused `UNAVAILABLE` because its record could not be kept: counted, and
    /// its record (as that refusal) queued if there is room.
    pub fn refuse(&self, record: AuditRecord) {
        let s = self.shared.lock();
        self.refuse_locked(s, record);
    }

    fn refuse_locked(&self, mut s: MutexGuard<'_, State>, mut record: AuditRecord) {
        s.refused += 1;
        record.decision = Outcome::Deny;
        record.reason = Some(UNAVAILABLE.to_owned());
        if s.has_room() {
            self.push(s, record);
        } else {
            self.overflow(s);
        }
    }

    fn push(&self, mut s: MutexGuard<'_, State>, record: AuditRecord) {
        s.records.push(record);
        s.accepted += 1;
        s.peak = s.peak.max(s.depth());
        self.woken(s);
    }

    /// Wake the writer if it sleeps, or if the queue is long.
    fn woken(&self, mut s: MutexGuard<'_, State>) {
        let wake = s.parked || s.records.len() >= s.high_water();
        if wake {
            s.parked = false;
        }
        drop(s);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// A record that finds no room: dropped, counted; the first of an episode is logged.
    fn overflow(&self, mut s: MutexGuard<'_, State>) {
        s.dropped += 1;
        if s.full.is_some() || s.gone {
            return;
        }
        let logged = s.failing.is_none();
        s.full = Some(s.episode(logged));
        s.queue_full += 1;
        let message = format!(
            "queue full: {} records wait for the writer",
            s.settings.max_queue
        );
        s.last_error = Some((SystemTime::now(), message));
        let (label, settings) = (s.label.clone(), s.settings);
        drop(s);
        if logged {
            log_full(&label, settings);
        }
    }

    /// Apply `[audit]` settings (at start-up and on reload).
    pub fn configure(&self, settings: AuditConfig) {
        self.shared.lock().settings = settings;
        self.shared.wake.notify_one();
    }

    /// Have the writer open `target` anew (logrotate: the old file was renamed away). Resolves
    /// once the writer has switched — everything written before went to the old file — or
    /// with an error: the file could not be opened (the writer keeps the old one), or the
    /// writer is blocked in a write for longer than [`REOPEN_WAIT`] (it switches when that write
    /// returns).
    pub fn reopen(
        &self,
        target: &AuditTarget,
    ) -> impl Future<Output = Result<(), ReopenError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let mut s = self.shared.lock();
        let current = s.label.clone();
        let gone = s.gone;
        if !gone {
            s.reopen = Some(target.clone());
            s.reopen_waiters.push(tx);
            s.parked = false;
        }
        drop(s);
        self.shared.wake.notify_one();
        async move {
            if gone {
                return Err(ReopenError::Gone);
            }
            match tokio::time::timeout(REOPEN_WAIT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(ReopenError::Gone),
                Err(_) => Err(ReopenError::Stalled { current }),
            }
        }
    }

    /// Wait until every record queued before this call has been written, or the writer cannot
    /// make progress now (writes failing, or it has stopped). Returns whether all were written.
    pub fn flush(&self) -> bool {
        let mut s = self.shared.lock();
        let target = s.accepted;
        while s.settled < target && !s.gone && s.failing.is_none() {
            s.flush_wanted = true;
            self.shared.wake.notify_one();
            s = self
                .shared
                .progress
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
        s.settled >= target
    }

    /// Counters and state for `secretd status`.
    pub fn stats(&self) -> AuditStats {
        let s = self.shared.lock();
        AuditStats {
            target: s.label.clone(),
            on_failure: s.settings.on_failure,
            max_queue: s.settings.max_queue as u64,
            queue_depth: s.depth(),
            queue_peak: s.peak,
            written: s.written,
            dropped: s.dropped,
            refused: s.refused,
            write_failures: s.write_failures,
            queue_full: s.queue_full,
            state: if s.gone {
                "stopped"
            } else if s.failing.is_some() {
                "failing"
            } else if s.full.is_some() {
                "queue full"
            } else {
                "ok"
            },
            last_error: s.last_error.clone(),
            reopens: s.reopens,
        }
    }

    /// Write everything queued and stop the writer. Records that cannot be written within
    /// `grace` (a failing disk) are given up and counted; a writer blocked in a `write` is
    /// abandoned after `grace` with an error line.
    pub fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        {
            let mut s = self.shared.lock();
            if s.closing.is_none() {
                s.closing = Some(deadline);
            }
            s.parked = false;
        }
        self.shared.wake.notify_one();
        let wait_until = deadline + Duration::from_secs(1);
        let mut s = self.shared.lock();
        while !s.gone {
            let left = wait_until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .shared
                .progress
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let (gone, depth, label) = (s.gone, s.depth(), s.label.clone());
        drop(s);
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if gone {
            if let Some(h) = handle
                && h.join().is_err()
            {
                tracing::error!("the audit writer thread panicked");
            }
        } else if handle.is_some() {
            tracing::error!(
                target = %label,
                records = depth,
                "the audit writer is blocked in a write (a stalled disk, or a FIFO reader that \
                 stopped reading); exiting without writing {depth} queued records"
            );
        }
    }

    /// Flush and stop the writer (tests; the broker calls [`AuditLog::shutdown`]).
    pub fn close(self) {
        self.shutdown(Duration::from_secs(5));
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}

/// A place in the queue, held by [`AuditLog::reserve`] for one record.
#[derive(Debug)]
#[must_use = "a reservation holds a place in the audit queue until it is filled or dropped"]
pub struct Reservation<'a> {
    log: &'a AuditLog,
    /// `false`: there was no room (`on_failure = "serve"`): the record will be dropped.
    held: bool,
}

impl Reservation<'_> {
    /// Queue the record in the place held.
    pub fn fill(mut self, record: AuditRecord) {
        let s = self.log.shared.lock();
        if std::mem::take(&mut self.held) {
            let mut s = s;
            s.records.push(record);
            self.log.woken(s);
        } else {
            self.log.overflow(s);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.held {
            // Never filled (the call ended early): give the place back.
            self.log.shared.lock().settled += 1;
        }
    }
}

fn log_failing(label: &str, error: &io::Error, settings: AuditConfig) {
    match settings.on_failure {
        OnFailure::Deny => tracing::error!(
            target = %label,
            %error,
            "audit log write failed: refusing calls (on_failure = \"deny\") until a write \
             succeeds; retrying every {RETRY_EVERY:?}"
        ),
        OnFailure::Serve => tracing::error!(
            target = %label,
            %error,
            max_queue = settings.max_queue,
            "audit log write failed: serving calls anyway (on_failure = \"serve\"); records \
             wait in memory up to max_queue, then are dropped and counted; retrying every \
             {RETRY_EVERY:?}"
        ),
    }
}

fn log_recovered(s: &State, ep: Episode, what: &str) {
    let dropped = s.dropped - ep.dropped;
    let refused = s.refused - ep.refused;
    let after = humantime::format_duration(Duration::from_millis(
        u64::try_from(ep.since.elapsed().as_millis()).unwrap_or(u64::MAX),
    ));
    tracing::warn!(
        target = %s.label,
        dropped,
        refused,
        "{what} after {after}: {dropped} records dropped and {refused} calls refused meanwhile"
    );
}

fn log_full(label: &str, settings: AuditConfig) {
    let max = settings.max_queue;
    match settings.on_failure {
        OnFailure::Deny => tracing::error!(
            target = %label,
            max_queue = max,
            "audit queue full: {max} records wait for the writer (a stalled disk?); refusing \
             calls whose record cannot be queued (on_failure = \"deny\")"
        ),
        OnFailure::Serve => tracing::error!(
            target = %label,
            max_queue = max,
            "audit queue full: {max} records wait for the writer (a stalled disk?); serving \
             calls and dropping their records (on_failure = \"serve\"), counted in status"
        ),
    }
}

/// The writer thread's own state: the sink and what it holds that is not written yet.
struct Writer {
    sink: Sink,
    /// Records taken from the queue; `batch[..next]` are serialized.
    batch: Vec<AuditRecord>,
    next: usize,
    /// The bytes of the chunk being written, `out[..pos]` written; `ends[i]` is where the
    /// chunk's i-th record ends, `counted` of them are settled.
    out: Vec<u8>,
    pos: usize,
    ends: Vec<usize>,
    counted: usize,
    /// Bytes written since the last `fdatasync`.
    unsynced: bool,
    last_sync: Instant,
}

impl Writer {
    fn new(sink: Sink) -> Writer {
        Writer {
            sink,
            batch: Vec::new(),
            next: 0,
            out: Vec::new(),
            pos: 0,
            ends: Vec::new(),
            counted: 0,
            unsynced: false,
            last_sync: Instant::now(),
        }
    }

    /// Nothing taken from the queue is left to write.
    fn idle(&self) -> bool {
        self.next >= self.batch.len() && self.pos >= self.out.len()
    }

    /// Write everything held, chunk by chunk; `sync`: also `fdatasync` afterwards. Returns the
    /// records written and the error that stopped it, if one did (the unwritten bytes are kept
    /// for the next attempt).
    fn write(&mut self, sync: bool) -> (u64, Option<io::Error>) {
        let mut settled = 0u64;
        loop {
            if self.pos >= self.out.len() {
                self.out.clear();
                self.ends.clear();
                self.pos = 0;
                self.counted = 0;
                if self.next >= self.batch.len() {
                    self.batch.clear();
                    self.next = 0;
                    break;
                }
                while self.next < self.batch.len() && self.out.len() < CHUNK {
                    serde_json::to_writer(&mut self.out, &self.batch[self.next])
                        .expect("an audit record always serializes");
                    self.out.push(b'\n');
                    self.ends.push(self.out.len());
                    self.next += 1;
                }
            }
            match self.sink.write(&self.out[self.pos..]) {
                Ok(0) => {
                    return (
                        settled,
                        Some(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
                    );
                }
                Ok(n) => {
                    self.pos += n;
                    self.unsynced = self.sink.syncs();
                    let done = self.ends.partition_point(|&e| e <= self.pos);
                    settled += (done - self.counted) as u64;
                    self.counted = done;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (settled, Some(e)),
            }
        }
        // After a burst, do not keep megabytes for the quiet that follows.
        if self.batch.capacity() > 2 * HIGH_WATER {
            self.batch = Vec::new();
        }
        if self.out.capacity() > 2 * CHUNK {
            self.out = Vec::new();
        }
        let due = sync || self.last_sync.elapsed() >= SYNC_EVERY;
        if self.unsynced && due && self.sink.syncs() {
            self.last_sync = Instant::now();
            if let Err(e) = self.sink.sync() {
                return (settled, Some(e));
            }
            self.unsynced = false;
        }
        (settled, None)
    }

    /// Switch to `target`. A record cut short by a failed write is written whole to the new
    /// file (the old one keeps the fragment, as any file on a full disk would).
    fn reopen(&mut self, target: &AuditTarget) -> Result<String, ReopenError> {
        let new = Sink::open(target).map_err(|e| ReopenError::Open {
            target: match target {
                AuditTarget::Stderr => "stderr".to_owned(),
                AuditTarget::File(p) => p.display().to_string(),
            },
            current: self.sink.label(),
            error: e.to_string(),
        })?;
        if self.unsynced {
            let _ = self.sink.sync(); // best effort: the old file is complete on disk
        }
        let whole = self.ends.partition_point(|&e| e <= self.pos);
        self.pos = if whole == 0 { 0 } else { self.ends[whole - 1] };
        self.sink = new;
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(self.sink.label())
    }

    fn run(mut self, shared: &Shared) {
        let mut idle_ticks = 0u32;
        let mut s = shared.lock();
        loop {
            s = self.wait(shared, s, &mut idle_ticks);
            if let Some(target) = s.reopen.take() {
                let waiters = std::mem::take(&mut s.reopen_waiters);
                drop(s);
                let result = self.reopen(&target);
                s = shared.lock();
                let answer = match result {
                    Ok(label) => {
                        tracing::info!(target = %label, "audit log reopened");
                        s.label = label;
                        s.reopens += 1;
                        Ok(())
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        s.last_error = Some((SystemTime::now(), e.to_string()));
                        Err(e)
                    }
                };
                for w in waiters {
                    let _ = w.send(answer.clone());
                }
            }
            if self.idle() {
                std::mem::swap(&mut self.batch, &mut s.records);
                self.next = 0;
            }
            s.flush_wanted = false;
            let failing = s.failing.is_some();
            let closing = s.closing;
            // Sync now: to learn whether the disk took it (failing), before exit, before parking.
            let sync = failing || closing.is_some() || idle_ticks >= PARK_AFTER;
            let has_work = failing || !self.idle() || (self.unsynced && sync);
            drop(s);

            let (settled, error) = if has_work {
                self.write(sync)
            } else {
                (0, None)
            };

            s = shared.lock();
            s.settled += settled;
            s.written += settled;
            match error {
                Some(e) => {
                    s.last_error = Some((SystemTime::now(), e.to_string()));
                    if s.failing.is_none() {
                        s.failing = Some(s.episode(true));
                        s.write_failures += 1;
                        log_failing(&s.label, &e, s.settings);
                    }
                }
                None => {
                    if let Some(ep) = s.failing.take() {
                        log_recovered(&s, ep, "audit log writes succeed again");
                    }
                }
            }
            if let Some(ep) = s.full
                && s.failing.is_none()
                && s.depth() <= s.settings.max_queue as u64 / 2
            {
                s.full = None;
                if ep.logged {
                    log_recovered(&s, ep, "the audit queue has room again");
                }
            }
            shared.progress.notify_all();

            if let Some(deadline) = s.closing {
                let done = self.idle() && s.records.is_empty() && !self.unsynced;
                if done {
                    break;
                }
                if s.failing.is_some() && Instant::now() >= deadline {
                    let lost = s.depth();
                    s.dropped += lost;
                    s.settled = s.accepted;
                    tracing::error!(
                        target = %s.label,
                        records = lost,
                        "shutting down with the audit log failing: {lost} records could not be written"
                    );
                    break;
                }
            }
        }
        drop(s);
        shared.progress.notify_all();
    }

    /// Sleep until there is something to do: a reopen, shutdown, a flush, records after their
    /// linger (or enough of them), a retry after a failure, a sync before parking.
    fn wait<'a>(
        &self,
        shared: &'a Shared,
        mut s: MutexGuard<'a, State>,
        idle_ticks: &mut u32,
    ) -> MutexGuard<'a, State> {
        if s.reopen.is_some() {
            return s;
        }
        if s.failing.is_some() || !self.idle() {
            // Holding unwritten bytes after a failure: retry at the next interval (a flush or
            // shutdown wakes it early once; it does not spin).
            return shared
                .wake
                .wait_timeout(s, RETRY_EVERY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let urgent = |s: &State| s.reopen.is_some() || s.closing.is_some() || s.flush_wanted;
        if urgent(&s) {
            return s;
        }
        if !s.records.is_empty() {
            *idle_ticks = 0;
            if s.records.len() >= s.high_water() {
                return s;
            }
            return shared
                .wake
                .wait_timeout(s, LINGER)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if *idle_ticks < PARK_AFTER {
            *idle_ticks += 1;
            return shared
                .wake
                .wait_timeout(s, LINGER)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if self.unsynced {
            return s; // sync before sleeping
        }
        // Idle: sleep until a record (or a flush, a reopen, shutdown) wakes us; that first
        // record is then written at once.
        s.parked = true;
        while s.parked && !urgent(&s) {
            s = shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked = false;
        *idle_ticks = 0;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Caller;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Condvar;

    fn caller() -> Caller {
        Caller {
            pid: 4242,
            uid: 1001,
            gid: 1002,
            groups: vec![7],
            function: Some("orders".into()),
            exe: None,
        }
    }

    fn rec(name: impl Into<String>) -> AuditRecord {
        AuditRecord::new("GetSecret", &caller()).name(name).allow()
    }

    fn settings(on_failure: OnFailure, max_queue: usize) -> AuditConfig {
        AuditConfig {
            on_failure,
            max_queue,
        }
    }

    /// A disk for tests: a capacity (writes beyond it fail with ENOSPC after writing what
    /// fits, as a real file system does), and a gate that makes writes block (a stalled disk).
    #[derive(Clone, Default)]
    struct Disk(Arc<(Mutex<DiskState>, Condvar)>);

    #[derive(Default)]
    struct DiskState {
        data: Vec<u8>,
        capacity: Option<usize>,
        stalled: bool,
        /// Writes that are blocked right now.
        blocked: usize,
    }

    impl Disk {
        fn state(&self) -> MutexGuard<'_, DiskState> {
            self.0.0.lock().unwrap()
        }
        fn set(&self, f: impl FnOnce(&mut DiskState)) {
            f(&mut self.state());
            self.0.1.notify_all();
        }
        fn sink(&self) -> Sink {
            Sink::Writer(Box::new(self.clone()), "disk".to_owned())
        }
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.state().data.clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
        fn names(&self) -> Vec<String> {
            self.lines()
                .iter()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| {
                        panic!("a torn or broken line {l:?}: {e}");
                    });
                    v["names"][0].as_str().unwrap().to_owned()
                })
                .collect()
        }
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut s = lock.lock().unwrap();
            s.blocked += 1;
            while s.stalled {
                s = cv.wait(s).unwrap();
            }
            s.blocked -= 1;
            let room = s
                .capacity
                .map_or(usize::MAX, |c| c.saturating_sub(s.data.len()));
            if room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(room);
            s.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Poll (not a timing assertion: the bound only stops a bug from hanging the suite).
    fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn close_loses_nothing_and_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let target = AuditTarget::File(path.clone());
        let log = AuditLog::open(&target, AuditConfig::default()).unwrap();
        for i in 0..10_000 {
            log.record(rec(format!("N{i}"))).unwrap();
        }
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert!(text.ends_with('\n'));
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["names"][0], format!("N{i}"));
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Reopening appends.
        let log = AuditLog::open(&target, AuditConfig::default()).unwrap();
        log.record(AuditRecord::new("WhoAmI", &caller()).allow())
            .unwrap();
        drop(log);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            10_001
        );
    }

    #[test]
    fn open_refuses_symlinks_devices_and_missing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let open = |p: &std::path::Path| Sink::open(&AuditTarget::File(p.to_owned()));
        let real = dir.path().join("real");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = open(&link).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is a symbolic link; name the file itself"
        );
        let err = open(&dir.path().join("no/such/dir")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = open(dir.path()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
        let err = open("/dev/null".as_ref()).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file or a FIFO");
        // A FIFO: refused without a reader (no hang), accepted with one.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = open(&fifo).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO));
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let sink = open(&fifo).unwrap();
        assert!(!sink.syncs());
        drop((sink, reader));
    }

    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn records_are_written_without_a_flush_also_after_the_writer_parks() {
        let disk = Disk::default();
        let log = AuditLog::spawn(disk.sink(), AuditConfig::default()).unwrap();
        log.record(rec("A")).unwrap();
        eventually("the first record", || disk.lines().len() == 1);
        // Long enough for the writer to stop ticking and park; the next record must wake it.
        eventually("the idle writer parks", || log.shared.lock().parked);
        log.record(rec("B")).unwrap();
        eventually("the second record", || disk.lines().len() == 2);
        assert_eq!(disk.names(), ["A", "B"]);
        log.close();
    }

    #[test]
    fn concurrent_records_and_flushes_lose_nothing_and_keep_order() {
        let (log, sink) = AuditLog::in_memory();
        let log = Arc::new(log);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = Arc::clone(&log);
                thread::spawn(move || {
                    for i in 0..2000 {
                        log.record(rec(format!("T{t}_{i:05}"))).unwrap();
                        if i % 500 == 0 {
                            assert!(log.flush());
                        }
                    }
                    assert!(log.flush());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every record queued before the flushes above is written already.
        assert_eq!(sink.lines().len(), 8000);
        let stats = log.stats();
        assert_eq!(
            (stats.written, stats.queue_depth, stats.dropped),
            (8000, 0, 0)
        );
        Arc::into_inner(log).unwrap().close();
        let records = sink.records();
        for t in 0..4 {
            let mine: Vec<String> = records
                .iter()
                .map(|r| r["names"][0].as_str().unwrap().to_owned())
                .filter(|n| n.starts_with(&format!("T{t}_")))
                .collect();
            let expected: Vec<String> = (0..2000).map(|i| format!("T{t}_{i:05}")).collect();
            assert_eq!(mine, expected, "thread {t}'s records, in order");
        }
    }

    #[test]
    fn stderr_target_opens() {
        let log = AuditLog::open(&AuditTarget::Stderr, AuditConfig::default()).unwrap();
        assert_eq!(log.stats().target, "stderr");
        log.close();
    }

    /// A full disk with `deny`: calls are refused from the failed write until a write succeeds
    /// again; nothing accepted is lost, nothing is written twice, no line is torn.
    #[test]
    fn full_disk_deny_refuses_until_it_recovers_and_loses_nothing() {
        let disk = Disk::default();
        disk.set(|d| d.capacity = Some(1000)); // a few records fit, the next one is cut short
        let log = AuditLog::spawn(disk.sink(), settings(OnFailure::Deny, 1000)).unwrap();
        let mut accepted = Vec::new();
        let mut i = 0;
        // Until the writer has seen the disk full, records are accepted.
        while log.stats().state != "failing" {
            log.record(rec(format!("N{i:04}"))).unwrap();
            accepted.push(format!("N{i:04}"));
            i += 1;
            thread::sleep(Duration::from_millis(1));
            assert!(i < 5000, "the writer never saw the disk full");
        }
        let stats = log.stats();
        assert_eq!(stats.write_failures, 1);
        assert!(
            stats
                .last_error
                .as_ref()
                .is_some_and(|(_, e)| e.contains("No space left on device")),
            "{stats:?}"
        );
        // Now every call is refused; its record is kept as a refusal (there is room).
        for _ in 0..10 {
            assert_eq!(log.record(rec(format!("R{i:04}"))), Err(Unavailable));
            i += 1;
        }
        assert_eq!(log.stats().refused, 10);
        assert_eq!(log.reserve().err(), Some(Unavailable));
        // Room again: the retry writes the rest, starting where the disk stopped.
        disk.set(|d| d.capacity = None);
        eventually("recovery", || log.stats().state == "ok");
        log.record(rec("AFTER")).unwrap();
        assert!(log.flush());
        let names = disk.names();
        let (kept, refused): (Vec<_>, Vec<_>) = names.iter().partition(|n| n.starts_with('N'));
        assert_eq!(kept, accepted.iter().collect::<Vec<_>>());
        assert_eq!(refused.len(), 11); // the ten refusals and AFTER
        let lines = disk.lines();
        assert!(
            lines
                .iter()
                .filter(|l| l.contains(r#""names":["R"#))
                .all(|l| l.contains(r#""decision":"deny","reason":"audit log unavailable""#))
        );
        let stats = log.stats();
        assert_eq!((stats.dropped, stats.queue_depth), (0, 0));
        assert_eq!(stats.written, names.len() as u64);
        log.close();
    }

    /// A full disk with `serve`: calls are served, records wait up to `max_queue`, then are
    /// dropped and counted; memory stays bounded; the kept ones are written on recovery.
    #[test]
    fn full_disk_serve_keeps_serving_bounded_and_counts_drops() {
        let disk = Disk::default();
        disk.set(|d| d.capacity = Some(0));
        let log = AuditLog::spawn(disk.sink(), settings(OnFailure::Serve, 100)).unwrap();
        for i in 0..1000 {
            assert_eq!(log.record(rec(format!("N{i:04}"))), Ok(()));
        }
        eventually("the failure seen", || log.stats().state == "failing");
        let stats = log.stats();
        assert_eq!(stats.queue_depth, 100);
        assert_eq!(stats.queue_peak, 100);
        assert_eq!(stats.dropped, 900);
        assert_eq!(stats.refused, 0);
        assert_eq!(stats.queue_full, 1);
        disk.set(|d| d.capacity = None);
        eventually("recovery", || log.stats().state == "ok");
        assert!(log.flush());
        assert_eq!(
            disk.names(),
            (0..100).map(|i| format!("N{i:04}")).collect::<Vec<_>>()
        );
        log.close();
    }

    /// A stalled disk (a write that does not return): the queue holds at most `max_queue`
    /// records; `deny` refuses the rest, `serve` drops them; once the disk moves, all is written.
    #[test]
    fn stalled_disk_bounds_the_queue_in_both_modes() {
        for mode in [OnFailure::Deny, OnFailure::Serve] {
            let disk = Disk::default();
            disk.set(|d| d.stalled = true);
            let log = AuditLog::spawn(disk.sink(), settings(mode, 50)).unwrap();
            log.record(rec("FIRST")).unwrap();
            eventually("the writer blocked", || disk.state().blocked == 1);
            let mut results = Vec::new();
            for i in 0..500 {
                results.push(log.record(rec(format!("N{i:04}"))));
            }
            let stats = log.stats();
            assert_eq!(stats.queue_depth, 50, "{mode:?}");
            assert_eq!(stats.queue_peak, 50, "{mode:?}");
            assert_eq!(stats.dropped, 451, "{mode:?}");
            assert_eq!(stats.state, "queue full");
            let ok = results.iter().filter(|r| r.is_ok()).count();
            match mode {
                OnFailure::Deny => {
                    assert_eq!(ok, 49);
                    assert_eq!(stats.refused, 451);
                }
                OnFailure::Serve => {
                    assert_eq!(ok, 500);
                    assert_eq!(stats.refused, 0);
                }
            }
            // Exempt records are dropped too when there is no room, never block.
            log.record_best_effort(rec("STATUS"));
            // A reopen while the writer is blocked waits a bounded time.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let next = dir.path().join("next.jsonl");
            let started = Instant::now();
            let reopened = rt.block_on(log.reopen(&AuditTarget::File(next.clone())));
            assert!(
                matches!(reopened, Err(ReopenError::Stalled { .. })),
                "{reopened:?}"
            );
            assert!(started.elapsed() >= REOPEN_WAIT);
            disk.set(|d| d.stalled = false);
            eventually("the queue drained", || log.stats().state == "ok");
            log.close();
            // The blocked write finished on the old sink; the pending reopen happened when it
            // returned, and the rest went to the new file.
            assert_eq!(disk.names(), ["FIRST"]);
            let rest = std::fs::read_to_string(&next).unwrap();
            assert_eq!(rest.lines().count(), 49, "{mode:?}");
        }
    }

    #[test]
    fn shutdown_abandons_a_writer_blocked_for_good() {
        let disk = Disk::default();
        disk.set(|d| d.stalled = true);
        let log = AuditLog::spawn(disk.sink(), AuditConfig::default()).unwrap();
        log.record(rec("A")).unwrap();
        eventually("the writer blocked", || disk.state().blocked == 1);
        let started = Instant::now();
        log.shutdown(Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(10));
        disk.set(|d| d.stalled = false); // let the detached thread end
    }

    #[test]
    fn shutdown_gives_up_on_a_full_disk_after_the_grace() {
        let disk = Disk::default();
        disk.set(|d| d.capacity = Some(0));
        let log = AuditLog::spawn(disk.sink(), AuditConfig::default()).unwrap();
        for i in 0..10 {
            log.record(rec(format!("N{i}"))).unwrap();
        }
        log.shutdown(Duration::from_millis(300));
        let stats = log.stats();
        assert_eq!(
            (stats.state, stats.dropped, stats.queue_depth),
            ("stopped", 10, 0)
        );
        // After the writer stopped: refused (deny) and counted.
        assert_eq!(log.record(rec("LATE")), Err(Unavailable));
    }

    /// logrotate: rename, then reopen while a thread records without pause. Every record is
    /// in one of the two files, once; everything after the switch is in the new file.
    #[test]
    fn reopen_after_rename_loses_nothing_and_splits_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let target = AuditTarget::File(path.clone());
        let log = Arc::new(AuditLog::open(&target, AuditConfig::default()).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    log.record(rec(format!("N{i:07}"))).unwrap();
                    i += 1;
                }
                i
            })
        };
        eventually("records in the file", || {
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 10_000)
        });
        std::fs::rename(&path, &rotated).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(log.reopen(&target)).unwrap();
        assert_eq!(log.stats().reopens, 1);
        eventually("records in the new file", || {
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 10_000)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = busy.join().unwrap();
        Arc::into_inner(log).unwrap().close();
        let read = |p: &std::path::Path| -> Vec<u32> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["names"][0].as_str().unwrap()[1..].parse().unwrap()
                })
                .collect()
        };
        let (old, new) = (read(&rotated), read(&path));
        assert!(!old.is_empty() && !new.is_empty());
        let all: Vec<u32> = old.iter().chain(&new).copied().collect();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "every record once, in order"
        );
    }

    /// A record cut short by a full disk is written whole to the file reopened after it.
    #[test]
    fn reopen_on_a_full_disk_writes_the_cut_record_whole_to_the_new_file() {
        let disk = Disk::default();
        let one = rec("N0").to_json().len() + 1;
        disk.set(|d| d.capacity = Some(one + one / 2)); // the second record is cut in half
        let log = AuditLog::spawn(disk.sink(), settings(OnFailure::Serve, 100)).unwrap();
        for i in 0..3 {
            log.record(rec(format!("N{i}"))).unwrap();
        }
        eventually("the failure seen", || log.stats().state == "failing");
        let dir = tempfile::tempdir().unwrap();
        let next = dir.path().join("next.jsonl");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(log.reopen(&AuditTarget::File(next.clone())))
            .unwrap();
        eventually("recovery on the new file", || log.stats().state == "ok");
        log.close();
        let old = String::from_utf8(disk.state().data.clone()).unwrap();
        assert_eq!(old.len(), one + one / 2);
        assert!(old.starts_with(&(rec("N0").to_json()[..20])));
        let new = std::fs::read_to_string(&next).unwrap();
        let names: Vec<String> = new
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["names"][0].to_string())
            .collect();
        assert_eq!(names, [r#""N1""#, r#""N2""#]);
    }

    #[test]
    fn reservations_hold_a_place_until_filled_or_dropped() {
        let disk = Disk::default();
        disk.set(|d| d.stalled = true);
        let log = AuditLog::spawn(disk.sink(), settings(OnFailure::Deny, 3)).unwrap();
        log.record(rec("A")).unwrap();
        eventually("the writer blocked", || disk.state().blocked == 1);
        let kept = log.reserve().unwrap();
        let given_back = log.reserve().unwrap();
        assert_eq!(log.stats().queue_depth, 3);
        // Full: nothing else gets in, not even before the reservations are filled.
        assert_eq!(log.record(rec("B")), Err(Unavailable));
        assert_eq!(log.reserve().err(), Some(Unavailable));
        drop(given_back);
        assert_eq!(log.stats().queue_depth, 2);
        kept.fill(rec("C"));
        log.record(rec("D")).unwrap();
        disk.set(|d| d.stalled = false);
        assert!(log.flush());
        assert_eq!(disk.names(), ["A", "C", "D"]);
        // With "serve", a reservation on a full queue is granted and its record dropped.
        log.configure(settings(OnFailure::Serve, 1));
        disk.set(|d| d.stalled = true);
        log.record(rec("E")).unwrap();
        eventually("the writer blocked", || disk.state().blocked == 1);
        let before = log.stats().dropped;
        let r = log.reserve().unwrap();
        r.fill(rec("F"));
        assert_eq!(log.stats().dropped, before + 1);
        disk.set(|d| d.stalled = false);
        log.close();
        assert_eq!(disk.names(), ["A", "C", "D", "E"]);
    }
}
