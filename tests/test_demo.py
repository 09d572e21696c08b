"""`make demo` works as root (full privilege drop) and as a normal user (no user switch), and
cleans up after itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from harness import (
    REPO,
    Binaries,
    Sandbox,
    StagedLib,
    is_root,
    needs_root,
    publish_tree,
)

DEMO_UID = 64110  # a normal user for the non-root run


def assert_cleaned_up(output: str) -> None:
    match = re.search(r"sandbox: +(/tmp/secretd-demo-\S+)", output)
    assert match, output
    assert not os.path.exists(match.group(1)), f"{match.group(1)} outlived the demo"


def test_demo_as_the_invoking_user(bins: Binaries) -> None:
    """As root: the function runs as nobody. As anyone else: no user switch, and it says so."""
    result = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SECRETD_BIN_DIR": str(bins.secretd.parent)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if is_root():
        assert "the function runs as uid 65534" in result.stdout
    else:
        assert "no user switch" in result.stdout
    assert "✘" not in result.stdout
    assert_cleaned_up(result.stdout)


@needs_root
def test_demo_as_a_normal_user(bins: Binaries, staged: StagedLib, sandbox: Sandbox) -> None:
    # The repo (and the venv in /root) may be closed to other uids: run a copy of the demo and
    # the binaries on the system interpreter, with the staged client on PYTHONPATH.
    shutil.copytree(REPO / "demo", sandbox.root / "demo")
    (sandbox.root / "bin").mkdir()
    for binary in (bins.secretd, bins.shim):
        shutil.copy2(binary, sandbox.root / "bin" / binary.name)
    publish_tree(sandbox.root)
    for binary in (bins.secretd, bins.shim):
        (sandbox.root / "bin" / binary.name).chmod(0o755)
    result = subprocess.run(
        [str(staged.python), "-s", str(sandbox.root / "demo" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(sandbox.root),
            "LANG": "C.UTF-8",
            "SECRETD_BIN_DIR": str(sandbox.root / "bin"),
            "PYTHONPATH": str(staged.lib),
        },
        cwd="/",
        user=DEMO_UID,
        group=DEMO_UID,
        extra_groups=[],
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not root" in result.stdout
    assert "no user switch" in result.stdout
    assert_cleaned_up(result.stdout)
