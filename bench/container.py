#!/usr/bin/env python3
"""`docker run` to a function holding its secret: secretd supervisor mode vs os.environ.

    .venv/bin/python bench/container.py [--runs N]

Builds the example image (deploy/image/build.py) on a private dockerd (tests/container_engine.py:
own data-root and socket, no bridge, no iptables; stopped afterwards), then times, interleaved:
  secretd   `docker run --rm --network none -e ORDERS_DB=… IMAGE --once`: secretd (PID 1)
            starts, wipes, serves; the shim registers and drops to `func`; Python imports the
            client and calls secretd.get
  environ   the same image, `--entrypoint /usr/bin/python3.11 --user func … --from-environ
            --once`: the platform's default, the secret read from os.environ
  environ+import   the same, also importing the client (grpcio, protobuf): what of the
            difference is Python import time rather than the broker
Wall time of the whole `docker run` (container create, start, run, exit, remove) and the image
size. Prints a small table; exits 0 with a note when docker/mmdebstrap are missing.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from container_engine import Engine, missing_prerequisites, private_engine  # noqa: E402

TAG = "secretd-example:bench"


def bin_dir() -> Path:
    import os

    env = os.environ.get("SECRETD_BIN_DIR")
    return Path(env) if env else REPO / "target" / "x86_64-unknown-linux-gnu" / "release"


def timed_run(engine: Engine, args: list[str], expect: str) -> float:
    started = time.perf_counter()
    result = engine.docker("run", "--rm", "--network", "none", *args, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or expect not in result.stdout:
        raise SystemExit(f"bench: docker run {args[-3:]} failed:\n{result.stdout}{result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    missing = missing_prerequisites()
    if missing:
        print(f"container bench skipped: not installed: {', '.join(missing)}")
        return 0
    value = f"postgresql://orders:{secrets.token_hex(16)}@db.internal:5432/orders"
    with private_engine() as engine:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(REPO / "deploy" / "image" / "build.py"),
                "--bin-dir",
                str(bin_dir()),
                "--context",
                str(engine.root / "context"),
                "--tag",
                TAG,
            ],
            env=dict(engine.env),
            check=True,
        )
        build_s = time.perf_counter() - started
        size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout)
        broker = ["-e", f"ORDERS_DB={value}", TAG, "--once"]
        environ = [
            "--entrypoint",
            "/usr/bin/python3.11",
            "--user",
            "func",
            "-e",
            f"ORDERS_DB={value}",
            TAG,
            "-I",
            "/app/function.py",
            "--from-environ",
            "--once",
        ]
        environ_import = [*environ, "--import-client"]
        # One warm-up each (page cache, overlay layers), then interleaved runs.
        timed_run(engine, broker, "received via secretd.get")
        timed_run(engine, environ, "received via os.environ")
        times: dict[str, list[float]] = {"secretd": [], "environ": [], "environ_import": []}
        for _ in range(args.runs):
            times["secretd"].append(timed_run(engine, broker, "received via secretd.get"))
            times["environ"].append(timed_run(engine, environ, "received via os.environ"))
            times["environ_import"].append(
                timed_run(engine, environ_import, "received via os.environ")
            )
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"image {TAG}: {size / 1e6:.1f} MB; context staged and built in {build_s:.0f} s")
    print(f"docker run → function holding its secret, median of {args.runs} (min-max), ms:")
    for key, label in [
        ("secretd", "secretd serve -- shim -- python (secretd.get)"),
        ("environ", "python reading os.environ (platform default)"),
        ("environ_import", "  … and importing the client (grpcio, protobuf)"),
    ]:
        lo, hi = min(times[key]) * 1000, max(times[key]) * 1000
        print(f"  {label:<48} {med[key]:7.0f}  ({lo:.0f}-{hi:.0f})")
    print(f"  secretd - environ: {med['secretd'] - med['environ']:+.0f} ms "
          f"({med['secretd'] / med['environ']:.2f}x); of which client import "
          f"{med['environ_import'] - med['environ']:+.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
