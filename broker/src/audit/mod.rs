//! The audit log: one JSON object per line for every `Secrets` and `Admin` call.
//!
//! A record holds who called (pid, uid, gid, registered function, matched scopes), which valid
//! secret names the call was about, and the decision. It never holds a value: the type has no
//! field that could carry one, and names that failed validation are not recorded (the caller
//! records `names: []` with decision `invalid`), because a confused client may send a value
//! where a name belongs.
//!
//! Writing is done by one thread, so a slow disk never blocks a request. A call only appends its
//! record to a queue under a mutex; it does not wake the writer (a cross-CPU wake-up costs more
//! than the rest of a call). The writer drains the queue every [`LINGER`] while records keep
//! coming, writing each batch with one `write`; when nothing has come for [`PARK_AFTER`] ticks it
//! sleeps until the next record wakes it, so an idle broker does not tick. A full queue
//! ([`HIGH_WATER`]) also wakes it. So a record reaches the file at most [`LINGER`] after its
//! call, in call order, and never more than one record per call is lost or duplicated.
//! [`AuditLog::close`] (at shutdown) and [`AuditLog::flush`] wait until everything queued before
//! them has been written: a clean stop loses nothing; a `SIGKILL` can lose the last
//! [`LINGER`] of records. A write error never fails a call: it is reported once through
//! `tracing::warn!`, and again only after writes had recovered in between.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime};

use crate::config::AuditTarget;
use crate::policy::Caller;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
    NotFound,
    Invalid,
}

/// One line of the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, microseconds; set by [`AuditRecord::new`].
    pub time: String,
    /// The RPC's name, e.g. `"GetSecret"`.
    pub rpc: &'static str,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub function: Option<String>,
    /// Names of the scopes the caller matched (shared with the caller's grant: not copied per
    /// call).
    #[serde(serialize_with = "shared_strings")]
    pub scopes: Arc<[String]>,
    /// Valid secret names only.
    pub names: Vec<String>,
    pub decision: Outcome,
    /// Why the call was denied or invalid; `None` when allowed.
    pub reason: Option<String>,
}

impl AuditRecord {
    /// A record for `caller` calling `rpc` now. The decision starts as `deny` with no reason,
    /// so a record whose outcome was never set does not read as a success.
    pub fn new(rpc: &'static str, caller: &Caller) -> AuditRecord {
        AuditRecord {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            rpc,
            pid: caller.pid,
            uid: caller.uid,
            gid: caller.gid,
            function: caller.function.clone(),
            scopes: Arc::from([]),
            names: Vec::new(),
            decision: Outcome::Deny,
            reason: None,
        }
    }

    pub fn scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Valid secret names (`SecretName::as_str`) only.
    pub fn names<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.names = names.into_iter().map(Into::into).collect();
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.names.push(name.into());
        self
    }

    /// Set the decision and (for anything but `allow`, usually) the reason.
    pub fn decision(mut self, decision: Outcome, reason: Option<String>) -> Self {
        self.decision = decision;
        self.reason = reason;
        self
    }

    pub fn allow(self) -> Self {
        self.decision(Outcome::Allow, None)
    }

    pub fn deny(self, reason: impl Into<String>) -> Self {
        self.decision(Outcome::Deny, Some(reason.into()))
    }

    pub fn not_found(self) -> Self {
        self.decision(Outcome::NotFound, None)
    }

    pub fn invalid(self, reason: impl Into<String>) -> Self {
        self.decision(Outcome::Invalid, Some(reason.into()))
    }

    /// The JSON line, without the newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an audit record always serializes")
    }
}

fn shared_strings<S: serde::Serializer>(v: &Arc<[String]>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&**v, s)
}

/// How long a record may wait in the queue while calls keep coming.
pub const LINGER: Duration = Duration::from_millis(10);
/// Empty ticks after which the writer sleeps until a record arrives (1 s of silence).
pub const PARK_AFTER: u32 = 100;
/// Queue length that wakes the writer before its tick.
pub const HIGH_WATER: usize = 4096;

/// The audit log's sending side; the writer thread owns the file.
#[derive(Debug)]
pub struct AuditLog {
    shared: Arc<Shared>,
    writer: Option<thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// The writer waits here (for its tick, or to be woken).
    wake: Condvar,
    /// Flushers wait here for `written` to catch up.
    progress: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    records: Vec<AuditRecord>,
    /// Records ever queued / ever written (and flushed) — a flush waits for its own count.
    queued: u64,
    written: u64,
    /// Someone waits in `flush`: write now rather than at the next tick.
    flush_wanted: bool,
    /// The writer sleeps without a timeout: the next record must wake it.
    parked: bool,
    closing: bool,
    /// The writer thread has ended (flushers must not wait for it).
    gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an in-memory audit log has written (for tests).
#[derive(Debug, Clone, Default)]
pub struct MemorySink(Arc<Mutex<Vec<u8>>>);

impl MemorySink {
    /// Every complete line written so far. Call [`AuditLog::flush`] first to see all of them.
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

impl AuditLog {
    /// Opens the target and starts the one writer thread. A file is created 0600 if absent
    /// (an existing file keeps its mode) and appended to; its directory must exist, and it must
    /// be a regular file reached without following a symlink (the broker runs as root and must
    /// not be steered into writing elsewhere). Errors say which rule failed.
    pub fn open(target: &AuditTarget) -> io::Result<AuditLog> {
        match target {
            AuditTarget::Stderr => AuditLog::spawn(Box::new(io::stderr()), "stderr".to_owned()),
            AuditTarget::File(path) => {
                let file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    // O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of hanging.
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ELOOP) => {
                            io::Error::new(e.kind(), "it is a symbolic link; name the file itself")
                        }
                        _ => e,
                    })?;
                if !file.metadata()?.is_file() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a regular file",
                    ));
                }
                AuditLog::spawn(Box::new(file), path.display().to_string())
            }
        }
    }

    /// An audit log that writes to memory: returns the log and a handle to read the lines.
    pub fn in_memory() -> (AuditLog, MemorySink) {
        let sink = MemorySink::default();
        let log = AuditLog::spawn(Box::new(sink.clone()), "memory".to_owned())
            .expect("spawning the audit writer thread");
        (log, sink)
    }

    /// An audit log that writes to any writer (which the writer thread owns).
    pub fn to_writer(out: Box<dyn Write + Send>, label: &str) -> io::Result<AuditLog> {
        AuditLog::spawn(out, label.to_owned())
    }

    fn spawn(out: Box<dyn Write + Send>, label: String) -> io::Result<AuditLog> {
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        let writer = thread::Builder::new()
            .name("secretd-audit".to_owned())
            .spawn(move || {
                // Set `gone` however the loop ends (even by a panic), so no flush waits forever.
                struct Gone<'a>(&'a Shared);
                impl Drop for Gone<'_> {
                    fn drop(&mut self) {
                        self.0.lock().gone = true;
                        self.0.progress.notify_all();
                    }
                }
                let _gone = Gone(&theirs);
                write_loop(&theirs, out, &label);
            })?;
        Ok(AuditLog {
            shared,
            writer: Some(writer),
        })
    }

    /// Queue `record` for writing. Never blocks on disk and never fails the caller; wakes the
    /// writer only when it is parked (idle) or the queue is long.
    pub fn record(&self, record: AuditRecord) {
        let mut q = self.shared.lock();
        if q.gone {
            drop(q);
            tracing::warn!("audit writer thread is gone; an audit record was dropped");
            return;
        }
        q.records.push(record);
        q.queued += 1;
        let wake = q.parked || q.records.len() >= HIGH_WATER;
        if wake {
            q.parked = false;
        }
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Wait until every record queued before this call has been written and flushed.
    pub fn flush(&self) {
        let mut q = self.shared.lock();
        let target = q.queued;
        while q.written < target && !q.gone {
            q.flush_wanted = true;
            self.shared.wake.notify_one();
            q = self
                .shared
                .progress
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Flush and join the writer thread: every record queued before this is written.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::warn!("audit writer thread panicked");
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_loop(shared: &Shared, mut out: Box<dyn Write + Send>, label: &str) {
    let mut failing = false;
    let mut report = |result: io::Result<()>| match result {
        Ok(()) => failing = false,
        Err(e) => {
            if !failing {
                tracing::warn!(target = %label, error = %e, "failed to write the audit log");
            }
            failing = true;
        }
    };
    // The batch and the queue swap vectors, so a steady stream of calls allocates nothing here.
    let mut batch: Vec<AuditRecord> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut idle_ticks = 0u32;
    let mut q = shared.lock();
    loop {
        let urgent = q.closing || q.flush_wanted || q.records.len() >= HIGH_WATER;
        if !urgent {
            if q.records.is_empty() && idle_ticks >= PARK_AFTER {
                // Idle: sleep until a record (or a flush, or close) wakes us; that first
                // record is then written at once.
                q.parked = true;
                while q.parked && !q.closing && !q.flush_wanted {
                    q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.parked = false;
                idle_ticks = 0;
            } else {
                q = shared
                    .wake
                    .wait_timeout(q, LINGER)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if q.records.is_empty() {
            idle_ticks = idle_ticks.saturating_add(1);
            if q.flush_wanted {
                q.flush_wanted = false;
                shared.progress.notify_all();
            }
            if q.closing {
                break;
            }
            continue;
        }
        idle_ticks = 0;
        std::mem::swap(&mut batch, &mut q.records);
        drop(q);

        let n = batch.len() as u64;
        buf.clear();
        for record in batch.drain(..) {
            serde_json::to_writer(&mut buf, &record).expect("an audit record always serializes");
            buf.push(b'\n');
        }
        report(out.write_all(&buf).and_then(|()| out.flush()));
        if buf.capacity() > 1 << 20 {
            buf = Vec::new(); // after a burst, do not keep megabytes for the quiet that follows
        }

        q = shared.lock();
        q.written += n;
        q.flush_wanted = false;
        shared.progress.notify_all();
    }
    drop(q);
    report(out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn caller() -> Caller {
        Caller {
            pid: 4242,
            uid: 1001,
            gid: 1002,
            groups: vec![7],
            function: Some("orders".into()),
            exe: Some("/usr/bin/python3.11".into()),
        }
    }

    #[test]
    fn records_are_json_lines() {
        let (log, sink) = AuditLog::in_memory();
        log.record(
            AuditRecord::new("GetSecret", &caller())
                .scopes(["orders"])
                .name("ORDERS_DB")
                .allow(),
        );
        log.record(
            AuditRecord::new("GetSecrets", &Caller::default())
                .names(["A", "B"])
                .deny("caller matches no scope"),
        );
        log.record(AuditRecord::new("GetSecret", &caller()).invalid("invalid secret name: empty"));
        log.record(
            AuditRecord::new("GetSecret", &caller())
                .name("X")
                .not_found(),
        );
        log.flush();

        let lines = sink.lines();
        assert_eq!(lines.len(), 4);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let time = first["time"].as_str().unwrap();
        humantime::parse_rfc3339(time).unwrap();
        assert_eq!(
            first,
            serde_json::json!({
                "time": time, "rpc": "GetSecret", "pid": 4242, "uid": 1001, "gid": 1002,
                "function": "orders", "scopes": ["orders"], "names": ["ORDERS_DB"],
                "decision": "allow", "reason": null,
            })
        );
        let records = sink.records();
        assert_eq!(records[1]["function"], serde_json::Value::Null);
        assert_eq!(records[1]["names"], serde_json::json!(["A", "B"]));
        assert_eq!(records[1]["decision"], "deny");
        assert_eq!(records[1]["reason"], "caller matches no scope");
        assert_eq!(records[2]["decision"], "invalid");
        assert_eq!(records[2]["names"], serde_json::json!([]));
        assert_eq!(records[3]["decision"], "not_found");
        // The caller's exe and groups are not part of the record.
        assert!(!lines.iter().any(|l| l.contains("python")));
        log.close();
    }

    #[test]
    fn default_decision_is_deny() {
        let r = AuditRecord::new("ListSecrets", &caller());
        assert_eq!(r.decision, Outcome::Deny);
        assert!(r.to_json().contains(r#""decision":"deny""#));
    }

    #[test]
    fn close_loses_nothing_and_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        for i in 0..10_000 {
            log.record(
                AuditRecord::new("GetSecret", &caller())
                    .name(format!("N{i}"))
                    .allow(),
            );
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
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        log.record(AuditRecord::new("WhoAmI", &caller()).allow());
        drop(log);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            10_001
        );
    }

    #[test]
    fn open_refuses_symlinks_and_missing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = AuditLog::open(&AuditTarget::File(link)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is a symbolic link; name the file itself"
        );
        let err = AuditLog::open(&AuditTarget::File(dir.path().join("no/such/dir"))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = AuditLog::open(&AuditTarget::File(dir.path().to_owned())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = AuditLog::open(&AuditTarget::File(fifo)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO));
        let err = AuditLog::open(&AuditTarget::File("/dev/null".into())).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file");
    }

    #[test]
    fn write_errors_do_not_fail_the_caller() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let log = AuditLog::to_writer(Box::new(Broken), "broken").unwrap();
        for _ in 0..100 {
            log.record(AuditRecord::new("GetSecret", &caller()).allow());
        }
        log.flush();
        log.close();
    }

    /// Poll (not a timing assertion: the bound is only there so a bug cannot hang the suite).
    fn wait_for_lines(sink: &MemorySink, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let lines = sink.lines();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn records_are_written_without_a_flush_also_after_the_writer_parks() {
        let (log, sink) = AuditLog::in_memory();
        log.record(AuditRecord::new("GetSecret", &caller()).name("A").allow());
        assert_eq!(wait_for_lines(&sink, 1).len(), 1);
        // Long enough for the writer to stop ticking and park; the next record must wake it.
        thread::sleep(LINGER * (PARK_AFTER + 20));
        log.record(AuditRecord::new("GetSecret", &caller()).name("B").allow());
        let lines = wait_for_lines(&sink, 2);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains(r#""names":["B"]"#));
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
                        log.record(
                            AuditRecord::new("GetSecret", &caller())
                                .name(format!("T{t}_{i:05}"))
                                .allow(),
                        );
                        if i % 500 == 0 {
                            log.flush();
                        }
                    }
                    log.flush();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every record queued before the flushes above is written already.
        assert_eq!(sink.lines().len(), 8000);
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
        let log = AuditLog::open(&AuditTarget::Stderr).unwrap();
        log.close();
    }
}
