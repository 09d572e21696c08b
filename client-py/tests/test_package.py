"""The package itself: public names, typing marker, dependencies, and fresh generated stubs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import secretd

CLIENT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = CLIENT / "src" / "secretd"


def test_public_names() -> None:
    assert set(secretd.__all__) >= {
        "get",
        "get_bytes",
        "get_many",
        "list",
        "whoami",
        "watch",
        "Client",
        "Identity",
        "SecretdError",
        "PermissionDenied",
        "NotFound",
        "InvalidName",
        "Unavailable",
        "aio",
    }
    for name in secretd.__all__:
        assert hasattr(secretd, name), name
    assert callable(secretd.aio.Client)


def test_typed_marker_is_shipped() -> None:
    assert (pathlib.Path(secretd.__file__).parent / "py.typed").is_file()


def test_only_grpcio_and_protobuf_at_run_time() -> None:
    """Checked on the installed distribution's metadata, as pip sees it."""
    requires = importlib.metadata.requires("secretd") or []
    assert {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0] for r in requires} == {"grpcio", "protobuf"}
    assert importlib.metadata.metadata("secretd")["Requires-Python"] == ">=3.9"


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed"
)
def test_committed_stubs_match_proto(tmp_path: pathlib.Path) -> None:
    """Fails when proto/ changed without `make proto-py` (or someone edited _proto/ by hand)."""
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(CLIENT / "tools" / "gen_proto.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    committed = PACKAGE / "_proto"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    stale = [n for n in names if (out / n).read_bytes() != (committed / n).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto-py` and commit the result"


def test_importing_does_not_touch_the_broker(tmp_path: pathlib.Path) -> None:
    """`import secretd` opens no connection: the default client is created on first use."""
    code = "import secretd, sys; sys.exit(0 if secretd._default_client is None else 1)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
