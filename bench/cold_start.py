#!/usr/bin/env python3
"""What a cold start costs a Python function that reads its secret through secretd.

    .venv/bin/python bench/cold_start.py --socket /run/secretd/secretd.sock --name APP_DB

Every sample is a fresh interpreter (`python -s -c ...`), as a serverless cold start is:

  import       `import secretd` against `import grpc` + the protobuf runtime modules the
               generated code needs (descriptor, descriptor_pool, symbol_database, builder):
               the time the import statement takes inside the child and the RSS it adds over
               a bare interpreter. secretd's own share = (secretd - grpc+protobuf) / secretd.
  first get    `secretd.get(NAME)` right after the import (channel, connect, HTTP/2
               handshake, the call), then a second get on the warm channel, for comparison.
  end to end   the whole process, spawn to exit, for
               `python -c "import secretd; secretd.get(NAME)"` against
               `python -c "import os; os.environ[NAME]"` and a bare `python -c pass`.

Times are CPU time (user + system) unless called wall: on a shared machine a process waits for
a CPU for an unpredictable while, and CPU time is what the work itself costs (on an idle
machine an import's wall time is close to its CPU time). The first get is wall time: it waits
for the broker. Probes run interleaved in rotating rounds; medians are reported. Bytecode is
written on a warm-up run first (as `pip install` does for an installed client), so no probe
compiles. Benchmarks, not tests: bench/run.py prints the rows; nothing fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

_RSS = (
    "def rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmRSS:'):\n"
    "            return int(line.split()[1])\n"
)
DEPS = (
    "import grpc\n"
    "from google.protobuf import descriptor, descriptor_pool, symbol_database\n"
    "from google.protobuf.internal import builder\n"
)
IMPORT_PROBES = {
    "bare": "pass\n",
    "grpc+protobuf": DEPS,
    "secretd": "import secretd\n",
    "secretd+aio": "import secretd, secretd.aio\n",
}


def _import_child(body: str) -> str:
    """Prints the import's CPU and wall seconds and VmRSS (KiB) after it."""
    return (
        "import time, json\n"
        + _RSS
        + "c0 = time.process_time(); t0 = time.perf_counter()\n"
        + body
        + "t1 = time.perf_counter(); c1 = time.process_time()\n"
        "print(json.dumps({'cpu': c1 - c0, 'wall': t1 - t0, 'rss_kib': rss()}))\n"
    )


def _get_child(name: str) -> str:
    """Prints the wall seconds of the first and the second get after `import secretd`."""
    return (
        "import time, json\nimport secretd\nt0 = time.perf_counter()\n"
        f"secretd.get({name!r})\nt1 = time.perf_counter()\nsecretd.get({name!r})\n"
        "t2 = time.perf_counter()\nprint(json.dumps({'first': t1 - t0, 'second': t2 - t1}))\n"
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(python: str, code: str, env: Mapping[str, str]) -> dict[str, Any]:
    """One fresh interpreter: its JSON output plus its wall and CPU seconds, spawn to exit."""
    cpu0 = _children_cpu()
    started = time.perf_counter()
    p = subprocess.run(
        [python, "-s", "-c", code], capture_output=True, text=True, env=dict(env), check=False
    )
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu0
    if p.returncode != 0:
        raise RuntimeError(f"probe failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    out = p.stdout.strip()
    return {**(json.loads(out) if out else {}), "process_wall": wall, "process_cpu": cpu}


def measure(python: str, socket: str, name: str, value: str, runs: int) -> dict[str, Any]:
    """Medians over `runs` rounds (milliseconds, MiB); see the module docstring."""
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    base_env.pop(name, None)
    base_env["SECRETD_SOCKET"] = socket
    end_to_end = {
        "secretd.get": (f"import secretd; secretd.get({name!r})", base_env),
        "os.environ": (f"import os; os.environ[{name!r}]", {**base_env, name: value}),
        "bare": ("pass", base_env),
    }
    probes: dict[str, tuple[str, Mapping[str, str]]] = {
        **{f"import:{k}": (_import_child(v), base_env) for k, v in IMPORT_PROBES.items()},
        "get": (_get_child(name), base_env),
        **{f"e2e:{k}": v for k, v in end_to_end.items()},
    }
    for code, env in probes.values():  # warm-up: bytecode written, page cache filled
        _run(python, code, env)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in probes}
    keys = list(probes)
    for i in range(runs):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            code, env = probes[key]
            samples[key].append(_run(python, code, env))

    def med(key: str, field: str, scale: float = 1000.0) -> float:
        return statistics.median(s[field] for s in samples[key]) * scale

    imports = {
        k: {
            "import_cpu_ms": med(f"import:{k}", "cpu"),
            "import_wall_ms": med(f"import:{k}", "wall"),
            "rss_mib": med(f"import:{k}", "rss_kib", 1 / 1024),
        }
        for k in IMPORT_PROBES
    }
    for v in imports.values():
        v["rss_added_mib"] = v["rss_mib"] - imports["bare"]["rss_mib"]
    deps, own = imports["grpc+protobuf"]["import_cpu_ms"], imports["secretd"]["import_cpu_ms"]
    return {
        "runs": runs,
        "python": python,
        "load_average_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "import": imports,
        "own_share": (own - deps) / own,
        "get_wall_ms": {"first": med("get", "first"), "second": med("get", "second")},
        "end_to_end_cpu_ms": {k: med(f"e2e:{k}", "process_cpu") for k in end_to_end},
        "end_to_end_wall_ms": {k: med(f"e2e:{k}", "process_wall") for k in end_to_end},
    }


def rows(r: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """Table rows for bench/run.py."""
    imp, get = r["import"], r["get_wall_ms"]
    cpu, wall = r["end_to_end_cpu_ms"], r["end_to_end_wall_ms"]
    own, deps, aio = imp["secretd"], imp["grpc+protobuf"], imp["secretd+aio"]
    share = r["own_share"]
    return [
        (
            "9 cold start: import secretd (fresh interpreter)",
            "own share < 10%",
            f"{own['import_cpu_ms']:.0f} ms CPU (wall {own['import_wall_ms']:.0f}), "
            f"+{own['rss_added_mib']:.1f} MiB RSS; grpc+protobuf alone "
            f"{deps['import_cpu_ms']:.0f} ms, +{deps['rss_added_mib']:.1f} MiB; "
            f"secretd's own share {share:.0%}",
            "pass" if share < 0.10 else "MISS",
        ),
        (
            "  import secretd.aio as well (only when used)",
            "info",
            f"{aio['import_cpu_ms']:.0f} ms CPU, +{aio['rss_added_mib']:.1f} MiB RSS",
            "",
        ),
        (
            "9 first secretd.get after the import",
            "info",
            f"{get['first']:.1f} ms wall (connect + call); the next get {get['second']:.2f} ms",
            "",
        ),
        (
            "9 end to end: python -c 'import secretd; secretd.get(N)'",
            "info",
            f"{cpu['secretd.get']:.0f} ms CPU vs os.environ[N] {cpu['os.environ']:.0f} ms "
            f"(+{cpu['secretd.get'] - cpu['os.environ']:.0f}); wall {wall['secretd.get']:.0f} "
            f"vs {wall['os.environ']:.0f} ms",
            "",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="a running broker's socket")
    parser.add_argument("--name", required=True, help="a secret this process may read")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    # The os.environ probe needs a value of about the same size; it is never compared.
    r = measure(args.python, args.socket, args.name, "x" * 64, args.runs)
    print(json.dumps(r, indent=2))
    for row in rows(r):
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
