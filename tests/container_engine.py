"""A private Docker engine for tests and benchmarks: never the host's default one.

`dockerd` with its own data-root, exec-root, socket and pid file, and
`--iptables=false --ip-masq=false --bridge=none`, so the host's network is left as it was (no
docker0 bridge, no iptables chains, FORWARD policy untouched). Stopped by pid on exit, even
when the body fails; its mounts and files are removed. The client is Debian's
`/usr/bin/docker` (another `docker` earlier on PATH may lack the classic builder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DOCKER = Path("/usr/bin/docker")
DOCKERD = Path("/usr/sbin/dockerd")
START_TIMEOUT = 60.0


@dataclass
class Engine:
    """A running private dockerd and the client environment that talks to it."""

    root: Path
    env: Mapping[str, str]

    def docker(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(DOCKER), *args],
            env=dict(self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
            )
        return result


def missing_prerequisites() -> list[str]:
    """What this machine lacks to build and run the image (empty: nothing)."""
    missing = [f"{p} (Debian package docker.io)" for p in (DOCKER, DOCKERD) if not p.is_file()]
    if shutil.which("mmdebstrap") is None:
        missing.append("mmdebstrap (Debian package mmdebstrap)")
    return missing


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


@contextlib.contextmanager
def private_engine() -> Iterator[Engine]:
    root = Path(tempfile.mkdtemp(prefix="secretd-dockerd-"))
    sock = root / "docker.sock"
    log_path = root / "dockerd.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(DOCKERD),
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--data-root",
                str(root / "data"),
                "--exec-root",
                str(root / "exec"),
                "-H",
                f"unix://{sock}",
                "-p",
                str(root / "dockerd.pid"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_BUILDKIT": "0"}
    engine = Engine(root=root, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while engine.docker("version", check=False, timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the private dockerd did not start:\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.1)
        yield engine
    finally:
        with contextlib.suppress(Exception):
            ids = engine.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                engine.docker("rm", "-f", *ids, check=False, timeout=60)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: dockerd and containerd
            proc.wait(timeout=30)
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
