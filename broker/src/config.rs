//! The broker's configuration file, in two stages: TOML is parsed into raw structs that reject
//! every unknown key, then converted into a validated [`Config`] (users and groups resolved,
//! globs compiled, paths checked). Nothing half-valid escapes: either the whole file is good or
//! there is one [`ConfigError`].
//!
//! Errors are for operators and always read `PATH:LINE:COLUMN: message`, one line, pointing at
//! the offending key or value (line and column are 1-based; the column counts characters):
//!
//! ```text
//! /etc/secretd/secretd.toml:7:1: unknown key `colour` in [server], expected one of `socket`, ...
//! /etc/secretd/secretd.toml:12:8: `user` in [[scope]] #2: no user named "ordrs" in /etc/passwd
//! ```
//!
//! Besides the sections of the contract (`[server]`, `[sources.env]`, `[sources.files]`,
//! `[[scope]]`) two sections of our own are accepted:
//!
//! ```toml
//! [limits]
//! max_connections = 1024            # open connections; one beyond this is closed at once
//! max_connections_per_uid = 64      # open connections per peer uid (admin uids exempt)
//! handshake_timeout = "10s"         # HTTP/2 preface + SETTINGS must arrive within this
//! idle_timeout = "0s"               # close connections with no open stream after this; 0 = never
//! max_streams_per_connection = 32   # concurrent calls per connection (HTTP/2 streams)
//! max_request_bytes = 65536         # largest decoded request message
//! max_names_per_request = 256       # names in one GetSecrets call
//! shutdown_grace = "5s"             # how long in-flight calls may run after SIGTERM
//!
//! [log]
//! format = "human"                  # or "json"
//! level = "info"                    # a tracing EnvFilter directive; RUST_LOG overrides it
//! ```
//!
//! and the contract's `[audit]` (section 10): `on_failure = "deny" | "serve"` (default `deny`)
//! and `max_queue` (records waiting for the disk, default 65536).
//!
//! The file holds no secret values, so echoing its text in errors is fine.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use std::{fs, io};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use secretd_trust::{Trust, TrustError};
use serde::Deserialize;
use toml::Spanned;

mod dynamic;

pub use dynamic::{DynamicSecret, Part, Template};

use crate::name::{MAX_NAME_LEN, SecretName, is_name_byte};
use crate::policy::{Matcher, Policy, Scope, secret_glob};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/secretd/secretd.toml";
pub const DEFAULT_SOCKET_PATH: &str = "/run/secretd/secretd.sock";
pub const DEFAULT_SOCKET_MODE: u32 = 0o666;
/// Environment variables never taken as secrets unless `exclude` is given explicitly.
pub const DEFAULT_ENV_EXCLUDE: &[&str] = &[
    "PATH", "HOME", "HOSTNAME", "LANG", "LC_*", "TERM", "TZ", "PWD", "SHLVL", "RUST_LOG",
];
/// Longest socket path the kernel accepts (`sun_path` is 108 bytes with the final NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from; `None` means there was no file and these are the defaults.
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub env: EnvSource,
    pub files: FileSource,
    /// `[sources.openbao]` (or `[sources.vault]`): KV v2 secrets fetched over HTTPS.
    pub openbao: Option<OpenBaoSource>,
    pub policy: Policy,
    pub limits: Limits,
    pub log: LogConfig,
    pub audit: AuditConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Permission bits of the socket file (at most 0o777).
    pub socket_mode: u32,
    /// Peers allowed to call `secretd.v1.Admin`.
    pub admin_uids: Vec<u32>,
    pub audit_log: AuditTarget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stderr,
    File(PathBuf),
}

/// Which environment variables of the broker become secrets.
#[derive(Clone)]
pub struct EnvSource {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    include_set: GlobSet,
    exclude_set: GlobSet,
}

impl std::fmt::Debug for EnvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvSource")
            .field("include", &self.include)
            .field("exclude", &self.exclude)
            .finish_non_exhaustive()
    }
}

impl EnvSource {
    /// Build from glob patterns over variable names (case-sensitive).
    pub fn new(include: Vec<String>, exclude: Vec<String>) -> Result<EnvSource, globset::Error> {
        Ok(EnvSource {
            include_set: env_globs(&include)?,
            exclude_set: env_globs(&exclude)?,
            include,
            exclude,
        })
    }

    /// Whether the variable `var_name` is taken as a secret: it matches an include pattern and
    /// no exclude pattern.
    pub fn selects(&self, var_name: &str) -> bool {
        self.include_set.is_match(var_name) && !self.exclude_set.is_match(var_name)
    }
}

impl Default for EnvSource {
    fn default() -> EnvSource {
        EnvSource::new(
            vec!["*".to_owned()],
            DEFAULT_ENV_EXCLUDE
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        )
        .expect("the default env patterns are valid globs")
    }
}

fn env_glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    GlobBuilder::new(pattern).backslash_escape(true).build()
}

fn env_globs(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        set.add(env_glob(p)?);
    }
    set.build()
}

/// Directories whose regular files are secrets (one per file, named by the file name).
#[derive(Debug, Clone, Default)]
pub struct FileSource {
    pub dirs: Vec<PathBuf>,
}

/// `[sources.openbao]`: secrets read from an OpenBao/Vault KV v2 mount over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBaoSource {
    /// The section as written, `"openbao"` or `"vault"` (for messages).
    pub section: &'static str,
    /// The nodes of the cluster, in the order given (`address` is a string or a list); one is
    /// used at a time.
    pub addresses: Vec<OpenBaoAddress>,
    /// PEM file of the CA certificate(s) that sign the server's certificate; nothing else is
    /// trusted.
    pub ca_file: PathBuf,
    /// KV v2 mount, without slashes (`secret`).
    pub mount: String,
    pub refresh: Duration,
    /// The first fetch must succeed for start-up to go on.
    pub required: bool,
    pub auth: OpenBaoAuth,
    /// `NAME = "PATH#KEY"`, sorted by name.
    pub secrets: Vec<OpenBaoMapping>,
    /// `[sources.openbao.dynamic.NAME]`: values built from leases, sorted by name.
    pub dynamic: Vec<DynamicSecret>,
}

/// `https://HOST[:PORT]`: the host is what the certificate must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBaoAddress {
    /// As written, without a trailing `/` (shown in messages).
    pub url: String,
    /// Host name or IP address literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

#[derive(Clone, PartialEq, Eq)]
pub enum OpenBaoAuth {
    /// `auth/<mount>/login` with a role id (in the config) and a secret id (in a root-only file).
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    /// A token read from a root-only file (re-read when it stops working).
    Token { token_file: PathBuf },
}

impl std::fmt::Debug for OpenBaoAuth {
    // The role id is an identifier, not a secret, but it has no business in logs either.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenBaoAuth::AppRole {
                mount,
                secret_id_file,
                ..
            } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("secret_id_file", secret_id_file)
                .finish_non_exhaustive(),
            OpenBaoAuth::Token { token_file } => f
                .debug_struct("Token")
                .field("token_file", token_file)
                .finish(),
        }
    }
}

/// One secret of the OpenBao source: `name = "path#key"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBaoMapping {
    pub name: SecretName,
    pub path: String,
    pub key: String,
}

impl OpenBaoSource {
    /// Whether `name` is one of this source's secrets.
    pub fn maps(&self, name: &SecretName) -> bool {
        self.secrets.iter().any(|m| &m.name == name) || self.dynamic.iter().any(|d| &d.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// Open connections per peer uid; admin uids are exempt (see `admission`).
    pub max_connections_per_uid: usize,
    /// Time a new connection has to send the HTTP/2 preface and its SETTINGS frame.
    pub handshake_timeout: Duration,
    /// Close a connection with no open stream after this long; zero = never.
    pub idle_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub max_request_bytes: usize,
    pub max_names_per_request: usize,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_connections_per_uid: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            max_streams_per_connection: 32,
            max_request_bytes: 65536,
            max_names_per_request: 256,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// `[audit]`: what happens when audit records cannot be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    pub on_failure: OnFailure,
    /// Records accepted but not yet written, at most.
    pub max_queue: usize,
}

/// `[audit].on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Refuse (`UNAVAILABLE`) the calls whose records cannot be kept.
    Deny,
    /// Serve them and count the records dropped.
    Serve,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Deny => "deny",
            OnFailure::Serve => "serve",
        }
    }
}

/// Largest `max_queue` accepted: ~300 bytes of memory per waiting record, so ~5 GiB.
pub const MAX_AUDIT_QUEUE: usize = 1 << 24;

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            on_failure: OnFailure::Deny,
            max_queue: 65536,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive string; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            format: LogFormat::Human,
            level: "info".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (absent, unreadable, not UTF-8).
    #[error("{}: failed to read: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// The file is not trusted: an unprivileged uid could have written it (contract §7).
    #[error("{0}")]
    Untrusted(secretd_trust::TrustError),
    /// The file was read but is not a valid configuration.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The config decides who gets what: it is read only when trusted (`secretd_trust`: owned by
/// root or the broker's own uid, not writable by group/other, nor any directory above it),
/// judged on the opened descriptor.
fn read_trusted(path: &Path) -> Result<String, ConfigError> {
    let read = |error| ConfigError::Read {
        path: path.to_owned(),
        error,
    };
    let mut file = Trust::process().open_file(path).map_err(|e| match e {
        TrustError::Open { source, .. } => read(source),
        untrusted => ConfigError::Untrusted(untrusted),
    })?;
    let mut text = String::new();
    io::Read::read_to_string(&mut file, &mut text).map_err(read)?;
    Ok(text)
}

impl Config {
    /// No file: default socket, every environment variable but the default exclude list, no
    /// file sources, no scopes (every read is denied).
    pub fn defaults() -> Config {
        Config {
            path: None,
            server: ServerConfig {
                socket: PathBuf::from(DEFAULT_SOCKET_PATH),
                socket_mode: DEFAULT_SOCKET_MODE,
                admin_uids: vec![0],
                audit_log: AuditTarget::Stderr,
            },
            env: EnvSource::default(),
            files: FileSource::default(),
            openbao: None,
            policy: Policy::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            audit: AuditConfig::default(),
        }
    }

    /// Parse + validate `text` as if read from `path`; `etc` is where passwd/group live ("/etc").
    pub fn parse(text: &str, path: &Path, etc: &Path) -> Result<Config, ConfigError> {
        let doc = Doc { text, path };
        let tree = toml::de::DeTable::parse(text).map_err(|e| doc.toml_error(&e, None))?;
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let locator = Locator::new(tree.get_ref());
            doc.toml_error(&e, Some(&locator))
        })?;
        raw.validate(&doc, etc)
    }

    /// Read and parse `path`, which must be trusted (see [`read_trusted`]).
    pub fn load(path: &Path, etc: &Path) -> Result<Config, ConfigError> {
        let text = read_trusted(path)?;
        Config::parse(&text, path, etc)
    }

    /// `explicit == false` and the file is absent → `defaults()`; explicit and absent → error.
    pub fn load_or_default(path: &Path, explicit: bool, etc: &Path) -> Result<Config, ConfigError> {
        match read_trusted(path) {
            Ok(text) => Config::parse(&text, path, etc),
            Err(ConfigError::Read { error, .. })
                if error.kind() == io::ErrorKind::NotFound && !explicit =>
            {
                Ok(Config::defaults())
            }
            Err(e) => Err(e),
        }
    }

    /// Human-readable multi-line summary for `secretd check` and the start-up log.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = match &self.path {
            Some(p) => writeln!(out, "config: {}", p.display()),
            None => writeln!(out, "no config file: built-in defaults"),
        };
        let s = &self.server;
        let _ = writeln!(
            out,
            "socket: {} (mode {:04o})",
            s.socket.display(),
            s.socket_mode
        );
        let _ = if s.admin_uids.is_empty() {
            writeln!(out, "admin uids: none (the Admin service refuses everyone)")
        } else {
            writeln!(out, "admin uids: {}", join(s.admin_uids.iter()))
        };
        let _ = writeln!(
            out,
            "audit log: {} (on_failure={}, max_queue={})",
            match &s.audit_log {
                AuditTarget::Stderr => "stderr".to_owned(),
                AuditTarget::File(p) => p.display().to_string(),
            },
            self.audit.on_failure.as_str(),
            self.audit.max_queue
        );
        let _ = writeln!(
            out,
            "env source: include {}; exclude {}",
            quoted(&self.env.include),
            quoted(&self.env.exclude)
        );
        let _ = if self.files.dirs.is_empty() {
            writeln!(out, "file source: none")
        } else {
            writeln!(
                out,
                "file source: {}",
                join(self.files.dirs.iter().map(|d| d.display()))
            )
        };
        if let Some(o) = &self.openbao {
            let auth = match &o.auth {
                OpenBaoAuth::AppRole {
                    mount,
                    secret_id_file,
                    ..
                } => format!(
                    "approle at auth/{mount} (secret_id_file {})",
                    secret_id_file.display()
                ),
                OpenBaoAuth::Token { token_file } => {
                    format!("token (token_file {})", token_file.display())
                }
            };
            let _ = writeln!(
                out,
                "{} source: {} (ca_file {}), KV v2 mount {:?}, {} secrets, refresh {}, {}, auth {auth}",
                o.section,
                o.addresses
                    .iter()
                    .map(|a| a.url.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                o.ca_file.display(),
                o.mount,
                o.secrets.len(),
                humantime::format_duration(o.refresh),
                if o.required { "required" } else { "optional" },
            );
        }
        let scopes = self.policy.scopes();
        if scopes.is_empty() {
            let _ = writeln!(out, "no scopes: every read is denied");
        } else {
            let _ = writeln!(out, "scopes: {}", scopes.len());
        }
        for scope in scopes {
            let _ = writeln!(
                out,
                "  scope {:?}: {} -> {}",
                scope.name,
                scope.describe_matcher(),
                quoted(&scope.patterns)
            );
        }
        let l = &self.limits;
        let _ = writeln!(
            out,
            "limits: max_connections={} max_connections_per_uid={} handshake_timeout={} \
             idle_timeout={} max_streams_per_connection={} max_request_bytes={} \
             max_names_per_request={} shutdown_grace={}",
            l.max_connections,
            l.max_connections_per_uid,
            humantime::format_duration(l.handshake_timeout),
            if l.idle_timeout.is_zero() {
                "0s (never)".to_owned()
            } else {
                humantime::format_duration(l.idle_timeout).to_string()
            },
            l.max_streams_per_connection,
            l.max_request_bytes,
            l.max_names_per_request,
            humantime::format_duration(l.shutdown_grace)
        );
        let _ = writeln!(
            out,
            "log: format={} level={:?}",
            match self.log.format {
                LogFormat::Human => "human",
                LogFormat::Json => "json",
            },
            self.log.level
        );
        out
    }
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

fn quoted(items: &[String]) -> String {
    format!("[{}]", join(items.iter().map(|i| format!("{i:?}"))))
}

// ---------------------------------------------------------------------------------------------
// Stage 1: raw structs, exactly the file's shape.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    sources: Option<RawSources>,
    #[serde(default)]
    scope: Vec<Spanned<RawScope>>,
    limits: Option<RawLimits>,
    log: Option<RawLog>,
    audit: Option<RawAudit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    socket: Option<Spanned<String>>,
    socket_mode: Option<Spanned<String>>,
    admin_uids: Option<Vec<u32>>,
    audit_log: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSources {
    env: Option<RawEnv>,
    files: Option<RawFiles>,
    openbao: Option<Spanned<RawOpenBao>>,
    vault: Option<Spanned<RawOpenBao>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenBao {
    address: Spanned<RawAddresses>,
    ca_file: Spanned<String>,
    mount: Option<Spanned<String>>,
    refresh: Option<Spanned<String>>,
    required: Option<bool>,
    auth: Spanned<RawOpenBaoAuth>,
    secrets: Option<Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
    dynamic: Option<std::collections::BTreeMap<String, Spanned<dynamic::RawDynamic>>>,
}

/// `address = "https://…"` or `address = ["https://…", …]`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
enum RawAddresses {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenBaoAuth {
    method: Spanned<String>,
    role_id: Option<Spanned<String>>,
    secret_id_file: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    mount: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    include: Option<Vec<Spanned<String>>>,
    exclude: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    dirs: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    name: Spanned<String>,
    uid: Option<Spanned<u32>>,
    gid: Option<Spanned<u32>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    function: Option<Spanned<String>>,
    exe: Option<Spanned<String>>,
    secrets: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Spanned<usize>>,
    max_connections_per_uid: Option<Spanned<usize>>,
    handshake_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_streams_per_connection: Option<Spanned<u32>>,
    max_request_bytes: Option<Spanned<usize>>,
    max_names_per_request: Option<Spanned<usize>>,
    shutdown_grace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    on_failure: Option<Spanned<String>>,
    max_queue: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
    level: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Stage 2: validation.

impl RawConfig {
    fn validate(self, doc: &Doc<'_>, etc: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::defaults();
        config.path = Some(doc.path.to_owned());

        if let Some(server) = self.server {
            let at = "in [server]";
            if let Some(socket) = server.socket {
                config.server.socket =
                    socket_path(socket.get_ref()).map_err(|m| doc.err(&socket, "socket", at, m))?;
            }
            if let Some(mode) = server.socket_mode {
                config.server.socket_mode = socket_mode(mode.get_ref())
                    .map_err(|m| doc.err(&mode, "socket_mode", at, m))?;
            }
            if let Some(uids) = server.admin_uids {
                config.server.admin_uids = uids;
            }
            if let Some(audit) = server.audit_log {
                config.server.audit_log = match audit.get_ref().as_str() {
                    "stderr" => AuditTarget::Stderr,
                    p => AuditTarget::File(absolute_path(p).map_err(|m| {
                        doc.err(&audit, "audit_log", at, format!("{m} (or \"stderr\")"))
                    })?),
                };
            }
        }

        let sources = self.sources.unwrap_or(RawSources {
            env: None,
            files: None,
            openbao: None,
            vault: None,
        });
        config.openbao = match (sources.openbao, sources.vault) {
            (Some(_), Some(v)) => {
                return Err(doc.error_at(
                    v.span(),
                    "give [sources.openbao] or [sources.vault] (the same source), not both"
                        .to_owned(),
                ));
            }
            (Some(raw), None) => Some(raw.into_inner().validate(doc, "openbao")?),
            (None, Some(raw)) => Some(raw.into_inner().validate(doc, "vault")?),
            (None, None) => None,
        };
        if let Some(env) = sources.env {
            let at = "in [sources.env]";
            let include = match env.include {
                Some(list) => env_patterns(doc, list, "include", at)?,
                None => config.env.include.clone(),
            };
            let exclude = match env.exclude {
                Some(list) => env_patterns(doc, list, "exclude", at)?,
                None => config.env.exclude.clone(),
            };
            config.env =
                EnvSource::new(include, exclude).expect("patterns were checked one by one");
        }
        if let Some(files) = sources.files {
            for dir in files.dirs.unwrap_or_default() {
                let p = absolute_path(dir.get_ref())
                    .map_err(|m| doc.err(&dir, "dirs", "in [sources.files]", m))?;
                config.files.dirs.push(p);
            }
        }

        let mut scopes = Vec::with_capacity(self.scope.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, raw) in self.scope.into_iter().enumerate() {
            let header = raw.span();
            let scope = raw
                .into_inner()
                .validate(doc, etc, i + 1, header, &mut seen)?;
            scopes.push(scope);
        }
        config.policy = Policy::new(scopes);

        if let Some(limits) = self.limits {
            let at = "in [limits]";
            let l = &mut config.limits;
            if let Some(v) = limits.max_connections {
                l.max_connections = at_least_one(doc, v, "max_connections", at)?;
            }
            if let Some(v) = limits.max_connections_per_uid {
                l.max_connections_per_uid = at_least_one(doc, v, "max_connections_per_uid", at)?;
            }
            if let Some(v) = limits.handshake_timeout {
                l.handshake_timeout = duration(doc, &v, "handshake_timeout", at)?;
                if l.handshake_timeout.is_zero() {
                    return Err(doc.err(
                        &v,
                        "handshake_timeout",
                        at,
                        "must be more than 0s (a connection that never completes its handshake \
                         would be held forever)",
                    ));
                }
            }
            if let Some(v) = limits.idle_timeout {
                l.idle_timeout = duration(doc, &v, "idle_timeout", at)?;
            }
            if let Some(v) = limits.max_streams_per_connection {
                l.max_streams_per_connection =
                    at_least_one(doc, v, "max_streams_per_connection", at)?;
            }
            if let Some(v) = limits.max_request_bytes {
                l.max_request_bytes = at_least_one(doc, v, "max_request_bytes", at)?;
            }
            if let Some(v) = limits.max_names_per_request {
                l.max_names_per_request = at_least_one(doc, v, "max_names_per_request", at)?;
            }
            if let Some(v) = limits.shutdown_grace {
                l.shutdown_grace = duration(doc, &v, "shutdown_grace", at)?;
            }
        }

        if let Some(log) = self.log {
            let at = "in [log]";
            if let Some(format) = log.format {
                config.log.format = match format.get_ref().as_str() {
                    "human" => LogFormat::Human,
                    "json" => LogFormat::Json,
                    _ => {
                        return Err(doc.err(
                            &format,
                            "format",
                            at,
                            "expected \"human\" or \"json\"",
                        ));
                    }
                };
            }
            if let Some(level) = log.level {
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(level.get_ref()) {
                    return Err(doc.err(
                        &level,
                        "level",
                        at,
                        format!("not a log filter such as \"info\" or \"secretd=debug\" ({e})"),
                    ));
                }
                config.log.level = level.into_inner();
            }
        }

        if let Some(audit) = self.audit {
            let at = "in [audit]";
            if let Some(v) = audit.on_failure {
                config.audit.on_failure = match v.get_ref().as_str() {
                    "deny" => OnFailure::Deny,
                    "serve" => OnFailure::Serve,
                    _ => {
                        return Err(doc.err(
                            &v,
                            "on_failure",
                            at,
                            "expected \"deny\" or \"serve\"",
                        ));
                    }
                };
            }
            if let Some(v) = audit.max_queue {
                if *v.get_ref() > MAX_AUDIT_QUEUE {
                    return Err(doc.err(
                        &v,
                        "max_queue",
                        at,
                        format!("must be at most {MAX_AUDIT_QUEUE}"),
                    ));
                }
                config.audit.max_queue = at_least_one(doc, v, "max_queue", at)?;
            }
        }
        Ok(config)
    }
}

/// Shortest `refresh` accepted: a tighter loop would only load the server.
pub const MIN_OPENBAO_REFRESH: Duration = Duration::from_secs(1);

impl RawOpenBao {
    fn validate(self, doc: &Doc<'_>, section: &'static str) -> Result<OpenBaoSource, ConfigError> {
        let at = format!("in [sources.{section}]");
        let at = at.as_str();
        let written = match self.address.get_ref() {
            RawAddresses::One(a) => vec![a.clone()],
            RawAddresses::Many(list) => list.clone(),
        };
        if written.is_empty() {
            return Err(doc.err(
                &self.address,
                "address",
                at,
                "is empty: give at least one node",
            ));
        }
        let mut addresses: Vec<OpenBaoAddress> = Vec::with_capacity(written.len());
        for a in &written {
            let parsed = openbao_address(a).map_err(|m| {
                let m = if written.len() > 1 {
                    format!("{a:?}: {m}")
                } else {
                    m
                };
                doc.err(&self.address, "address", at, m)
            })?;
            if addresses.iter().any(|seen| seen.url == parsed.url) {
                return Err(doc.err(
                    &self.address,
                    "address",
                    at,
                    format!("{a:?} is listed twice"),
                ));
            }
            addresses.push(parsed);
        }
        let ca_file = absolute_path(self.ca_file.get_ref())
            .and_then(|p| check_ca_file(&p).map(|()| p))
            .map_err(|m| doc.err(&self.ca_file, "ca_file", at, m))?;
        let mount = match &self.mount {
            Some(m) => {
                kv_segment_path(m.get_ref()).map_err(|e| doc.err(m, "mount", at, e))?;
                m.get_ref().clone()
            }
            None => "secret".to_owned(),
        };
        let refresh = match &self.refresh {
            Some(r) => {
                let d = humantime::parse_duration(r.get_ref()).map_err(|e| {
                    doc.err(
                        r,
                        "refresh",
                        at,
                        format!("expected a duration such as \"30s\" or \"5m\" ({e})"),
                    )
                })?;
                if d < MIN_OPENBAO_REFRESH {
                    return Err(doc.err(r, "refresh", at, "must be at least 1s"));
                }
                d
            }
            None => Duration::from_secs(30),
        };
        let auth = self.auth.into_inner().validate(doc, section)?;
        let dynamic = dynamic::validate(doc, section, self.dynamic.unwrap_or_default())?;
        let mapped = match self.secrets {
            Some(s) if s.get_ref().is_empty() && dynamic.is_empty() => {
                return Err(doc.err(
                    &s,
                    "secrets",
                    at,
                    "is empty: map at least one NAME = \"PATH#KEY\"",
                ));
            }
            Some(s) => s.into_inner(),
            None if dynamic.is_empty() => {
                return Err(doc.error_at(
                    self.address.span(),
                    format!("[sources.{section}] needs [sources.{section}.secrets] or [sources.{section}.dynamic.NAME]"),
                ));
            }
            None => std::collections::BTreeMap::new(),
        };
        let at_secrets = format!("in [sources.{section}.secrets]");
        let mut secrets = Vec::new();
        for (name, target) in mapped {
            if let Some(d) = dynamic.iter().find(|d| d.name.as_str() == name) {
                return Err(doc.err(
                    &target,
                    &name,
                    &at_secrets,
                    format!(
                        "{} is also a [sources.{section}.dynamic] secret: give it once",
                        d.name
                    ),
                ));
            }
            let key_name = name.as_str();
            let secret_name = SecretName::parse(key_name).map_err(|e| {
                doc.err(
                    &target,
                    key_name,
                    &at_secrets,
                    format!("not a valid secret name: {e}"),
                )
            })?;
            let (path, key) = target
                .get_ref()
                .split_once('#')
                .ok_or("expected \"PATH#KEY\" (the key inside the KV secret after `#`)".to_owned())
                .and_then(|(path, key)| {
                    kv_segment_path(path)?;
                    if key.is_empty() {
                        return Err("the KEY after `#` is empty".to_owned());
                    }
                    Ok((path.to_owned(), key.to_owned()))
                })
                .map_err(|m| doc.err(&target, key_name, &at_secrets, m))?;
            secrets.push(OpenBaoMapping {
                name: secret_name,
                path,
                key,
            });
        }
        Ok(OpenBaoSource {
            section,
            addresses,
            ca_file,
            mount,
            refresh,
            required: self.required.unwrap_or(true),
            auth,
            secrets,
            dynamic,
        })
    }
}

impl RawOpenBaoAuth {
    fn validate(self, doc: &Doc<'_>, section: &'static str) -> Result<OpenBaoAuth, ConfigError> {
        let at = format!("in [sources.{section}.auth]");
        let at = at.as_str();
        let not_for = |v: &Option<Spanned<String>>, key: &str, method: &str| match v {
            Some(v) => Err(doc.err(v, key, at, format!("is not used by method = \"{method}\""))),
            None => Ok(()),
        };
        let credential = |v: &Spanned<String>, key: &str| {
            absolute_path(v.get_ref())
                .and_then(|p| check_credential_file(&p).map(|()| p))
                .map_err(|m| doc.err(v, key, at, m))
        };
        match self.method.get_ref().as_str() {
            "approle" => {
                not_for(&self.token_file, "token_file", "approle")?;
                let role_id = self.role_id.ok_or_else(|| {
                    doc.err(&self.method, "method", at, "\"approle\" needs `role_id`")
                })?;
                if role_id.get_ref().trim().is_empty() {
                    return Err(doc.err(&role_id, "role_id", at, "must not be empty"));
                }
                let file = self.secret_id_file.ok_or_else(|| {
                    doc.err(
                        &self.method,
                        "method",
                        at,
                        "\"approle\" needs `secret_id_file`",
                    )
                })?;
                let mount = match &self.mount {
                    Some(m) => {
                        kv_segment_path(m.get_ref()).map_err(|e| doc.err(m, "mount", at, e))?;
                        m.get_ref().clone()
                    }
                    None => "approle".to_owned(),
                };
                Ok(OpenBaoAuth::AppRole {
                    mount,
                    role_id: role_id.into_inner(),
                    secret_id_file: credential(&file, "secret_id_file")?,
                })
            }
            "token" => {
                not_for(&self.role_id, "role_id", "token")?;
                not_for(&self.secret_id_file, "secret_id_file", "token")?;
                not_for(&self.mount, "mount", "token")?;
                let file = self.token_file.ok_or_else(|| {
                    doc.err(&self.method, "method", at, "\"token\" needs `token_file`")
                })?;
                Ok(OpenBaoAuth::Token {
                    token_file: credential(&file, "token_file")?,
                })
            }
            _ => Err(doc.err(
                &self.method,
                "method",
                at,
                "expected \"approle\" or \"token\"",
            )),
        }
    }
}

/// `https://HOST[:PORT][/]`, parsed by `http::Uri`. Plain `http://` is refused: verification
/// is always on. Anything after the authority but a single `/` is refused too.
fn openbao_address(s: &str) -> Result<OpenBaoAddress, String> {
    const SHAPE: &str = "expected https://HOST or https://HOST:PORT, with no path";
    if !s.starts_with("https://") {
        return Err(
            "must start with https:// (TLS with certificate verification is always on)".to_owned(),
        );
    }
    let uri: http::Uri = s.parse().map_err(|e| format!("{SHAPE} ({e})"))?;
    let authority = uri.authority().ok_or(SHAPE)?;
    if uri.query().is_some() || !matches!(uri.path(), "" | "/") || s.contains('#') {
        return Err(SHAPE.to_owned());
    }
    if authority.as_str().contains('@') {
        return Err("must not hold a user name or password".to_owned());
    }
    // `http::Uri` takes `[::1]junk` as an authority with host `[::1]` and no port: insist that
    // the authority is exactly HOST or HOST:PORT.
    let rebuilt = match authority.port() {
        Some(p) => format!("{}:{}", authority.host(), p.as_str()),
        None => authority.host().to_owned(),
    };
    if rebuilt != authority.as_str() && format!("{rebuilt}:") != authority.as_str() {
        return Err(SHAPE.to_owned());
    }
    let host = authority.host();
    let host = match host.strip_prefix('[') {
        Some(v6) => {
            let v6 = v6.strip_suffix(']').ok_or(SHAPE)?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
            v6
        }
        None => host,
    };
    if host.is_empty() {
        return Err("no host name".to_owned());
    }
    rustls_pki_types::ServerName::try_from(host)
        .map_err(|_| format!("{host:?} is not a valid host name or IP address"))?;
    let port = match authority.port() {
        Some(p) if p.as_u16() != 0 => p.as_u16(),
        Some(p) => return Err(format!("invalid port {:?}", p.as_str())),
        None if authority.as_str().ends_with(':') => return Err("invalid port \"\"".to_owned()),
        None => 443,
    };
    Ok(OpenBaoAddress {
        url: format!("https://{authority}"),
        host: host.to_owned(),
        port,
    })
}

/// A mount or KV path: `a/b/c`, no empty, `.` or `..` segment, no leading or trailing `/`.
fn kv_segment_path(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "{s:?} must be a path like \"apps/orders\": no leading, trailing or double `/`, no `.` or `..`"
        ));
    }
    if s.chars().any(|c| c.is_control() || c == '#' || c == '?') {
        return Err(format!(
            "{s:?} must not contain control characters, `#` or `?`"
        ));
    }
    Ok(())
}

fn check_ca_file(path: &Path) -> Result<(), String> {
    let pem = read_ca_file(path)?;
    let mut count = 0;
    for cert in
        <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
    {
        cert.map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

/// The CA bundle decides whom the broker believes to be OpenBao: trusted like the config.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut file = Trust::process()
        .open_file(path)
        .map_err(|e| e.to_string())?;
    let mut pem = Vec::new();
    io::Read::read_to_end(&mut file, &mut pem)
        .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
    Ok(pem)
}

/// A file holding a credential, opened: trusted (see [`read_trusted`]) and not accessible to
/// group or others at all.
pub fn open_credential_file(path: &Path) -> Result<fs::File, String> {
    Trust::process()
        .open_private_file(path)
        .map_err(|e| e.to_string())
}

/// [`open_credential_file`], for validation.
pub fn check_credential_file(path: &Path) -> Result<(), String> {
    open_credential_file(path).map(drop)
}

impl RawScope {
    fn validate(
        self,
        doc: &Doc<'_>,
        etc: &Path,
        number: usize,
        header: Range<usize>,
        seen: &mut HashMap<String, usize>,
    ) -> Result<Scope, ConfigError> {
        let at = format!("in [[scope]] #{number}");
        let at = at.as_str();

        let name = self.name.get_ref();
        if name.trim().is_empty() {
            return Err(doc.err(&self.name, "name", at, "must not be empty"));
        }
        if name.chars().any(char::is_control) {
            return Err(doc.err(
                &self.name,
                "name",
                at,
                "must not contain control characters",
            ));
        }
        if let Some(line) = seen.get(name) {
            return Err(doc.err(
                &self.name,
                "name",
                at,
                format!("scope {name:?} is already defined on line {line}"),
            ));
        }
        seen.insert(name.clone(), doc.line_col(self.name.span().start).0);

        let mut matcher = Matcher::default();
        // The matcher as written, with what names resolved to: shown by `secretd check`.
        let mut described = Vec::new();
        if let Some(uid) = &self.uid {
            matcher.uid = Some(*uid.get_ref());
            described.push(format!("uid={}", uid.get_ref()));
        }
        if let Some(user) = &self.user {
            if self.uid.is_some() {
                return Err(doc.err(user, "user", at, "give `user` or `uid`, not both"));
            }
            let found = secretd_accounts::lookup_user(etc, user.get_ref())
                .map_err(|e| doc.err(user, "user", at, e.to_string()))?;
            matcher.uid = Some(found.uid);
            described.push(format!("user={} (uid {})", user.get_ref(), found.uid));
        }
        if let Some(gid) = &self.gid {
            matcher.gid = Some(*gid.get_ref());
            described.push(format!("gid={}", gid.get_ref()));
        }
        if let Some(group) = &self.group {
            if self.gid.is_some() {
                return Err(doc.err(group, "group", at, "give `group` or `gid`, not both"));
            }
            let found = secretd_accounts::lookup_group(etc, group.get_ref())
                .map_err(|e| doc.err(group, "group", at, e.to_string()))?;
            matcher.gid = Some(found.gid);
            described.push(format!("group={} (gid {})", group.get_ref(), found.gid));
        }
        if let Some(function) = &self.function {
            if function.get_ref().trim().is_empty() {
                return Err(doc.err(function, "function", at, "must not be empty"));
            }
            matcher.function = Some(function.get_ref().clone());
            described.push(format!("function={:?}", function.get_ref()));
        }
        if let Some(exe) = &self.exe {
            matcher.exe = Some(exe_path(exe.get_ref()).map_err(|m| doc.err(exe, "exe", at, m))?);
            described.push(format!("exe={}", exe.get_ref()));
        }
        if matcher.is_empty() {
            return Err(doc.error_at(
                header,
                format!(
                    "[[scope]] #{number} ({name:?}) has no caller matcher: give at least one of \
                     uid, gid, user, group, function, exe"
                ),
            ));
        }

        if self.secrets.get_ref().is_empty() {
            return Err(doc.err(
                &self.secrets,
                "secrets",
                at,
                "is empty: list at least one name or pattern",
            ));
        }
        let mut patterns = Vec::with_capacity(self.secrets.get_ref().len());
        for pattern in self.secrets.into_inner() {
            secret_pattern(pattern.get_ref()).map_err(|m| doc.err(&pattern, "secrets", at, m))?;
            patterns.push(pattern.into_inner());
        }
        Ok(Scope::new(self.name.into_inner(), matcher, patterns)
            .expect("patterns were checked one by one")
            .with_description(described.join(" ")))
    }
}

fn env_patterns(
    doc: &Doc<'_>,
    list: Vec<Spanned<String>>,
    key: &str,
    at: &str,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        if let Err(e) = env_glob(p.get_ref()) {
            return Err(doc.err(&p, key, at, format!("invalid pattern: {}", glob_reason(&e))));
        }
        out.push(p.into_inner());
    }
    Ok(out)
}

const GLOB_SYNTAX: &str = "*?[]{},!^\\";

/// Check one `secrets` pattern: a valid glob that could match some secret name.
fn secret_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty pattern".to_owned());
    }
    if let Err(e) = secret_glob(pattern) {
        return Err(format!("invalid pattern {pattern:?}: {}", glob_reason(&e)));
    }
    if let Some(c) = pattern
        .chars()
        .find(|&c| !(c.is_ascii() && is_name_byte(c as u8) || GLOB_SYNTAX.contains(c)))
    {
        return Err(format!(
            "pattern {pattern:?} can never match: {c:?} cannot appear in a secret name"
        ));
    }
    let never = |why: &str| Err(format!("pattern {pattern:?} can never match: {why}"));
    if pattern.starts_with('/') {
        return never("secret names never start with `/` (they are relative: \"apps/db\")");
    }
    // Segment rules hold for the literal `/`s of a pattern; inside `{…}`, `[…]` or after `\`
    // a `/` is not a plain separator, so such patterns are left to the name check at call time.
    if !pattern.contains(['{', '[', '\\']) {
        let segments: Vec<&str> = pattern.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return never("secret names have no empty segment (no trailing `/`, no `//`)");
        }
        if segments.contains(&"..") {
            return never("secret names have no `..` segment");
        }
        if !pattern.contains(['*', '?']) && pattern.len() > MAX_NAME_LEN {
            return never(&format!(
                "it is {} bytes long and secret names are at most {MAX_NAME_LEN}",
                pattern.len()
            ));
        }
    }
    Ok(())
}

fn glob_reason(e: &globset::Error) -> String {
    e.kind().to_string()
}

fn at_least_one<T>(doc: &Doc<'_>, v: Spanned<T>, key: &str, at: &str) -> Result<T, ConfigError>
where
    T: PartialEq + From<u8>,
{
    if *v.get_ref() == T::from(0) {
        return Err(doc.err(&v, key, at, "must be at least 1"));
    }
    Ok(v.into_inner())
}

/// A `humantime` duration ("10s", "500ms", "0s").
fn duration(
    doc: &Doc<'_>,
    v: &Spanned<String>,
    key: &str,
    at: &str,
) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.get_ref()).map_err(|e| {
        doc.err(
            v,
            key,
            at,
            format!("expected a duration such as \"5s\" or \"500ms\" ({e})"),
        )
    })
}

fn socket_mode(s: &str) -> Result<u32, String> {
    const WANT: &str =
        "expected octal permission bits such as \"0666\" or \"0660\", at most \"0777\"";
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(WANT.to_owned());
    }
    let mode = u32::from_str_radix(s, 8).map_err(|_| WANT.to_owned())?;
    if mode > 0o777 {
        return Err(WANT.to_owned());
    }
    Ok(mode)
}

fn absolute_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err("must be an absolute path".to_owned());
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err("must not contain `..`".to_owned());
    }
    Ok(p.to_owned())
}

fn socket_path(s: &str) -> Result<PathBuf, String> {
    let p = absolute_path(s)?;
    if s.len() > MAX_SOCKET_PATH_LEN {
        return Err(format!(
            "is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH_LEN}",
            s.len()
        ));
    }
    Ok(p)
}

/// `exe` is compared with `/proc/<pid>/exe`, which is always absolute, normalised and free of
/// symlinks: refuse a path that could never be equal to it.
fn exe_path(s: &str) -> Result<PathBuf, String> {
    let p = absolute_path(s)?;
    let normal: PathBuf = p.components().collect();
    if normal.as_os_str() != p.as_os_str() {
        return Err(format!(
            "must be a normalised path (no `.`, `//` or trailing `/`): {}",
            normal.display()
        ));
    }
    if let Ok(real) = fs::canonicalize(&p)
        && real != p
    {
        return Err(format!(
            "{} resolves to {}; /proc/<pid>/exe shows the resolved path, so configure that",
            p.display(),
            real.display()
        ));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Error locations.

/// The text being parsed and where it came from.
struct Doc<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Doc<'_> {
    /// 1-based line and column (in characters) of byte `offset`.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        )
    }

    fn error_at(&self, span: Range<usize>, message: String) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            message,
        }
    }

    /// A semantic error about the value of `key`.
    fn err<T>(
        &self,
        value: &Spanned<T>,
        key: &str,
        at: &str,
        message: impl AsRef<str>,
    ) -> ConfigError {
        self.error_at(value.span(), format!("`{key}` {at}: {}", message.as_ref()))
    }

    /// Turn a toml/serde error into ours, naming the key it is about when `locator` can tell.
    fn toml_error(&self, e: &toml::de::Error, locator: Option<&Locator>) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim_end();
        let found = locator.and_then(|l| l.find(&span));
        let message = if let Some(rest) = msg.strip_prefix("unknown field ") {
            let in_ = found.map_or(String::new(), |f| format!(" {}", f.parent));
            match rest.split_once(", ") {
                Some((key, expected)) => format!("unknown key {key}{in_}, {expected}"),
                None => format!("unknown key {rest}{in_}"),
            }
        } else if let Some(key) = msg.strip_prefix("missing field ") {
            match found {
                Some(f) if f.is_table => format!("missing key {key} in {}", f.label),
                Some(f) => format!("missing key {key} {}", f.parent),
                None => format!("missing key {key}"),
            }
        } else if msg == "duplicate key" {
            format!(
                "duplicate key `{}`",
                self.text.get(span.clone()).unwrap_or("?")
            )
        } else if let Some(hint) = found.and_then(|f| bracket_hint(f, msg)) {
            hint
        } else {
            match found {
                Some(f) => format!("{}: {msg}", f.label),
                None => msg.to_owned(),
            }
        };
        self.error_at(span, message.replace('\n', " "))
    }
}

/// `[scope]` where `[[scope]]` is meant, and the reverse: serde only says "invalid type: map,
/// expected a sequence" (or names an internal struct), so say which brackets to write.
fn bracket_hint(found: &Entry, msg: &str) -> Option<String> {
    let path = found.path.as_deref()?;
    // `scope` is the one array of tables in the file; every other table is a single one.
    let is_array = path == "scope";
    if is_array && found.is_table && msg.starts_with("invalid type: map, expected a sequence") {
        return Some(format!(
            "[{path}] must be an array of tables: write [[{path}]] (double brackets), once per entry"
        ));
    }
    // serde reads `[[server]]` as a struct given positionally, so the message it gives is
    // about a field; the entry found is the first `[[server]]` itself.
    if !is_array && found.array_item {
        return Some(format!(
            "[{path}] is a single table: write [{path}] (single brackets), not [[{path}]]"
        ));
    }
    None
}

/// Where each key and value of the parsed document is, to say which key a serde error is about.
struct Locator {
    entries: Vec<Entry>,
}

struct Entry {
    key: Option<Range<usize>>,
    value: Range<usize>,
    /// How to name this item: "`socket` in [server]", "[server]", "[[scope]] #2".
    label: String,
    /// Where it sits: "in [server]", "at the top level".
    parent: String,
    is_table: bool,
    /// The dotted key path of a table or an array (`scope`, `sources.env`), for bracket hints.
    path: Option<String>,
    /// A table inside an array (`[[path]]`).
    array_item: bool,
}

type DeTable<'i> = toml::de::DeTable<'i>;

impl Locator {
    fn new(root: &DeTable<'_>) -> Locator {
        let mut l = Locator {
            entries: Vec::new(),
        };
        l.walk_table(root, "", "at the top level");
        l
    }

    fn walk_table(&mut self, table: &DeTable<'_>, path: &str, parent: &str) {
        for (key, value) in table.iter() {
            let key_name = key.get_ref().as_ref();
            let path = if path.is_empty() {
                key_name.to_owned()
            } else {
                format!("{path}.{key_name}")
            };
            match value.get_ref() {
                toml::de::DeValue::Table(t) => {
                    let label = format!("[{path}]");
                    self.entries.push(Entry {
                        key: Some(key.span()),
                        value: value.span(),
                        label: label.clone(),
                        parent: parent.to_owned(),
                        is_table: true,
                        path: Some(path.clone()),
                        array_item: false,
                    });
                    self.walk_table(t, &path, &format!("in {label}"));
                }
                toml::de::DeValue::Array(items) => {
                    let label = format!("`{key_name}` {parent}");
                    self.entries.push(Entry {
                        key: Some(key.span()),
                        value: value.span(),
                        label: label.clone(),
                        parent: parent.to_owned(),
                        is_table: false,
                        path: Some(path.clone()),
                        array_item: false,
                    });
                    for (i, item) in items.iter().enumerate() {
                        if let toml::de::DeValue::Table(t) = item.get_ref() {
                            let label = format!("[[{path}]] #{}", i + 1);
                            self.entries.push(Entry {
                                key: None,
                                value: item.span(),
                                label: label.clone(),
                                parent: parent.to_owned(),
                                is_table: true,
                                path: Some(path.clone()),
                                array_item: true,
                            });
                            self.walk_table(t, &path, &format!("in {label}"));
                        }
                    }
                }
                _ => self.entries.push(Entry {
                    key: Some(key.span()),
                    value: value.span(),
                    label: format!("`{key_name}` {parent}"),
                    parent: parent.to_owned(),
                    is_table: false,
                    path: None,
                    array_item: false,
                }),
            }
        }
    }

    /// The entry whose key is exactly `span`, else whose value is exactly `span`, else the
    /// smallest value containing it.
    fn find(&self, span: &Range<usize>) -> Option<&Entry> {
        if let Some(e) = self.entries.iter().find(|e| e.key.as_ref() == Some(span)) {
            return Some(e);
        }
        // An array of tables and its first table share a span: prefer the later (inner) entry.
        if let Some(e) = self.entries.iter().rev().find(|e| &e.value == span) {
            return Some(e);
        }
        self.entries
            .iter()
            .filter(|e| e.value.start <= span.start && span.end <= e.value.end)
            .min_by_key(|e| e.value.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/secretd/secretd.toml";

    fn etc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\norders:x:1001:1001::/home/orders:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("group"),
            "root:x:0:\nfunctions:x:500:orders\n",
        )
        .unwrap();
        dir
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let etc = etc();
        Config::parse(text, Path::new(PATH), etc.path()).map_err(|e| {
            // Make messages that name the temporary etc directory comparable.
            match e {
                ConfigError::Invalid {
                    path,
                    line,
                    column,
                    message,
                } => ConfigError::Invalid {
                    path,
                    line,
                    column,
                    message: message.replace(&etc.path().display().to_string(), "ETC"),
                },
                e => e,
            }
        })
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            ("[server]\nsocket = \"/x\"\ncolour = 1\n",
             "3:1: unknown key `colour` in [server], expected one of `socket`, `socket_mode`, `admin_uids`, `audit_log`"),
            ("colour = 1\n",
             "1:1: unknown key `colour` at the top level, expected one of `server`, `sources`, `scope`, `limits`, `log`, `audit`"),
            ("[server]\nsocket = 5\n",
             "2:10: `socket` in [server]: invalid type: integer `5`, expected a string"),
            ("[server]\nadmin_uids = [0, -1]\n",
             "2:18: `admin_uids` in [server]: invalid value: integer `-1`, expected u32"),
            ("[server]\nsocket = \"relative.sock\"\n",
             "2:10: `socket` in [server]: must be an absolute path"),
            (&format!("[server]\nsocket = \"/{}\"\n", "s".repeat(107)),
             "2:10: `socket` in [server]: is 108 bytes long; a Unix socket path holds at most 107"),
            ("[server]\nsocket_mode = \"0999\"\n",
             "2:15: `socket_mode` in [server]: expected octal permission bits such as \"0666\" or \"0660\", at most \"0777\""),
            ("[server]\nsocket_mode = \"01777\"\n",
             "2:15: `socket_mode` in [server]: expected octal permission bits such as \"0666\" or \"0660\", at most \"0777\""),
            ("[server]\nsocket_mode = 438\n",
             "2:15: `socket_mode` in [server]: invalid type: integer `438`, expected a string"),
            ("[server]\naudit_log = \"audit.jsonl\"\n",
             "2:13: `audit_log` in [server]: must be an absolute path (or \"stderr\")"),
            ("[server\n",
             "1:8: unclosed table, expected `]`"),
            ("[server]\nsocket = \"/a\"\nsocket = \"/b\"\n",
             "3:1: duplicate key `socket`"),
            ("[sources.consul]\naddress = \"https://x\"\n",
             "1:10: unknown key `consul` in [sources], expected one of `env`, `files`, `openbao`, `vault`"),
            ("[sources.env]\ninclude = [\"A\"]\nbogus = 1\n",
             "3:1: unknown key `bogus` in [sources.env], expected `include` or `exclude`"),
            ("[sources]\nenv = { include = [\"é\"], bogus = 1 }\n",
             "2:26: unknown key `bogus` in [sources.env], expected `include` or `exclude`"),
            ("sources.env.bogus = 1\n",
             "1:13: unknown key `bogus` in [sources.env], expected `include` or `exclude`"),
            ("[sources.env]\nexclude = [\"PATH\", \"a[\"]\n",
             "2:20: `exclude` in [sources.env]: invalid pattern: unclosed character class; missing ']'"),
            ("[sources.files]\ndirs = [\"run/secrets\"]\n",
             "2:9: `dirs` in [sources.files]: must be an absolute path"),
            ("[sources.files]\ndirs = [\"/run/../etc\"]\n",
             "2:9: `dirs` in [sources.files]: must not contain `..`"),
            ("[[scope]]\nname = \"a\"\nuid = 1\n",
             "1:1: missing key `secrets` in [[scope]] #1"),
            ("[[scope]]\nuid = 1\nsecrets = [\"A\"]\n",
             "1:1: missing key `name` in [[scope]] #1"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"A\"]\n\n[[scope]]\nname = \"b\"\nsecrets = [\"A\"]\n",
             "6:1: [[scope]] #2 (\"b\") has no caller matcher: give at least one of uid, gid, user, group, function, exe"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"A\"]\ncolor = 2\n",
             "5:1: unknown key `color` in [[scope]] #1, expected one of `name`, `uid`, `gid`, `user`, `group`, `function`, `exe`, `secrets`"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"A\"]\n[[scope]]\nname = \"a\"\nuid = 2\nsecrets = [\"B\"]\n",
             "6:8: `name` in [[scope]] #2: scope \"a\" is already defined on line 2"),
            ("[[scope]]\nname = \"\"\nuid = 1\nsecrets = [\"A\"]\n",
             "2:8: `name` in [[scope]] #1: must not be empty"),
            ("[[scope]]\nname = \"a\\nb\"\nuid = 1\nsecrets = [\"A\"]\n",
             "2:8: `name` in [[scope]] #1: must not contain control characters"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nuser = \"orders\"\nsecrets = [\"A\"]\n",
             "4:8: `user` in [[scope]] #1: give `user` or `uid`, not both"),
            ("[[scope]]\nname = \"a\"\ngid = 1\ngroup = \"functions\"\nsecrets = [\"A\"]\n",
             "4:9: `group` in [[scope]] #1: give `group` or `gid`, not both"),
            ("[[scope]]\nname = \"a\"\nuser = \"ordrs\"\nsecrets = [\"A\"]\n",
             "3:8: `user` in [[scope]] #1: no user named \"ordrs\" in ETC/passwd"),
            ("[[scope]]\nname = \"a\"\ngroup = \"nope\"\nsecrets = [\"A\"]\n",
             "3:9: `group` in [[scope]] #1: no group named \"nope\" in ETC/group"),
            ("[[scope]]\nname = \"a\"\nexe = \"python3\"\nsecrets = [\"A\"]\n",
             "3:7: `exe` in [[scope]] #1: must be an absolute path"),
            ("[[scope]]\nname = \"a\"\nexe = \"/usr/bin/./python3\"\nsecrets = [\"A\"]\n",
             "3:7: `exe` in [[scope]] #1: must be a normalised path (no `.`, `//` or trailing `/`): /usr/bin/python3"),
            ("[[scope]]\nname = \"a\"\nfunction = \"\"\nsecrets = [\"A\"]\n",
             "3:12: `function` in [[scope]] #1: must not be empty"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = []\n",
             "4:11: `secrets` in [[scope]] #1: is empty: list at least one name or pattern"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"A\", \"b[\"]\n",
             "4:17: `secrets` in [[scope]] #1: invalid pattern \"b[\": unclosed character class; missing ']'"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"ORDERS DB\"]\n",
             "4:12: `secrets` in [[scope]] #1: pattern \"ORDERS DB\" can never match: ' ' cannot appear in a secret name"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"/abs\"]\n",
             "4:12: `secrets` in [[scope]] #1: pattern \"/abs\" can never match: secret names never start with `/` (they are relative: \"apps/db\")"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"/**\"]\n",
             "4:12: `secrets` in [[scope]] #1: pattern \"/**\" can never match: secret names never start with `/` (they are relative: \"apps/db\")"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"apps/\"]\n",
             "4:12: `secrets` in [[scope]] #1: pattern \"apps/\" can never match: secret names have no empty segment (no trailing `/`, no `//`)"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"apps//*\"]\n",
             "4:12: `secrets` in [[scope]] #1: pattern \"apps//*\" can never match: secret names have no empty segment (no trailing `/`, no `//`)"),
            ("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"apps/../*\"]\n",
             "4:12: `secrets` in [[scope]] #1: pattern \"apps/../*\" can never match: secret names have no `..` segment"),
            (&format!("[[scope]]\nname = \"a\"\nuid = 1\nsecrets = [\"{}\"]\n", "A".repeat(257)),
             &format!("4:12: `secrets` in [[scope]] #1: pattern \"{}\" can never match: it is 257 bytes long and secret names are at most 256", "A".repeat(257))),
            ("[scope]\nname = \"a\"\nuid = 1\nsecrets = [\"A\"]\n",
             "1:1: [scope] must be an array of tables: write [[scope]] (double brackets), once per entry"),
            ("[[server]]\nsocket = \"/x\"\n",
             "1:1: [server] is a single table: write [server] (single brackets), not [[server]]"),
            ("[[scope]]\nname = \"é\"\nuid = \"1001\"\nsecrets = [\"A\"]\n",
             "3:7: `uid` in [[scope]] #1: invalid type: string \"1001\", expected u32"),
            ("[limits]\nmax_connections = 0\n",
             "2:19: `max_connections` in [limits]: must be at least 1"),
            ("[limits]\nmax_streams_per_connection = 0\n",
             "2:30: `max_streams_per_connection` in [limits]: must be at least 1"),
            ("[limits]\nshutdown_grace = \"soon\"\n",
             "2:18: `shutdown_grace` in [limits]: expected a duration such as \"5s\" or \"500ms\" (expected number at 0)"),
            ("[limits]\nmax_connections_per_uid = 0\n",
             "2:27: `max_connections_per_uid` in [limits]: must be at least 1"),
            ("[limits]\nhandshake_timeout = \"0s\"\n",
             "2:21: `handshake_timeout` in [limits]: must be more than 0s (a connection that never completes its handshake would be held forever)"),
            ("[limits]\nidle_timeout = \"later\"\n",
             "2:16: `idle_timeout` in [limits]: expected a duration such as \"5s\" or \"500ms\" (expected number at 0)"),
            ("[limits]\nshutdown_grace = 5\n",
             "2:18: `shutdown_grace` in [limits]: invalid type: integer `5`, expected a string"),
            ("[audit]\non_failure = \"drop\"\n",
             "2:14: `on_failure` in [audit]: expected \"deny\" or \"serve\""),
            ("[audit]\nmax_queue = 0\n",
             "2:13: `max_queue` in [audit]: must be at least 1"),
            ("[audit]\nmax_queue = 99999999\n",
             "2:13: `max_queue` in [audit]: must be at most 16777216"),
            ("[audit]\nqueue = 1\n",
             "2:1: unknown key `queue` in [audit], expected `on_failure` or `max_queue`"),
            ("[log]\nformat = \"xml\"\n",
             "2:10: `format` in [log]: expected \"human\" or \"json\""),
            ("[log]\nlevel = \"info\"\nfile = \"/x\"\n",
             "3:1: unknown key `file` in [log], expected `format` or `level`"),
        ];
        for (text, want) in cases {
            let got = match parse(text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e.to_string(),
            };
            assert_eq!(got, format!("{PATH}:{want}"), "config:\n{text}");
        }
    }

    /// A CA file and a credential file that pass the load-time checks.
    fn openbao_files() -> (tempfile::TempDir, PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // A real (self-signed, EC) certificate: the check parses the PEM.
        fs::write(&ca, include_str!("../tests/data/foreign-ca.pem")).unwrap();
        let cred = dir.path().join("secret-id");
        fs::write(&cred, "s.secret\n").unwrap();
        fs::set_permissions(&cred, fs::Permissions::from_mode(0o600)).unwrap();
        (dir, ca, cred)
    }

    fn openbao_text(ca: &Path, cred: &Path, section: &str) -> String {
        format!(
            r#"[sources.{section}]
address = "https://bao.internal:8200"
ca_file = "{}"
mount = "kv"
refresh = "45s"

[sources.{section}.auth]
method = "approle"
role_id = "0b9c-role"
secret_id_file = "{}"

[sources.{section}.secrets]
ORDERS_DB = "apps/orders#connection_string"
SHARED_CACHE = "shared/cache#url"
"#,
            ca.display(),
            cred.display()
        )
    }

    #[test]
    fn openbao_source() {
        let (_dir, ca, cred) = openbao_files();
        for section in ["openbao", "vault"] {
            let c = parse(&openbao_text(&ca, &cred, section)).unwrap();
            let o = c.openbao.as_ref().unwrap();
            assert_eq!(o.section, section);
            assert_eq!(
                o.addresses[0],
                OpenBaoAddress {
                    url: "https://bao.internal:8200".into(),
                    host: "bao.internal".into(),
                    port: 8200
                }
            );
            assert_eq!(
                (o.mount.as_str(), o.refresh),
                ("kv", Duration::from_secs(45))
            );
            assert!(o.required);
            assert_eq!(
                o.auth,
                OpenBaoAuth::AppRole {
                    mount: "approle".into(),
                    role_id: "0b9c-role".into(),
                    secret_id_file: cred.clone()
                }
            );
            assert!(
                !format!("{:?}", o.auth).contains("0b9c-role"),
                "Debug hides the role id"
            );
            let m: Vec<(&str, &str, &str)> = o
                .secrets
                .iter()
                .map(|m| (m.name.as_str(), m.path.as_str(), m.key.as_str()))
                .collect();
            assert_eq!(
                m,
                [
                    ("ORDERS_DB", "apps/orders", "connection_string"),
                    ("SHARED_CACHE", "shared/cache", "url")
                ]
            );
            assert!(c.summary().contains(&format!(
                "{section} source: https://bao.internal:8200 (ca_file {}), KV v2 mount \"kv\", 2 secrets, refresh 45s, required, auth approle at auth/approle (secret_id_file {})\n",
                ca.display(),
                cred.display()
            )));
        }
        let both = format!(
            "{}\n{}",
            openbao_text(&ca, &cred, "openbao"),
            openbao_text(&ca, &cred, "vault")
        );
        assert_eq!(
            parse(&both).unwrap_err().to_string(),
            format!(
                "{PATH}:16:1: give [sources.openbao] or [sources.vault] (the same source), not both"
            )
        );
    }

    #[test]
    fn openbao_addresses_are_parsed_by_http_uri() {
        let ok = |s: &str| openbao_address(s).map(|a| (a.url, a.host, a.port));
        assert_eq!(
            ok("https://bao.internal"),
            Ok(("https://bao.internal".into(), "bao.internal".into(), 443))
        );
        assert_eq!(
            ok("https://bao.internal:8200/"),
            Ok((
                "https://bao.internal:8200".into(),
                "bao.internal".into(),
                8200
            ))
        );
        assert_eq!(
            ok("https://[::1]:8200"),
            Ok(("https://[::1]:8200".into(), "::1".into(), 8200))
        );
        assert_eq!(
            ok("https://[::1]"),
            Ok(("https://[::1]".into(), "::1".into(), 443))
        );
        // The hand-written parser took `https://[::1]junk` for [::1] port 443.
        for bad in [
            "https://[::1]junk",
            "https://[::1",
            "https://[zz]:8200",
            "https://bao:0",
            "https://bao:99999",
            "https://bao:port",
            "https://bao:",
            "https://bao_x!:8200",
            "https://bao/v1",
            "https://bao?x=1",
            "https://bao#frag",
            "https://user:pw@bao",
            "https://",
            "http://bao",
            "bao:8200",
        ] {
            assert!(ok(bad).is_err(), "accepted {bad:?}: {:?}", ok(bad));
        }
    }

    #[test]
    fn openbao_address_is_a_string_or_a_list() {
        let (_dir, ca, cred) = openbao_files();
        let good = openbao_text(&ca, &cred, "openbao");
        let list = good.replace(
            "address = \"https://bao.internal:8200\"",
            "address = [\"https://bao-1:8200\", \"https://bao-2:8200\", \"https://[::1]:8201\"]",
        );
        let c = parse(&list).unwrap();
        let urls: Vec<&str> = c
            .openbao
            .as_ref()
            .unwrap()
            .addresses
            .iter()
            .map(|a| a.url.as_str())
            .collect();
        assert_eq!(
            urls,
            [
                "https://bao-1:8200",
                "https://bao-2:8200",
                "https://[::1]:8201"
            ]
        );
        assert!(c.summary().contains(
            "openbao source: https://bao-1:8200, https://bao-2:8200, https://[::1]:8201 (ca_file"
        ));
        for (text, want) in [
            (
                good.replace("address = \"https://bao.internal:8200\"", "address = []"),
                "2:11: `address` in [sources.openbao]: is empty: give at least one node",
            ),
            (
                good.replace(
                    "address = \"https://bao.internal:8200\"",
                    "address = [\"https://a:1\", \"http://b:2\"]",
                ),
                "2:11: `address` in [sources.openbao]: \"http://b:2\": must start with https:// (TLS with certificate verification is always on)",
            ),
            (
                good.replace(
                    "address = \"https://bao.internal:8200\"",
                    "address = [\"https://a:1\", \"https://a:1/\"]",
                ),
                "2:11: `address` in [sources.openbao]: \"https://a:1/\" is listed twice",
            ),
        ] {
            assert_eq!(
                parse(&text).unwrap_err().to_string(),
                format!("{PATH}:{want}")
            );
        }
        let bad_type = good.replace("address = \"https://bao.internal:8200\"", "address = 8200");
        let e = parse(&bad_type).unwrap_err().to_string();
        assert!(
            e.contains("address") && e.contains("a string or a list of strings"),
            "{e}"
        );
    }

    #[test]
    fn openbao_errors_name_file_line_column_and_key() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, ca, cred) = openbao_files();
        let good = openbao_text(&ca, &cred, "openbao");
        let open = dir.path().join("open-secret-id");
        fs::write(&open, "x").unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o640)).unwrap();
        let cases: Vec<(String, String)> = vec![
            (
                good.replace("https://bao.internal:8200", "http://bao:8200"),
                "2:11: `address` in [sources.openbao]: must start with https:// (TLS with certificate verification is always on)".into(),
            ),
            (
                good.replace("https://bao.internal:8200", "https://bao:0"),
                "2:11: `address` in [sources.openbao]: invalid port \"0\"".into(),
            ),
            (
                good.replace("https://bao.internal:8200", "https://bao/v1"),
                "2:11: `address` in [sources.openbao]: expected https://HOST or https://HOST:PORT, with no path".into(),
            ),
            (
                good.replace(&ca.display().to_string(), "/nonexistent/ca.pem"),
                "3:11: `ca_file` in [sources.openbao]: /nonexistent/ca.pem: No such file or directory".into(),
            ),
            (
                good.replace(&ca.display().to_string(), &cred.display().to_string()),
                format!("3:11: `ca_file` in [sources.openbao]: {} holds no PEM certificate", cred.display()),
            ),
            (
                good.replace("refresh = \"45s\"", "refresh = \"10ms\""),
                "5:11: `refresh` in [sources.openbao]: must be at least 1s".into(),
            ),
            (
                good.replace("method = \"approle\"", "method = \"kubernetes\""),
                "8:10: `method` in [sources.openbao.auth]: expected \"approle\" or \"token\"".into(),
            ),
            (
                good.replace(&cred.display().to_string(), &open.display().to_string()),
                format!(
                    "10:18: `secret_id_file` in [sources.openbao.auth]: {}: accessible to group/other (mode 0640): a credential file must be 0600 or 0400",
                    open.display()
                ),
            ),
            (
                good.replace("role_id = \"0b9c-role\"\n", ""),
                "8:10: `method` in [sources.openbao.auth]: \"approle\" needs `role_id`".into(),
            ),
            (
                good.replace("method = \"approle\"", "method = \"token\""),
                "9:11: `role_id` in [sources.openbao.auth]: is not used by method = \"token\"".into(),
            ),
            (
                good.replace("apps/orders#connection_string", "apps/orders"),
                "13:13: `ORDERS_DB` in [sources.openbao.secrets]: expected \"PATH#KEY\" (the key inside the KV secret after `#`)".into(),
            ),
            (
                good.replace("apps/orders#connection_string", "/apps//orders#k"),
                "13:13: `ORDERS_DB` in [sources.openbao.secrets]: \"/apps//orders\" must be a path like \"apps/orders\": no leading, trailing or double `/`, no `.` or `..`".into(),
            ),
            (
                good.replace("ORDERS_DB =", "\"ORDERS DB\" ="),
                "13:15: `ORDERS DB` in [sources.openbao.secrets]: not a valid secret name: ".into(),
            ),
            (
                good.replace("mount = \"kv\"\n", "mount = \"kv\"\ntimeout = 3\n"),
                "5:1: unknown key `timeout` in [sources.openbao], expected one of `address`, `ca_file`, `mount`, `refresh`, `required`, `auth`, `secrets`, `dynamic`".into(),
            ),
        ];
        for (text, want) in cases {
            let got = match parse(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e.to_string(),
            };
            assert!(
                got.starts_with(&format!("{PATH}:{want}")),
                "got {got}\nwant {want}\nconfig:\n{text}"
            );
        }
    }

    #[test]
    fn openbao_dynamic_secrets_and_their_errors() {
        let (_dir, ca, cred) = openbao_files();
        let good = format!(
            "{}\n[sources.openbao.dynamic.APP_DB]\npath = \"database/creds/app\"\ntemplate = \"postgresql://{{{{username}}}}:{{{{password}}}}@db/app\"\nrotate_before = \"2m\"\n",
            openbao_text(&ca, &cred, "openbao")
        );
        let c = parse(&good).unwrap();
        let d = &c.openbao.as_ref().unwrap().dynamic[0];
        assert_eq!(d.name.as_str(), "APP_DB");
        assert_eq!(d.path, "database/creds/app");
        assert_eq!(
            d.template.keys().collect::<Vec<_>>(),
            ["username", "password"]
        );
        assert_eq!(d.rotate_before, Duration::from_secs(120));
        assert_eq!(d.revoke_grace, Duration::from_secs(60));
        assert!(d.revoke_on_shutdown);
        // Dynamic only: no [sources.openbao.secrets] needed.
        let start = good.find("[sources.openbao.secrets]").unwrap();
        let end = good.find("[sources.openbao.dynamic").unwrap();
        let only_dynamic = format!("{}{}", &good[..start], &good[end..]);
        assert!(parse(&only_dynamic).is_ok());
        let cases: Vec<(String, &str)> = vec![
            (
                good.replace("{{password}}@", "{{password@"),
                "18:12: `template` in [sources.openbao.dynamic.APP_DB]: `{{` without a closing `}}`",
            ),
            (
                good.replace("@db/app", "@db/app}}"),
                "18:12: `template` in [sources.openbao.dynamic.APP_DB]: `}}` without an opening `{{`",
            ),
            (
                good.replace("rotate_before = \"2m\"", "rotate_before = \"soon\""),
                "19:17: `rotate_before` in [sources.openbao.dynamic.APP_DB]: expected a duration",
            ),
            (
                good.replace("database/creds/app", "/database/creds/app"),
                "17:8: `path` in [sources.openbao.dynamic.APP_DB]: \"/database/creds/app\" must be a path like",
            ),
            (
                good.replace("APP_DB]", "ORDERS_DB]"),
                "13:13: `ORDERS_DB` in [sources.openbao.secrets]: ORDERS_DB is also a [sources.openbao.dynamic] secret: give it once",
            ),
            (
                good.replace("rotate_before", "rotate_after"),
                "19:1: unknown key `rotate_after`",
            ),
        ];
        for (text, want) in cases {
            let got = match parse(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e.to_string(),
            };
            assert!(
                got.starts_with(&format!("{PATH}:{want}")),
                "got {got}\nwant {want}\nconfig:\n{text}"
            );
        }
    }

    #[test]
    fn column_counts_characters() {
        let err = parse("[server]\nsocket = \"/é\" \nadmin_uids = 1\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{PATH}:3:14: `admin_uids` in [server]: invalid type: integer `1`, expected a sequence"
            )
        );
        let err = parse("[sources]\nfiles = { dirs = [\"/é\", \"x\"] }\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{PATH}:2:25: `dirs` in [sources.files]: must be an absolute path")
        );
    }

    const FULL: &str = r#"
[server]
socket = "/run/secretd/s.sock"
socket_mode = "0660"
admin_uids = [0, 990]
audit_log = "/var/log/secretd/audit.jsonl"

[sources.env]
include = ["APP_*", "DB_*"]
exclude = ["DB_DEBUG"]

[sources.files]
dirs = ["/run/secrets", "/run/credentials/secretd"]

[[scope]]
name = "orders"
user = "orders"
secrets = ["ORDERS_DB", "SHARED_*"]

[[scope]]
name = "functions"
group = "functions"
function = "billing"
exe = "/opt/app/bin/worker"
secrets = ["apps/billing/**"]

[[scope]]
name = "numeric"
uid = 2000
gid = 2000
secrets = ["X"]

[limits]
max_connections = 10
max_connections_per_uid = 3
handshake_timeout = "2s"
idle_timeout = "5m"
max_streams_per_connection = 4
max_request_bytes = 4096
max_names_per_request = 16
shutdown_grace = "1500ms"

[log]
format = "json"
level = "secretd=debug,info"

[audit]
on_failure = "serve"
max_queue = 1000
"#;

    #[test]
    fn full_config() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.path.as_deref(), Some(Path::new(PATH)));
        assert_eq!(c.server.socket, Path::new("/run/secretd/s.sock"));
        assert_eq!(c.server.socket_mode, 0o660);
        assert_eq!(c.server.admin_uids, [0, 990]);
        assert_eq!(
            c.server.audit_log,
            AuditTarget::File("/var/log/secretd/audit.jsonl".into())
        );
        assert!(c.env.selects("APP_KEY") && c.env.selects("DB_URL"));
        assert!(!c.env.selects("DB_DEBUG") && !c.env.selects("OTHER"));
        assert_eq!(
            c.files.dirs,
            [
                PathBuf::from("/run/secrets"),
                PathBuf::from("/run/credentials/secretd")
            ]
        );
        let scopes = c.policy.scopes();
        assert_eq!(scopes.len(), 3);
        assert_eq!(scopes[0].name, "orders");
        assert_eq!(
            scopes[0].matcher,
            Matcher {
                uid: Some(1001),
                ..Matcher::default()
            }
        );
        assert_eq!(scopes[0].patterns, ["ORDERS_DB", "SHARED_*"]);
        assert_eq!(
            scopes[1].matcher,
            Matcher {
                gid: Some(500),
                function: Some("billing".into()),
                exe: Some("/opt/app/bin/worker".into()),
                ..Matcher::default()
            }
        );
        assert_eq!(
            scopes[2].matcher,
            Matcher {
                uid: Some(2000),
                gid: Some(2000),
                ..Matcher::default()
            }
        );
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.limits.max_connections_per_uid, 3);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.max_streams_per_connection, 4);
        assert_eq!(c.limits.max_request_bytes, 4096);
        assert_eq!(c.limits.max_names_per_request, 16);
        assert_eq!(c.limits.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "secretd=debug,info");
        assert_eq!(
            c.audit,
            AuditConfig {
                on_failure: OnFailure::Serve,
                max_queue: 1000
            }
        );

        assert_eq!(
            c.summary(),
            "config: /etc/secretd/secretd.toml
socket: /run/secretd/s.sock (mode 0660)
admin uids: 0, 990
audit log: /var/log/secretd/audit.jsonl (on_failure=serve, max_queue=1000)
env source: include [\"APP_*\", \"DB_*\"]; exclude [\"DB_DEBUG\"]
file source: /run/secrets, /run/credentials/secretd
scopes: 3
  scope \"orders\": user=orders (uid 1001) -> [\"ORDERS_DB\", \"SHARED_*\"]
  scope \"functions\": group=functions (gid 500) function=\"billing\" exe=/opt/app/bin/worker -> [\"apps/billing/**\"]
  scope \"numeric\": uid=2000 gid=2000 -> [\"X\"]
limits: max_connections=10 max_connections_per_uid=3 handshake_timeout=2s idle_timeout=5m max_streams_per_connection=4 max_request_bytes=4096 max_names_per_request=16 shutdown_grace=1s 500ms
log: format=json level=\"secretd=debug,info\"
"
        );
    }

    #[test]
    fn empty_file_and_defaults() {
        for c in [parse("").unwrap(), Config::defaults()] {
            assert_eq!(c.server.socket, Path::new(DEFAULT_SOCKET_PATH));
            assert_eq!(c.server.socket_mode, 0o666);
            assert_eq!(c.server.admin_uids, [0]);
            assert_eq!(c.server.audit_log, AuditTarget::Stderr);
            assert_eq!(c.env.include, ["*"]);
            assert_eq!(c.env.exclude, DEFAULT_ENV_EXCLUDE);
            assert!(c.files.dirs.is_empty());
            assert!(c.policy.scopes().is_empty());
            assert_eq!(c.limits.max_connections, 1024);
            assert_eq!(c.limits.max_streams_per_connection, 32);
            assert_eq!(c.limits.max_request_bytes, 65536);
            assert_eq!(c.limits.max_names_per_request, 256);
            assert_eq!(c.limits.shutdown_grace, Duration::from_secs(5));
            assert_eq!(c.log.format, LogFormat::Human);
            assert_eq!(c.log.level, "info");
            assert_eq!(c.audit.on_failure, OnFailure::Deny);
            assert_eq!(c.audit.max_queue, 65536);
        }
        assert_eq!(
            Config::defaults().summary(),
            "no config file: built-in defaults
socket: /run/secretd/secretd.sock (mode 0666)
admin uids: 0
audit log: stderr (on_failure=deny, max_queue=65536)
env source: include [\"*\"]; exclude [\"PATH\", \"HOME\", \"HOSTNAME\", \"LANG\", \"LC_*\", \"TERM\", \"TZ\", \"PWD\", \"SHLVL\", \"RUST_LOG\"]
file source: none
no scopes: every read is denied
limits: max_connections=1024 max_connections_per_uid=64 handshake_timeout=10s idle_timeout=0s (never) max_streams_per_connection=32 max_request_bytes=65536 max_names_per_request=256 shutdown_grace=5s
log: format=human level=\"info\"
"
        );
    }

    #[test]
    fn env_selection() {
        let env = EnvSource::default();
        #[rustfmt::skip]
        let rows = [
            ("ORDERS_DB", true), ("PATH", false), ("HOME", false), ("LC_ALL", false),
            ("LC", true), ("RUST_LOG", false), ("path", true), ("TERM", false), ("TERMINAL", true),
        ];
        for (var, want) in rows {
            assert_eq!(env.selects(var), want, "{var}");
        }
        // `include` alone keeps the default exclude list; `exclude` replaces it.
        let c = parse("[sources.env]\ninclude = [\"P*\"]\n").unwrap();
        assert!(c.env.selects("PGPASS") && !c.env.selects("PATH") && !c.env.selects("X"));
        let c = parse("[sources.env]\nexclude = []\n").unwrap();
        assert!(c.env.selects("PATH"));
    }

    #[test]
    fn exe_must_be_the_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let dir = fs::canonicalize(dir.path()).unwrap();
        let real = dir.join("python3.11");
        fs::write(&real, "").unwrap();
        let link = dir.join("python3");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let text = |exe: &Path| {
            format!(
                "[[scope]]\nname = \"py\"\nexe = \"{}\"\nsecrets = [\"A\"]\n",
                exe.display()
            )
        };
        let c = parse(&text(&real)).unwrap();
        assert_eq!(
            c.policy.scopes()[0].matcher.exe.as_deref(),
            Some(real.as_path())
        );
        assert_eq!(
            parse(&text(&link)).unwrap_err().to_string(),
            format!(
                "{PATH}:3:7: `exe` in [[scope]] #1: {} resolves to {}; /proc/<pid>/exe shows the resolved path, so configure that",
                link.display(),
                real.display()
            )
        );
        // A path that does not exist (yet) is taken as given.
        assert!(parse(&text(&dir.join("later"))).is_ok());
    }

    #[test]
    fn numeric_user_and_group_need_no_entry() {
        let c = parse(
            "[[scope]]\nname = \"n\"\nuser = \"4242\"\ngroup = \"4343\"\nsecrets = [\"A\"]\n",
        )
        .unwrap();
        let m = &c.policy.scopes()[0].matcher;
        assert_eq!((m.uid, m.gid), (Some(4242), Some(4343)));
    }

    #[test]
    fn loading_files() {
        let dir = tempfile::tempdir().unwrap();
        let etc = etc();
        let missing = dir.path().join("missing.toml");

        let c = Config::load_or_default(&missing, false, etc.path()).unwrap();
        assert!(c.path.is_none());
        assert_eq!(
            Config::load_or_default(&missing, true, etc.path())
                .unwrap_err()
                .to_string(),
            format!(
                "{}: failed to read: No such file or directory (os error 2)",
                missing.display()
            )
        );
        assert_eq!(
            Config::load(&missing, etc.path()).unwrap_err().to_string(),
            format!(
                "{}: failed to read: No such file or directory (os error 2)",
                missing.display()
            )
        );

        let file = dir.path().join("secretd.toml");
        fs::write(&file, "[server]\nsocket_mode = \"0600\"\n").unwrap();
        for c in [
            Config::load(&file, etc.path()).unwrap(),
            Config::load_or_default(&file, false, etc.path()).unwrap(),
            Config::load_or_default(&file, true, etc.path()).unwrap(),
        ] {
            assert_eq!(c.path.as_deref(), Some(file.as_path()));
            assert_eq!(c.server.socket_mode, 0o600);
        }

        fs::write(&file, "[server]\nbad = 1\n").unwrap();
        assert_eq!(
            Config::load_or_default(&file, false, etc.path())
                .unwrap_err()
                .to_string(),
            format!(
                "{}:2:1: unknown key `bad` in [server], expected one of `socket`, `socket_mode`, `admin_uids`, `audit_log`",
                file.display()
            )
        );

        fs::write(&file, b"\xff\xfe").unwrap();
        assert_eq!(
            Config::load(&file, etc.path()).unwrap_err().to_string(),
            format!(
                "{}: failed to read: stream did not contain valid UTF-8",
                file.display()
            )
        );
    }
}
