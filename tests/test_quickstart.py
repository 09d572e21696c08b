"""The newcomer's path: README.md's quick start, run literally.

The shell blocks of the "Quick start" section are extracted from README.md and run in order,
in one bash, as root, from the root of the clone — `make install`, `make install-client`, the
config, `secretd serve` in the background, the shim starting the function as `nobody` on
`/usr/bin/python3`, the environ check, `secretd scan`, stop. The only change: the first block's
path variables point into a scratch directory, so nothing lands in /usr/local, /etc, /srv or
/run. Then the outcome is checked: the function read its secret as uid 65534, and its
`/proc/<pid>/environ` held no brokered value.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from harness import NOBODY_UID, REPO, Processes, Sandbox, needs_root

pytestmark = needs_root

WORKER_PYTHON = Path("/usr/bin/python3")
# The variables the first block defines, and where this test points them.
PATH_VARIABLES = {
    "PREFIX": "usr/local",
    "CONF": "etc/secretd",
    "APP": "srv/orders",
    "LOG": "var/log/secretd",
    "SECRETD_SOCKET": "run/secretd/secretd.sock",
}
ASSIGNMENT = re.compile(r"^(export )?([A-Z_]+)=(\S+)(\s+#.*)?$")


def quickstart_blocks() -> list[str]:
    """The ```sh blocks between '## Quick start' and the next '## ' heading."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Quick start.*?$(.*?)^## ", text, re.M | re.S)
    assert match, "README.md has no '## Quick start' section"
    return re.findall(r"^```sh\n(.*?)^```$", match.group(1), re.M | re.S)


def with_scratch_paths(block: str, root: Path) -> str:
    """The first block with each path variable's value replaced; every other line as written."""
    seen = set()
    lines = []
    for line in block.splitlines():
        m = ASSIGNMENT.match(line)
        if m and m.group(2) in PATH_VARIABLES:
            name = m.group(2)
            seen.add(name)
            line = f"{m.group(1) or ''}{name}={root / PATH_VARIABLES[name]}"
        lines.append(line)
    assert seen == set(PATH_VARIABLES), f"the first block should set {sorted(PATH_VARIABLES)}"
    return "\n".join(lines) + "\n"


def test_readme_lists_the_blocks_this_test_runs() -> None:
    """Runs as any user: the section exists and its first block names every path it uses."""
    blocks = quickstart_blocks()
    assert len(blocks) >= 5, blocks
    with_scratch_paths(blocks[0], Path("/scratch"))
    later = "".join(blocks[1:])
    for fixed in ("/usr/local", "/etc/secretd", "/srv/orders", "/var/log", "/run/secretd"):
        assert fixed not in later, f"{fixed} is written out after the first block"


# make install-client may download grpcio and protobuf for the worker's interpreter.
@pytest.mark.timeout(900)
def test_quickstart_runs_literally(sandbox: Sandbox, processes: Processes) -> None:
    if not WORKER_PYTHON.exists():
        pytest.skip(f"{WORKER_PYTHON} is not installed (the quick start's worker interpreter)")
    blocks = quickstart_blocks()
    root = sandbox.root
    script = root / "quickstart.sh"
    # -e: a failing step fails the test; -x: the transcript shows which one.
    script.write_text(
        "set -euxo pipefail\n" + with_scratch_paths(blocks[0], root) + "\n".join(blocks[1:])
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETD_")}
    # Run from a file, not `bash -c`: a script on the command line would put the example
    # secret in bash's /proc/<pid>/cmdline, and `secretd scan` would rightly report it.
    proc = processes.start(
        ["bash", str(script)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = proc.communicate(timeout=900)
    transcript = out.decode(errors="replace")
    assert proc.returncode == 0, transcript[-6000:]

    # 5. The function ran as nobody and read its secret over the socket.
    assert f"orders: uid {NOBODY_UID} got ORDERS_DB for db.internal" in transcript, transcript
    # 6. Its environment, as /proc/<pid>/environ showed it: the shim's three variables only.
    socket = root / PATH_VARIABLES["SECRETD_SOCKET"]
    environ = [
        line
        for line in transcript.splitlines()
        if re.match(r"^(SECRETD_SOCKET|PATH|PYTHONPATH)=", line)
    ]
    assert environ == [
        f"SECRETD_SOCKET={socket}",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        f"PYTHONPATH={root / PATH_VARIABLES['PREFIX']}/lib/secretd-python",
    ], transcript
    quoted = re.search(r"ORDERS_DB='([^']+)'", "".join(blocks))
    assert quoted, "the quick start should start the broker with ORDERS_DB='…'"
    secret = quoted.group(1)
    # The value appears in the transcript only where the script itself is echoed (set -x).
    assert not any(
        secret in line for line in transcript.splitlines() if not line.startswith("+")
    ), transcript
    assert "no process holds a brokered value" in transcript, transcript
    # The audit log names the function and the secret it read, never the value.
    audit = (root / PATH_VARIABLES["LOG"] / "audit.jsonl").read_text()
    records = [json.loads(line) for line in audit.splitlines() if line]
    assert any(
        r.get("function") == "orders" and "ORDERS_DB" in r.get("names", []) for r in records
    ), audit
    assert secret not in audit
    # 7. Both stopped: the broker removed its socket.
    assert not socket.exists()
    # Installed where the variables said, world-readable for the worker.
    prefix = root / PATH_VARIABLES["PREFIX"]
    for path in ("bin/secretd", "bin/secretd-shim", "lib/systemd/system/secretd.service"):
        assert (prefix / path).is_file(), path
    assert (prefix / "lib/secretd-python/secretd/__init__.py").stat().st_mode & 0o004
    assert (root / PATH_VARIABLES["CONF"] / "secretd.toml.example").is_file()
