"""A throwaway PostgreSQL for the dynamic-credentials tests and bench (Debian's `postgresql`
package; `.ci/run` installs it when missing).

`initdb` into a fresh directory, then `postgres` listening on one free loopback port (and a
Unix socket in its own directory, nothing in /var/run), started and stopped by pid. PostgreSQL
refuses to run as root, so under root it runs as `nobody` (its directory chowned to it).
The superuser `postgres` logs in over TCP with a password (scram-sha-256), as OpenBao's
database engine does; every other role logs in the same way.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Start = Callable[..., "subprocess.Popen[bytes]"]

STARTUP_TIMEOUT = 60.0
SUPERUSER = "postgres"


def find_pg_bin() -> Path | None:
    """The server binaries: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    env = os.environ.get("SECRETD_PG_BIN")
    candidates = [Path(env)] if env else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out:
            candidates.append(Path(out))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    candidates += [Path(p) for p in reversed(versions)]
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """One server; `stop()` (or the caller's process cleanup) ends it."""

    def __init__(self, bindir: Path, root: Path, start: Start) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.sockdir = root / "sock"
        self.password = secrets.token_urlsafe(24)
        self.port = free_port()
        run_as: dict[str, Any] = {}
        root.mkdir(mode=0o700, exist_ok=True)
        self.sockdir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for p in (root, self.sockdir):
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
            run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        pwfile = root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": str(root)}
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
            **run_as,
        )
        pwfile.unlink()
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = start(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={self.port}",
                "-c",
                f"unix_socket_directories={self.sockdir}",
                "-c",
                "fsync=off",
                "-c",
                "log_connections=off",
            ],
            env=env,
            stdout=log,
            stderr=log,
            **run_as,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log()}")
            if self.query(SUPERUSER, self.password, "select 1", check=False) == "1":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready within {STARTUP_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            return (self.root / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""

    def url(self, user: str, password: str, database: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def query(self, user: str, password: str, sql: str, check: bool = True) -> str | None:
        """Run `sql` as `user` over TCP with `psql`; the password goes through PGPASSWORD,
        never argv. Returns the unaligned output, or None when the login or query failed."""
        psql = self.bindir / "psql"
        if not psql.is_file():
            psql = Path(shutil.which("psql") or "psql")
        result = subprocess.run(
            [
                str(psql),
                "-X",
                "-q",
                "-At",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                user,
                "-d",
                "postgres",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"},
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            if check:
                raise RuntimeError(f"psql as {user!r} failed: {result.stderr.strip()}")
            return None
        return result.stdout.strip()

    def admin(self, sql: str) -> str:
        out = self.query(SUPERUSER, self.password, sql)
        assert out is not None
        return out

    def roles(self, prefix: str) -> list[str]:
        """Login roles whose name starts with `prefix` (OpenBao's generated users)."""
        out = self.admin(
            f"select rolname from pg_roles where rolname like '{prefix}%' order by rolname"
        )
        return [line for line in out.splitlines() if line]

    def stop(self) -> None:
        """Fast shutdown by pid (SIGINT), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
