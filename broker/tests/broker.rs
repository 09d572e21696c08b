//! Integration tests: the real `secretd serve` binary on a temp socket, driven by real clients —
//! the tonic client in this process (uid 0) and the `secretd` CLI run as other uids.

mod common;

use std::{fs, os::unix::fs::PermissionsExt, process::Command, time::Duration};

use common::*;
use nix::sys::signal::Signal;
use secretd_proto::v1 as pb;
use tonic::Code;

const POLICY: &str = r#"
[server]
socket = "{socket}"
socket_mode = "0666"
admin_uids = [0]
audit_log = "{audit}"

[sources.env]
include = ["ORDERS_*", "BILLING_*", "SHARED_*", "ROOT_*", "SHORT"]

[[scope]]
name = "orders"
uid = 64201
secrets = ["ORDERS_*", "SHARED_*"]

[[scope]]
name = "ops"
uid = 0
secrets = ["ROOT_*", "ORDERS_*", "SHORT"]
"#;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn environment_is_wiped_and_each_value_is_held_once() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let orders = unique_value("postgres://orders:pw@db/orders");
    let root = unique_value("root-token");
    let broker = start(
        &sb,
        &[
            ("ORDERS_DB", &orders),
            ("ROOT_TOKEN", &root),
            ("PATH", "/usr/bin"),
        ],
    );

    // /proc/<pid>/environ, read as root: every byte of the original block is zero.
    let environ = fs::read(format!("/proc/{}/environ", broker.pid)).unwrap();
    assert!(
        !environ.is_empty(),
        "the kernel still reports the original block"
    );
    assert!(
        environ.iter().all(|&b| b == 0),
        "environ not wiped: {:?}",
        String::from_utf8_lossy(&environ)
    );
    let cmdline = fs::read(format!("/proc/{}/cmdline", broker.pid)).unwrap();
    assert!(!contains(&cmdline, orders.as_bytes()));

    // Core files off, process non-dumpable (so /proc/<pid> is root-owned).
    let limits = fs::read_to_string(format!("/proc/{}/limits", broker.pid)).unwrap();
    assert!(
        limits.lines().any(
            |l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        ),
        "{limits}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(format!("/proc/{}/environ", broker.pid))
            .unwrap()
            .uid(),
        0
    );

    // Right after start-up each value is in memory exactly once (the store).
    assert_eq!(count_in_memory(broker.pid, orders.as_bytes()), 1);
    assert_eq!(count_in_memory(broker.pid, root.as_bytes()), 1);

    // Serving it does not leave copies behind once the connection is gone: every buffer the
    // response passed through was cleared when freed.
    let rt = runtime();
    rt.block_on(async {
        let mut c = secrets(&broker.socket).await;
        for _ in 0..20 {
            assert_eq!(value_of(&mut c, "ORDERS_DB").await, orders.as_bytes());
        }
    });
    drop(rt);
    eventually(
        "response buffers cleared after the connection closed",
        || count_in_memory(broker.pid, orders.as_bytes()) == 1,
    );
    assert_eq!(broker.stop().code(), Some(0));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn scopes_decide_by_peer_uid_and_hide_which_names_exist() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let orders = unique_value("orders-db");
    let billing = unique_value("billing-db");
    let _b = start(
        &sb,
        &[
            ("ORDERS_DB", &orders),
            ("BILLING_DB", &billing),
            ("SHARED_CACHE", "redis://cache"),
        ],
    );

    let ok = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "ORDERS_DB"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(stdout(&ok), orders);

    // Out of scope: existing and non-existing names get the same status and message.
    let denied_existing = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "BILLING_DB"]);
    let denied_missing = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "BILLING_NOPE"]);
    assert!(!denied_existing.status.success());
    assert_eq!(stderr(&denied_existing), stderr(&denied_missing));
    assert!(
        stderr(&denied_existing).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&denied_existing)
    );
    assert!(!stderr(&denied_existing).contains(&billing));

    // In scope but absent: NOT_FOUND.
    let missing = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "ORDERS_NOPE"]);
    assert!(
        stderr(&missing).contains("NOT_FOUND"),
        "{}",
        stderr(&missing)
    );

    // A uid with no scope gets nothing, and the same message.
    let other = cli_as(&sb, UID_OTHER, UID_OTHER, &["get", "ORDERS_DB"]);
    assert_eq!(stderr(&other), stderr(&denied_existing));

    // Malformed names: INVALID_ARGUMENT, without echoing the name.
    let bad = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "../etc/passwd"]);
    assert!(
        stderr(&bad).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&bad)
    );
    assert!(!stderr(&bad).contains("etc/passwd"));

    // ListSecrets: only names in scope, never values.
    let list = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["list"]);
    assert_eq!(stdout(&list), "ORDERS_DB\nSHARED_CACHE\n");
    assert_eq!(stdout(&cli_as(&sb, UID_OTHER, UID_OTHER, &["list"])), "");

    // WhoAmI reflects the kernel's view.
    let who = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["whoami", "--json"]);
    let who: serde_json::Value = serde_json::from_slice(&who.stdout).unwrap();
    assert_eq!(who["uid"], UID_ORDERS);
    assert_eq!(who["scopes"], serde_json::json!(["orders"]));
    assert_eq!(who["function"], serde_json::Value::Null);

    // Admin calls need an admin uid.
    let status = cli_as(&sb, UID_ORDERS, UID_ORDERS, &["status"]);
    assert!(
        stderr(&status).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&status)
    );
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn get_secrets_is_all_or_nothing() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let b = start(
        &sb,
        &[
            ("ROOT_A", "value-a-1234"),
            ("ROOT_B", "value-b-1234"),
            ("BILLING_DB", "billing-value"),
        ],
    );
    runtime().block_on(async {
        let mut c = secrets(&b.socket).await;
        let names = |n: &[&str]| pb::GetSecretsRequest {
            names: n.iter().map(|s| s.to_string()).collect(),
        };
        let ok = c
            .get_secrets(names(&["ROOT_B", "ROOT_A"]))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<(String, Vec<u8>)> =
            ok.secrets.into_iter().map(|s| (s.name, s.value)).collect();
        assert_eq!(
            got,
            [
                ("ROOT_B".into(), b"value-b-1234".to_vec()),
                ("ROOT_A".into(), b"value-a-1234".to_vec())
            ]
        );
        let e = c
            .get_secrets(names(&["ROOT_A", "BILLING_DB"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = c
            .get_secrets(names(&["ROOT_A", "ROOT_MISSING"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = c
            .get_secrets(names(&["ROOT_A", "bad name"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let many: Vec<String> = (0..300).map(|i| format!("ROOT_{i}")).collect();
        let e = c
            .get_secrets(pb::GetSecretsRequest { names: many })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        // Versions are stable for an unchanged value.
        let v1 = c
            .get_secret(pb::GetSecretRequest {
                name: "ROOT_A".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .version;
        let v2 = c
            .get_secret(pb::GetSecretRequest {
                name: "ROOT_A".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .version;
        assert_eq!(v1, v2);
    });
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn grandchild_holding_an_inherited_socket_is_denied() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let b = start(&sb, &[("ROOT_TOKEN", "grandchild-should-not-see-this")]);
    // Sanity: the same program as one process (no fork) is allowed.
    let helper = grandchild_helper();
    let direct = Command::new(&helper)
        .arg(&b.socket)
        .arg("direct")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout).trim(),
        "Ok",
        "{}",
        stderr(&direct)
    );
    // The connecting process exits; its grandchild keeps the socket and calls.
    let out = Command::new(&helper)
        .arg(&b.socket)
        .arg("grandchild")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "PermissionDenied",
        "{}",
        stderr(&out)
    );
    let log = b.log();
    assert!(
        log.contains("the process that opened this connection has exited"),
        "{log}"
    );
}

/// The `grandchild` example binary, built by `cargo test` next to the test executables.
fn grandchild_helper() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples/grandchild");
    assert!(
        path.exists(),
        "{} missing: cargo test builds examples",
        path.display()
    );
    path
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn reload_rejects_a_broken_file_and_keeps_the_old_policy() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let b = start(&sb, &[("ORDERS_DB", "orders-value-1")]);
    // Broken: unknown key. Admin.Reload reports file:line:col; nothing changes.
    sb.write_config(&format!("{POLICY}\n[server2]\nx = 1\n"));
    let out = Command::new(BIN)
        .args(["reload", "--socket"])
        .arg(&b.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    let cfg = sb.config_path().display().to_string();
    assert!(err.contains(&format!("{cfg}:")), "{err}");
    assert!(err.contains("configuration unchanged"), "{err}");
    assert_eq!(
        stdout(&cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "ORDERS_DB"])),
        "orders-value-1"
    );
    // SIGHUP with the broken file: logged, broker keeps serving.
    b.signal(Signal::SIGHUP);
    eventually("SIGHUP reload error logged", || {
        b.log().contains("reload rejected")
    });
    assert_eq!(
        stdout(&cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "ORDERS_DB"])),
        "orders-value-1"
    );
    // A valid change takes effect on SIGHUP: the orders scope moves to another uid.
    sb.write_config(&POLICY.replace("uid = 64201", "uid = 64299"));
    b.signal(Signal::SIGHUP);
    eventually("reloaded policy denies the old uid", || {
        stderr(&cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "ORDERS_DB"]))
            .contains("PERMISSION_DENIED")
    });
    assert_eq!(b.stop().code(), Some(0));
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn stale_socket_is_replaced_and_a_live_one_is_not() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let first = start(&sb, &[]);
    let second = try_start(&sb, &[], &[]);
    let err = second
        .err()
        .expect("a second broker on a live socket must refuse");
    assert!(err.contains("another broker is already serving"), "{err}");
    first.crash();
    assert!(
        sb.socket().exists(),
        "kill -9 leaves the socket file behind"
    );
    let third = start(&sb, &[]);
    assert!(
        third.log().contains("replaced a stale socket"),
        "{}",
        third.log()
    );
    assert_eq!(third.stop().code(), Some(0));
    assert!(!sb.socket().exists(), "SIGTERM removes the socket");
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn socket_directory_writable_by_others_is_refused() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    fs::create_dir(sb.path().join("run")).unwrap();
    fs::set_permissions(sb.path().join("run"), fs::Permissions::from_mode(0o777)).unwrap();
    let err = try_start(&sb, &[], &[]).err().expect("must refuse");
    assert!(
        err.contains(&format!(
            "refusing socket directory {}/run: mode 0777",
            sb.path().display()
        )),
        "{err}"
    );
}

#[test]
fn broken_config_aborts_start_up_with_file_line_column() {
    let sb = Sandbox::new();
    sb.write_config("[server]\nsocket = \"{socket}\"\ncolour = \"blue\"\n");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(sb.config_path())
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("secretd: {}:3:1: ", sb.config_path().display())),
        "{err}"
    );
    assert!(err.contains("colour"), "{err}");
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(sb.config_path())
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    sb.write_config(POLICY);
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(sb.config_path())
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(stdout(&check).contains("orders"));
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn logs_and_audit_never_contain_values_even_at_trace() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let orders = unique_value("trace-orders");
    let root = unique_value("trace-root");
    let b = start(
        &sb,
        &[
            ("ORDERS_DB", &orders),
            ("ROOT_TOKEN", &root),
            ("RUST_LOG", "trace"),
        ],
    );
    assert!(stdout(&cli_as(&sb, UID_ORDERS, UID_ORDERS, &["get", "ORDERS_DB"])).contains(&orders));
    cli_as(&sb, UID_OTHER, UID_OTHER, &["get", "ORDERS_DB"]);
    cli_as(&sb, UID_ORDERS, UID_ORDERS, &["list"]);
    runtime().block_on(async {
        let mut c = secrets(&b.socket).await;
        c.get_secret(pb::GetSecretRequest {
            name: "ROOT_TOKEN".into(),
        })
        .await
        .unwrap();
        let mut a = admin(&b.socket).await;
        a.status(pb::StatusRequest {}).await.unwrap();
        a.scan(pb::ScanRequest {}).await.unwrap();
        a.set_secret(pb::SetSecretRequest {
            name: "ROOT_NEW".into(),
            value: root.clone().into_bytes(),
        })
        .await
        .unwrap();
    });
    let log_path = b.stderr.clone();
    assert_eq!(b.stop().code(), Some(0));
    let log = fs::read_to_string(log_path).unwrap();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was not on:\n{log}"
    );
    let audit = fs::read_to_string(sb.audit()).unwrap();
    for v in [&orders, &root] {
        assert!(!log.contains(v.as_str()), "a value reached the log");
        assert!(!audit.contains(v.as_str()), "a value reached the audit log");
    }
    // Every call is audited with who, what and the decision.
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let get = records
        .iter()
        .find(|r| r["rpc"] == "GetSecret" && r["uid"] == UID_ORDERS)
        .unwrap();
    assert_eq!(get["decision"], "allow");
    assert_eq!(get["names"], serde_json::json!(["ORDERS_DB"]));
    assert_eq!(get["scopes"], serde_json::json!(["orders"]));
    let deny = records
        .iter()
        .find(|r| r["rpc"] == "GetSecret" && r["uid"] == UID_OTHER)
        .unwrap();
    assert_eq!(deny["decision"], "deny");
    assert!(
        deny["reason"].as_str().unwrap().contains("no scope"),
        "{deny}"
    );
    assert!(records.iter().any(|r| r["rpc"] == "Scan"));
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn scan_reports_a_planted_leak_by_name_only() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let leaked = unique_value("leaked-orders-db");
    let b = start(&sb, &[("ORDERS_DB", &leaked), ("SHORT", "abc")]);
    let mut victim = Command::new("/bin/sleep")
        .arg("300")
        .env_clear()
        .env("DATABASE_URL", &leaked)
        .spawn()
        .unwrap();
    let out = Command::new(BIN)
        .args(["scan", "--json", "--socket"])
        .arg(&b.socket)
        .output()
        .unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();
    // `scan` exits 3 when it finds a leak (README: so it can gate a cron job or CI).
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains(&leaked));
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let hits = report["hits"].as_array().unwrap();
    let hit = hits
        .iter()
        .find(|h| h["pid"] == victim.id())
        .unwrap_or_else(|| panic!("victim not found: {text}"));
    assert_eq!(hit["environ"], serde_json::json!(["ORDERS_DB"]));
    // Nothing else on the machine holds the value: not the broker, not us (the test's own
    // environment never had it).
    assert_eq!(hits.len(), 1, "{text}");
    assert_eq!(report["not_searched"], serde_json::json!(["SHORT"]));
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn registered_worker_and_its_children_get_the_function_across_restarts() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(&format!(
        "{POLICY}\n[[scope]]\nname = \"fn-billing\"\nfunction = \"billing\"\nsecrets = [\"BILLING_*\"]\n"
    ));
    let env = [("BILLING_DB", "billing-value-123")];
    let b = start(&sb, &env);
    // A worker as another uid, waiting for a line on stdin before it calls.
    let script = format!(
        "read go; {bin} whoami --json --socket {s}; {bin} get BILLING_DB --socket {s}; echo; read again; {bin} get BILLING_DB --socket {s}",
        bin = sb.bin().display(),
        s = sb.socket().display()
    );
    use std::{io::Write, os::unix::process::CommandExt};
    let mut worker = Command::new("/bin/sh")
        .args(["-c", &script])
        .uid(UID_OTHER)
        .gid(UID_OTHER)
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Same uid, not registered: denied.
    assert!(
        stderr(&cli_as(&sb, UID_OTHER, UID_OTHER, &["get", "BILLING_DB"]))
            .contains("PERMISSION_DENIED")
    );
    runtime().block_on(async {
        let mut a = admin(&b.socket).await;
        a.register_worker(pb::RegisterWorkerRequest {
            pid: worker.id(),
            function: "billing".into(),
        })
        .await
        .unwrap();
        let e = a
            .register_worker(pb::RegisterWorkerRequest {
                pid: 0,
                function: "bad name!".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    });
    // The broker crashes and its supervisor restarts it with the same environment.
    b.crash();
    let b = start(&sb, &env);
    assert!(
        b.log().contains("restored worker registrations"),
        "{}",
        b.log()
    );
    let mut stdin = worker.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    writeln!(stdin, "again").unwrap();
    drop(stdin);
    let out = worker.wait_with_output().unwrap();
    let text = stdout(&out);
    let (json, rest) = text
        .split_once("\n}\n")
        .unwrap_or_else(|| panic!("no whoami JSON: {text}"));
    let who: serde_json::Value = serde_json::from_str(&format!("{json}\n}}")).unwrap();
    assert_eq!(who["function"], "billing", "{text}");
    assert_eq!(who["scopes"], serde_json::json!(["fn-billing"]));
    assert_eq!(
        rest, "billing-value-123\nbilling-value-123",
        "the worker's children inherit the function: {text}"
    );
    assert!(out.status.success());
    // The worker exited: its registration ends.
    runtime().block_on(async {
        let mut a = admin(&b.socket).await;
        let mut n = u64::MAX;
        for _ in 0..200 {
            n = a
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .registered_workers;
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(n, 0);
    });
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn connection_limit_refuses_extra_connections_but_keeps_serving() {
    require_root!();
    let sb = Sandbox::new();
    // root is an admin here: admins are exempt from the per-uid share and may exceed
    // max_connections by a reserve of max_connections_per_uid, so 2 + 1 = 3 connections.
    sb.write_config(&format!(
        "{POLICY}\n[limits]\nmax_connections = 2\nmax_connections_per_uid = 1\n"
    ));
    let b = start(&sb, &[("ROOT_A", "limit-value-1")]);
    runtime().block_on(async {
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = secrets(&b.socket).await;
            c.get_secret(pb::GetSecretRequest {
                name: "ROOT_A".into(),
            })
            .await
            .unwrap();
            held.push(c);
        }
        // Over the limit: the broker closes the connection at once. Depending on timing the
        // client sees that while connecting or on its first call; either way it gets nothing.
        let refused = match secretd::client::connect(&b.socket).await {
            Err(_) => true,
            Ok(ch) => pb::secrets_client::SecretsClient::new(ch)
                .get_secret(pb::GetSecretRequest {
                    name: "ROOT_A".into(),
                })
                .await
                .is_err(),
        };
        assert!(refused, "a fourth connection must be refused");
        // Everyone already connected is still served.
        for c in &mut held {
            c.get_secret(pb::GetSecretRequest {
                name: "ROOT_A".into(),
            })
            .await
            .unwrap();
        }
        held.pop();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = None;
        for _ in 0..100 {
            if let Ok(ch) = secretd::client::connect(&b.socket).await {
                let mut c = pb::secrets_client::SecretsClient::new(ch);
                let got = c.get_secret(pb::GetSecretRequest {
                    name: "ROOT_A".into(),
                });
                if got.await.is_ok() {
                    again = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(again.is_some(), "a freed slot is usable again");
        // Oversized request: refused, broker unaffected.
        let huge = "A".repeat(100_000);
        let e = held[0]
            .get_secret(pb::GetSecretRequest { name: huge })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e}");
        held[0]
            .get_secret(pb::GetSecretRequest {
                name: "ROOT_A".into(),
            })
            .await
            .unwrap();
    });
    // The refused oversized call is audited too (tonic rejects it before any handler runs).
    eventually("oversized request audited", || {
        fs::read_to_string(sb.audit())
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                r["rpc"] == "GetSecret"
                    && r["decision"] == "invalid"
                    && r["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("max_request_bytes")
            })
    });
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn health_reflection_and_watch() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let b = start(&sb, &[("ROOT_W", "watch-value-1")]);
    runtime().block_on(async {
        let ch = channel(&b.socket).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "secretd.v1.Secrets".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut refl = ServerReflectionClient::new(ch.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = refl
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("no list")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"secretd.v1.Secrets".to_owned())
                && names.contains(&"secretd.v1.Admin".to_owned()),
            "{names:?}"
        );
        // The same through v1alpha, which grpcio's reflection client and grpc_cli speak.
        {
            use tonic_reflection::pb::v1alpha::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let resp = ServerReflectionClient::new(ch.clone())
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap()
                .unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
                panic!("no list from v1alpha")
            };
            let alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            assert!(
                alpha.contains(&"secretd.v1.Secrets".to_owned())
                    && alpha.contains(&"secretd.v1.Admin".to_owned()),
                "{alpha:?}"
            );
        }

        let mut s = pb::secrets_client::SecretsClient::new(ch.clone());
        let mut a = pb::admin_client::AdminClient::new(ch);
        let mut watch = open_watch(&mut s, "ROOT_W").await;
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.value, b"watch-value-1");
        let v = a
            .set_secret(pb::SetSecretRequest {
                name: "ROOT_W".into(),
                value: b"watch-value-2".to_vec(),
            })
            .await
            .unwrap()
            .into_inner()
            .version;
        let second = watch.message().await.unwrap().unwrap();
        assert_eq!(
            (second.value.as_slice(), second.version),
            (b"watch-value-2".as_slice(), v)
        );
        assert!(second.version > first.version);
        a.delete_secret(pb::DeleteSecretRequest {
            name: "ROOT_W".into(),
        })
        .await
        .unwrap();
        let end = watch.message().await.unwrap_err();
        assert_eq!(end.code(), Code::NotFound);
        let e = s
            .get_secret(pb::GetSecretRequest {
                name: "ROOT_W".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    });
}

#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn stream_limit_is_advertised_to_every_connection() {
    require_root!();
    use std::io::{Read, Write};
    let sb = Sandbox::new();
    sb.write_config(&format!(
        "{POLICY}\n[limits]\nmax_streams_per_connection = 7\n"
    ));
    let b = start(&sb, &[]);
    // Speak raw HTTP/2: the client preface and an empty SETTINGS frame; the server answers with
    // its own SETTINGS, which carry SETTINGS_MAX_CONCURRENT_STREAMS (id 3).
    let mut s = std::os::unix::net::UnixStream::connect(&b.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let max_streams = loop {
        let mut header = [0u8; 9];
        s.read_exact(&mut header).unwrap();
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        let (kind, ack) = (header[3], header[4] & 1 == 1);
        if kind != 4 || ack {
            continue;
        }
        let value = payload.chunks_exact(6).find_map(|e| {
            (u16::from_be_bytes([e[0], e[1]]) == 3)
                .then(|| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
        });
        break value;
    };
    assert_eq!(max_streams, Some(7));
}

/// A value of at least `len` bytes made of unique 34-byte chunks, and the chunks: a memory scan
/// for the chunks finds a copy of any part of the value.
fn chunked(len: usize) -> (String, Vec<String>) {
    let chunks: Vec<String> = (0..len.div_ceil(34)).map(|_| unique_value("c")).collect();
    (chunks.concat(), chunks)
}

/// A rotated-away value must leave no copy in the broker while its clients stay connected:
/// a `WatchSecret` stream that carried it, a connection that read it with `GetSecret` each
/// time, and one that read the first value only and then sat idle. The per-stream encode
/// buffer and the per-connection HTTP/2 write buffer both outlive one message. Each value is
/// a run of unique 34-byte chunks, so a copy of any part of it is found; the first value is
/// longer than one HTTP/2 frame (16 KiB), whose later frames begin inside the value.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn rotated_values_leave_no_copy_while_clients_stay_connected() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let (first, mut old_chunks) = chunked(40_000);
    let b = start(&sb, &[("ROOT_ROTATING", &first)]);
    runtime().block_on(async {
        let mut watcher = secrets(&b.socket).await;
        let mut watch = open_watch(&mut watcher, "ROOT_ROTATING").await;
        assert_eq!(
            watch.message().await.unwrap().unwrap().value,
            first.as_bytes()
        );
        let mut reader = secrets(&b.socket).await;
        assert_eq!(
            value_of(&mut reader, "ROOT_ROTATING").await,
            first.as_bytes()
        );
        let mut idle = secrets(&b.socket).await;
        assert_eq!(value_of(&mut idle, "ROOT_ROTATING").await, first.as_bytes());

        let mut current = Vec::new();
        for len in [1500, 5000, 400, 700, 40] {
            let (next, chunks) = chunked(len);
            set_value(&b.socket, "ROOT_ROTATING", next.as_bytes()).await;
            assert_eq!(
                watch.message().await.unwrap().unwrap().value,
                next.as_bytes()
            );
            assert_eq!(
                value_of(&mut reader, "ROOT_ROTATING").await,
                next.as_bytes()
            );
            old_chunks.append(&mut current);
            current = chunks;
        }

        // All three client connections are still open.
        eventually_eq(
            "chunks of rotated-away values found in the broker",
            0,
            || counts_in_memory(b.pid, &old_chunks).iter().sum::<usize>(),
        );
        assert!(counts_in_memory(b.pid, &current).iter().all(|&n| n >= 1));
        drop((watch, watcher, reader, idle));
    });
}

/// A watcher that stops reading (a frozen function) must not make the broker hold the values
/// it misses: once HTTP/2 flow control stops the stream, later rotations queue nothing. At
/// most two values it has not received are held until it reads or goes — the one handed to
/// h2 (partly sent) and the next, which hyper polls from the body before it waits for window;
/// every other rotated-away value is gone.
#[ignore = "needs root: `make test` runs it as root (README, Tests)"]
#[test]
fn a_stalled_watcher_holds_no_rotated_away_value() {
    require_root!();
    let sb = Sandbox::new();
    sb.write_config(POLICY);
    let (first, first_chunks) = chunked(400);
    let b = start(&sb, &[("ROOT_STALLED", &first)]);
    runtime().block_on(async {
        // A window of 1 KiB that the client never reopens: it never reads the stream.
        let channel =
            tonic::transport::Endpoint::from_shared(format!("unix://{}", b.socket.display()))
                .unwrap()
                .initial_stream_window_size(1024)
                .connect()
                .await
                .unwrap();
        let stalled = open_watch(
            &mut pb::secrets_client::SecretsClient::new(channel),
            "ROOT_STALLED",
        )
        .await;

        let mut values = vec![first_chunks];
        for _ in 0..6 {
            let (next, chunks) = chunked(400);
            set_value(&b.socket, "ROOT_STALLED", next.as_bytes()).await;
            values.push(chunks);
            // Let the broker act on the change before the next one.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let current = values.pop().unwrap();

        let held = |v: &Vec<String>| counts_in_memory(b.pid, v).iter().any(|&n| n > 0);
        let in_flight: Vec<usize> = (0..values.len()).filter(|&i| held(&values[i])).collect();
        assert!(
            in_flight.len() <= 2,
            "rotated-away values still held for a watcher that stopped reading: {in_flight:?}"
        );
        assert!(held(&current));
        drop(stalled);
    });
}
