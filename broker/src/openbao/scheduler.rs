//! The refresh scheduler: when to re-read, when to look after the token, how long to back off,
//! and what to publish.
//!
//! It owns the [`Client`] and the source's end of the broker link ([`Inbox`]): it re-reads every
//! `refresh`, renews the token when due, answers `Admin.Refresh` requests, picks up a changed
//! `[sources.openbao]` after a reload (latest configuration wins), and pushes each outcome into
//! a [`SecretSink`]. On errors it backs off exponentially (1 s doubling, at most
//! `min(refresh, 5 min)`) while the broker keeps serving the last good values.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    OpenBaoError, SOURCE,
    leases::{self, Leases},
    session::Client,
};
use crate::{
    name::SecretName,
    store::Origin,
    upstream::{Inbox, SecretSink, Update},
};

/// Longest back-off between failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The refresh loop. Created before the runtime serves (with the client of the start-up
/// fetch) and run by [`Refresher::spawn`].
#[derive(Debug)]
pub struct Refresher {
    client: Option<Client>,
    /// When the next full refresh is due.
    next: Instant,
    /// No token maintenance before this (set to the back-off after a failure, so a token that
    /// is due while the server is down does not make the loop spin).
    token_hold: Instant,
    failures: u32,
    /// The dynamic secrets and their leases.
    leases: Leases,
}

impl Refresher {
    /// `client` is the one [`super::initial_fetch`] returned (if the source is configured);
    /// `ok` says whether that fetch fully succeeded (if not, the first retry comes after 1 s).
    pub fn new(client: Option<Client>, ok: bool, leases: Leases) -> Refresher {
        let mut r = Refresher {
            next: Instant::now(),
            token_hold: Instant::now(),
            client,
            failures: 0,
            leases,
        };
        if ok {
            r.succeeded();
        } else {
            r.failed();
        }
        r
    }

    fn refresh_interval(&self) -> Duration {
        self.client
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.config().refresh)
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.next = Instant::now() + self.refresh_interval();
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let cap = self.refresh_interval().min(MAX_BACKOFF);
        let backoff = Duration::from_secs(1)
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(cap);
        self.next = Instant::now() + backoff;
        self.token_hold = self.next;
    }

    /// Start the loop, fed by `inbox` and publishing into `sink`.
    pub fn spawn(self, sink: Arc<dyn SecretSink>, inbox: Inbox) {
        if let Some(c) = &self.client {
            sink.note_node(SOURCE, c.node());
        }
        sink.note_leases(self.leases.status());
        tokio::spawn(self.run(sink, inbox));
    }

    async fn run(mut self, sink: Arc<dyn SecretSink>, mut inbox: Inbox) {
        let mut config_open = true;
        loop {
            let far = Instant::now() + Duration::from_secs(24 * 3600);
            let (refresh_at, token_at, leases_at) = match &self.client {
                Some(c) => (
                    // A source with only dynamic secrets has nothing to re-read.
                    if c.config().secrets.is_empty() {
                        far
                    } else {
                        self.next
                    },
                    c.token_due().map_or(far, |due| due.max(self.token_hold)),
                    self.leases.next_due().unwrap_or(far),
                ),
                None => (far, far, far),
            };
            let wake = refresh_at.min(token_at).min(leases_at);
            tokio::select! {
                () = tokio::time::sleep_until(wake.into()) => {
                    if Instant::now() >= leases_at {
                        self.tick_leases(&*sink).await;
                    } else if Instant::now() >= refresh_at {
                        let _ = self.cycle(&*sink, None).await;
                    } else if let Some(c) = &mut self.client {
                        let r = c.maintain_token().await;
                        sink.note_node(SOURCE, c.node());
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "token renewal failed; serving the last good values");
                            sink.note(SOURCE, Err(e.to_string()));
                            // Retry with the refresh back-off (`failed` also holds the token
                            // timer until then) rather than spinning on the token.
                            self.failed();
                        }
                    }
                }
                req = inbox.refresh.recv() => match req {
                    None => return,
                    Some(req) => {
                        let r = self.refresh(&*sink, req.only.as_ref()).await;
                        let _ = req.reply.send(r);
                    }
                },
                reply = inbox.shutdown.recv() => {
                    if let Some(c) = &mut self.client {
                        let n = self.leases.revoke_all(c).await;
                        if n > 0 {
                            tracing::info!(revoked = n, "shutdown: dynamic secrets' leases revoked");
                        }
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    return;
                },
                changed = inbox.config.changed(), if config_open => match changed {
                    Ok(()) => {
                        let new = inbox.config.borrow_and_update().openbao.clone();
                        self.reconfigure(&*sink, new).await;
                    }
                    Err(_) => config_open = false,
                },
            }
        }
    }

    async fn reconfigure(
        &mut self,
        sink: &dyn SecretSink,
        new: Option<crate::config::OpenBaoSource>,
    ) {
        if new.as_ref() == self.client.as_ref().map(Client::config) {
            return;
        }
        match new {
            None => {
                tracing::info!("[sources.openbao] removed by reload: dropping its secrets");
                if let Some(c) = &mut self.client {
                    self.leases.revoke_all(c).await;
                }
                self.leases = Leases::default();
                sink.note_leases(Vec::new());
                self.client = None;
                sink.publish(
                    Origin::OpenBao,
                    Update {
                        values: Vec::new(),
                        provides: Some(BTreeSet::new()),
                    },
                );
            }
            Some(cfg) => match Client::new(cfg) {
                Ok(c) => {
                    tracing::info!("[sources.openbao] changed by reload: fetching again");
                    self.leases.reconfigure(c.config().dynamic.clone());
                    self.client = Some(c);
                    let _ = self.cycle(sink, None).await;
                    self.tick_leases(sink).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "[sources.openbao] changed by reload but cannot be used; keeping the previous one");
                    sink.note(SOURCE, Err(e.to_string()));
                }
            },
        }
    }

    /// `Admin.Refresh`: re-read the KV secrets (all, or `only`) and get new credentials for
    /// the dynamic secrets (all, or `only`).
    async fn refresh(
        &mut self,
        sink: &dyn SecretSink,
        only: Option<&SecretName>,
    ) -> Result<u64, String> {
        let Some(client) = self.client.as_mut() else {
            return Ok(0);
        };
        match only {
            Some(name) if self.leases.provides(name) => {
                let got = self.leases.rotate_now(client, Some(name)).await;
                self.publish_leases(sink, got.map_err(|e| e.to_string()))
            }
            Some(_) => self.cycle(sink, only).await,
            None => {
                let kv = if client.config().secrets.is_empty() {
                    Ok(0)
                } else {
                    self.cycle(sink, None).await
                };
                let Some(client) = self.client.as_mut() else {
                    return kv;
                };
                let got = self.leases.rotate_now(client, None).await;
                let dynamic = self.publish_leases(sink, got.map_err(|e| e.to_string()));
                match (kv, dynamic) {
                    (Ok(a), Ok(b)) => Ok(a + b),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
        }
    }

    /// Renewals, rotations and revocations that are due.
    async fn tick_leases(&mut self, sink: &dyn SecretSink) {
        let Some(client) = &mut self.client else {
            return;
        };
        let got = self.leases.tick(client).await;
        let _ = self.publish_leases(sink, Ok(got));
    }

    /// Publish new dynamic values (a new version each) and the leases' state.
    fn publish_leases(
        &mut self,
        sink: &dyn SecretSink,
        got: Result<leases::Outcome, String>,
    ) -> Result<u64, String> {
        let result = got.and_then(|out| {
            let n = out.values.len() as u64;
            if !out.values.is_empty() {
                sink.publish(
                    Origin::OpenBao,
                    Update {
                        values: out.values,
                        provides: None,
                    },
                );
            }
            match out.errors.first() {
                None => Ok(n),
                Some(first) => Err(first.clone()),
            }
        });
        sink.note_leases(self.leases.status());
        if let Some(c) = &self.client {
            sink.note_node(SOURCE, c.node());
        }
        match &result {
            Ok(n) if *n > 0 => sink.note(SOURCE, Ok(())),
            Ok(_) => {}
            Err(e) => sink.note(SOURCE, Err(e.clone())),
        }
        result
    }

    /// One refresh: read, publish what was read (a changed value replaces and zeroizes the old
    /// one; a full read also drops secrets no longer mapped), record the outcome for Status.
    async fn cycle(
        &mut self,
        sink: &dyn SecretSink,
        only: Option<&SecretName>,
    ) -> Result<u64, String> {
        let Some(client) = &mut self.client else {
            return Ok(0);
        };
        if let Some(n) = only
            && !client.config().maps(n)
        {
            return Ok(0);
        }
        let result = client.fetch(only).await;
        sink.note_node(SOURCE, client.node());
        match result {
            Ok(fetched) => {
                let n = fetched.values.len() as u64;
                let provides = only.is_none().then(|| {
                    let cfg = client.config();
                    cfg.secrets
                        .iter()
                        .map(|m| m.name.clone())
                        .chain(cfg.dynamic.iter().map(|d| d.name.clone()))
                        .collect()
                });
                sink.publish(
                    Origin::OpenBao,
                    Update {
                        values: fetched.values,
                        provides,
                    },
                );
                if fetched.failures.is_empty() {
                    sink.note(SOURCE, Ok(()));
                    if only.is_none() {
                        self.succeeded();
                    }
                    Ok(n)
                } else {
                    for e in &fetched.failures {
                        tracing::warn!(error = %e, "secret not refreshed; serving its last good value");
                    }
                    let msg = summarize(&fetched.failures);
                    sink.note(SOURCE, Err(msg.clone()));
                    if only.is_none() {
                        self.failed();
                    }
                    Err(msg)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "OpenBao refresh failed; serving the last good values");
                sink.note(SOURCE, Err(e.to_string()));
                self.failed();
                Err(e.to_string())
            }
        }
    }
}

fn summarize(failures: &[OpenBaoError]) -> String {
    let mut msg = failures
        .iter()
        .take(3)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if failures.len() > 3 {
        msg.push_str(&format!(" (and {} more)", failures.len() - 3));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_refresh_interval() {
        let mut r = Refresher::new(None, true, Leases::default());
        let mut seen = Vec::new();
        for _ in 0..14 {
            r.failed();
            seen.push((r.next - Instant::now()).as_secs_f64().round() as u64);
        }
        // No client: the interval is an hour, so the cap is MAX_BACKOFF.
        assert_eq!(
            seen,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300]
        );
        assert_eq!(
            r.token_hold, r.next,
            "a failure also holds token maintenance"
        );
        r.succeeded();
        assert_eq!(r.failures, 0);
    }
}
