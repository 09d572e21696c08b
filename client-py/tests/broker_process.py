"""Start a real `secretd serve` on a temp socket for the integration tests and the benchmark.

Secrets come from the broker's environment (`[sources.env] include = ["APP_*", "OTHER_*"]`);
scope "tests" gives this uid `APP_*`, scope "nobody" gives uid 65534 only `APP_PUBLIC`.
"""

from __future__ import annotations

import os
import pathlib
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from types import TracebackType

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = REPO / "target" / "x86_64-unknown-linux-gnu"

SECRETS = {
    "APP_DB": "postgres://orders:hunter2-s3cret@db.internal:5432/orders",
    "APP_CACHE": "redis://:pässwörd@cache:6379/0",
    "APP_PUBLIC": "not-so-secret-public-value",
    "APP_BINARY": "\udcff\udcfekey",  # non-UTF-8 bytes, via surrogateescape
    "OTHER_TOKEN": "tok_out_of_scope_0123456789",
}

CONFIG = """\
[server]
socket = "{socket}"
socket_mode = "0666"
admin_uids = [{admin}]
audit_log = "{audit}"

[sources.env]
include = ["APP_*", "OTHER_*"]

[[scope]]
name = "tests"
uid = {uid}
secrets = ["APP_*"]

[[scope]]
name = "nobody"
uid = 65534
secrets = ["APP_PUBLIC"]
"""


def find_secretd() -> pathlib.Path | None:
    """$SECRETD_BIN_DIR/secretd (what `make test` exports), else the newest local build."""
    bin_dir = os.environ.get("SECRETD_BIN_DIR")
    if bin_dir and (pathlib.Path(bin_dir) / "secretd").is_file():
        return pathlib.Path(bin_dir) / "secretd"
    found = [TARGET / p / "secretd" for p in ("release", "debug")]
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def broker_skip_reason() -> str | None:
    """Why no broker can be started here (None: it can)."""
    binary = find_secretd()
    if binary is None:
        return "no secretd binary: run `make build` (or cargo build -p secretd)"
    probe = subprocess.run(
        [str(binary), "serve", "--help"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"{binary} has no working `serve` command yet"
    return None


class Broker:
    """One broker process on a fresh socket directory; `stop()` (or `with`) cleans up all."""

    def __init__(self, secrets: Mapping[str, str] = SECRETS) -> None:
        binary = find_secretd()
        if binary is None:
            raise RuntimeError("no secretd binary: run `make build`")
        self.binary = binary
        self.secrets = dict(secrets)
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="secretd-py-"))
        os.chmod(self.dir, 0o755)  # the broker refuses a socket dir others may write
        self.socket = str(self.dir / "secretd.sock")
        self.audit = self.dir / "audit.jsonl"
        self.config = self.dir / "secretd.toml"
        # Admin is this uid (root in CI): a non-root `make test` can drive the admin API too.
        self.config.write_text(
            CONFIG.format(socket=self.socket, audit=self.audit, uid=os.getuid(), admin=os.geteuid())
        )
        self.log = self.dir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        """Start the broker and wait for READY on --ready-fd."""
        read_end, write_end = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "RUST_LOG": "warn"}
        env.update(self.secrets)  # os.fsencode turns the surrogate escapes back into bytes
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "serve",
                    "--config",
                    str(self.config),
                    "--socket",
                    self.socket,
                    "--ready-fd",
                    str(write_end),
                ],
                env=env,
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], timeout)
            line = os.read(read_end, 64) if ready else b""
        finally:
            os.close(read_end)
        if line != b"READY\n":
            self.stop_process(signal.SIGKILL)
            raise RuntimeError(f"secretd did not become ready: {self.log.read_text()[-2000:]}")

    def stop_process(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` and wait for the broker to exit (SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop(self) -> None:
        self.stop_process(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)
