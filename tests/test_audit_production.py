"""Contract section 10: an audit log production can run — reopened for logrotate with nothing
lost, a real full disk (a small tmpfs) in both `on_failure` modes, a stalled reader with the
queue (and the broker's memory) bounded, and an operator log that summarises denials instead
of repeating the audit log. Real broker, real files, real signals; the calls come from the
test process (root, matched by a uid scope) through the Python client, or from another uid."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    DEFAULT_SCOPES,
    INTRUDER_UID,
    Binaries,
    Broker,
    HostSecrets,
    Processes,
    Sandbox,
    Scope,
    StagedLib,
    broker_config,
    leaked_values,
    needs_root,
    run_as,
    wait_until,
)

import secretd

pytestmark = needs_root

# The test process (root) reads PROBE_* (none exist: NOT_FOUND, audited with the name) and
# ORDERS_* (values) through this scope.
ROOT_SCOPE = Scope("root", ["PROBE_*", "ORDERS_*"], {"uid": 0})

# Counts of this many lines in the operator log mean one per episode, not one per call.
FAILED = "audit log write failed"
RECOVERED = "audit log writes succeed again"
FULL = "audit queue full"
ROOM = "the audit queue has room again"

# Generous bounds that only stop a hang; nothing is gated on speed.
WAIT = 60.0


def start(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    host_secrets: HostSecrets,
    audit_log: Path,
    audit: str = "",
) -> Broker:
    """A broker whose audit log is `audit_log`, with `audit` appended as its [audit] section."""
    sandbox.run_dir.mkdir(mode=0o755, exist_ok=True)
    text = broker_config(sandbox, [*DEFAULT_SCOPES, ROOT_SCOPE], [0])
    text = text.replace(
        f"audit_log = {json.dumps(str(sandbox.audit_log))}",
        f"audit_log = {json.dumps(str(audit_log))}",
    )
    sandbox.config.write_text(text + (f"\n[audit]\n{audit}\n" if audit else ""))
    broker = Broker(bins, sandbox, processes, host_secrets.host_environment())
    broker.start()
    return broker


def client(broker: Broker) -> secretd.Client:
    # No retries: each call is answered by the broker once, as it decides now.
    return secretd.Client(str(broker.socket), timeout=30, retry=secretd.Retry(total=0))


def status(broker: Broker) -> dict[str, Any]:
    result = broker.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    audit = json.loads(result.stdout)["audit"]
    assert isinstance(audit, dict)
    return audit


def probe(c: secretd.Client, name: str) -> str:
    """One GetSecret: 'value', 'not_found' or 'unavailable' (with the fixed message)."""
    try:
        c.get_bytes(name)
        return "value"
    except secretd.NotFound:
        return "not_found"
    except secretd.Unavailable as e:
        message = str(e)
    assert "audit log unavailable" in message, message
    return "unavailable"


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit file, each of which must be a whole JSON object."""
    out = []
    for line in path.read_bytes().splitlines():
        out.append(json.loads(line))  # a torn or doubled line fails here
    return out


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------------------------------------
# logrotate: rename + SIGHUP / `secretd reload`, with a caller busy across the switch
# ---------------------------------------------------------------------------------------------

BUSY = """
import sys, secretd
c = secretd.Client(sys.argv[1], timeout=30, retry=secretd.Retry(total=0))
stop = sys.argv[2]
import os
i = 0
while not os.path.exists(stop):
    try:
        c.get_bytes(f"PROBE_{i:07d}")
    except secretd.NotFound:
        pass
    i += 1
print(i, flush=True)
"""


@pytest.mark.parametrize("how", ["sighup", "reload"])
def test_reopen_after_rename_loses_nothing_with_a_busy_caller(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    host_secrets: HostSecrets,
    how: str,
) -> None:
    audit = sandbox.audit_log
    broker = start(bins, sandbox, processes, host_secrets, audit)
    stop = sandbox.root / "stop-busy"
    busy = processes.start(
        [sys.executable, "-c", BUSY, str(broker.socket), str(stop)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ""},
    )

    def probes(path: Path) -> list[int]:
        return [
            int(r["names"][0][len("PROBE_") :])
            for r in records(path)
            if r.get("pid") == busy.pid and r["names"]
        ]

    wait_until(lambda: len(probes(audit)) >= 300, WAIT, "the busy caller's records")
    rotated = sandbox.root / "audit.jsonl.1"
    os.rename(audit, rotated)
    if how == "sighup":
        os.kill(broker.pid, signal.SIGHUP)
    else:
        result = broker.cli("reload")
        assert result.returncode == 0, result.stderr
        # `reload` returns once the broker has switched: the rotated file is complete.
        assert audit.exists()
    wait_until(
        lambda: audit.exists() and len(probes(audit)) >= 300, WAIT, "records in the new file"
    )
    assert status(broker)["reopens"] == 1
    stop.touch()
    out, _ = busy.communicate(timeout=WAIT)
    made = int(out)
    assert broker.stop() == 0
    old, new = probes(rotated), probes(audit)
    assert old
    assert new
    # Every call once, in order; all of the old file's before all of the new file's.
    assert old + new == list(range(made)), (len(old), len(new), made)
    if how == "reload":
        assert any(r["rpc"] == "Reload" for r in records(audit))
    assert "audit log reopened" in broker.log()


def test_reload_reports_an_audit_file_it_cannot_reopen(
    bins: Binaries, sandbox: Sandbox, processes: Processes, host_secrets: HostSecrets
) -> None:
    """logrotate's postrotate sees the failure; records keep going to the file still open."""
    broker = start(bins, sandbox, processes, host_secrets, sandbox.audit_log)
    rotated = sandbox.root / "audit.jsonl.1"
    os.rename(sandbox.audit_log, rotated)
    os.symlink(rotated, sandbox.audit_log)  # never followed
    result = broker.cli("reload")
    assert result.returncode != 0
    assert "configuration reloaded, but failed to open the audit log" in result.stderr
    assert "symbolic link" in result.stderr
    c = client(broker)
    assert probe(c, "PROBE_AFTER") == "not_found"
    assert broker.stop() == 0
    assert any(r["names"] == ["PROBE_AFTER"] for r in records(rotated))


# ---------------------------------------------------------------------------------------------
# A real full disk: the audit file on a small tmpfs, filled, then emptied
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(sandbox: Sandbox) -> Iterator[Path]:
    mount = sandbox.root / "auditfs"
    mount.mkdir(mode=0o755)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr}")
    try:
        yield mount
    finally:
        # The broker (which holds the file open) is stopped by then: tests stop it, and the
        # processes fixture kills what is left before the sandbox goes.
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the tmpfs is full; returns it (delete it to make room)."""
    filler = disk / "filler"
    failed = OSError()
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                failed = e
                break
    assert failed.errno == errno.ENOSPC, failed
    # The last bytes: smaller writes until not even one fits.
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0")
    return filler


@pytest.mark.parametrize("mode", ["deny", "serve"])
def test_full_disk(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    host_secrets: HostSecrets,
    small_disk: Path,
    mode: str,
) -> None:
    audit = small_disk / "audit.jsonl"
    max_queue = 200
    broker = start(
        bins,
        sandbox,
        processes,
        host_secrets,
        audit,
        f'on_failure = "{mode}"\nmax_queue = {max_queue}',
    )
    c = client(broker)
    assert probe(c, "PROBE_BEFORE") == "not_found"
    filler = fill(small_disk)

    # Calls go on until the writer has seen the disk full (their records are in its hands).
    answers: list[str] = []
    for i in range(5000):
        answers.append(probe(c, f"PROBE_{i:05d}"))
        if mode == "deny" and answers[-1] == "unavailable":
            break
        if mode == "serve" and i >= 20 and status(broker)["state"] == "failing":
            break
    s = status(broker)
    assert s["state"] == "failing", s
    assert s["write_failures"] == 1
    assert "No space left on device" in s["last_error"], s
    assert s["last_error_time"]

    # Now: many calls, and a value-bearing one.
    burst = [probe(c, f"PROBE_X{i:05d}") for i in range(400)]
    got_value = probe(c, "ORDERS_DB")
    s = status(broker)
    assert s["queue_depth"] <= max_queue, s
    assert s["queue_peak"] <= max_queue, s
    if mode == "deny":
        # Refused from the failure on: no value left the broker.
        assert set(burst) == {"unavailable"}
        assert got_value == "unavailable"
        assert s["calls_refused"] >= 401, s
    else:
        assert set(burst) == {"not_found"}
        assert got_value == "value"
        assert s["calls_refused"] == 0
        # More calls than the queue holds: the rest were dropped and counted.
        assert s["records_dropped"] >= 400 - max_queue, s
    # One line for the whole episode, not one per call.
    assert broker.log().count(FAILED) == 1, broker.log()

    # Room again: recovery needs nobody.
    filler.unlink()
    wait_until(lambda: status(broker)["state"] == "ok", WAIT, "recovery")
    assert probe(c, "PROBE_AFTER") == "not_found"
    assert probe(c, "ORDERS_DB") == "value"
    assert broker.log().count(RECOVERED) == 1, broker.log()
    s = status(broker)
    assert broker.stop() == 0

    lines = records(audit)  # every line whole: the retry went on from the byte it stopped at
    names = [r["names"][0] for r in lines if r["names"]]
    assert names[0] == "PROBE_BEFORE"
    assert names[-1] == "ORDERS_DB"
    probes = [n for n in names if n.startswith("PROBE_")]
    assert len(probes) == len(set(probes))  # nothing written twice
    if mode == "deny":
        # What was accepted before the failure was seen is kept; the refused calls are on
        # record as refusals (the queue had room for them).
        for i, answer in enumerate(answers):
            if answer != "unavailable":
                assert f"PROBE_{i:05d}" in names
        refusals = [r for r in lines if r.get("reason") == "audit log unavailable"]
        assert len(refusals) >= 1
        assert all(r["decision"] == "deny" for r in refusals)
        assert s["records_dropped"] == 0 or s["queue_peak"] == max_queue
    else:
        assert len(lines) >= s["records_written"] - 1  # the Status call's own record after
    everything = [*host_secrets.all_values()]
    assert leaked_values(audit.read_bytes() + broker.log().encode(), everything) == []


# ---------------------------------------------------------------------------------------------
# A stalled reader: the audit log is a FIFO whose reader is stopped (SIGSTOP)
# ---------------------------------------------------------------------------------------------

# 256 names per call: each record holds ~3 KiB of names, so an unbounded queue would show.
MANY = [f"PROBE_{i:06d}" for i in range(256)]


@pytest.mark.parametrize("mode", ["deny", "serve"])
def test_stalled_reader_keeps_the_queue_and_memory_bounded(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    host_secrets: HostSecrets,
    mode: str,
) -> None:
    """The audit log is a FIFO whose only reader (this test) reads nothing: the broker's
    writes block as on a stalled disk. Then a reader (`cat`) catches up."""
    fifo = sandbox.root / "audit.fifo"
    os.mkfifo(fifo, 0o600)
    idle_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        max_queue = 100
        broker = start(
            bins,
            sandbox,
            processes,
            host_secrets,
            fifo,
            f'on_failure = "{mode}"\nmax_queue = {max_queue}',
        )
        c = client(broker)
        assert probe(c, "PROBE_FIRST") == "not_found"
        rss_before = vm_rss_kib(broker.pid)
        answers = []
        for _ in range(2000):
            try:
                c.get_many(MANY)
                answers.append("served")
            except secretd.NotFound:
                answers.append("served")
            except secretd.Unavailable as e:
                answers.append("unavailable" if "audit log unavailable" in str(e) else str(e))
        rss_after = vm_rss_kib(broker.pid)
        s = status(broker)
        assert s["state"] == "queue full", s
        assert s["queue_depth"] <= max_queue, s
        assert s["queue_peak"] <= max_queue, s
        # The pipe holds 64 KiB (~20 records), the queue 100: of 2,000 calls most had no room.
        assert s["records_dropped"] >= 1500, s
        if mode == "deny":
            assert answers.count("unavailable") >= 1500
            assert s["calls_refused"] == answers.count("unavailable")
        else:
            assert answers == ["served"] * 2000
            assert s["calls_refused"] == 0
        # ~100 waiting records of ~3 KiB, not 2,000: memory stayed flat (an unbounded queue
        # grows by tens of MiB here).
        assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
        assert broker.log().count(FULL) == 1, broker.log()

        out = sandbox.root / "audit.out"
        with open(out, "wb") as sink:
            reader = processes.start(["cat", str(fifo)], stdout=sink)
        wait_until(lambda: status(broker)["state"] == "ok", WAIT, "the reader to catch up")
        assert probe(c, "PROBE_LAST") == "not_found"
        assert broker.log().count(ROOM) == 1, broker.log()
        s = status(broker)
        assert broker.stop() == 0
    finally:
        os.close(idle_reader)
    wait_until(lambda: reader.poll() is not None, WAIT, "cat to see the end of the FIFO")
    written = records(out)
    assert len(written) >= s["records_written"]
    assert written[0]["names"] == ["PROBE_FIRST"]
    assert any(r["names"] == ["PROBE_LAST"] for r in written)


# ---------------------------------------------------------------------------------------------
# The operator log is not a second audit log
# ---------------------------------------------------------------------------------------------

PROBER = """
import sys
sys.path.insert(0, sys.argv[2])
import secretd
c = secretd.Client(sys.argv[1], retry=secretd.Retry(total=0))
denied = 0
for i in range(1000):
    try:
        c.get_bytes(f"GUESS_{i:04d}")
    except secretd.PermissionDenied:
        denied += 1
print(denied)
"""


def test_a_caller_probing_names_writes_a_bounded_number_of_log_lines(
    bins: Binaries,
    sandbox: Sandbox,
    processes: Processes,
    host_secrets: HostSecrets,
    staged: StagedLib,
) -> None:
    broker = start(bins, sandbox, processes, host_secrets, sandbox.audit_log)
    result = run_as(
        INTRUDER_UID,
        [str(staged.python), "-s", "-E", "-c", PROBER, str(broker.socket), str(staged.lib)],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"1000"
    assert broker.stop() == 0  # the interval's summary is written at shutdown

    # Every denial is in the audit log…
    denials = [
        r
        for r in broker.audit_records()
        if r["uid"] == INTRUDER_UID and r["decision"] == "deny" and r["rpc"] == "GetSecret"
    ]
    assert len(denials) == 1000
    # …and the operator log has the first in full and one summary with the count.
    mine = [
        line
        for line in re.sub(r"\x1b\[[0-9;]*m", "", broker.log()).splitlines()
        if f"uid={INTRUDER_UID}" in line or f"uid {INTRUDER_UID}" in line
    ]
    assert len(mine) == 2, "\n".join(mine)
    assert "GUESS_0000" in mine[0]
    assert re.search(rf"uid {INTRUDER_UID}: 999 more calls refused", mine[1]), mine[1]
    assert "GUESS_" not in mine[1]
    assert leaked_values(broker.log().encode(), host_secrets.all_values()) == []
