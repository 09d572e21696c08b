#!/usr/bin/env python3
"""`make demo`: the main job of secretd, end to end, on real processes.

1. A broker starts in a temp directory with demo connection strings in *its* environment and a
   demo policy; it wipes that environment.
2. A demo Python function is launched through `secretd-shim --function orders` (as an
   unprivileged user when run as root). It fetches its connection string over the socket and
   uses it: the string names an SQLite database, which it opens and queries.
3. A caller that was not launched as the function is denied.
4. A process started the old way, with the connection string in its environment, is found by
   `secretd scan`.
5. The audit log is shown: every access, never a value.

Each check prints ✔ or ✘; the exit status is non-zero if any fails. Every process and file the
demo starts is removed at the end. Needs only the standard library and the secretd client
(whose grpc/protobuf are staged, world-readable, for the unprivileged function).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(__file__).resolve().parent
TARGET = "x86_64-unknown-linux-gnu"
FUNCTION_UID = 65534  # nobody: the function's uid when the demo runs as root
TIMEOUT = 30.0  # only guards against a hang
SCAN_FOUND_LEAK = 3  # `secretd scan` exit status when a process holds a brokered value


def _utf8_stdout() -> bool:
    return (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"


OK, FAIL = ("✔", "✘") if _utf8_stdout() else ("[ok]", "[FAIL]")


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def check(self, ok: bool, text: str, detail: str = "") -> bool:
        print(f"  {OK if ok else FAIL} {text}")
        for line in detail.splitlines():
            print(f"      {line}")
        if ok:
            self.passed += 1
        else:
            self.failed.append(text)
        return ok

    @staticmethod
    def note(text: str) -> None:
        print(f"    {text}")


def find_bin_dir() -> Path:
    env = os.environ.get("SECRETD_BIN_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO / "target" / TARGET / "release", REPO / "target" / TARGET / "debug"]
    for directory in candidates:
        if (directory / "secretd").is_file() and (directory / "secretd-shim").is_file():
            return directory
    raise SystemExit("secretd binaries not found: run `make build` (or `make demo`) first")


def world_runnable(path: Path) -> bool:
    """Whether a uid with no special rights can execute path (every parent traversable)."""
    real = path.resolve()
    if not real.is_file() or not os.stat(real).st_mode & 0o001:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in real.parents)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"python package {name!r} not found: run `make venv` first")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return Path(spec.origin)


def read_line(proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"{what} gave no answer (exit status {proc.poll()})")
    reply: dict[str, Any] = json.loads(line)
    return reply


def environ_names(blob: bytes) -> list[str]:
    return sorted(item.split(b"=", 1)[0].decode() for item in blob.split(b"\0") if item)


class Demo:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.root_mode = os.geteuid() == 0
        bin_dir = find_bin_dir()
        self.secretd = bin_dir / "secretd"
        self.shim = bin_dir / "secretd-shim"
        self.dir = Path(tempfile.mkdtemp(prefix="secretd-demo-"))
        self.dir.chmod(0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.socket = self.dir / "run" / "secretd.sock"
        self.audit = self.dir / "audit.jsonl"
        self.config = self.dir / "secretd.toml"
        self.lib = self.dir / "lib"
        self.db = self.dir / "data" / "orders.db"
        token = secrets.token_hex(16)
        self.values = {
            "ORDERS_DB": f"sqlite://{self.db}?mode=ro&password={token}",
            "BILLING_API_KEY": f"bk_live_{secrets.token_hex(16)}",
        }
        # What a function host holds: its own settings plus the app's connection strings.
        self.host_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(Path.home()),
            "LANG": "C.UTF-8",
            "FUNCTIONS_WORKER_RUNTIME": "python",
            **self.values,
        }
        self.python = self._interpreter()

    # -- set-up ---------------------------------------------------------------------------

    def _interpreter(self) -> Path:
        if not self.root_mode:
            return Path(sys.executable)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        for candidate in (Path(sys.executable), Path(f"/usr/bin/python{version}")):
            if world_runnable(candidate):
                return candidate
        raise SystemExit(f"no python{version} that uid {FUNCTION_UID} may execute was found")

    def _start(self, argv: Sequence[str | Path], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([str(a) for a in argv], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stage(self) -> None:
        """The database, the config and a world-readable copy of the client for the function."""
        for sub in ("run", "data", "lib"):
            (self.dir / sub).mkdir(mode=0o755)
            (self.dir / sub).chmod(0o755)
        with contextlib.closing(sqlite3.connect(self.db)) as db, db:
            db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL)")
            db.executemany(
                "INSERT INTO orders (customer, total) VALUES (?, ?)",
                [("ada", 19.99), ("grace", 25.00), ("linus", 14.98)],
            )
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        client = REPO / "client-py" / "src" / "secretd"
        shutil.copytree(
            client if client.is_dir() else package_dir("secretd"),
            self.lib / "secretd",
            ignore=ignore,
        )
        shutil.copytree(package_dir("grpc"), self.lib / "grpc", ignore=ignore)
        shutil.copytree(
            package_dir("google.protobuf"), self.lib / "google" / "protobuf", ignore=ignore
        )
        te = package_dir("typing_extensions")
        shutil.copy2(te, self.lib / te.name)
        for program in ("orders_function.py", "unauthorized_caller.py"):
            shutil.copy2(DEMO / program, self.lib / program)
        for dirpath, _dirs, files in os.walk(self.dir):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        admin = 0 if self.root_mode else os.geteuid()
        self.config.write_text(
            "\n".join(
                [
                    "[server]",
                    f'socket = "{self.socket}"',
                    'socket_mode = "0666"',
                    f"admin_uids = [{admin}]",
                    f'audit_log = "{self.audit}"',
                    "",
                    "[sources.env]",
                    'include = ["ORDERS_*", "BILLING_*"]',
                    "",
                    "[[scope]]",
                    'name = "orders"',
                    'function = "orders"',
                    'secrets = ["ORDERS_*"]',
                    "",
                    "[[scope]]",
                    'name = "billing"',
                    'function = "billing"',
                    'secrets = ["BILLING_*"]',
                    "",
                ]
            )
        )
        self.config.chmod(0o600)

    # -- the steps ------------------------------------------------------------------------

    def start_broker(self) -> bool:
        read_fd, write_fd = os.pipe()
        log = open(self.dir / "broker.log", "wb")  # noqa: SIM115 (kept open for the child)
        try:
            self.broker = self._start(
                [
                    self.secretd,
                    "serve",
                    "--config",
                    self.config,
                    "--socket",
                    self.socket,
                    "--ready-fd",
                    str(write_fd),
                ],
                env=self.host_env,
                pass_fds=(write_fd,),
                stdout=log,
                stderr=log,
            )
        finally:
            os.close(write_fd)
            log.close()
        ready, _, _ = select.select([read_fd], [], [], TIMEOUT)
        got = os.read(read_fd, 16) if ready else b""
        os.close(read_fd)
        status = self.cli("status", "--json") if got == b"READY\n" else None
        detail = ""
        if status is not None and status.returncode == 0:
            doc = json.loads(status.stdout)
            detail = (
                f"{doc.get('secrets')} secrets from its environment, {doc.get('scopes')} scopes"
            )
        else:
            detail = (self.dir / "broker.log").read_text(errors="replace")[-2000:]
        return self.report.check(
            got == b"READY\n" and status is not None and status.returncode == 0,
            f"broker up: pid {self.broker.pid}, socket {self.socket}",
            detail,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.secretd), *args, "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def leaks(self, blob: bytes) -> list[str]:
        return [name for name, value in self.values.items() if value.encode() in blob]

    def check_broker_environ(self) -> None:
        assert self.broker is not None
        path = Path(f"/proc/{self.broker.pid}/environ")
        try:
            blob = path.read_bytes()
        except PermissionError:
            # Same uid, but the broker made itself non-dumpable: /proc/<pid>/environ is closed.
            self.report.check(
                True, f"broker environ: {path} is unreadable even to its own uid (non-dumpable)"
            )
            return
        cmdline = Path(f"/proc/{self.broker.pid}/cmdline").read_bytes()
        wiped = set(blob) <= {0} and not self.leaks(blob) and not self.leaks(cmdline)
        self.report.check(
            wiped,
            f"broker environ wiped: {path} is {len(blob)} zero bytes; no value in cmdline",
            "" if wiped else f"still visible: {environ_names(blob)} {self.leaks(blob)}",
        )

    def shim_argv(self, program: str, function: str | None) -> list[str]:
        argv = [str(self.shim), "--socket", str(self.socket)]
        if function:
            argv += ["--function", function]
        if self.root_mode:
            argv += ["--user", str(FUNCTION_UID), "--group", str(FUNCTION_UID)]
        return [*argv, "--", str(self.python), "-s", "-E", str(self.lib / program)]

    def run_function(self) -> None:
        err = open(self.dir / "function.stderr", "wb")  # noqa: SIM115 (kept open for the child)
        with err:
            proc = self._start(
                self.shim_argv("orders_function.py", "orders"),
                env=self.host_env,  # the shim itself gets every secret, like a host's child
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd="/",
            )
        try:
            got = read_line(proc, "the function")
        except (RuntimeError, json.JSONDecodeError) as exc:
            stderr = (self.dir / "function.stderr").read_text(errors="replace")[-2000:]
            self.report.check(False, f"function ran: {exc}", stderr)
            return
        self.report.check(
            got.get("orders") == 3 and got.get("function") == "orders",
            f'function "orders" (pid {got["pid"]}, uid {got["uid"]}) fetched ORDERS_DB and '
            f"opened {self.db.name}: {got.get('orders')} orders, total {got.get('total')}",
        )
        self.report.check(
            got.get("billing") == "PermissionDenied",
            f"the function asking for BILLING_API_KEY (outside its scope): {got.get('billing')}",
        )
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        names = environ_names(environ)
        clean = names == ["PATH", "SECRETD_SOCKET"] and not self.leaks(environ + cmdline)
        self.report.check(
            clean,
            f"worker environ holds only {' and '.join(names)}; no value in environ or cmdline "
            f"(the shim itself was started with {len(self.host_env)} variables, secrets included)",
            "" if clean else f"leaked: {self.leaks(environ + cmdline)}",
        )
        assert proc.stdin is not None
        proc.stdin.write(b"done\n")
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT)

    def run_unauthorized(self) -> None:
        proc = self._start(
            self.shim_argv("unauthorized_caller.py", None),
            env=self.host_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        try:
            got = read_line(proc, "the unauthorized caller")
        except (RuntimeError, json.JSONDecodeError) as exc:
            self.report.check(False, f"unauthorized caller ran: {exc}")
            return
        proc.wait(timeout=TIMEOUT)
        self.report.check(
            got.get("result") == "PermissionDenied",
            f"unauthorized caller (pid {got['pid']}, uid {got['uid']}, not launched with "
            f"--function) asking for ORDERS_DB: {got.get('result')}",
        )

    def run_scan(self) -> None:
        # The old way: a process started with the connection string in its environment.
        kwargs: dict[str, Any] = {}
        if self.root_mode:
            kwargs = {"user": FUNCTION_UID, "group": FUNCTION_UID, "extra_groups": []}
        legacy = self._start(
            [self.python, "-s", "-E", "-c", "import time; time.sleep(300)"],
            env={"PATH": "/usr/bin:/bin", "ORDERS_DB": self.values["ORDERS_DB"]},
            cwd="/",
            **kwargs,
        )
        result = self.cli("scan", "--json")
        human = self.cli("scan")
        hits: list[Mapping[str, Any]] = []
        # Exit status 3: a leak was found (so `secretd scan` can gate a cron job or CI).
        if result.returncode == SCAN_FOUND_LEAK:
            doc = json.loads(result.stdout)
            hits = doc.get("hits", []) if isinstance(doc, dict) else doc
        found = [
            (int(h["pid"]), sorted(h.get("environ", [])), sorted(h.get("cmdline", [])))
            for h in hits
        ]
        output = human.stdout + human.stderr
        ok = (
            found == [(legacy.pid, ["ORDERS_DB"], [])]
            and human.returncode == SCAN_FOUND_LEAK
            and not self.leaks(output.encode())
        )
        self.report.check(
            ok,
            f"secretd scan: finds the planted process (pid {legacy.pid}, ORDERS_DB in its "
            f"environ) and nothing else; exit status {human.returncode} (a leak)",
            output.strip() if ok else f"{found}\n{result.stderr}",
        )
        legacy.kill()
        legacy.wait(timeout=TIMEOUT)

    def show_audit(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        records: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                lines = self.audit.read_bytes().splitlines()
                records = [json.loads(line) for line in lines if line]
            if any(r.get("decision") == "deny" for r in records):
                break
            time.sleep(0.05)
        blob = self.audit.read_bytes() if self.audit.exists() else b""
        allowed = [
            r
            for r in records
            if r.get("function") == "orders"
            and r.get("decision") == "allow"
            and str(r.get("rpc", "")).endswith("GetSecret")
        ]
        denied = [r for r in records if r.get("decision") == "deny"]
        ok = bool(allowed) and bool(denied) and not self.leaks(blob)
        shown = []
        for r in records[-8:]:
            names = r.get("secrets", r.get("names", []))
            shown.append(
                f"{str(r.get('rpc', '?')).rsplit('/', 1)[-1]:<14} pid={r.get('pid')} "
                f"uid={r.get('uid')} function={r.get('function') or '-'} "
                f"names={','.join(names) or '-'} decision={r.get('decision')}"
                + (f" reason={r['reason']}" if r.get("reason") else "")
            )
        if records:
            shown += ["one record as written:", json.dumps(records[-1])[:200]]
        self.report.check(
            ok,
            f"audit log: {len(records)} records with pid, uid, function and decision; no value",
            "\n".join(shown),
        )

    def stop_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGTERM)
        code = self.broker.wait(timeout=TIMEOUT)
        self.report.check(
            code == 0 and not self.socket.exists(),
            f"broker stopped on SIGTERM: exit {code}, socket removed: {not self.socket.exists()}",
        )

    # -- tear-down ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Kill every session the demo started (with any grandchild), then remove its files."""
        for proc in self.procs:
            pids = [proc.pid]
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        stat = Path(f"/proc/{entry}/stat").read_text()
                        if int(stat[stat.rindex(")") + 2 :].split()[3]) == proc.pid:
                            pids.append(int(entry))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=TIMEOUT)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    report = Report()
    demo = Demo(report)
    if demo.root_mode:
        who = f"running as root: the function runs as uid {FUNCTION_UID} (nobody) via secretd-shim"
    else:
        who = (
            f"running as uid {os.geteuid()} (not root): no user switch — the function runs as "
            "your own uid; run as root to see the full privilege drop"
        )
    print(f"secretd demo — {who}")
    print(f"  binaries: {demo.secretd.parent}")
    print(f"  sandbox:  {demo.dir} (removed at the end)\n")
    try:
        demo.stage()
        if demo.start_broker():
            demo.check_broker_environ()
            demo.run_function()
            demo.run_unauthorized()
            demo.run_scan()
            demo.show_audit()
            demo.stop_broker()
    finally:
        demo.cleanup()
    gone = not demo.dir.exists()
    print()
    if report.failed:
        print(f"{FAIL} {len(report.failed)} of {report.passed + len(report.failed)} checks failed:")
        for text in report.failed:
            print(f"    - {text}")
    else:
        print(f"{OK} all {report.passed} checks passed.")
    print(f"cleaned up: {len(demo.procs)} processes ended, sandbox removed: {gone}")
    return 1 if report.failed or not gone else 0


if __name__ == "__main__":
    sys.exit(main())
