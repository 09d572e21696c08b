"""What an operator relies on around the main job: config checks with file:line:column, a
reload that applies a good policy and rejects a bad one, refusing an unsafe socket directory or
a live socket, and the shim's exit codes when it cannot do what it was asked."""

from __future__ import annotations

import os
import signal
import stat
import subprocess

from harness import (
    DEFAULT_SCOPES,
    WORKER_UID,
    Binaries,
    Broker,
    BrokerFactory,
    HostSecrets,
    Launcher,
    Sandbox,
    Scope,
    broker_config,
    needs_root,
    wait_until,
)

pytestmark = needs_root


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else {"PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_check_accepts_the_test_policy_and_names_the_line_of_a_bad_key(
    bins: Binaries, sandbox: Sandbox
) -> None:
    sandbox.config.write_text(broker_config(sandbox, DEFAULT_SCOPES, [0]))
    good = run([str(bins.secretd), "check", "--config", str(sandbox.config)])
    assert good.returncode == 0, good.stdout + good.stderr

    bad = sandbox.root / "bad.toml"
    bad.write_text('[server]\nsocket = "/run/x.sock"\nsocket_mod = "0666"\n')
    result = run([str(bins.secretd), "check", "--config", str(bad)])
    assert result.returncode == 1
    assert f"{bad}:3:1" in result.stderr + result.stdout, result.stderr
    assert "socket_mod" in result.stderr + result.stdout


def test_reload_applies_a_good_policy_and_keeps_the_old_one_on_a_bad_file(
    broker: Broker, launcher: Launcher, sandbox: Sandbox, host_secrets: HostSecrets
) -> None:
    worker = launcher.worker()
    assert worker.get("SHARED_CACHE_URL")["ok"] is True

    # A narrower policy through Admin.Reload (`secretd reload`): SHARED_* is taken away.
    narrower = [Scope("orders", ["ORDERS_*"], {"function": "orders"}), DEFAULT_SCOPES[1]]
    sandbox.config.write_text(broker_config(sandbox, narrower, [0]))
    result = broker.cli("reload")
    assert result.returncode == 0, result.stderr
    assert worker.get("SHARED_CACHE_URL")["error"] == "PermissionDenied"
    assert worker.get("ORDERS_DB")["sha256"] == host_secrets.sha256("ORDERS_DB")

    # A broken file is rejected, both by `secretd reload` and by SIGHUP; the policy stays.
    sandbox.config.write_text(sandbox.config.read_text() + "\n[[scope]]\nname = 42\n")
    assert broker.cli("reload").returncode != 0
    logged = broker.log().lower().count("reload")
    os.kill(broker.pid, signal.SIGHUP)
    wait_until(lambda: broker.log().lower().count("reload") > logged, 30, "a logged reload")
    assert broker.proc is not None
    assert broker.proc.poll() is None, "a bad reload must not stop the broker"
    assert worker.get("ORDERS_DB")["sha256"] == host_secrets.sha256("ORDERS_DB")
    assert worker.get("SHARED_CACHE_URL")["error"] == "PermissionDenied"
    worker.exit()


def test_refuses_a_socket_directory_others_can_write(
    make_broker: BrokerFactory, sandbox: Sandbox, bins: Binaries, host_secrets: HostSecrets
) -> None:
    sandbox.run_dir.mkdir(mode=0o755)
    sandbox.run_dir.chmod(0o777)
    sandbox.config.write_text(broker_config(sandbox, DEFAULT_SCOPES, [0]))
    result = run(
        [str(bins.secretd), "serve", "--config", str(sandbox.config)],
        env=host_secrets.host_environment(),
    )
    assert result.returncode != 0
    assert str(sandbox.run_dir) in result.stderr
    assert not sandbox.socket.exists()


def test_a_second_broker_does_not_take_over_a_live_socket(
    broker: Broker, bins: Binaries, sandbox: Sandbox, host_secrets: HostSecrets
) -> None:
    result = run(
        [str(bins.secretd), "serve", "--config", str(sandbox.config)],
        env=host_secrets.host_environment(),
    )
    assert result.returncode != 0
    assert str(sandbox.socket) in result.stderr
    assert broker.cli("status").returncode == 0, "the first broker must keep serving"


def test_shim_exit_codes(bins: Binaries, sandbox: Sandbox) -> None:
    ids = ["--user", str(WORKER_UID), "--group", str(WORKER_UID)]
    marker = sandbox.root / "ran"
    cases = [
        # PROGRAM not found: 127; not executable: 126.
        ([*ids, "--", "/nonexistent/program"], 127),
        ([*ids, "--", "/etc/passwd"], 126),
        # --function with no broker to register with: an error, never a silent fallback.
        (
            [
                "--socket",
                str(sandbox.socket),
                "--function",
                "orders",
                *ids,
                "--",
                "/bin/touch",
                str(marker),
            ],
            125,
        ),
        # Root only when asked for explicitly.
        (["--", "/bin/touch", str(marker)], 125),
    ]
    for args, code in cases:
        result = run([str(bins.shim), *args])
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith("secretd-shim: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists(), "PROGRAM ran although the shim failed"


def test_socket_is_root_owned_with_the_configured_mode(broker: Broker) -> None:
    info = os.stat(broker.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o666)
    parent = os.stat(broker.socket.parent)
    assert (parent.st_uid, stat.S_IMODE(parent.st_mode)) == (0, 0o755)
