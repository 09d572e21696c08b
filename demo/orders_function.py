"""The demo's function: what an "orders" serverless function looks like with secretd.

It is started by `secretd-shim --function orders`, so its environment holds only
SECRETD_SOCKET and PATH. It fetches its connection string from the broker, parses it, opens
the SQLite database it names (read-only) and reports what it found as one JSON line. It also
tries a secret outside its scope. It then waits for one line on stdin before exiting, so the
demo can look at its /proc/<pid>/environ while it is alive.

Nothing printed here contains the connection string.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import secretd


def open_orders_db(dsn: str) -> sqlite3.Connection:
    """`sqlite:///abs/path.db?mode=ro&password=...`: SQLite has no passwords; the token in the
    query string stands for the credential a real connection string would carry."""
    url = urlsplit(dsn)
    if url.scheme != "sqlite":
        raise ValueError("ORDERS_DB is not an sqlite:// connection string")
    mode = parse_qs(url.query).get("mode", ["ro"])[0]
    return sqlite3.connect(f"file:{url.path}?mode={mode}", uri=True)


def main() -> None:
    report: dict[str, Any] = {"pid": os.getpid(), "uid": os.getuid(), "env": sorted(os.environ)}
    dsn = secretd.get("ORDERS_DB")
    with open_orders_db(dsn) as db:
        count, total = db.execute("SELECT count(*), sum(total) FROM orders").fetchone()
    report.update(orders=count, total=round(total, 2))
    try:
        secretd.get("BILLING_API_KEY")
        report["billing"] = "allowed"
    except secretd.PermissionDenied:
        report["billing"] = "PermissionDenied"
    me = secretd.whoami()
    report.update(function=me.function, scopes=list(me.scopes))
    print(json.dumps(report), flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
