"""A function whose database pool follows `secretd.watch`: the example of contract §8
"Dynamic credentials" (README: "Dynamic database credentials").

With `[sources.openbao.dynamic.ORDERS_DB]` the broker hands out a PostgreSQL connection string
whose user exists only for this node and a short time. Each rotation (before the lease's max
TTL, after a failed renewal, or `secretd refresh ORDERS_DB`) is pushed to every watcher at once;
the previous user keeps working for `revoke_grace` and is then revoked. So a function must:

1. open its connections from the *current* value, and
2. on a new value, open new connections with it, switch new work to them, and close the old
   connections once the work running on them is done — well within `revoke_grace`.

`FollowingPool` does exactly that with psycopg 3 (`pip install psycopg`; it uses the system's
libpq): a background thread runs `for url in client.watch(name)` and swaps in a fresh
connection for each value; `connection()` lends the current one. The value is never logged,
printed or put in an exception: a failed connect reports only the exception's class.

    pool = FollowingPool("ORDERS_DB")
    with pool.connection() as conn:
        conn.execute("select 1")
    pool.close()

Run as a script it serves a tiny loop for the second demo (`make demo-dynamic`): each line on
stdin is a command (`user` prints the current PostgreSQL user, `wait N` waits for the N-th
connection, `quit`); it answers one JSON object per line, never a value.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psycopg

import secretd


class FollowingPool:
    """One connection at a time, replaced whenever the watched connection string rotates.

    Thread-safe: `connection()` may be called from any thread. A connection being used when
    a rotation arrives finishes its work on the old user and is closed when it is returned;
    new work gets the new connection at once.
    """

    def __init__(self, name: str, client: secretd.Client | None = None) -> None:
        self._name = name
        # A client made here is closed by `close()`, which ends the watch; a client passed in
        # is the caller's to close (the watch thread, a daemon, ends with it).
        self._owns_client = client is None
        self._client = client or secretd.Client()
        self._cond = threading.Condition()
        self._conn: psycopg.Connection[Any] | None = None
        self._generation = 0
        self._lent: dict[int, int] = {}  # id(conn) -> borrowers
        self._retired: list[psycopg.Connection[Any]] = []
        self._error: BaseException | None = None
        self._closed = False
        self._watch = self._client.watch(name)
        self._thread = threading.Thread(target=self._follow, name=f"follow-{name}", daemon=True)
        self._thread.start()

    @property
    def generation(self) -> int:
        """How many connection strings have been connected to so far."""
        with self._cond:
            return self._generation

    def wait_generation(self, n: int, timeout: float) -> bool:
        """Block until the `n`-th connection string is connected (or `timeout` passes)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation >= n or self._closed, timeout)

    def _follow(self) -> None:
        try:
            for url in self._watch:
                # Connect first: until the new connection works, the old one keeps serving.
                try:
                    fresh = psycopg.connect(url, autocommit=True, connect_timeout=10)
                except psycopg.Error as e:
                    # Never the value: psycopg's message can quote the connection string.
                    print(
                        f"{self._name}: connecting with the new value failed ({type(e).__name__});"
                        " keeping the old connection",
                        file=sys.stderr,
                    )
                    continue
                finally:
                    del url
                with self._cond:
                    if self._closed:
                        fresh.close()
                        return
                    old, self._conn = self._conn, fresh
                    self._generation += 1
                    if old is not None:
                        self._retire(old)
                    self._cond.notify_all()
        except BaseException as e:  # handed to the next caller
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _retire(self, conn: psycopg.Connection[Any]) -> None:
        # Called with the lock held: close now if idle, else when the last borrower returns.
        if self._lent.get(id(conn), 0) == 0:
            conn.close()
        else:
            self._retired.append(conn)

    @contextlib.contextmanager
    def connection(self, timeout: float = 30.0) -> Iterator[psycopg.Connection[Any]]:
        """Lend the current connection (waiting up to `timeout` for the first one)."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._conn is not None or self._error is not None or self._closed,
                timeout,
            ):
                raise TimeoutError(f"no connection for {self._name} within {timeout}s")
            if self._conn is None:
                raise secretd.SecretdError(
                    f"{self._name}: the watch ended ({type(self._error).__name__})"
                )
            conn = self._conn
            self._lent[id(conn)] = self._lent.get(id(conn), 0) + 1
        try:
            yield conn
        finally:
            with self._cond:
                left = self._lent[id(conn)] - 1
                if left:
                    self._lent[id(conn)] = left
                else:
                    del self._lent[id(conn)]
                    if conn in self._retired:
                        self._retired.remove(conn)
                        conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conns = [c for c in (self._conn, *self._retired) if c is not None]
            self._conn = None
            self._retired.clear()
            self._cond.notify_all()
        for c in conns:
            c.close()
        if self._owns_client:
            self._client.close()


def main() -> int:
    pool = FollowingPool(sys.argv[1] if len(sys.argv) > 1 else "ORDERS_DB")
    try:
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            answer: dict[str, object]
            if cmd == "user":
                with pool.connection() as conn:
                    row = conn.execute("select current_user").fetchone()
                answer = {
                    "ok": True,
                    "user": row[0] if row else None,
                    "generation": pool.generation,
                }
            elif cmd == "wait":
                ok = pool.wait_generation(int(arg), 60.0)
                answer = {"ok": ok, "generation": pool.generation}
            elif cmd == "quit":
                break
            else:
                answer = {"ok": False, "error": f"unknown command {cmd!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
