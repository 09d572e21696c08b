"""Supervisor mode (contract §9): `secretd serve [flags] -- PROGRAM [ARG]...` on the host.

The broker starts PROGRAM once READY with its environment minus every brokered variable,
reaps orphans (it is a child subreaper; in a container it is PID 1), forwards SIGTERM/SIGINT,
and exits with PROGRAM's status. Checked on real processes through /proc, no container needed
(tests/test_image.py runs the same chain as PID 1 in a container).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    DEFAULT_SCOPES,
    SYSTEM_PYTHON,
    TESTS_DIR,
    Binaries,
    Broker,
    HostSecrets,
    Processes,
    Sandbox,
    broker_config,
    cmdline_of,
    environ_names,
    environ_of,
    leaked_values,
    needs_root,
    proc_stat_fields,
    wait_until,
)

pytestmark = needs_root

PROGRAM = TESTS_DIR / "supervised_prog.py"
PYTHON = str(SYSTEM_PYTHON if SYSTEM_PYTHON.exists() else Path(sys.executable))
EXIT_TIMEOUT = 30.0


class Supervised:
    def __init__(self, broker: Broker, report: Path) -> None:
        self.broker = broker
        self.report = report

    def lines(self) -> list[str]:
        try:
            return self.report.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_line(self, prefix: str) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines() if line.startswith(prefix)]
            return bool(found)

        wait_until(seen, EXIT_TIMEOUT, f"{prefix!r} in the program's report")
        return found[0]

    def child_pid(self) -> int:
        return int(self.wait_line("started ").split()[1])

    def wait_exit(self) -> int:
        assert self.broker.proc is not None
        return self.broker.proc.wait(timeout=EXIT_TIMEOUT)


SuperviseFactory = Callable[..., Supervised]


@pytest.fixture
def supervise(
    bins: Binaries, sandbox: Sandbox, processes: Processes, host_secrets: HostSecrets
) -> SuperviseFactory:
    def start(*args: str, program: list[str] | None = None) -> Supervised:
        sandbox.run_dir.mkdir(mode=0o755, exist_ok=True)
        sandbox.config.write_text(broker_config(sandbox, DEFAULT_SCOPES, (0,)))
        report = sandbox.root / "report.txt"
        broker = Broker(bins, sandbox, processes, host_secrets.host_environment())
        broker.program = program or [PYTHON, "-s", str(PROGRAM), str(report), *args]
        broker.start()
        return Supervised(broker, report)

    return start


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_program_gets_the_environment_minus_brokered_variables(
    supervise: SuperviseFactory, host_secrets: HostSecrets, sandbox: Sandbox
) -> None:
    run = supervise("wait")
    child = run.child_pid()
    assert children_of(run.broker.pid) == [child]
    environ = environ_of(child)
    assert leaked_values(environ + cmdline_of(child), host_secrets.all_values()) == []
    passed = run.broker.env
    # Everything [sources.env] did not take passes through, values intact; SECRETD_SOCKET is added.
    expected = sorted([n for n in passed if n not in host_secrets.values] + ["SECRETD_SOCKET"])
    assert environ_names(environ) == expected
    assert f"UNBROKERED_TOKEN={passed['UNBROKERED_TOKEN']}".encode() in environ.split(b"\0")
    assert f"SECRETD_SOCKET={sandbox.socket}".encode() in environ.split(b"\0")
    # The broker itself still holds nothing in its own block.
    assert leaked_values(environ_of(run.broker.pid), host_secrets.all_values()) == []


def test_sigterm_is_forwarded_and_the_status_returned(
    supervise: SuperviseFactory, sandbox: Sandbox
) -> None:
    run = supervise("wait", "7")
    run.child_pid()
    os.kill(run.broker.pid, signal.SIGTERM)
    assert run.wait_exit() == 7
    assert "signal SIGTERM" in run.lines()
    assert not sandbox.socket.exists(), "the broker removed its socket on the way out"


def test_sigint_is_forwarded(supervise: SuperviseFactory) -> None:
    run = supervise("wait")
    run.child_pid()
    os.kill(run.broker.pid, signal.SIGINT)
    assert run.wait_exit() == 0
    assert "signal SIGINT" in run.lines()


def test_the_broker_serves_until_program_exits(supervise: SuperviseFactory) -> None:
    # While PROGRAM runs the broker answers; SIGTERM does not stop it before PROGRAM is gone.
    run = supervise("wait")
    run.child_pid()
    status = run.broker.cli("status")
    assert status.returncode == 0, status.stderr


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_status_propagates(supervise: SuperviseFactory, sandbox: Sandbox, code: int) -> None:
    run = supervise("exit", str(code))
    assert run.wait_exit() == code
    assert not sandbox.socket.exists()
    assert "stopped" in run.broker.log()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_killed_program_gives_128_plus_signal(
    supervise: SuperviseFactory, sig: signal.Signals
) -> None:
    run = supervise("die", str(int(sig)))
    assert run.wait_exit() == 128 + int(sig)


def test_orphans_are_reaped(supervise: SuperviseFactory) -> None:
    run = supervise("orphan")
    run.child_pid()
    _, grandchild, _, ppid = run.wait_line("grandchild ").split()
    # Orphaned, it was re-parented to the broker (a child subreaper, as PID 1 would be) ...
    assert int(ppid) == run.broker.pid

    # ... which reaps it once it exits: no zombie stays behind.
    def gone() -> bool:
        fields = proc_stat_fields(int(grandchild))
        return fields is None

    wait_until(gone, EXIT_TIMEOUT, f"orphan {grandchild} to be reaped")
    os.kill(run.broker.pid, signal.SIGTERM)
    assert run.wait_exit() == 0


def test_program_not_found_is_127_with_one_clear_line(
    bins: Binaries, sandbox: Sandbox, host_secrets: HostSecrets
) -> None:
    missing = sandbox.root / "no-such-program"
    result = run_to_end(bins, sandbox, host_secrets, [str(missing), "arg"])
    assert result.returncode == 127
    assert (
        f"secretd: cannot start PROGRAM {missing}: No such file or directory (os error 2)"
        in result.stderr.splitlines()
    ), result.stderr
    assert not sandbox.socket.exists()


def test_program_not_executable_is_126(
    bins: Binaries, sandbox: Sandbox, host_secrets: HostSecrets
) -> None:
    plain = sandbox.root / "not-executable"
    plain.write_text("data\n")
    plain.chmod(0o644)
    result = run_to_end(bins, sandbox, host_secrets, [str(plain)])
    assert result.returncode == 126
    assert f"secretd: cannot start PROGRAM {plain}: Permission denied" in result.stderr


def run_to_end(
    bins: Binaries, sandbox: Sandbox, host_secrets: HostSecrets, program: list[str]
) -> subprocess.CompletedProcess[str]:
    sandbox.run_dir.mkdir(mode=0o755, exist_ok=True)
    sandbox.config.write_text(broker_config(sandbox, DEFAULT_SCOPES, (0,)))
    return subprocess.run(
        [str(bins.secretd), "serve", "--config", str(sandbox.config), "--", *program],
        env=host_secrets.host_environment(),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )
