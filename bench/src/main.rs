//! `secretd-bench`: the Rust half of `make bench` (the Python half is `bench/run.py`, which
//! calls this binary and writes `bench/RESULTS.md`).
//!
//! ```text
//! secretd-bench echo  --socket PATH [--value-len N] [--clearing-alloc] --ready-fd N
//! secretd-bench suite --secretd PATH --out FILE.json [--calls N] [--quick]
//! ```
//!
//! `echo` is the transport floor (see `echo.rs`). `suite` starts real brokers and echo floors
//! and measures, always interleaving what is compared: latency against the floor (item 1),
//! throughput at 1/8/32/128 connections (3), scaling with secrets and scopes (4), start-up to
//! READY (5), resident memory (6, and RSS once a flood of connections has ended) and a second
//! uid's latency while one uid holds its whole share of idle and half-handshake connections
//! (`flood`, issue 11). Benchmarks, not tests: nothing here judges a number.

mod alloc;
mod echo;
mod measure;
mod procs;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::{
    measure::{Stats, connect, connect_many, latency, median, run_closed_loop},
    procs::{BrokerDir, BrokerShape, Running, start_echo},
};

#[global_allocator]
static ALLOC: alloc::SwitchableAlloc = alloc::SwitchableAlloc;

#[derive(Debug, Parser)]
#[command(name = "secretd-bench", about = "secretd benchmarks (not tests)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the transport floor: GetSecret answered with a fixed value, nothing else.
    Echo {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, default_value_t = procs::VALUE.len())]
        value_len: usize,
        /// Clear every freed block, as the broker's allocator does.
        #[arg(long)]
        clearing_alloc: bool,
        #[arg(long)]
        ready_fd: Option<i32>,
    },
    /// Call GetSecret on a running server for a while (load for a profiler); prints calls/s.
    Load {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        clients: usize,
    },
    /// Hold connections open and do nothing with them (the flood of `suite --only flood`, run
    /// as another uid): `idle` send nothing, `preface` send only the HTTP/2 client preface.
    /// Prints `HELD` once they are open; exits when stdin closes.
    Hold {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        idle: usize,
        #[arg(long)]
        preface: usize,
    },
    /// Run the Rust-side measurements and write them as JSON.
    Suite {
        /// The `secretd` binary under test.
        #[arg(long)]
        secretd: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Timed calls per target in each latency comparison.
        #[arg(long, default_value_t = 5000)]
        calls: usize,
        /// Short runs, for iterating (not for RESULTS.md).
        #[arg(long)]
        quick: bool,
        /// Another `secretd` build (e.g. before a fix) measured in the same interleaved
        /// latency and scaling runs, as `*_baseline`.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Also measure latency and scaling with the client on CPU 0 and every server on CPU 1
        /// (`*_pinned`): on a small VM, whether a server thread shares the client's CPU changes
        /// a round trip by tens of microseconds; pinning makes that the same for every server.
        #[arg(long)]
        pin: bool,
        /// Only these items (comma-separated: latency,throughput,scaling,startup,memory,flood,audit).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Echo {
            socket,
            value_len,
            clearing_alloc,
            ready_fd,
        } => {
            if clearing_alloc {
                alloc::enable_clearing();
            }
            // The inherited pipe, reopened by path: no unsafe fd adoption needed.
            let ready = ready_fd
                .map(|fd| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(format!("/proc/self/fd/{fd}"))
                        .map(std::os::fd::OwnedFd::from)
                })
                .transpose()
                .context("--ready-fd")?;
            echo::run(&socket, value_len, ready)
        }
        Cmd::Load {
            socket,
            seconds,
            clients,
        } => {
            let rate = current_thread()?.block_on(async {
                let conns = connect_many(&socket, clients).await?;
                run_closed_loop(&conns, Duration::from_secs_f64(seconds)).await
            })?;
            println!("{rate:.0} calls/s");
            Ok(())
        }
        Cmd::Hold {
            socket,
            idle,
            preface,
        } => {
            use std::io::{BufRead, Write};
            let mut held = Vec::with_capacity(idle + preface);
            for i in 0..idle + preface {
                let Ok(mut c) = std::os::unix::net::UnixStream::connect(&socket) else {
                    continue;
                };
                if i >= idle {
                    // Refused (over the share) connections may already be closed: ignore.
                    let _ = c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                }
                held.push(c);
            }
            println!("HELD {}", held.len());
            std::io::stdout().flush()?;
            let _ = std::io::stdin().lock().lines().count();
            drop(held);
            Ok(())
        }
        Cmd::Suite {
            secretd,
            out,
            calls,
            quick,
            baseline,
            pin,
            only,
        } => {
            raise_nofile();
            let want = |item: &str| only.is_empty() || only.iter().any(|o| o == item);
            let all_cpus = format!(
                "0-{}",
                std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
            );
            let s = Suite {
                secretd,
                baseline,
                pin: pin.then_some(all_cpus),
                calls: if quick { calls.min(1000) } else { calls },
                quick,
            };
            let mut results = serde_json::Map::new();
            let pinned = s.pin.is_some();
            for (item, run) in [
                (
                    "latency",
                    (|s: &Suite| s.latency(false)) as fn(&Suite) -> anyhow::Result<Value>,
                ),
                ("latency_pinned", |s: &Suite| s.latency(true)),
                ("throughput", Suite::throughput),
                ("scaling", |s: &Suite| s.scaling(false)),
                ("scaling_pinned", |s: &Suite| s.scaling(true)),
                ("startup", Suite::startup),
                ("memory", Suite::memory),
                ("audit", |s: &Suite| s.audit(s.pin.is_some())),
                ("flood", Suite::flood),
            ] {
                let base = item.trim_end_matches("_pinned");
                if !want(base) || (item != base && !pinned) {
                    continue;
                }
                eprintln!("bench: {item} …");
                let started = Instant::now();
                let value = run(&s).with_context(|| format!("bench item {item}"))?;
                eprintln!("bench: {item} done in {:.1?}", started.elapsed());
                results.insert(item.to_owned(), value);
            }
            let text = serde_json::to_string_pretty(&Value::Object(results))?;
            std::fs::write(&out, text + "\n")?;
            Ok(())
        }
    }
}

/// 1,000 connections need more than the usual soft limit of 1,024 descriptors.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn stats_json(all: &[(String, Stats)]) -> Value {
    Value::Object(
        all.iter()
            .map(|(k, s)| (k.clone(), serde_json::to_value(s).unwrap_or_default()))
            .collect(),
    )
}

struct Suite {
    secretd: PathBuf,
    baseline: Option<PathBuf>,
    /// `Some(all CPUs)` when latency runs are pinned (see `--pin`).
    pin: Option<String>,
    calls: usize,
    quick: bool,
}

/// The everyday shape: a handful of secrets, one scope that the caller matches.
const SMALL: BrokerShape = BrokerShape {
    secrets: 10,
    scopes: 1,
    matched: 1,
};

impl Suite {
    fn broker(&self, shape: BrokerShape) -> anyhow::Result<(BrokerDir, Running)> {
        self.broker_on(shape, None)
    }

    fn broker_on(
        &self,
        shape: BrokerShape,
        cpu: Option<usize>,
    ) -> anyhow::Result<(BrokerDir, Running)> {
        let dir = BrokerDir::new(shape)?;
        let running = dir.start(&self.secretd, cpu)?;
        Ok((dir, running))
    }

    /// The CPU servers of a pinned latency run use.
    fn server_cpu(&self, pinned: bool) -> Option<usize> {
        pinned.then_some(1)
    }

    /// Run `f` with the main thread (the current-thread client) on CPU 0 when `pinned`.
    fn pinned<T>(&self, pinned: bool, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let (true, Some(all)) = (pinned, &self.pin) else {
            return f();
        };
        procs::pin_main_thread("0")?;
        let result = f();
        procs::pin_main_thread(all)?;
        result
    }

    /// The `--baseline` build on the same shape, if one was given.
    fn baseline(
        &self,
        shape: BrokerShape,
        pinned: bool,
    ) -> anyhow::Result<Option<(BrokerDir, Running)>> {
        let Some(bin) = &self.baseline else {
            return Ok(None);
        };
        let dir = BrokerDir::new(shape)?;
        let running = dir.start(bin, self.server_cpu(pinned))?;
        Ok(Some((dir, running)))
    }

    fn echo(&self, dir: &BrokerDir, clearing: bool, cpu: Option<usize>) -> anyhow::Result<Running> {
        let tag = if clearing { "echo-clearing" } else { "echo" };
        start_echo(
            &dir.dir.path().join(format!("{tag}.sock")),
            clearing,
            &dir.dir.path().join(format!("{tag}.log")),
            cpu,
        )
    }

    /// Item 1: GetSecret on the broker vs the echo floor (and the floor with the clearing
    /// allocator, which prices the allocator alone), interleaved, one connection each.
    fn latency(&self, pinned: bool) -> anyhow::Result<Value> {
        let cpu = self.server_cpu(pinned);
        let (dir, broker) = self.broker_on(SMALL, cpu)?;
        let echo = self.echo(&dir, false, cpu)?;
        let echo_clearing = self.echo(&dir, true, cpu)?;
        let baseline = self.baseline(SMALL, pinned)?;
        let all = self.pinned(pinned, || {
            current_thread()?.block_on(async {
                let mut targets = vec![
                    ("secretd".to_owned(), connect(&broker.socket).await?),
                    ("echo".to_owned(), connect(&echo.socket).await?),
                    (
                        "echo_clearing_alloc".to_owned(),
                        connect(&echo_clearing.socket).await?,
                    ),
                ];
                if let Some((_, b)) = &baseline {
                    targets.push(("secretd_baseline".to_owned(), connect(&b.socket).await?));
                }
                latency(&mut targets, self.calls, 20).await
            })
        })?;
        if let Some((_, b)) = baseline {
            b.stop();
        }
        broker.stop();
        echo.stop();
        echo_clearing.stop();
        Ok(stats_json(&all))
    }

    /// Item 3: closed-loop throughput with N concurrent clients, one connection each, the
    /// broker and the floor alternating; median of the repetitions.
    fn throughput(&self) -> anyhow::Result<Value> {
        let (dir, broker) = self.broker(SMALL)?;
        let echo = self.echo(&dir, false, None)?;
        let (duration, reps) = if self.quick {
            (Duration::from_millis(300), 1)
        } else {
            (Duration::from_secs(1), 3)
        };
        // The clients share the machine with the server, as callers would: two workers.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut out = serde_json::Map::new();
        for clients in [1usize, 8, 32, 128] {
            let row = runtime.block_on(async {
                let targets = [
                    ("secretd", connect_many(&broker.socket, clients).await?),
                    ("echo", connect_many(&echo.socket, clients).await?),
                ];
                let mut rates = [Vec::new(), Vec::new()];
                for rep in 0..reps {
                    for k in 0..2 {
                        let t = (rep + k) % 2;
                        rates[t].push(run_closed_loop(&targets[t].1, duration).await?);
                    }
                }
                anyhow::Ok(json!({
                    "secretd_calls_per_s": median(&mut rates[0]),
                    "echo_calls_per_s": median(&mut rates[1]),
                    "reps": reps,
                    "seconds_each": duration.as_secs_f64(),
                }))
            })?;
            out.insert(clients.to_string(), row);
        }
        broker.stop();
        echo.stop();
        Ok(Value::Object(out))
    }

    /// Item 4: p50 with 10 secrets/1 scope vs 10,000 secrets/1,000 scopes (the caller matching
    /// one of them, or all of them), interleaved.
    fn scaling(&self, pinned: bool) -> anyhow::Result<Value> {
        let shapes = [
            ("s10_scopes1", SMALL),
            (
                "s10k_scopes1k_match1",
                BrokerShape {
                    secrets: 10_000,
                    scopes: 1000,
                    matched: 1,
                },
            ),
            (
                "s10k_scopes1k_match1k",
                BrokerShape {
                    secrets: 10_000,
                    scopes: 1000,
                    matched: 1000,
                },
            ),
        ];
        let mut brokers = Vec::new();
        for (label, shape) in shapes {
            brokers.push((
                label.to_owned(),
                self.broker_on(shape, self.server_cpu(pinned))?,
            ));
            if let Some(b) = self.baseline(shape, pinned)? {
                brokers.push((format!("{label}_baseline"), b));
            }
        }
        let all = self.pinned(pinned, || {
            current_thread()?.block_on(async {
                let mut targets = Vec::new();
                for (label, (_, running)) in &brokers {
                    targets.push((label.clone(), connect(&running.socket).await?));
                }
                latency(&mut targets, self.calls, 20).await
            })
        })?;
        for (_, (_, running)) in brokers {
            running.stop();
        }
        Ok(stats_json(&all))
    }

    /// Issue 16: what the audit log costs. `GetSecret` p50 with the audit log written to a
    /// file vs written nowhere (stderr to `/dev/null`), interleaved, for this build and the
    /// `--baseline` one; and the audit file's bytes per call (the calls above: warm-up and
    /// timed, all allowed `GetSecret`s).
    fn audit(&self, pinned: bool) -> anyhow::Result<Value> {
        let cpu = self.server_cpu(pinned);
        let mut brokers = Vec::new();
        let mut builds = vec![("", &self.secretd)];
        if let Some(b) = &self.baseline {
            builds.push(("_baseline", b));
        }
        for (suffix, bin) in builds {
            for (what, nowhere) in [("file", false), ("nowhere", true)] {
                let dir = BrokerDir::with_audit(SMALL, nowhere)?;
                let running = dir.start(bin, cpu)?;
                brokers.push((format!("audit_{what}{suffix}"), dir, running));
            }
        }
        let all = self.pinned(pinned, || {
            current_thread()?.block_on(async {
                let mut targets = Vec::new();
                for (label, _, running) in &brokers {
                    targets.push((label.clone(), connect(&running.socket).await?));
                }
                latency(&mut targets, self.calls, 20).await
            })
        })?;
        let mut out = match stats_json(&all) {
            Value::Object(m) => m,
            _ => unreachable!("stats_json returns an object"),
        };
        for (label, dir, running) in brokers {
            running.stop(); // SIGTERM: every queued record is written
            if label.starts_with("audit_file") {
                let text = std::fs::read(dir.audit())?;
                let lines = text.iter().filter(|&&b| b == b'\n').count().max(1);
                out.insert(
                    format!("bytes_per_call{}", label.trim_start_matches("audit_file")),
                    json!({"bytes": text.len(), "records": lines,
                           "per_call": text.len() as f64 / lines as f64}),
                );
            }
        }
        out.insert("pinned".to_owned(), json!(pinned));
        Ok(Value::Object(out))
    }

    /// Item 5: wall time from spawn (exec) to READY, secrets from `[sources.files]`.
    fn startup(&self) -> anyhow::Result<Value> {
        let reps = if self.quick { 2 } else { 7 };
        let sizes = [10usize, 1000, 10_000];
        let mut dirs = Vec::new();
        for secrets in sizes {
            dirs.push(BrokerDir::new(BrokerShape {
                secrets,
                scopes: 1,
                matched: 1,
            })?);
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
        // One untimed start each: page cache and binary warm.
        for dir in &dirs {
            dir.start(&self.secretd, None)?.stop();
        }
        for rep in 0..reps {
            for k in 0..dirs.len() {
                let i = (rep + k) % dirs.len();
                let running = dirs[i].start(&self.secretd, None)?;
                times[i].push(running.ready_after.as_secs_f64() * 1000.0);
                running.stop();
            }
        }
        let mut out = serde_json::Map::new();
        for (secrets, mut t) in sizes.into_iter().zip(times) {
            let max = t.iter().copied().fold(0.0, f64::max);
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            out.insert(
                secrets.to_string(),
                json!({"median_ms": median(&mut t), "min_ms": min, "max_ms": max, "reps": reps}),
            );
        }
        Ok(Value::Object(out))
    }

    /// Item 6: broker RSS with 10,000 secrets at rest, then with 1,000 idle connections (each
    /// made one call, so it is attested and its HTTP/2 session is set up, then stays open).
    /// The echo floor gets the same 1,000 connections: what the transport alone costs; and
    /// again with the clearing allocator: what clearing on free adds.
    fn memory(&self) -> anyhow::Result<Value> {
        let (dir, broker) = self.broker(BrokerShape {
            secrets: 10_000,
            scopes: 1,
            matched: 1,
        })?;
        let echo = self.echo(&dir, false, None)?;
        let echo_clearing = self.echo(&dir, true, None)?;
        std::thread::sleep(Duration::from_millis(500));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let conns = 1000;
        let mut out = serde_json::Map::new();
        for (label, server) in [
            ("secretd", &broker),
            ("echo", &echo),
            ("echo_clearing_alloc", &echo_clearing),
        ] {
            let rest = snapshot(server)?;
            let (idle, after, settled) = runtime.block_on(async {
                let clients = connect_many(&server.socket, conns).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let idle = snapshot(server)?;
                drop(clients);
                tokio::time::sleep(Duration::from_secs(1)).await;
                let after = snapshot(server)?;
                // The broker trims its heap once a second after connections close in numbers.
                tokio::time::sleep(Duration::from_secs(2)).await;
                anyhow::Ok((idle, after, snapshot(server)?))
            })?;
            out.insert(
                label.to_owned(),
                json!({
                    "at_rest": rest,
                    "with_idle_connections": idle,
                    "after_they_close": after,
                    "three_seconds_after": settled,
                    "per_connection_kib":
                        idle["VmRSS"].as_u64().unwrap_or(0).saturating_sub(
                            rest["VmRSS"].as_u64().unwrap_or(0)) as f64 / conns as f64,
                }),
            );
        }
        broker.stop();
        echo.stop();
        echo_clearing.stop();
        out.insert("secrets".to_owned(), json!(10_000));
        out.insert("idle_connections".to_owned(), json!(conns));
        Ok(Value::Object(out))
    }
}

impl Suite {
    /// Issue 11: a second uid's `GetSecret` latency while uid 65534 holds its whole share of
    /// idle and half-handshake connections (plus more, which the broker closes), against the
    /// same client with no flood: quiet, flooded, quiet, flooded, each `calls` timed calls.
    fn flood(&self) -> anyhow::Result<Value> {
        use std::{
            io::{BufRead, BufReader},
            os::unix::{fs::PermissionsExt, process::CommandExt},
            process::{Command, Stdio},
        };
        const FLOODER: u32 = 65_534;
        if !nix::unistd::geteuid().is_root() {
            return Ok(json!({"skipped": "needs root (the flood runs as uid 65534)"}));
        }
        let per_uid = 64;
        let (dir, broker) = self.broker(SMALL)?;
        // The flooder must reach the socket and run a copy of this binary.
        std::fs::set_permissions(dir.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let exe = dir.dir.path().join("secretd-bench");
        std::fs::copy(std::env::current_exe()?, &exe)?;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
        let runtime = current_thread()?;
        let mut client = runtime.block_on(connect(&broker.socket))?;
        let mut phases = Vec::new();
        for round in 0..2 {
            for flooded in [false, true] {
                let holder = if flooded {
                    let mut child = Command::new(&exe)
                        .args(["hold", "--socket"])
                        .arg(&broker.socket)
                        .args(["--idle", &(per_uid / 2).to_string()])
                        .args(["--preface", &(per_uid / 2 + 16).to_string()])
                        .uid(FLOODER)
                        .gid(FLOODER)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .spawn()?;
                    let mut line = String::new();
                    BufReader::new(child.stdout.take().context("holder stdout")?)
                        .read_line(&mut line)?;
                    anyhow::ensure!(line.starts_with("HELD"), "flooder said {line:?}");
                    std::thread::sleep(Duration::from_millis(300));
                    Some(child)
                } else {
                    None
                };
                let label = if flooded { "flooded" } else { "quiet" };
                let mut targets = vec![(label.to_owned(), client)];
                let stats = runtime.block_on(latency(&mut targets, self.calls, 1))?;
                client = targets.pop().context("client")?.1;
                phases.push((format!("{label}_{round}"), stats[0].1));
                if let Some(mut child) = holder {
                    drop(child.stdin.take());
                    let _ = child.wait();
                }
            }
        }
        broker.stop();
        let mut out = match stats_json(&phases) {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        out.insert("flooder_uid".to_owned(), json!(FLOODER));
        out.insert(
            "flood".to_owned(),
            json!({"idle": per_uid / 2, "preface": per_uid / 2 + 16, "share": per_uid}),
        );
        Ok(Value::Object(out))
    }
}

/// RSS and its parts, in KiB.
fn snapshot(server: &Running) -> anyhow::Result<Value> {
    let mut m = serde_json::Map::new();
    for field in ["VmRSS", "RssAnon", "RssFile", "VmLck"] {
        m.insert(field.to_owned(), json!(server.status_kib(field)?));
    }
    Ok(Value::Object(m))
}
