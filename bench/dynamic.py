#!/usr/bin/env python3
"""Dynamic credentials benchmarks (issue #15): a benchmark, not a test — nothing is gated on time.

    .venv/bin/python bench/dynamic.py [--rotations N] [--steady SECONDS]

Against a throwaway PostgreSQL, a real `bao server -dev -dev-tls` with the database engine
and the real broker (the test suite's fixtures: tests/postgres.py, tests/test_openbao.py,
tests/test_dynamic.py):

  A. forced rotation -> working connection: `secretd refresh ORDERS_DB` is sent (Admin.Refresh
     over gRPC, as the CLI does) and the clock runs until the example function
     (demo/following_pool.py, psycopg 3, watching in this process) holds a *new* PostgreSQL
     connection and `select current_user` on it returns the new user. Also reported: the
     Refresh call alone (new lease read + publish).
  B. steady-state OpenBao request rate per dynamic secret: the broker runs for --steady seconds
     with a role of default_ttl 6 s, max_ttl 30 s (rotate_before 5 s, revoke_grace 2 s); the
     broker's own debug log counts each OpenBao call it makes (lease read, renew, revoke; token
     renew, login) — OpenBao 2.x cannot enable an audit device on a dev server through its API.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "demo")]

from following_pool import FollowingPool  # noqa: E402
from harness import Binaries, Processes, Sandbox, find_bin_dir  # noqa: E402
from openbao_cluster import find_bao  # noqa: E402
from postgres import Postgres, find_pg_bin  # noqa: E402
from test_dynamic import database_engine, start_broker  # noqa: E402
from test_openbao import Bao  # noqa: E402

import secretd  # noqa: E402
from secretd._proto import secretd_pb2 as pb  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


class Admin:
    """Admin.Refresh over one kept-open channel, as `secretd refresh` sends it."""

    def __init__(self, socket_path: Path) -> None:
        import grpc

        from secretd._proto import secretd_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(
            f"unix://{socket_path}", options=[("grpc.default_authority", "localhost")]
        )
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]

    def refresh(self, name: str) -> int:
        return int(self.admin.Refresh(pb.RefreshRequest(name=name), timeout=30).refreshed)

    def close(self) -> None:
        self.channel.close()


def forced_rotation(
    bins: Binaries, root: Path, processes: Processes, pg: Postgres, bao_bin: Path, n: int
) -> dict[str, object]:
    sandbox = Sandbox(root / "a")
    sandbox.root.mkdir(mode=0o755)
    bao_dir = sandbox.root / "bao"
    bao_dir.mkdir(mode=0o700)
    bao = Bao(bao_bin, bao_dir, processes)
    database_engine(bao, pg, ttl="1h", max_ttl="2h")
    broker = start_broker(bins, sandbox, processes, bao, pg, revoke_grace="1s")
    client = secretd.Client(socket_path=broker.socket)
    admin = Admin(broker.socket)
    pool = FollowingPool("ORDERS_DB", client)
    total: list[float] = []
    call: list[float] = []
    try:
        assert pool.wait_generation(1, 30)
        for i in range(n):
            with pool.connection() as conn:
                row = conn.execute("select current_user").fetchone()
                before = row[0] if row else None
            t0 = time.perf_counter()
            admin.refresh("ORDERS_DB")
            t1 = time.perf_counter()
            assert pool.wait_generation(i + 2, 30), "no new connection within 30 s"
            with pool.connection() as conn:
                row = conn.execute("select current_user").fetchone()
                after = row[0] if row else None
            t2 = time.perf_counter()
            assert after
            assert after != before
            call.append((t1 - t0) * 1000)
            total.append((t2 - t0) * 1000)
            time.sleep(0.2)
    finally:
        pool.close()
        admin.close()
        client.close()
        broker.stop()
    return {
        "rotations": n,
        "refresh_call_ms": {"p50": statistics.median(call), "p90": pct(call, 90)},
        "to_new_connection_ms": {
            "p50": statistics.median(total),
            "p90": pct(total, 90),
            "max": max(total),
        },
    }


def steady_rate(
    bins: Binaries, root: Path, processes: Processes, pg: Postgres, bao_bin: Path, seconds: float
) -> dict[str, object]:
    sandbox = Sandbox(root / "b")
    sandbox.root.mkdir(mode=0o755)
    bao_dir = sandbox.root / "bao"
    bao_dir.mkdir(mode=0o700)
    bao = Bao(bao_bin, bao_dir, processes)
    database_engine(bao, pg, ttl="6s", max_ttl="30s")
    # Debug level: the broker logs each lease call (read, renew, revoke) and token call.
    broker = start_broker(
        bins,
        sandbox,
        processes,
        bao,
        pg,
        rotate_before="5s",
        revoke_grace="2s",
        extra_config='\n[log]\nlevel = "secretd=debug"\n',
    )
    client = secretd.Client(socket_path=broker.socket)
    versions = 0
    it = client.watch("ORDERS_DB")
    next(it)

    def count() -> None:
        nonlocal versions
        with contextlib.suppress(secretd.SecretdError):
            for _ in it:
                versions += 1

    threading.Thread(target=count, daemon=True).start()
    # The window starts after start-up (its read is not steady state) and ends before SIGTERM.
    before = broker.log().count("\n")
    started = time.monotonic()
    time.sleep(seconds)
    window = broker.log().splitlines()[before:]
    elapsed = time.monotonic() - started
    broker.stop()
    client.close()
    calls = {
        "read (new credentials)": "dynamic secret: new credentials",
        "renew": "dynamic secret: lease renewed",
        "revoke": "dynamic secret: lease revoked",
        "token renew": "OpenBao token renewed",
        "login": "logged in to OpenBao",
    }
    by_call = {k: sum(needle in line for line in window) for k, needle in calls.items()}
    minutes = elapsed / 60
    return {
        "seconds": round(elapsed, 1),
        "role": "default_ttl 6s, max_ttl 30s; rotate_before 5s, revoke_grace 2s",
        "requests_per_minute": round(sum(by_call.values()) / minutes, 1),
        "by_call_per_minute": {k: round(v / minutes, 1) for k, v in by_call.items()},
        "rotations_seen_by_watcher_per_minute": round(versions / minutes, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--steady", type=float, default=60.0)
    args = parser.parse_args()
    bin_dir, bao_bin, pg_bin = find_bin_dir(), find_bao(), find_pg_bin()
    missing = [
        what
        for what, ok in [("secretd build", bin_dir), ("bao", bao_bin), ("PostgreSQL", pg_bin)]
        if ok is None
    ]
    if missing:
        print(json.dumps({"skipped": f"missing: {', '.join(missing)}"}))
        return 0
    assert bin_dir
    assert bao_bin
    assert pg_bin
    bins = Binaries(secretd=bin_dir / "secretd", shim=bin_dir / "secretd-shim")
    processes = Processes()
    root = Sandbox.create().root
    try:
        pg = Postgres(pg_bin, root / "pg", processes.start)
        result = {
            "forced_rotation": forced_rotation(bins, root, processes, pg, bao_bin, args.rotations),
            "steady_state": steady_rate(bins, root, processes, pg, bao_bin, args.steady),
        }
        pg.stop()
    finally:
        processes.cleanup()
        Sandbox(root).remove()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())
