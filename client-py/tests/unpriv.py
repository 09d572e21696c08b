"""Run Python code as another uid, with `secretd` importable: for "another uid is denied" tests.

The venv's interpreter links into /root (mode 0700), so an unprivileged uid cannot start it.
The system interpreter of the same version (/usr/bin/python3.11 for the venv's 3.11, so the
same cp311 ABI) can be, given a
world-readable copy of what the client imports: `secretd` (from client-py/src), `grpc`,
`google.protobuf` (+ `google._upb`) and `typing_extensions`, found in the running interpreter.

    from unpriv import UnprivPython, unpriv_skip_reason

    reason = unpriv_skip_reason()
    if reason: pytest.skip(reason)
    with UnprivPython() as py:
        done = py.run("import secretd; print(secretd.whoami().uid)",
                      env={"SECRETD_SOCKET": sock})
        assert done.stdout.strip() == "65534"

The copy lives in a fresh temp dir (0755 dirs, 0644 files) and is removed on exit.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from types import TracebackType

# The system interpreter of the running one's version: the copied grpcio/protobuf binaries
# are built for that ABI (cp311 for the venv).
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
NOBODY = 65534
# Top-level names copied into the tree: the client and its run-time dependencies.
PACKAGES = ("secretd", "grpc", "google", "typing_extensions")


def unpriv_skip_reason(python: str = SYSTEM_PYTHON) -> str | None:
    """Why `UnprivPython` cannot work here, or None when it can."""
    if os.geteuid() != 0:
        return "switching to another uid needs root (CI runs as root)"
    if not os.access(python, os.X_OK):
        return f"{python} is not installed (it runs the code as another uid)"
    return None


def _source(name: str) -> pathlib.Path:
    if name == "secretd":
        in_repo = pathlib.Path(__file__).resolve().parent.parent / "src" / "secretd"
        if in_repo.is_dir():
            return in_repo
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise RuntimeError(f"{name!r} is not importable by the test interpreter")
    if spec.submodule_search_locations:  # a package (or the `google` namespace)
        return pathlib.Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return pathlib.Path(spec.origin)


def _publish(root: pathlib.Path) -> None:
    """0755 for directories, 0644 for files (0755 for shared objects and scripts kept as is)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, 0o755 if os.stat(p).st_mode & 0o100 else 0o644)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)


class UnprivPython:
    """A world-readable copy of the client and its dependencies, and `run()` as another uid."""

    def __init__(self, python: str = SYSTEM_PYTHON) -> None:
        self.python = python
        self.root: pathlib.Path | None = None

    def __enter__(self) -> UnprivPython:
        root = pathlib.Path(tempfile.mkdtemp(prefix="secretd-unpriv-"))
        self.root = root
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in PACKAGES:
            src = _source(name)
            if src.is_dir():
                shutil.copytree(src, root / src.name, ignore=ignore)
            else:
                shutil.copy2(src, root / src.name)
        _publish(root)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def run(
        self,
        code: str,
        *,
        uid: int = NOBODY,
        gid: int = NOBODY,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run `code` with the system interpreter as uid:gid (no supplementary groups).

        The environment is only `env` plus PATH, PYTHONPATH (the copy) and
        PYTHONDONTWRITEBYTECODE; the working directory is /. Output is captured as text.
        """
        if self.root is None:
            raise RuntimeError("use UnprivPython as a context manager")
        full_env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(self.root),
            "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {}),
        }
        return subprocess.run(
            [self.python, "-s", "-c", code],
            user=uid,
            group=gid,
            extra_groups=[],
            env=full_env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
