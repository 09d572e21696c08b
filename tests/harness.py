"""The end-to-end harness: real binaries, real processes, real uids.

Everything an unprivileged process touches lives in a fresh temp dir under /tmp (0755), never
inside the repo: CI clones the repo into a folder other uids may not be able to traverse, and
the venv's interpreter links into /root (0700). Workers therefore run on the system interpreter
with a world-readable staged copy of the client package and its two dependencies.

Every process the harness starts gets its own session (``start_new_session=True``), and
:class:`Processes` kills each such session — the process, its children and any grandchild
left behind by a parent that exited — when the test ends. Nothing is killed by name or uid.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGET = "x86_64-unknown-linux-gnu"
TESTS_DIR = Path(__file__).resolve().parent

# Numeric ids with no /etc/passwd entry: nothing on the machine owns files under them.
WORKER_UID = 64101  # runs the "orders" function; has no uid scope of its own
BILLING_UID = 64102  # has a uid-only scope, for comparison with function scopes
INTRUDER_UID = 64103  # matches no scope at all
NOBODY_UID = 65534

SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
BUSYBOX = Path("/bin/busybox")

# `secretd scan` exits with this when a process holds a brokered value (0 when none does).
SCAN_FOUND_LEAK = 3

# Generous bounds that only stop a hang; nothing is gated on how fast things are.
READY_TIMEOUT = 30.0
REPLY_TIMEOUT = 30.0


def is_root() -> bool:
    return os.geteuid() == 0


NEEDS_ROOT = "needs root: other uids, admin registration, a non-dumpable broker's /proc files"


def missing(reason: str) -> NoReturn:
    """A prerequisite is missing: under CI (where nothing may quietly not run) the test fails;
    elsewhere it is skipped, and `-ra` lists it with its reason in the summary."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI: a test that cannot run is a failure, not a skip)")
    pytest.skip(reason)


# Decided per test at setup by tests/conftest.py (`missing(NEEDS_ROOT)` when not root), so that
# CI=true without root fails instead of skipping.
needs_root = pytest.mark.needs_root


def write_openbao_config(
    sandbox: Sandbox,
    *,
    address: str | list[str],
    ca: Path,
    refresh: str,
    role_id: str,
    secret_id: Path,
    sources: str,
    extra: str = "",
) -> None:
    """The broker config every OpenBao test uses: AppRole login, no env source, one scope
    "me" for this uid over ORDERS_DB; `sources` is the OpenBao table after `.auth` (static
    mappings or a dynamic secret), `extra` is appended."""
    uid = os.geteuid()
    sandbox.run_dir.mkdir(mode=0o755, exist_ok=True)
    sandbox.config.write_text(
        f"""
[server]
socket = "{sandbox.socket}"
admin_uids = [{uid}]
audit_log = "{sandbox.audit_log}"

[sources.env]
include = []

[sources.openbao]
address = {json.dumps(address)}
ca_file = "{ca}"
refresh = "{refresh}"

[sources.openbao.auth]
method = "approle"
role_id = "{role_id}"
secret_id_file = "{secret_id}"

{sources}
[[scope]]
name = "me"
uid = {uid}
secrets = ["ORDERS_DB"]
{extra}"""
    )


def find_bin_dir() -> Path | None:
    """SECRETD_BIN_DIR if set, else the release build, else the debug build."""
    env = os.environ.get("SECRETD_BIN_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO / "target" / TARGET / "release", REPO / "target" / TARGET / "debug"]
    for directory in candidates:
        if (directory / "secretd").is_file() and (directory / "secretd-shim").is_file():
            return directory
    return None


@dataclass(frozen=True)
class Binaries:
    secretd: Path
    shim: Path


# ---------------------------------------------------------------------------------------------
# Secrets handed to the broker by a host-like parent
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostSecrets:
    """Fresh random values per test, long enough that finding one anywhere is never chance."""

    values: Mapping[str, str]

    @classmethod
    def generate(cls) -> HostSecrets:
        def token() -> str:
            return secrets.token_hex(16)

        return cls(
            {
                "ORDERS_DB": f"postgresql://orders:{token()}@db.internal:5432/orders",
                "ORDERS_API_TOKEN": f"ord_{token()}",
                "SHARED_CACHE_URL": f"redis://:{token()}@cache.internal:6379/0",
                "BILLING_KEY": f"bill_{token()}",
            }
        )

    def host_environment(self) -> dict[str, str]:
        """What a function host (or a supervisor) would hand the broker: secrets and noise."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "HOSTNAME": "e2e-host",
            "FUNCTIONS_WORKER_RUNTIME": "python",
            # Not brokered (no include pattern matches), but still wiped with the whole block.
            "UNBROKERED_TOKEN": f"unbrokered_{secrets.token_hex(16)}",
        }
        env.update(self.values)
        return env

    def all_values(self) -> list[bytes]:
        return [v.encode() for v in self.values.values()]

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.values[name].encode()).hexdigest()


def leaked_values(blob: bytes, values: Sequence[bytes]) -> list[bytes]:
    return [v for v in values if v in blob]


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def count_in_memory(pid: int, values: dict[str, bytes]) -> Counter[str]:
    """How often each value occurs in the readable memory of pid (read as root)."""
    found: Counter[str] = Counter()
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:  # [vvar] and friends
                continue
            for name, value in values.items():
                found[name] += data.count(value)
    return found


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the comm, split after the *last* ')'."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(int(entry))
        # fields[0] is state (stat field 3); session is stat field 6 -> index 3.
        if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


def pid_alive(pid: int) -> bool:
    fields = proc_stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until predicate() is true; a timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Uid line for pid {pid}")


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def cmdline_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def environ_names(blob: bytes) -> list[str]:
    return sorted(item.split(b"=", 1)[0].decode() for item in blob.split(b"\0") if item)


class Processes:
    """Every process a test starts; each in its own session, all killed at teardown."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("close_fds", True)
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self._procs:
            # Grandchildren outlive their parents but keep the session.
            for pid in [proc.pid, *session_members(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()


def drop_to(uid: int, gid: int | None = None) -> dict[str, Any]:
    """Popen keyword arguments that run a child as uid:gid with no supplementary groups."""
    return {"user": uid, "group": uid if gid is None else gid, "extra_groups": []}


# ---------------------------------------------------------------------------------------------
# Files: the sandbox and the staged client library
# ---------------------------------------------------------------------------------------------


def make_public_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def publish_tree(root: Path) -> None:
    """Directories 0755, files 0644 (shared objects need no exec bit to be mapped)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise RuntimeError(f"package {name!r} is not importable in the test interpreter")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return Path(spec.origin)


def world_runnable(path: Path) -> bool:
    """Whether a uid with no special rights can execute path (every parent traversable)."""
    real = path.resolve()
    if not real.is_file() or not real.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in real.parents)


def client_source_dir() -> Path:
    in_repo = REPO / "client-py" / "src" / "secretd"
    return in_repo if in_repo.is_dir() else _package_dir("secretd")


@dataclass
class StagedLib:
    """A world-readable copy of the client, grpc, protobuf and the worker programs.

    Programs live *in* the lib dir, so ``python -s -E <lib>/prog.py`` finds ``secretd`` on
    sys.path[0] without PYTHONPATH: a worker's environment stays exactly what the shim built.
    """

    root: Path
    python: Path

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    def program(self, name: str) -> Path:
        return self.lib / name

    def argv(self, name: str, *args: str) -> list[str]:
        return [str(self.python), "-s", "-E", str(self.program(name)), *args]

    @classmethod
    def create(cls) -> StagedLib:
        root = make_public_dir(Path(tempfile.mkdtemp(prefix="secretd-e2e-lib-")))
        lib = make_public_dir(root / "lib")
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(client_source_dir(), lib / "secretd", ignore=ignore)
        grpc_dir = _package_dir("grpc")
        shutil.copytree(grpc_dir, lib / "grpc", ignore=ignore)
        # google/ is a namespace package: copy only protobuf into it.
        protobuf_dir = _package_dir("google.protobuf")
        shutil.copytree(protobuf_dir, lib / "google" / "protobuf", ignore=ignore)
        te = _package_dir("typing_extensions")
        shutil.copy2(te, lib / te.name)
        for program in ("worker_prog.py", "inherit_prog.py"):
            shutil.copy2(TESTS_DIR / program, lib / program)
        publish_tree(root)
        python = SYSTEM_PYTHON if SYSTEM_PYTHON.exists() else Path(sys.executable)
        return cls(root=root, python=python)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Sandbox:
    """A fresh 0755 dir under /tmp for one test: socket dir, config, logs, worker homes."""

    root: Path

    @classmethod
    def create(cls) -> Sandbox:
        return cls(make_public_dir(Path(tempfile.mkdtemp(prefix="secretd-e2e-"))))

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "secretd.sock"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "secretd.toml"

    def home_for(self, uid: int) -> Path:
        """A private dir the given uid may write (for the inherited-socket proxy)."""
        home = self.root / f"home-{uid}"
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, uid, uid)
        return home

    def public_bins(self, bins: Binaries) -> Binaries:
        """Copies other uids can execute (the repo itself may not be traversable for them)."""
        directory = self.root / "bin"
        if not directory.exists():
            make_public_dir(directory)
            for binary in (bins.secretd, bins.shim):
                shutil.copy2(binary, directory / binary.name)
                (directory / binary.name).chmod(0o755)
        return Binaries(secretd=directory / bins.secretd.name, shim=directory / bins.shim.name)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The broker
# ---------------------------------------------------------------------------------------------


@dataclass
class Scope:
    name: str
    secrets: list[str]
    matchers: dict[str, str | int] = field(default_factory=dict)


DEFAULT_SCOPES = [
    # Only a worker registered as "orders" (and its descendants) gets these.
    Scope("orders", ["ORDERS_*", "SHARED_*"], {"function": "orders"}),
    # A uid-only scope, for comparison.
    Scope("billing", ["BILLING_*"], {"uid": BILLING_UID}),
]


def _toml_value(value: str | int | list[str] | list[int]) -> str:
    if isinstance(value, bool):
        raise TypeError("no booleans in this config")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def broker_config(
    sandbox: Sandbox,
    scopes: Sequence[Scope],
    admin_uids: Sequence[int],
    files_dirs: Sequence[Path] = (),
) -> str:
    lines = [
        "[server]",
        f"socket = {_toml_value(str(sandbox.socket))}",
        'socket_mode = "0666"',
        f"admin_uids = {_toml_value(list(admin_uids))}",
        f"audit_log = {_toml_value(str(sandbox.audit_log))}",
        "",
        "[sources.env]",
        'include = ["ORDERS_*", "BILLING_*", "SHARED_*"]',
    ]
    if files_dirs:
        lines += ["", "[sources.files]", f"dirs = {_toml_value([str(d) for d in files_dirs])}"]
    for scope in scopes:
        lines += ["", "[[scope]]", f"name = {_toml_value(scope.name)}"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in scope.matchers.items()]
        lines.append(f"secrets = {_toml_value(scope.secrets)}")
    return "\n".join(lines) + "\n"


BrokerFactory = Callable[..., "Broker"]  # make_broker: make(scopes=, admin_uids=, files_dirs=)


class BrokerError(RuntimeError):
    pass


@dataclass
class ScanHit:
    pid: int
    uid: int
    environ: list[str]
    cmdline: list[str]


def parse_scan(text: str) -> list[ScanHit]:
    """`secretd scan --json`: the proto's ScanResponse as JSON (hits[].pid/uid/environ/cmdline)."""
    doc = json.loads(text)
    hits = doc.get("hits", []) if isinstance(doc, dict) else doc
    return [
        ScanHit(
            pid=int(hit["pid"]),
            uid=int(hit.get("uid", -1)),
            environ=sorted(hit.get("environ", [])),
            cmdline=sorted(hit.get("cmdline", [])),
        )
        for hit in hits
    ]


class Broker:
    """`secretd serve` started the way a supervisor would: secrets in its environment."""

    def __init__(
        self,
        bins: Binaries,
        sandbox: Sandbox,
        processes: Processes,
        env: Mapping[str, str],
    ) -> None:
        self.bins = bins
        self.sandbox = sandbox
        self.processes = processes
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = sandbox.root / "broker.log"
        self.starts = 0
        # Supervisor mode (contract §9): `serve ... -- PROGRAM [ARG]...` when not empty.
        self.program: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, "broker not started"
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.sandbox.socket

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        """Start and wait for READY on --ready-fd; a broker that exits first fails loudly."""
        read_fd, write_fd = os.pipe()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts}\n".encode())
            log.flush()
            try:
                self.proc = self.processes.start(
                    [
                        str(self.bins.secretd),
                        "serve",
                        "--config",
                        str(self.sandbox.config),
                        "--socket",
                        str(self.socket),
                        "--ready-fd",
                        str(write_fd),
                        *(["--", *self.program] if self.program else []),
                    ],
                    env=self.env,
                    pass_fds=(write_fd,),
                    stdout=log,
                    stderr=log,
                )
            finally:
                os.close(write_fd)
        try:
            got = b""
            deadline = time.monotonic() + READY_TIMEOUT
            while not got.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"broker sent no READY within {READY_TIMEOUT}s:\n{self.log()}"
                    )
                ready, _, _ = select.select([read_fd], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(read_fd, 64)
                if not chunk:
                    code = self.proc.wait(timeout=10)
                    raise BrokerError(f"broker exited ({code}) before READY:\n{self.log()}")
                got += chunk
            if got != b"READY\n":
                raise BrokerError(f"unexpected ready message {got!r}")
        finally:
            os.close(read_fd)

    def stop(self) -> int:
        """SIGTERM, the clean way: returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`secretd <subcommand> --socket S ...` as root (an admin)."""
        return subprocess.run(
            [str(self.bins.secretd), *args, "--socket", str(self.socket)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )

    def scan(self) -> list[ScanHit]:
        """`secretd scan --json`; its exit status must say whether it found anything."""
        result = self.cli("scan", "--json")
        if result.returncode not in (0, SCAN_FOUND_LEAK):
            raise BrokerError(f"secretd scan failed ({result.returncode}): {result.stderr}")
        hits = parse_scan(result.stdout)
        if (result.returncode == SCAN_FOUND_LEAK) != bool(hits):
            raise BrokerError(f"secretd scan exited {result.returncode} with hits {hits}")
        return hits

    def audit_bytes(self) -> bytes:
        try:
            return self.sandbox.audit_log.read_bytes()
        except FileNotFoundError:
            return b""

    def audit_records(self) -> list[dict[str, Any]]:
        return [
            cast(dict[str, Any], json.loads(line))
            for line in self.audit_bytes().splitlines()
            if line
        ]


# ---------------------------------------------------------------------------------------------
# Workers: Python programs driven over stdin/stdout with one JSON object per line
# ---------------------------------------------------------------------------------------------


class LineChannel:
    """JSON lines over a child's stdin/stdout, with a read deadline (no hang, no timing gate)."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        self.proc = proc
        self.stderr_path = stderr_path
        self._out = proc.stdout.fileno()
        self._buf = b""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def read(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from pid {self.proc.pid}; stderr:\n{self.stderr()}")
            ready, _, _ = select.select([self._out], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._out, 65536)
            if not chunk:
                code = self.proc.poll()
                raise EOFError(
                    f"pid {self.proc.pid} closed stdout (exit {code}); stderr:\n{self.stderr()}"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return cast(dict[str, Any], json.loads(line))

    def send(self, message: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, message: Mapping[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        self.send(message)
        return self.read(timeout)


class Worker(LineChannel):
    """tests/worker_prog.py, launched through the shim (or directly) and driven op by op."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        super().__init__(proc, stderr_path)
        hello = self.read()
        assert hello.get("op") == "hello", hello
        self.pid = int(hello["pid"])
        self.hello = hello

    def get(self, name: str) -> dict[str, Any]:
        return self.request({"op": "get", "name": name})

    def get_many(self, names: Sequence[str]) -> dict[str, Any]:
        return self.request({"op": "get_many", "names": list(names)})

    def list(self) -> dict[str, Any]:
        return self.request({"op": "list"})

    def whoami(self) -> dict[str, Any]:
        return self.request({"op": "whoami"})

    def spawn_child(self) -> int:
        reply = self.request({"op": "spawn"})
        assert reply["ok"], reply
        return int(reply["pid"])

    def child(self, message: Mapping[str, Any]) -> dict[str, Any]:
        return self.request({"op": "child", "message": dict(message)})

    def exit(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self.request({"op": "exit"})
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@dataclass
class Launcher:
    """Starts worker programs through `secretd-shim` as real processes."""

    bins: Binaries
    sandbox: Sandbox
    staged: StagedLib
    processes: Processes
    host_env: Mapping[str, str]
    counter: int = 0

    def shim_argv(
        self,
        program: Sequence[str],
        *,
        uid: int | None,
        function: str | None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        argv = [str(self.bins.shim), "--socket", str(self.sandbox.socket)]
        if uid is not None:
            argv += ["--user", str(uid), "--group", str(uid)]
        if function is not None:
            argv += ["--function", function]
        return [*argv, *extra, "--", *program]

    def popen(
        self,
        argv: Sequence[str],
        name: str,
        extra_env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        self.counter += 1
        stderr_path = self.sandbox.root / f"{name}-{self.counter}.stderr"
        with open(stderr_path, "wb") as err:
            proc = self.processes.start(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                # A host-like parent: the shim itself starts with every secret in its environment.
                env={**self.host_env, **(extra_env or {})},
                cwd="/",
                **kwargs,
            )
        return proc, stderr_path

    def worker(
        self,
        *,
        uid: int | None = WORKER_UID,
        function: str | None = "orders",
        shim_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> Worker:
        """kwargs go to Popen (e.g. pass_fds, preexec_fn: what the host leaks into the shim)."""
        program = self.staged.argv("worker_prog.py")
        argv = self.shim_argv(program, uid=uid, function=function, extra=shim_args)
        proc, stderr_path = self.popen(argv, "worker", **kwargs)
        return Worker(proc, stderr_path)

    def worker_via(self, argv: Sequence[str], extra_env: Mapping[str, str]) -> Worker:
        """The worker program started by an arbitrary command line (interpreter mode)."""
        proc, stderr_path = self.popen(argv, "worker", extra_env)
        return Worker(proc, stderr_path)

    def channel(self, program: str, *args: str, uid: int, function: str | None) -> LineChannel:
        argv = self.shim_argv(self.staged.argv(program, *args), uid=uid, function=function)
        proc, stderr_path = self.popen(argv, Path(program).stem)
        return LineChannel(proc, stderr_path)


def run_as(
    uid: int, argv: Sequence[str], timeout: float = 60.0
) -> subprocess.CompletedProcess[bytes]:
    """Run argv directly (no shim) as uid with an empty supplementary group list."""
    return subprocess.run(
        argv,
        capture_output=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
        check=False,
        **drop_to(uid),
    )
