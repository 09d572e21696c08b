//! `secretd`: the broker daemon and its operator commands.
//!
//! `serve` runs the start-up sequence of the contract in a plain `fn main`, before any thread
//! exists: capture and wipe the environment, harden the process, load config, sources and
//! policy, bind the socket — and only then start the async runtime.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use secretd::{
    audit::{self, AuditLog},
    client,
    config::{AuditTarget, Config, DEFAULT_CONFIG_PATH, LogFormat},
    filewatch, openbao,
    procfs::ProcFs,
    registry::Registry,
    scrub,
    server::{self, bind_socket},
    state::{self, Broker, ConfigOrigin},
    store::{Origin, Store},
    supervise,
};
use secretd_proto::v1::{self as pb, admin_client::AdminClient, secrets_client::SecretsClient};

/// Every heap block is cleared when freed (see `secretd::alloc`): secrets pass through buffers
/// we do not own (prost, hyper, std::env), and this is the one place that reaches all of them.
#[global_allocator]
static ALLOCATOR: secretd::alloc::ZeroizingAlloc = secretd::alloc::ZeroizingAlloc;

#[derive(Debug, Parser)]
#[command(
    name = "secretd",
    version,
    about = "Runtime secret broker: scoped secrets over gRPC on a Unix socket, callers identified by kernel peer credentials"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker: read secrets from the environment and secret files, wipe the
    /// environment, serve scoped values on the socket.
    Serve {
        /// Config file [default: /etc/secretd/secretd.toml; built-in defaults if absent]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Socket to listen on (overrides [server].socket)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Write "READY\n" to this inherited file descriptor once accepting connections
        #[arg(long, value_name = "N")]
        ready_fd: Option<i32>,
        /// Supervisor mode: once ready, run PROGRAM as a child with the environment minus every
        /// brokered variable; reap orphans, forward SIGTERM/SIGINT, exit with its status.
        #[arg(last = true, value_name = "PROGRAM [ARG]...")]
        program: Vec<std::ffi::OsString>,
    },
    /// Validate the config and policy and run every start-up check of `serve` that needs no
    /// bind and no fetch (socket directory, file sources, audit log); print a summary; exit 0
    /// if `serve` would start, 1 if not.
    Check {
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The socket `serve --socket` would use (default: [server].socket)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Validate the file alone, without the start-up checks against this machine (for a
        /// config that will be deployed elsewhere)
        #[arg(long, conflicts_with = "socket")]
        config_only: bool,
    },
    /// Ask a running broker to reload its config and policy (Admin.Reload).
    Reload {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Show a running broker's status (Admin.Status). No values.
    Status {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List processes whose environ or cmdline holds a brokered value (Admin.Scan). Names, never
    /// values. Exit status 3 when any process does (a gate for cron jobs and CI), 0 when none.
    Scan {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read one secret (or all) from its source now (Admin.Refresh).
    Refresh {
        name: Option<String>,
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Create or replace a secret in memory; the value is read from standard input, never argv
    /// (one trailing newline is removed).
    Set {
        name: String,
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Remove (and zeroize) a secret.
    Delete {
        name: String,
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print one secret's value to standard output (as the calling process is scoped).
    Get {
        name: String,
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print the names the calling process may read.
    List {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print what the broker knows about the calling process.
    Whoami {
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            socket,
            ready_fd,
            program,
        } => serve(config, socket, ready_fd, program),
        Command::Check {
            config,
            socket,
            config_only,
        } => check(config, socket, config_only),
        other => client_command(other),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("secretd: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `secretd scan` when a process holds a brokered value.
const EXIT_SCAN_FOUND: u8 = 3;

/// An error and its causes on one line, each cause once: many errors repeat their source in
/// their own message ("…: No such file or directory (os error 2): No such file or directory
/// (os error 2)"), so a cause already shown is skipped.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace(['\n', '\r'], " ")
}

fn config_location(config: Option<PathBuf>) -> (PathBuf, bool) {
    match config {
        Some(p) => (p, true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    }
}

fn check(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    config_only: bool,
) -> anyhow::Result<ExitCode> {
    use secretd::preflight::{self, Finding};
    let (path, explicit) = config_location(config);
    let config = match Config::load_or_default(&path, explicit, std::path::Path::new("/etc")) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("secretd: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", config.summary());
    let socket = socket.unwrap_or_else(|| config.server.socket.clone());
    let findings = if config_only {
        Vec::new()
    } else {
        preflight::run(&config, &socket)
    };
    let mut failed = false;
    for finding in findings {
        match finding {
            Finding::Note(note) => println!("note: {note}"),
            Finding::Warning(warning) => println!("warning: {warning}"),
            Finding::Problem(problem) => {
                eprintln!("secretd: {problem}");
                failed = true;
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    println!("config OK");
    Ok(ExitCode::SUCCESS)
}

fn serve(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    ready_fd: Option<i32>,
    program: Vec<std::ffi::OsString>,
) -> anyhow::Result<ExitCode> {
    let proc = ProcFs::system();
    // 1–2. Copy every variable out, zero the original block, empty `environ`. Single-threaded.
    let env = scrub::capture_and_wipe(&proc).context("failed to wipe the environment")?;
    // 3. Non-dumpable, no core files, memory locked (best effort; warnings logged below).
    let hardening = scrub::harden();
    // 4. Config, policy and file sources; any error aborts with file:line:col.
    let (path, explicit) = config_location(config);
    let etc = PathBuf::from("/etc");
    let config = Config::load_or_default(&path, explicit, &etc)?;
    init_logging(&config, env.rust_log.as_deref());
    for w in &hardening.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        memory_lock = hardening.memory_lock,
        "process hardened: non-dumpable, RLIMIT_CORE=0"
    );
    for line in config.summary().lines() {
        tracing::info!("{}", line.trim_start());
    }
    // Supervisor mode: PROGRAM's environment is what [sources.env] does not select.
    let program =
        (!program.is_empty()).then(|| supervise::Program::new(program, &config.env, &env.vars));
    let (env_secrets, file_secrets) = state::initial_secrets(&config, env.vars)?;
    let store = Store::new();
    for (name, value) in env_secrets {
        store.put(name, value, Origin::Env);
    }
    for (name, value) in file_secrets {
        store.put(name, value, Origin::File);
    }
    let socket = socket.unwrap_or_else(|| config.server.socket.clone());
    let ready = ready_fd
        .map(|fd| {
            secretd::sys::inherited_fd(fd)
                .map(std::fs::File::from)
                .with_context(|| format!("--ready-fd {fd} is not an open file descriptor"))
        })
        .transpose()?;
    let audit = AuditLog::open(&config.server.audit_log, config.audit).with_context(|| {
        match &config.server.audit_log {
            AuditTarget::File(p) => format!("failed to open the audit log {}", p.display()),
            AuditTarget::Stderr => "failed to write the audit log to stderr".to_owned(),
        }
    })?;
    // 5. The runtime (its threads start only now, after the wipe and the hardening), the
    // OpenBao start-up fetch, the socket. Every mapped secret is fetched before the socket is
    // bound (so before READY): a failed required fetch exits non-zero with the cause and never
    // touches the socket path.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("secretd")
        .build()
        .context("failed to start the async runtime")?;
    let (openbao_client, openbao_first, openbao_leases) = match &config.openbao {
        Some(cfg) => {
            let (client, fetched, leases) = runtime
                .block_on(openbao::initial_fetch(cfg))
                .with_context(|| {
                    format!(
                        "[sources.{}] start-up fetch from {} failed (required = true)",
                        cfg.section,
                        cfg.addresses
                            .iter()
                            .map(|a| a.url.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            let first = if fetched.failures.is_empty() {
                Ok(())
            } else {
                Err(fetched
                    .failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "))
            };
            for (name, value) in fetched.values {
                store.put(name, value, Origin::OpenBao);
            }
            (Some(client), Some(first), leases)
        }
        None => (None, None, Default::default()),
    };
    let listener = bind_socket(&socket, config.server.socket_mode)?;
    let counts = store.count_by_origin();
    let count = |o: Origin| counts.get(&o).copied().unwrap_or(0);
    tracing::info!(
        secrets = store.len(),
        scopes = config.policy.scopes().len(),
        "loaded {} secrets ({} from the environment, {} from files, {} from OpenBao)",
        store.len(),
        count(Origin::Env),
        count(Origin::File),
        count(Origin::OpenBao),
    );
    let origin = ConfigOrigin {
        path,
        explicit,
        etc,
    };
    let result = runtime.block_on(async move {
        let registry = Registry::new(state::state_path_for(&socket), proc.clone());
        let kept = registry.load()?;
        if !kept.is_empty() {
            tracing::info!(count = kept.len(), "restored worker registrations");
        }
        let broker = Arc::new(Broker::new(
            config, origin, socket, store, registry, audit, proc,
        ));
        broker.note_source("env", Ok(()));
        broker.note_source("files", Ok(()));
        let openbao_ok = openbao_first.as_ref().is_none_or(Result::is_ok);
        if let Some(first) = openbao_first {
            broker.note_source(openbao::SOURCE, first);
        }
        let (control, inbox) = secretd::upstream::channel(broker.config());
        openbao::Refresher::new(openbao_client, openbao_ok, openbao_leases)
            .spawn(Arc::clone(&broker) as _, inbox);
        broker.set_upstream(control.clone());
        filewatch::spawn(Arc::clone(&broker));
        spawn_reload_on_sighup(Arc::clone(&broker))?;
        spawn_denial_summaries(Arc::clone(&broker));
        let grace = broker.config().limits.shutdown_grace;
        let outcome = match program {
            None => server::serve(Arc::clone(&broker), listener, stop_signal()?, ready)
                .await
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from),
            Some(program) => {
                supervise::serve_and_supervise(Arc::clone(&broker), listener, ready, program)
                    .await
                    .map_err(anyhow::Error::from)
            }
        };
        // Dynamic credentials: revoke the leases held (`revoke_on_shutdown`), bounded so that
        // an unreachable OpenBao cannot hold the shutdown (the leases then expire by TTL).
        if tokio::time::timeout(SHUTDOWN_REVOKE_TIMEOUT, control.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "revoking dynamic secrets' leases took over {}s; leaving the rest to expire by their TTL",
                SHUTDOWN_REVOKE_TIMEOUT.as_secs()
            );
        }
        broker.audit.denials.summarize(audit::SUMMARY_EVERY);
        // Every queued record is written; a failing or stalled disk gets the grace period.
        let audit = Arc::clone(&broker);
        let _ = tokio::task::spawn_blocking(move || audit.audit.shutdown(grace)).await;
        outcome
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let code = result?;
    tracing::info!("stopped");
    Ok(code)
}

/// Longest wait for lease revocation at shutdown.
const SHUTDOWN_REVOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn init_logging(config: &Config, rust_log: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    // Network crates are capped whatever the level: their trace output is protocol frames.
    let directive = format!(
        "{},h2=info,hyper=info,hyper_util=info,tonic=info,tower=info",
        rust_log.unwrap_or(&config.log.level)
    );
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a journal, a file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn spawn_reload_on_sighup(broker: Arc<Broker>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("failed to install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading configuration and reopening the audit log");
            if let Err(e) = broker.reload().await {
                tracing::error!(error = %e, "reload rejected; the configuration in force is unchanged");
            }
            // Also after a rejected config: logrotate has renamed the audit file away.
            if let Err(e) = broker.reopen_audit().await
                && !matches!(e, audit::ReopenError::Open { .. })
            // the writer logged that one
            {
                tracing::error!("{e}");
            }
        }
    });
    Ok(())
}

/// The operator log's summaries of refused calls, one line per caller uid and interval.
fn spawn_denial_summaries(broker: Arc<Broker>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(audit::SUMMARY_EVERY);
        every.tick().await; // the first tick is immediate
        loop {
            every.tick().await;
            broker.audit.denials.summarize(audit::SUMMARY_EVERY);
        }
    });
}

fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut int =
        signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// The operator/client subcommands: one call on a single-threaded runtime.
fn client_command(command: Command) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_client(command))
}

async fn channel(socket: Option<PathBuf>) -> anyhow::Result<tonic::transport::Channel> {
    let path = client::socket_path(socket);
    client::connect(&path).await.map_err(|e| {
        // The OS error is the cause worth naming; the transport layers above it add nothing.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        anyhow::anyhow!(
            "cannot connect to the broker at {}: {cause}. Is the broker running (secretd serve), \
             and does --socket or SECRETD_SOCKET name its socket?",
            path.display()
        )
    })
}

/// A gRPC error from the broker as the canonical status name, its message and, where one
/// helps, what to do about it.
fn status_error(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let hint = match status.code() {
        Code::PermissionDenied => {
            " (Admin calls need a uid in [server].admin_uids, usually root; a read needs a \
             [[scope]] that matches the caller: see `secretd whoami`)"
        }
        Code::Unavailable => " (is the broker running, and still accepting connections?)",
        _ => "",
    };
    anyhow::anyhow!(
        "{}: {}{hint}",
        secretd_proto::code_name(status.code()),
        status.message()
    )
}

async fn run_client(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Reload { socket } => {
            let r = AdminClient::new(channel(socket).await?)
                .reload(pb::ReloadRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("reloaded: {} secrets, {} scopes", r.secrets, r.scopes);
        }
        Command::Status { socket, json } => {
            let s = AdminClient::new(channel(socket).await?)
                .status(pb::StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
            } else {
                print_status(&s);
            }
        }
        Command::Scan { socket, json } => {
            let s = AdminClient::new(channel(socket).await?)
                .scan(pb::ScanRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&scan_json(&s))?);
            } else {
                print_scan(&s);
            }
            if !s.hits.is_empty() {
                return Ok(ExitCode::from(EXIT_SCAN_FOUND));
            }
        }
        Command::Refresh { name, socket } => {
            let r = AdminClient::new(channel(socket).await?)
                .refresh(pb::RefreshRequest {
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("refreshed {} secrets", r.refreshed);
        }
        Command::Set { name, socket } => {
            let mut value = Vec::new();
            std::io::stdin()
                .read_to_end(&mut value)
                .context("failed to read the value from standard input")?;
            if value.last() == Some(&b'\n') {
                value.pop();
            }
            let r = AdminClient::new(channel(socket).await?)
                .set_secret(pb::SetSecretRequest {
                    name: name.clone(),
                    value,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{name}: version {}", r.version);
        }
        Command::Delete { name, socket } => {
            AdminClient::new(channel(socket).await?)
                .delete_secret(pb::DeleteSecretRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            println!("{name}: deleted");
        }
        Command::Get { name, socket } => {
            let s = SecretsClient::new(channel(socket).await?)
                .get_secret(pb::GetSecretRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            out.write_all(&s.value)?;
            out.flush()?;
        }
        Command::List { socket } => {
            let r = SecretsClient::new(channel(socket).await?)
                .list_secrets(pb::ListSecretsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            for n in r.names {
                println!("{n}");
            }
        }
        Command::Whoami { socket, json } => {
            let w = SecretsClient::new(channel(socket).await?)
                .who_am_i(pb::WhoAmIRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let v = serde_json::json!({
                    "pid": w.pid, "uid": w.uid, "gid": w.gid,
                    "function": (!w.function.is_empty()).then_some(&w.function),
                    "scopes": w.scopes, "exe": w.exe,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("pid {} uid {} gid {}", w.pid, w.uid, w.gid);
                println!("exe {}", w.exe);
                println!(
                    "function {}",
                    if w.function.is_empty() {
                        "-"
                    } else {
                        &w.function
                    }
                );
                println!(
                    "scopes {}",
                    if w.scopes.is_empty() {
                        "-".to_owned()
                    } else {
                        w.scopes.join(", ")
                    }
                );
            }
        }
        Command::Serve { .. } | Command::Check { .. } => bail!("not a client command"),
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "version": s.version,
        "pid": s.pid,
        "uptime_seconds": s.uptime_seconds,
        "socket": s.socket,
        "config": s.config,
        "secrets": s.secrets,
        "scopes": s.scopes,
        "registered_workers": s.registered_workers,
        "open_connections": s.open_connections,
        "calls_allowed": s.calls_allowed,
        "calls_denied": s.calls_denied,
        "audit": s.audit.as_ref().map(|a| serde_json::json!({
            "target": a.target,
            "state": a.state,
            "on_failure": a.on_failure,
            "max_queue": a.max_queue,
            "queue_depth": a.queue_depth,
            "queue_peak": a.queue_peak,
            "records_written": a.records_written,
            "records_dropped": a.records_dropped,
            "calls_refused": a.calls_refused,
            "write_failures": a.write_failures,
            "queue_full": a.queue_full,
            "last_error": (!a.last_error.is_empty()).then_some(&a.last_error),
            "last_error_time": (!a.last_error_time.is_empty()).then_some(&a.last_error_time),
            "reopens": a.reopens,
        })),
        "sources": s.sources.iter().map(|src| serde_json::json!({
            "name": src.name,
            "secrets": src.secrets,
            "last_success": (!src.last_success.is_empty()).then_some(&src.last_success),
            "last_error": (!src.last_error.is_empty()).then_some(&src.last_error),
            "last_error_time": (!src.last_error_time.is_empty()).then_some(&src.last_error_time),
            "errors": src.errors,
            "node": (!src.node.is_empty()).then_some(&src.node),
            "failovers": (!src.node.is_empty()).then_some(src.failovers),
        })).collect::<Vec<_>>(),
        "dynamic": s.dynamic.iter().map(|d| serde_json::json!({
            "name": d.name,
            "path": d.path,
            "held": d.held,
            "ttl_seconds": d.held.then_some(d.ttl_seconds),
        })).collect::<Vec<_>>(),
    })
}

fn print_status(s: &pb::StatusResponse) {
    println!(
        "secretd {} (pid {}), up {}s",
        s.version, s.pid, s.uptime_seconds
    );
    println!("socket      {}", s.socket);
    println!(
        "config      {}",
        if s.config.is_empty() {
            "(built-in defaults)"
        } else {
            &s.config
        }
    );
    println!("secrets     {}", s.secrets);
    println!("scopes      {}", s.scopes);
    println!("workers     {} registered", s.registered_workers);
    println!("connections {} open", s.open_connections);
    println!(
        "calls       {} allowed, {} denied",
        s.calls_allowed, s.calls_denied
    );
    if let Some(a) = &s.audit {
        println!(
            "audit       {} to {} (on_failure {}); queue {}/{} (peak {}); {} written, {} dropped, \
             {} calls refused; {} reopens",
            a.state,
            a.target,
            a.on_failure,
            a.queue_depth,
            a.max_queue,
            a.queue_peak,
            a.records_written,
            a.records_dropped,
            a.calls_refused,
            a.reopens
        );
        if !a.last_error.is_empty() {
            println!(
                "audit error {} write failures, {} times queue full; last: {} ({})",
                a.write_failures, a.queue_full, a.last_error, a.last_error_time
            );
        }
    }
    for src in &s.sources {
        let ok = if src.last_success.is_empty() {
            "never"
        } else {
            &src.last_success
        };
        print!(
            "source {:<6} {} secrets, last success {ok}",
            src.name, src.secrets
        );
        if !src.node.is_empty() {
            print!(", node {} ({} failovers)", src.node, src.failovers);
        }
        if !src.last_error.is_empty() {
            print!(
                ", {} errors, last: {} ({})",
                src.errors, src.last_error, src.last_error_time
            );
        }
        println!();
    }
    for d in &s.dynamic {
        if d.held {
            let ttl = humantime::format_duration(std::time::Duration::from_secs(d.ttl_seconds));
            println!("dynamic {}  {}  ttl {ttl}", d.name, d.path);
        } else {
            println!("dynamic {}  {}  no lease (retrying)", d.name, d.path);
        }
    }
}

fn scan_json(s: &pb::ScanResponse) -> serde_json::Value {
    serde_json::json!({
        "processes_scanned": s.processes_scanned,
        "processes_skipped": s.processes_skipped,
        "not_searched": s.not_searched,
        "hits": s.hits.iter().map(|h| serde_json::json!({
            "pid": h.pid, "uid": h.uid, "exe": h.exe, "environ": h.environ, "cmdline": h.cmdline,
        })).collect::<Vec<_>>(),
    })
}

fn print_scan(s: &pb::ScanResponse) {
    println!(
        "scanned {} processes ({} skipped: vanished or unreadable)",
        s.processes_scanned, s.processes_skipped
    );
    if !s.not_searched.is_empty() {
        println!(
            "not searched (shorter than 8 bytes): {}",
            s.not_searched.join(", ")
        );
    }
    if s.hits.is_empty() {
        println!("no process holds a brokered value in its environ or cmdline");
        return;
    }
    for h in &s.hits {
        println!("pid {} uid {} {}", h.pid, h.uid, h.exe);
        if !h.environ.is_empty() {
            println!("  environ: {}", h.environ.join(", "));
        }
        if !h.cmdline.is_empty() {
            println!("  cmdline: {}", h.cmdline.join(", "));
        }
    }
}
