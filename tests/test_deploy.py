"""The deployment examples stay true to the binaries: `secretd check` accepts the example broker
configs (deploy/, the image's deploy/image/, and the one embedded in
deploy/Dockerfile.azure-functions), and the shim configs use only keys the shim knows. (The
Azure Dockerfile needs Microsoft's base image and is not built; deploy/Dockerfile is, by
tests/test_image.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO, Binaries, Sandbox

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11
    tomllib = pytest.importorskip("tomllib")

DEPLOY = REPO / "deploy"
SHIM_KEYS = {"exec", "user", "group", "keep", "set", "function", "socket", "allow_root"}


def dockerfile_heredoc(target: str) -> str:
    text = (DEPLOY / "Dockerfile.azure-functions").read_text()
    match = re.search(rf"<<'EOF' {re.escape(target)}\n(.*?)\nEOF\n", text, re.S)
    assert match, f"no heredoc for {target} in Dockerfile.azure-functions"
    return match.group(1) + "\n"


def check(bins: Binaries, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --config-only: the examples name paths of the machine they are meant for
        # (/run/secrets, /var/log/secretd), not of this one.
        [str(bins.secretd), "check", "--config-only", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_example_broker_configs_pass_secretd_check(bins: Binaries, sandbox: Sandbox) -> None:
    embedded = sandbox.root / "docker-secretd.toml"
    embedded.write_text(dockerfile_heredoc("/etc/secretd/secretd.toml"))
    for config in (DEPLOY / "secretd.toml.example", DEPLOY / "image" / "secretd.toml", embedded):
        result = check(bins, config)
        assert result.returncode == 0, f"{config}: {result.stderr}"


def test_example_shim_configs_use_known_keys() -> None:
    for text in (
        (DEPLOY / "shim.toml.example").read_text(),
        (DEPLOY / "image" / "shim.toml").read_text(),
        dockerfile_heredoc("/etc/secretd/shim.toml"),
    ):
        programs = tomllib.loads(text)["program"]
        assert "python3" in programs
        for name, program in programs.items():
            assert set(program) <= SHIM_KEYS, (name, set(program) - SHIM_KEYS)
            assert Path(program["exec"]).is_absolute()
            assert "SECRETD_SOCKET" not in program.get("keep", [])
