//! The audit log: one JSON object per line for every `Secrets` and `Admin` call.
//!
//! A record holds who called (pid, uid, gid, registered function, matched scopes), which valid
//! secret names the call was about, and the decision. It never holds a value: the type has no
//! field that could carry one, and names that failed validation are not recorded (the caller
//! records `names: []` with decision `invalid`), because a confused client may send a value
//! where a name belongs.
//!
//! Writing is done by one thread fed through a channel, so a slow disk never blocks a request.
//! [`AuditLog::close`] (at shutdown) and [`AuditLog::flush`] wait until everything sent before
//! them has been written. A write error never fails a call: it is reported once through
//! `tracing::warn!`, and again only after writes had recovered in between.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::SystemTime;

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
    /// Names of the scopes the caller matched.
    pub scopes: Vec<String>,
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
            scopes: Vec::new(),
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

enum Message {
    Record(Box<AuditRecord>),
    /// Answer once every earlier message has been written and flushed.
    Flush(mpsc::SyncSender<()>),
}

/// The audit log's sender side; the writer thread owns the file.
#[derive(Debug)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<Message>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Record(_) => "Record",
            Message::Flush(_) => "Flush",
        })
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
        let (tx, rx) = mpsc::channel();
        let writer = thread::Builder::new()
            .name("secretd-audit".to_owned())
            .spawn(move || write_loop(rx, out, &label))?;
        Ok(AuditLog {
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Queue `record` for writing. Never blocks on disk and never fails the caller.
    pub fn record(&self, record: AuditRecord) {
        if let Some(tx) = &self.tx
            && tx.send(Message::Record(Box::new(record))).is_err()
        {
            tracing::warn!("audit writer thread is gone; an audit record was dropped");
        }
    }

    /// Wait until every record sent before this call has been written and flushed.
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if tx.send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    /// Flush and join the writer thread: every record sent before this is written.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Dropping the sender ends the writer's loop once it has drained the channel.
        drop(self.tx.take());
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

fn write_loop(rx: mpsc::Receiver<Message>, out: Box<dyn Write + Send>, label: &str) {
    let mut out = io::BufWriter::new(out);
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
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Write everything already queued, then flush once.
        while let Some(message) = next {
            match message {
                Message::Record(record) => {
                    let mut line = record.to_json();
                    line.push('\n');
                    report(out.write_all(line.as_bytes()));
                }
                Message::Flush(done) => {
                    report(out.flush());
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        report(out.flush());
    }
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

    #[test]
    fn stderr_target_opens() {
        let log = AuditLog::open(&AuditTarget::Stderr).unwrap();
        log.close();
    }
}
