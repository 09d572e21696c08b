//! The operator log is not a second audit log.
//!
//! Every refused call has its record in the audit log. The operator log (stderr, the journal)
//! gets the first refusal of each caller uid in full, so a misconfigured worker shows up at
//! once, and then, for as long as that uid keeps being refused, one summary line per uid every
//! [`SUMMARY_EVERY`] with counts — never names or values. A caller probing a thousand names
//! therefore writes two lines a minute, not a thousand. The per-call line is still there at
//! `debug` level for whoever turns it on.
//!
//! Memory is bounded: at most [`MAX_UIDS`] uids are tracked per interval; refusals of further
//! uids are summed in one "other uids" line.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How often the counted refusals are summarized.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// Uids tracked per interval.
pub const MAX_UIDS: usize = 4096;

/// Why a call was refused, as the operator log counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The policy said no (`PERMISSION_DENIED`: out of scope, not an admin).
    Denied,
    /// The caller could not be verified (attestation failed, the connecting process exited).
    Unverified,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    denied: u64,
    unverified: u64,
}

impl Counts {
    fn add(&mut self, kind: Refusal) {
        match kind {
            Refusal::Denied => self.denied += 1,
            Refusal::Unverified => self.unverified += 1,
        }
    }

    fn total(self) -> u64 {
        self.denied + self.unverified
    }
}

#[derive(Debug, Default)]
struct Window {
    /// Uids whose first refusal this interval was logged in full, with what came after it.
    uids: HashMap<u32, Counts>,
    /// Refusals of uids beyond [`MAX_UIDS`].
    others: Counts,
}

/// Counts refusals per caller uid between summaries.
#[derive(Debug, Default)]
pub struct DenialLog {
    window: Mutex<Window>,
}

/// One summary line's content (returned for tests; [`DenialLog::summarize`] logs them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `None`: the uids beyond [`MAX_UIDS`].
    pub uid: Option<u32>,
    pub denied: u64,
    pub unverified: u64,
}

impl DenialLog {
    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one refusal of `uid`. Returns `true` when it is the uid's first since the last
    /// summary: the caller then logs it in full (and at `debug` otherwise).
    pub fn note(&self, uid: u32, kind: Refusal) -> bool {
        let mut w = self.lock();
        if let Some(c) = w.uids.get_mut(&uid) {
            c.add(kind);
            return false;
        }
        if w.uids.len() >= MAX_UIDS {
            w.others.add(kind);
            return false;
        }
        w.uids.insert(uid, Counts::default());
        true
    }

    /// Take the counts of the interval that ends now: one entry per uid refused again after
    /// its first logged refusal, sorted by uid, then the other uids if any.
    pub fn take(&self) -> Vec<Summary> {
        let w = std::mem::take(&mut *self.lock());
        let mut out: Vec<Summary> = w
            .uids
            .into_iter()
            .filter(|(_, c)| c.total() > 0)
            .map(|(uid, c)| Summary {
                uid: Some(uid),
                denied: c.denied,
                unverified: c.unverified,
            })
            .collect();
        out.sort_by_key(|s| s.uid);
        if w.others.total() > 0 {
            out.push(Summary {
                uid: None,
                denied: w.others.denied,
                unverified: w.others.unverified,
            });
        }
        out
    }

    /// Log the interval's summaries (every [`SUMMARY_EVERY`], and once at shutdown).
    pub fn summarize(&self, interval: Duration) {
        let every = humantime::format_duration(interval);
        for s in self.take() {
            let total = s.denied + s.unverified;
            match s.uid {
                Some(uid) => tracing::info!(
                    uid,
                    denied = s.denied,
                    unverified = s.unverified,
                    "uid {uid}: {total} more calls refused in the last {every} (each one is in the audit log)"
                ),
                None => tracing::info!(
                    denied = s.denied,
                    unverified = s.unverified,
                    "{total} calls refused in the last {every} from uids beyond the first {MAX_UIDS} (each one is in the audit log)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_refusal_per_uid_is_logged_then_counted() {
        let log = DenialLog::default();
        assert!(log.note(1001, Refusal::Denied));
        for _ in 0..999 {
            assert!(!log.note(1001, Refusal::Denied));
        }
        assert!(log.note(1002, Refusal::Unverified));
        assert!(!log.note(1001, Refusal::Unverified));
        assert_eq!(
            log.take(),
            [Summary {
                uid: Some(1001),
                denied: 999,
                unverified: 1
            }]
        );
        // A new interval: the first refusal is logged in full again.
        assert!(log.note(1001, Refusal::Denied));
        assert_eq!(log.take(), []);
    }

    #[test]
    fn uids_beyond_the_bound_share_one_line() {
        let log = DenialLog::default();
        for uid in 0..MAX_UIDS as u32 {
            assert!(log.note(uid, Refusal::Denied));
        }
        assert!(!log.note(u32::MAX, Refusal::Denied));
        assert!(!log.note(u32::MAX - 1, Refusal::Unverified));
        assert_eq!(log.lock().uids.len(), MAX_UIDS);
        assert_eq!(
            log.take(),
            [Summary {
                uid: None,
                denied: 1,
                unverified: 1
            }]
        );
    }
}
