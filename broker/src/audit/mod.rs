//! The audit log: one JSON object per line for every `Secrets` and `Admin` call.
//!
//! A record holds who called (pid, uid, gid, registered function, matched scopes), which valid
//! secret names the call was about, and the decision. It never holds a value: the type has no
//! field that could carry one, and names that failed validation are not recorded (the caller
//! records `names: []` with decision `invalid`), because a confused client may send a value
//! where a name belongs.
//!
//! - [`AuditRecord`] (here): the record and its JSON form.
//! - [`AuditLog`] (`writer.rs`): the bounded queue, the one writer thread, what happens when
//!   records cannot be kept (`[audit].on_failure`), reopening for logrotate, the counters that
//!   `secretd status` shows.
//! - [`Sink`] (`sink.rs`): where the lines go — a file, a FIFO, stderr, or memory for tests.
//! - [`DenialLog`] (`denials.rs`): the operator log's side of denials — the first per caller uid
//!   in full, then one summary per uid and interval, so that a caller probing names cannot flood
//!   the journal with what the audit log already holds.

mod denials;
mod sink;
mod writer;

use std::sync::Arc;
use std::time::SystemTime;

pub use denials::{DenialLog, Refusal, SUMMARY_EVERY};
pub use sink::{MemorySink, Sink};
pub use writer::{
    AuditLog, AuditStats, HIGH_WATER, LINGER, PARK_AFTER, REOPEN_WAIT, RETRY_EVERY, ReopenError,
    Reservation, SYNC_EVERY, Unavailable,
};

use crate::policy::Caller;

/// The reason recorded (and the status message) for a call refused because its record could
/// not be kept (`on_failure = "deny"`).
pub const UNAVAILABLE: &str = "audit log unavailable";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
    NotFound,
    Invalid,
}

/// One line of the audit log.
///
/// The time is taken when the record is made and formatted by the writer thread (RFC 3339,
/// UTC, microseconds), off the request path. `reason` is left out of the line when there is
/// none (an allowed call): the contract asks for the reason of a denial, and `"reason":null` was
/// 14 of the ~190 bytes of every allowed call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRecord {
    #[serde(serialize_with = "rfc3339_micros")]
    pub time: SystemTime,
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
    /// Why the call was denied or invalid; `None` (and absent from the line) when allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditRecord {
    /// A record for `caller` calling `rpc` now. The decision starts as `deny` with no reason,
    /// so a record whose outcome was never set does not read as a success.
    pub fn new(rpc: &'static str, caller: &Caller) -> AuditRecord {
        AuditRecord {
            time: SystemTime::now(),
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

fn rfc3339_micros<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

fn shared_strings<S: serde::Serializer>(v: &Arc<[String]>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&**v, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn caller() -> Caller {
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
        )
        .unwrap();
        log.record(
            AuditRecord::new("GetSecrets", &Caller::default())
                .names(["A", "B"])
                .deny("caller matches no scope"),
        )
        .unwrap();
        log.record(AuditRecord::new("GetSecret", &caller()).invalid("invalid secret name: empty"))
            .unwrap();
        log.record(
            AuditRecord::new("GetSecret", &caller())
                .name("X")
                .not_found(),
        )
        .unwrap();
        log.flush();

        let lines = sink.lines();
        assert_eq!(lines.len(), 4);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let time = first["time"].as_str().unwrap();
        humantime::parse_rfc3339(time).unwrap();
        assert_eq!(time.len(), "2026-12-01T21:58:15.123456Z".len(), "{time}");
        assert_eq!(
            first,
            serde_json::json!({
                "time": time, "rpc": "GetSecret", "pid": 4242, "uid": 1001, "gid": 1002,
                "function": "orders", "scopes": ["orders"], "names": ["ORDERS_DB"],
                "decision": "allow",
            })
        );
        // Field order is the contract's; no whitespace; no reason on an allowed call.
        assert!(
            lines[0].starts_with(r#"{"time":""#)
                && lines[0].ends_with(
                    r#","rpc":"GetSecret","pid":4242,"uid":1001,"gid":1002,"function":"orders","scopes":["orders"],"names":["ORDERS_DB"],"decision":"allow"}"#
                ),
            "{}",
            lines[0]
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
}
