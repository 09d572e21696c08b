#!/usr/bin/env python3
"""OpenBao HA and fleet-cost benchmarks (issue #14): a benchmark, not a test.

    .venv/bin/python bench/openbao_ha.py [--baseline PATH/TO/secretd] [--secrets N]
        [--cycles N] [--rounds N] [--failovers N] [--json OUT]

  E. refresh-cycle cost with --secrets mapped secrets (one KV path each: one GET per secret)
     against a `bao server -dev -dev-tls`: Admin.Refresh() wall time and the broker's CPU time
     per cycle; with --baseline, the same for that (older) binary, interleaved round by round
     (each round starts each broker afresh), so both meet the same machine noise.
  F. failover: a real 3-node Raft cluster over TLS (tests/openbao_cluster.py), the broker
     listing all three nodes with `refresh = "1s"` and AppRole auth. The active node is
     SIGKILLed; measured: the cluster's election (kill -> a node reports active) and the
     broker's recovery (kill -> the first successful refresh, Status `last_success`, on
     another node). Repeated --failovers times (a killed node is restarted and rejoins).
  G. what one broker costs the cluster: requests per refresh cycle per mapped secret, and
     logins and token renewals per hour, counted by the server's audit log (file device)
     while a broker with 10 secrets on 10 paths runs with refresh = "1s" and a token TTL of
     12s for 60 s, then scaled to an hour.

Binaries: $SECRETD_BIN_DIR, else target/x86_64-unknown-linux-gnu/release.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

import rotation  # noqa: E402
from openbao_cluster import Cluster, find_bao  # noqa: E402


def start_process(argv: list[str], **kwargs: Any) -> Any:
    import subprocess

    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


# --- E: refresh-cycle cost ----------------------------------------------------------------------


def bench_cycle(
    bins: dict[str, Path], secrets: int, cycles: int, rounds: int
) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="secretd-ha-cycle-"))
    tmp.chmod(0o755)
    bao_root = tmp / "bao"
    bao_root.mkdir(mode=0o700)
    bao = rotation.Bao(bao_root)
    try:
        items = [(f"bench/many/s{i:05d}", "v") for i in range(secrets)]
        for path, key in items:
            bao.put(path, {key: os.urandom(16).hex()})
        mapping = "\n".join(f'S{i:05d} = "{p}#{k}"' for i, (p, k) in enumerate(items))
        walls: dict[str, list[float]] = {label: [] for label in bins}
        cpus: dict[str, list[float]] = {label: [] for label in bins}
        for r in range(rounds):
            order = list(bins.items())
            if r % 2:
                order.reverse()
            for label, binary in order:
                root = tmp / f"{label}-{r}"
                root.mkdir()
                b = rotation.Broker(binary, root, bao, "1h", mapping)
                try:
                    b.refresh()  # warm up
                    for _ in range(cycles):
                        c0, t0 = b.cpu_s(), time.monotonic()
                        assert b.refresh() == secrets
                        walls[label].append(time.monotonic() - t0)
                        cpus[label].append(b.cpu_s() - c0)
                finally:
                    b.stop()
        out: dict[str, dict[str, float]] = {}
        for label in bins:
            out[label] = {
                "wall_p50_ms": statistics.median(walls[label]) * 1000,
                "wall_p90_ms": sorted(walls[label])[int(0.9 * len(walls[label]))] * 1000,
                "cpu_p50_ms": statistics.median(cpus[label]) * 1000,
                "cycles": len(walls[label]),
            }
            print(
                f"E  refresh cycle, {secrets} secrets on {secrets} paths, {label:<8}: wall p50 "
                f"{out[label]['wall_p50_ms']:.0f} ms (p90 {out[label]['wall_p90_ms']:.0f}), "
                f"broker CPU p50 {out[label]['cpu_p50_ms']:.0f} ms/cycle "
                f"({len(walls[label])} cycles)"
            )
        return out
    finally:
        bao.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# --- F: failover ----------------------------------------------------------------------------------


class HaBroker:
    """The broker against the cluster, AppRole auth, refresh 1 s."""

    def __init__(self, binary: Path, root: Path, cluster: Cluster, token_ttl: str, paths: int):
        secret_id = root / "secret-id"
        role_id = cluster.setup_approle(secret_id, token_ttl=token_ttl)
        for i in range(paths):
            cluster.put(f"apps/p{i:03d}", "k=v0")
        mapping = "\n".join(f'S{i:03d} = "apps/p{i:03d}#k"' for i in range(paths))
        self.root = root
        self.socket = root / "run" / "secretd.sock"
        uid = os.geteuid()
        addresses = json.dumps([n.address for n in cluster.nodes])
        config = root / "secretd.toml"
        config.write_text(
            f"""[server]
socket = "{self.socket}"
admin_uids = [{uid}]
audit_log = "{root / "audit.jsonl"}"

[sources.env]
include = []

[sources.openbao]
address = {addresses}
ca_file = "{cluster.ca}"
refresh = "1s"

[sources.openbao.auth]
method = "approle"
role_id = "{role_id}"
secret_id_file = "{secret_id}"

[sources.openbao.secrets]
{mapping}

[[scope]]
name = "bench"
uid = {uid}
secrets = ["*"]
"""
        )
        import grpc

        from secretd._proto import secretd_pb2 as pb
        from secretd._proto import secretd_pb2_grpc as pb_grpc

        self.pb = pb
        read_fd, write_fd = os.pipe()
        self.log = open(root / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start_process(
            [str(binary), "serve", "--config", str(config), "--socket", str(self.socket),
             "--ready-fd", str(write_fd)],
            env={"RUST_LOG": "info"}, pass_fds=(write_fd,), stdout=self.log, stderr=self.log,
        )  # fmt: skip
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            if r.read(6) != b"READY\n":
                self.proc.wait(timeout=30)
                raise RuntimeError((root / "broker.log").read_text(errors="replace"))
        self.channel = grpc.insecure_channel(
            f"unix://{self.socket}", options=[("grpc.default_authority", "localhost")]
        )
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]

    def source(self) -> Any:
        st = self.admin.Status(self.pb.StatusRequest(), timeout=10)
        return next(s for s in st.sources if s.name == "openbao")

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def parse_time(s: str) -> float:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def bench_failover(binary: Path, runs: int) -> dict[str, Any]:
    bao = find_bao()
    if bao is None:
        raise RuntimeError("no bao binary")
    tmp = Path(tempfile.mkdtemp(prefix="secretd-ha-failover-"))
    tmp.chmod(0o755)
    croot = tmp / "cluster"
    croot.mkdir(mode=0o700)
    cluster = Cluster(bao, croot, start_process)
    broker: HaBroker | None = None
    elections: list[float] = []
    recoveries: list[float] = []
    try:
        broot = tmp / "broker"
        broot.mkdir()
        broker = HaBroker(binary, broot, cluster, "1h", 10)
        for _ in range(runs):
            leader = cluster.wait_active()
            # Let the broker settle on a live node with a fresh success.
            time.sleep(2.5)
            killed_wall = time.time()
            killed = time.monotonic()
            cluster.kill(leader)
            new = cluster.wait_active()
            elections.append(time.monotonic() - killed)
            deadline = time.monotonic() + 120
            while True:
                s = broker.source()
                if (
                    s.last_success
                    and parse_time(s.last_success) > killed_wall + 0.001
                    and (s.node != leader.address)
                ):
                    recoveries.append(parse_time(s.last_success) - killed_wall)
                    break
                assert time.monotonic() < deadline, "no recovery within 120 s"
                time.sleep(0.02)
            print(
                f"F  failover: election {elections[-1]:.2f} s; broker's first successful refresh "
                f"after the kill {recoveries[-1]:.2f} s (now on {s.node}, new active "
                f"{new.address}, {s.failovers} failovers so far)"
            )
            # Bring the killed node back as a standby for the next run.
            cluster.start_node(leader)
            cluster.unseal(leader)
            cluster._wait(lambda: len(cluster.standbys()) == 2, "the old leader to rejoin")
        return {
            "election_s": elections,
            "recovery_s": recoveries,
            "recovery_p50_s": statistics.median(recoveries),
        }
    finally:
        if broker is not None:
            broker.stop()
        cluster.stop_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# --- G: cost to the cluster ---------------------------------------------------------------------


def bench_cluster_cost(binary: Path, seconds: float) -> dict[str, Any]:
    bao = find_bao()
    if bao is None:
        raise RuntimeError("no bao binary")
    tmp = Path(tempfile.mkdtemp(prefix="secretd-ha-cost-"))
    tmp.chmod(0o755)
    croot = tmp / "cluster"
    croot.mkdir(mode=0o700)
    audit = croot / "audit.log"
    cluster = Cluster(bao, croot, start_process, audit=audit)
    broker: HaBroker | None = None
    try:
        broot = tmp / "broker"
        broot.mkdir()
        paths = 10
        broker = HaBroker(binary, broot, cluster, "12s", paths)
        start_lines = len(audit.read_text().splitlines())
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        lines = audit.read_text().splitlines()[start_lines:]
        counts: dict[str, int] = {}
        for line in lines:
            rec = json.loads(line)
            if rec.get("type") != "request":
                continue
            path = rec["request"]["path"]
            kind = (
                "kv_read" if path.startswith("secret/data/apps/")
                else "login" if path.endswith("/login")
                else "renew" if path == "auth/token/renew-self"
                else path
            )  # fmt: skip
            counts[kind] = counts.get(kind, 0) + 1
        cycles = counts.get("kv_read", 0) / paths
        per_hour = 3600 / elapsed
        out = {
            "seconds": elapsed,
            "counts": counts,
            "cycles": cycles,
            "requests_per_cycle_per_secret": (
                sum(counts.values()) / cycles / paths if cycles else None
            ),
            "logins_per_hour_ttl12s": counts.get("login", 0) * per_hour,
            "renewals_per_hour_ttl12s": counts.get("renew", 0) * per_hour,
        }
        print(
            f"G  cluster cost over {elapsed:.0f} s, 10 secrets on 10 paths, refresh 1s, token TTL "
            f"12s: {counts}; {cycles:.0f} cycles -> "
            f"{out['requests_per_cycle_per_secret']:.2f} requests per cycle per mapped secret"
        )
        return out
    finally:
        if broker is not None:
            broker.stop()
        cluster.stop_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--baseline", type=Path, help="an older secretd binary to compare in E")
    ap.add_argument("--secrets", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--cost-seconds", type=float, default=60.0)
    ap.add_argument("--only", choices=["cycle", "failover", "cost"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    binary = rotation.find_bins()
    result: dict[str, Any] = {"secretd": str(binary)}
    if args.only in (None, "cycle"):
        bins = {"current": binary}
        if args.baseline:
            bins = {"baseline": args.baseline, "current": binary}
        result["cycle"] = bench_cycle(bins, args.secrets, args.cycles, args.rounds)
    if args.only in (None, "failover"):
        result["failover"] = bench_failover(binary, args.failovers)
    if args.only in (None, "cost"):
        result["cost"] = bench_cluster_cost(binary, args.cost_seconds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
