"""The demo's unauthorized caller: same kind of process, not launched as the function.

It asks for ORDERS_DB and prints one JSON line with the outcome (never a value).
"""

from __future__ import annotations

import json
import os

import secretd


def main() -> None:
    outcome: dict[str, object] = {"pid": os.getpid(), "uid": os.getuid()}
    try:
        secretd.get("ORDERS_DB")
        outcome["result"] = "allowed"
    except secretd.SecretdError as exc:
        outcome["result"] = type(exc).__name__
        outcome["message"] = str(exc)
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
