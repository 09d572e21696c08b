"""What a newcomer trips over first, fixed (issue 12): `check` runs serve's start-up checks,
`scan`'s exit status (in test_scan.py), one-line CLI errors with a hint, plain logs off a
terminal, a warning for a function no scope names, the shim's SECRETD_SOCKET, and precise
errors for `[scope]` and patterns that can never match. Reflection v1alpha is in
test_generic_grpc.py.

The tests without `needs_root` run as any user: `check` and the client commands need no
privilege, and a sandbox under /tmp is owned by whoever runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness import (
    WORKER_UID,
    Binaries,
    Broker,
    BrokerFactory,
    Launcher,
    Sandbox,
    Worker,
    environ_of,
    needs_root,
    wait_until,
)


def secretd(
    bins: Binaries, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bins.secretd), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else {"PATH": "/usr/bin:/bin"},
        check=False,
    )


def write_config(sandbox: Sandbox, text: str) -> Path:
    sandbox.config.write_text(text)
    return sandbox.config


# --- 4. `check` refuses what `serve` refuses ------------------------------------------------


def test_check_refuses_a_socket_directory_serve_would_refuse(
    bins: Binaries, sandbox: Sandbox
) -> None:
    """The report: `check` said `config OK` for a socket in /tmp (mode 1777) that serve then
    refused. Both now give the same one-line reason and exit 1."""
    open_dir = sandbox.root / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    config = write_config(sandbox, f'[server]\nsocket = "{open_dir}/secretd.sock"\n')
    why = (
        f"refusing socket directory {open_dir}: mode 1777 lets others create or replace the "
        "socket; put the socket in a directory only root can write, such as /run/secretd"
    )
    checked = secretd(bins, "check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert checked.stderr == f"secretd: {why}\n"
    assert "config OK" not in checked.stdout
    served = secretd(bins, "serve", "--config", str(config))
    assert served.returncode == 1
    assert served.stderr.splitlines()[-1] == f"secretd: {why}"
    # The same config with a safe socket directory passes, and says so.
    sandbox.run_dir.mkdir(mode=0o755)
    config = write_config(sandbox, f'[server]\nsocket = "{sandbox.socket}"\n')
    ok = secretd(bins, "check", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("config OK\n")


def test_check_reads_the_file_sources_and_the_audit_log_location(
    bins: Binaries, sandbox: Sandbox
) -> None:
    """Every problem is reported (not just the first), and nothing is created."""
    config = write_config(
        sandbox,
        f'[server]\nsocket = "{sandbox.socket}"\naudit_log = "{sandbox.root}/logs/audit.jsonl"\n'
        f'[sources.files]\ndirs = ["{sandbox.root}/secrets"]\n',
    )
    checked = secretd(bins, "check", "--config", str(config))
    assert checked.returncode == 1
    lines = checked.stderr.splitlines()
    assert len(lines) == 2, checked.stderr
    assert f"{sandbox.root}/secrets" in lines[0]
    assert lines[1].startswith(
        f"secretd: cannot use the audit log {sandbox.root}/logs/audit.jsonl: its directory"
    )
    assert not (sandbox.root / "logs").exists()
    assert not sandbox.run_dir.exists()


# --- 10. precise config errors -----------------------------------------------------------------


def test_config_mistakes_get_precise_errors(bins: Binaries, sandbox: Sandbox) -> None:
    path = sandbox.config
    cases = {
        # `[scope]` for `[[scope]]`: serde alone says "invalid type: map, expected a sequence".
        '[scope]\nname = "orders"\nuid = 1001\nsecrets = ["ORDERS_DB"]\n': (
            f"secretd: {path}:1:1: [scope] must be an array of tables: write [[scope]] "
            "(double brackets), once per entry"
        ),
        # A pattern no valid secret name can match was accepted silently.
        '[[scope]]\nname = "orders"\nuid = 1001\nsecrets = ["/abs"]\n': (
            f'secretd: {path}:4:12: `secrets` in [[scope]] #1: pattern "/abs" can never match: '
            'secret names never start with `/` (they are relative: "apps/db")'
        ),
        '[[scope]]\nname = "orders"\nuid = 1001\nsecrets = ["apps//db"]\n': (
            f'secretd: {path}:4:12: `secrets` in [[scope]] #1: pattern "apps//db" can never '
            "match: secret names have no empty segment (no trailing `/`, no `//`)"
        ),
    }
    for text, want in cases.items():
        path.write_text(text)
        result = secretd(bins, "check", "--config", str(path))
        assert result.returncode == 1, text
        assert result.stderr == want + "\n", text


# --- 6. one-line CLI errors with a hint --------------------------------------------------------


def test_a_cli_error_is_one_line_with_a_hint(bins: Binaries, sandbox: Sandbox) -> None:
    """No broker at the socket: the cause once (it was printed three times), and what to do."""
    socket = sandbox.root / "nothing-here.sock"
    for args, env in [
        (["status", "--socket", str(socket)], None),
        (["list"], {"PATH": "/usr/bin:/bin", "SECRETD_SOCKET": str(socket)}),
    ]:
        result = secretd(bins, *args, env=env)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"secretd: cannot connect to the broker at {socket}: ")
        assert result.stderr.count("No such file or directory") == 1, result.stderr
        assert "Is the broker running (secretd serve), and does --socket or SECRETD_SOCKET" in (
            result.stderr
        )


@needs_root
def test_a_status_error_names_the_code_and_what_to_do(broker: Broker) -> None:
    """An Admin call from a uid outside admin_uids: the gRPC code as gRPC spells it (never
    Rust's `PermissionDenied` Debug name), the broker's message, and the rule to fix it."""
    result = subprocess.run(
        [
            str(broker.sandbox.public_bins(broker.bins).secretd),
            "status",
            "--socket",
            str(broker.socket),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        user=WORKER_UID,
        group=WORKER_UID,
        extra_groups=[],
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("secretd: PERMISSION_DENIED: "), result.stderr
    assert "[server].admin_uids" in result.stderr
    assert result.stderr.count("\n") == 1


# --- 7. logs an operator reads -----------------------------------------------------------------


@needs_root
def test_broker_log_is_plain_text_without_debug_formatting(
    broker: Broker, launcher: Launcher
) -> None:
    """stderr is a file here: no ANSI colour codes; no `config: config:`; a denial line
    names the function as `function=orders`, not Rust's `Some("orders")`."""
    worker = launcher.worker(function="orders")
    assert worker.get("BILLING_KEY")["error"] == "PermissionDenied"
    wait_until(lambda: "denied" in broker.log(), 30, "the denial in the broker's log")
    log = broker.log()
    assert "\x1b[" not in log
    assert "config: config:" not in log
    assert f"config: {broker.sandbox.config}" in log
    assert "Some(" not in log, log
    assert "None" not in log, log
    denial = next(line for line in log.splitlines() if "denied" in line)
    assert "function=orders" in denial, denial
    assert "names=BILLING_KEY" in denial, denial
    worker.exit()


# --- 8. a function name no scope mentions ------------------------------------------------------


@needs_root
def test_registering_a_function_no_scope_names_warns_loudly(
    broker: Broker, launcher: Launcher
) -> None:
    """`--function ordrs` (a typo of "orders"): the registration is kept (the name still labels
    audit records; a reload may add its scope) but the shim prints a warning on the worker's
    stderr, the broker logs one, and the audit record carries it."""
    worker = launcher.worker(function="ordrs")
    warning = (
        'no [[scope]] has function = "ordrs" (known: "orders"): this worker gets only what '
        "scopes without a function matcher grant it"
    )
    assert worker.stderr().splitlines() == [f"secretd-shim: warning: {warning}"]
    assert worker.get("ORDERS_DB")["error"] == "PermissionDenied"
    assert worker.whoami()["function"] == "ordrs"
    wait_until(lambda: warning in broker.log(), 30, "the warning in the broker's log")
    assert " WARN " in next(line for line in broker.log().splitlines() if warning in line)

    def registrations() -> list[dict[str, object]]:
        return [r for r in broker.audit_records() if r.get("rpc") == "RegisterWorker"]

    wait_until(lambda: bool(registrations()), 30, "the RegisterWorker audit record")
    record = registrations()[-1]
    assert record["decision"] == "allow", record
    assert record["function"] == "ordrs", record
    assert f"warning: {warning}" in str(record["reason"]), record
    worker.exit()
    # A function the policy names registers without a word.
    quiet = launcher.worker(function="orders")
    assert quiet.stderr() == ""
    quiet.exit()


# --- 9. the shim honours SECRETD_SOCKET --------------------------------------------------------


def _shim_worker(launcher: Launcher, shim_args: list[str], env: dict[str, str]) -> Worker:
    argv = [
        str(launcher.bins.shim),
        "--user",
        str(WORKER_UID),
        "--group",
        str(WORKER_UID),
        "--function",
        "orders",
        *shim_args,
        "--",
        *launcher.staged.argv("worker_prog.py"),
    ]
    return launcher.worker_via(argv, env)


@needs_root
def test_the_shim_takes_the_socket_from_its_environment(
    make_broker: BrokerFactory, launcher: Launcher, sandbox: Sandbox
) -> None:
    """Flag > SECRETD_SOCKET > default, as the client does: the socket is given once. The
    registration goes to that socket, and the worker is handed the same path."""
    broker = make_broker()
    worker = _shim_worker(launcher, [], {"SECRETD_SOCKET": str(broker.socket)})
    assert worker.get("ORDERS_DB")["ok"] is True
    assert f"SECRETD_SOCKET={broker.socket}".encode() in environ_of(worker.pid).split(b"\0")
    worker.exit()
    # --socket wins over the environment (here pointing nowhere).
    worker = _shim_worker(
        launcher,
        ["--socket", str(broker.socket)],
        {"SECRETD_SOCKET": str(sandbox.root / "elsewhere.sock")},
    )
    assert worker.get("ORDERS_DB")["ok"] is True
    worker.exit()
    # A relative SECRETD_SOCKET is refused, naming where it came from.
    result = subprocess.run(
        [
            str(launcher.bins.shim),
            "--user",
            str(WORKER_UID),
            "--group",
            str(WORKER_UID),
            "--",
            "/bin/true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SECRETD_SOCKET": "run/secretd.sock"},
        check=False,
    )
    assert result.returncode == 125
    assert result.stderr == (
        "secretd-shim: SECRETD_SOCKET (from the environment) must be an absolute path, got "
        '"run/secretd.sock"\n'
    )
