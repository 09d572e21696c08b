"""4. `secretd scan` reports a planted leak (a process started with a brokered value in its
environment or on its command line) and nothing else, and exits 3 while it finds one and 0 once
the machine is clean (so it can gate a cron job or CI)."""

from __future__ import annotations

from harness import (
    INTRUDER_UID,
    SCAN_FOUND_LEAK,
    SYSTEM_PYTHON,
    Broker,
    HostSecrets,
    Launcher,
    Processes,
    cmdline_of,
    drop_to,
    environ_of,
    needs_root,
    wait_until,
)

pytestmark = needs_root

SLEEPER = "import time; time.sleep(600)"


def test_scan_reports_planted_leaks_and_nothing_else(
    broker: Broker, launcher: Launcher, processes: Processes, host_secrets: HostSecrets
) -> None:
    orders_db = host_secrets.values["ORDERS_DB"]
    billing_key = host_secrets.values["BILLING_KEY"]

    # The old way: a process started with a connection string in its environment (another uid).
    env_leak = processes.start(
        [str(SYSTEM_PYTHON), "-I", "-c", SLEEPER],
        env={"PATH": "/usr/bin:/bin", "LEGACY_DB_URL": orders_db},
        **drop_to(INTRUDER_UID),
    )
    # And one with a secret on its command line (root).
    argv_leak = processes.start([str(SYSTEM_PYTHON), "-I", "-c", SLEEPER, billing_key])
    # A proper worker that fetched values over the socket must not be reported.
    worker = launcher.worker()
    assert worker.get("ORDERS_DB")["ok"] is True
    worker.spawn_child()

    wait_until(lambda: orders_db.encode() in environ_of(env_leak.pid), 30, "env leak exec")
    wait_until(lambda: billing_key.encode() in cmdline_of(argv_leak.pid), 30, "argv leak exec")

    hits = {hit.pid: hit for hit in broker.scan()}
    assert sorted(hits) == sorted([env_leak.pid, argv_leak.pid]), hits
    assert (hits[env_leak.pid].environ, hits[env_leak.pid].cmdline) == (["ORDERS_DB"], [])
    assert hits[env_leak.pid].uid in (INTRUDER_UID, -1)
    assert (hits[argv_leak.pid].environ, hits[argv_leak.pid].cmdline) == ([], ["BILLING_KEY"])

    # Names, never values, in either output format.
    for fmt in (("scan", "--json"), ("scan",)):
        result = broker.cli(*fmt)
        # A leak is exit status 3 in either format, so `secretd scan` can gate cron and CI.
        assert result.returncode == SCAN_FOUND_LEAK, result.stderr
        assert str(env_leak.pid) in result.stdout
        for value in host_secrets.values.values():
            assert value not in result.stdout
            assert value not in result.stderr

    # Once the leaking processes are gone, the machine is clean.
    env_leak.kill()
    argv_leak.kill()
    env_leak.wait()
    argv_leak.wait()
    assert broker.scan() == []
    clean = broker.cli("scan")
    assert clean.returncode == 0, clean.stderr
    worker.exit()
