//! Client loops: interleaved per-call latency and closed-loop throughput, over tonic channels
//! to Unix sockets (one channel = one connection).

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use secretd_proto::v1::{self as pb, secrets_client::SecretsClient};
use tonic::transport::{Channel, Endpoint};

use crate::procs::NAME;

/// Percentiles of one set of samples, in microseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
}

/// Nearest-rank percentiles of `samples` (nanoseconds).
pub fn stats(samples: &mut [u64]) -> Stats {
    samples.sort_unstable();
    let n = samples.len().max(1);
    let at = |q: f64| samples[((q * n as f64) as usize).min(n - 1)] as f64 / 1000.0;
    Stats {
        n: samples.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        mean_us: samples.iter().sum::<u64>() as f64 / n as f64 / 1000.0,
        min_us: samples.first().copied().unwrap_or(0) as f64 / 1000.0,
    }
}

/// One connection to a server on `socket` (what `secretd::client::connect` does; the bench
/// does not link the broker library — see Cargo.toml).
pub async fn connect(socket: &Path) -> anyhow::Result<SecretsClient<Channel>> {
    let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    Ok(SecretsClient::new(channel))
}

/// One `GetSecret(NAME)`; the value must come back.
pub async fn get(client: &mut SecretsClient<Channel>) -> anyhow::Result<()> {
    let secret = client
        .get_secret(pb::GetSecretRequest {
            name: NAME.to_owned(),
        })
        .await
        .context("GetSecret failed")?
        .into_inner();
    anyhow::ensure!(!secret.value.is_empty(), "GetSecret returned no value");
    Ok(())
}

/// `calls` timed `GetSecret`s per target, in `rounds` blocks whose order rotates each round, so
/// that machine noise (other tenants, frequency changes) hits every target alike.
pub async fn latency(
    targets: &mut [(String, SecretsClient<Channel>)],
    calls: usize,
    rounds: usize,
) -> anyhow::Result<Vec<(String, Stats)>> {
    for (_, client) in targets.iter_mut() {
        for _ in 0..500 {
            get(client).await?;
        }
    }
    let per_round = calls.div_ceil(rounds);
    let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(per_round * rounds); targets.len()];
    for r in 0..rounds {
        for k in 0..targets.len() {
            let t = (r + k) % targets.len();
            let client = &mut targets[t].1;
            for _ in 0..per_round {
                let start = Instant::now();
                get(client).await?;
                samples[t].push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
        }
    }
    Ok(targets
        .iter()
        .zip(samples.iter_mut())
        .map(|((label, _), s)| (label.clone(), stats(s)))
        .collect())
}

/// `clients` open connections to one server, ready for [`run_closed_loop`].
pub async fn connect_many(
    socket: &Path,
    clients: usize,
) -> anyhow::Result<Vec<SecretsClient<Channel>>> {
    let mut out = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = connect(socket).await?;
        get(&mut c).await?;
        out.push(c);
    }
    Ok(out)
}

/// Every client calls `GetSecret` back to back for `duration`; returns completed calls/s.
pub async fn run_closed_loop(
    clients: &[SecretsClient<Channel>],
    duration: Duration,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut c = c.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    get(&mut c).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// The median of `v` (which is sorted).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}
