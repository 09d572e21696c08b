"""3. An unprivileged process cannot read the broker's environ or mem, nor ptrace it."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from harness import (
    BUSYBOX,
    NOBODY_UID,
    SYSTEM_PYTHON,
    Broker,
    HostSecrets,
    leaked_values,
    missing,
    needs_root,
    run_as,
)

pytestmark = needs_root

PROBE = r"""
import ctypes, json, os, sys
pid = int(sys.argv[1])
out = {}
for what in ("environ", "mem"):
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            f.read(4096)
        out[what] = "read"
    except OSError as e:
        out[what] = e.errno
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
for name, request in (("ptrace_attach", PTRACE_ATTACH), ("ptrace_seize", PTRACE_SEIZE)):
    rc = libc.ptrace(request, pid, None, None)
    out[name] = "attached" if rc == 0 else ctypes.get_errno()
print(json.dumps(out))
"""


def test_unprivileged_process_cannot_read_environ_or_mem_nor_ptrace(
    broker: Broker, host_secrets: HostSecrets
) -> None:
    result = run_as(NOBODY_UID, [str(SYSTEM_PYTHON), "-I", "-c", PROBE, str(broker.pid)])
    assert result.returncode == 0, result.stderr.decode()
    outcome = json.loads(result.stdout)
    assert outcome == {
        "environ": errno.EACCES,
        "mem": errno.EACCES,
        "ptrace_attach": errno.EPERM,
        "ptrace_seize": errno.EPERM,
    }, outcome


def test_busybox_cat_of_broker_environ_is_refused(
    broker: Broker, host_secrets: HostSecrets
) -> None:
    if not BUSYBOX.exists():
        missing("busybox-static is not installed (.ci/run installs it)")
    result = run_as(NOBODY_UID, [str(BUSYBOX), "cat", f"/proc/{broker.pid}/environ"])
    assert result.returncode != 0
    assert b"Permission denied" in result.stderr, result.stderr
    assert leaked_values(result.stdout, host_secrets.all_values()) == []


def test_broker_never_dumps_core(broker: Broker) -> None:
    limits = Path(f"/proc/{broker.pid}/limits").read_text().splitlines()
    core = next(line for line in limits if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
