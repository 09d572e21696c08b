"""Issue 11, items 1 and 2: files that decide who gets what are believed only when no unprivileged
uid can have written them (contract §7). Each test does what a local attacker (uid 65534, or
any uid other than root) would do, with the real shim and broker, and checks the refusal line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from harness import (
    BILLING_UID,
    NOBODY_UID,
    SYSTEM_PYTHON,
    Binaries,
    Broker,
    BrokerFactory,
    Sandbox,
    Scope,
    broker_config,
    make_public_dir,
    needs_root,
    run_as,
)

pytestmark = needs_root

ATTACKER = NOBODY_UID
# Reads every file-sourced secret: the scope the broker's own tests give the reader.
READER_SCOPES = [Scope("reader", ["**"], {"uid": BILLING_UID})]


def attacker_writes(path: Path, text: str) -> None:
    """uid 65534 writes `path` itself (a file it owns, or in a directory it may write)."""
    code = f"open({str(path)!r}, 'w').write({text!r})"
    done = run_as(ATTACKER, [str(SYSTEM_PYTHON), "-c", code])
    assert done.returncode == 0, done.stderr


def attacker_file(parent: Path, name: str, text: str) -> Path:
    """A file in a root-owned 0755 directory, handed to uid 65534, which writes its content."""
    path = make_public_dir(parent) / name
    path.touch(mode=0o644)
    os.chown(path, ATTACKER, ATTACKER)
    attacker_writes(path, text)
    return path


def attacker_dir(parent: Path, name: str) -> Path:
    directory = make_public_dir(parent / name)
    os.chown(directory, ATTACKER, ATTACKER)
    return directory


def says_code(text: str, code: str) -> bool:
    """The CLI names the gRPC code (`FailedPrecondition`, `FAILED_PRECONDITION`, …)."""
    squash = text.upper().replace("_", "").replace(" ", "")
    return code.replace("_", "") in squash


def get_as(
    bins: Binaries, broker: Broker, uid: int, name: str
) -> subprocess.CompletedProcess[bytes]:
    return run_as(uid, [str(bins.secretd), "get", name, "--socket", str(broker.socket)], timeout=30)


# ---------------------------------------------------------------------------------------------
# 1. The shim, as root, obeys only a trusted config.


def shim_config(marker: Path) -> str:
    # What an attacker wants: run a program of their choice as root.
    return f'[program.evil]\nexec = "/usr/bin/touch"\nallow_root = true\n# {marker}\n'


def run_shim(
    bins: Binaries, config: Path, marker: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bins.shim), "--config", str(config), "--", "evil", str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


def test_shim_refuses_a_config_written_by_another_uid(bins: Binaries, sandbox: Sandbox) -> None:
    marker = sandbox.root / "ran-as-root"
    config = attacker_file(sandbox.root / "etc-secretd", "shim.toml", shim_config(marker))

    done = run_shim(bins, config, marker)
    assert done.returncode == 125, done
    assert done.stderr == f"secretd-shim: {config}: owned by uid {ATTACKER}\n"
    assert not marker.exists(), "the shim ran the attacker's program as root"

    # The same file, now root's but still writable by everyone: refused too.
    os.chown(config, 0, 0)
    config.chmod(0o666)
    done = run_shim(bins, config, marker)
    assert done.returncode == 125, done
    assert done.stderr == f"secretd-shim: {config}: writable by group/other (mode 0666)\n"
    assert not marker.exists()

    # Root's and 0644, but in a directory the attacker owns (they could swap it): refused.
    home = attacker_dir(sandbox.root, "attacker")
    config = home / "shim.toml"
    config.write_text(shim_config(marker))
    done = run_shim(bins, config, marker)
    assert done.returncode == 125, done
    assert done.stderr == f"secretd-shim: {home}: owned by uid {ATTACKER}\n"
    assert not marker.exists()

    # Control: the same config where only root can write it runs (so the refusals above are
    # the trust rule, not a broken config).
    trusted = make_public_dir(sandbox.root / "etc") / "shim.toml"
    trusted.write_text(shim_config(marker))
    done = run_shim(bins, trusted, marker)
    assert done.returncode == 0, done
    assert marker.exists()


def test_interpreter_mode_refuses_an_untrusted_config_from_the_environment(
    bins: Binaries, sandbox: Sandbox
) -> None:
    marker = sandbox.root / "ran-as-root"
    config = attacker_file(sandbox.root / "etc-secretd", "shim.toml", shim_config(marker))
    evil = make_public_dir(sandbox.root / "bin") / "evil"
    evil.symlink_to(bins.shim)  # the shim installed under a program's name
    done = subprocess.run(
        [str(evil), str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "SECRETD_SHIM_CONFIG": str(config)},
        check=False,
    )
    assert done.returncode == 125, done
    assert done.stderr == f"secretd-shim: {config}: owned by uid {ATTACKER}\n"
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 2. The broker: its config, its file sources.

EXPANDED = """
[[scope]]
name = "mine"
uid = {uid}
secrets = ["**"]
"""


def run_broker(bins: Binaries, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bins.secretd), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.parametrize("how", ["owned by the attacker", "mode 0666"])
def test_serve_and_check_refuse_an_untrusted_config(
    bins: Binaries, sandbox: Sandbox, how: str
) -> None:
    make_public_dir(sandbox.run_dir)
    config = sandbox.root / "secretd.toml"
    config.write_text(f'[server]\nsocket = "{sandbox.socket}"\n' + EXPANDED.format(uid=ATTACKER))
    if how == "mode 0666":
        config.chmod(0o666)
        want = f"{config}: writable by group/other (mode 0666)"
    else:
        config.chmod(0o644)
        os.chown(config, ATTACKER, ATTACKER)
        want = f"{config}: owned by uid {ATTACKER}"
    check = run_broker(bins, "check", "--config", str(config))
    assert check.returncode == 1, check
    assert check.stderr == f"secretd: {want}\n"
    assert "config OK" not in check.stdout
    serve = run_broker(bins, "serve", "--config", str(config))
    assert serve.returncode == 1, serve
    assert f"secretd: {want}" in serve.stderr
    assert not sandbox.socket.exists(), "the broker served an untrusted config"


def test_reload_of_an_untrusted_config_is_refused_and_the_old_policy_stays(
    bins: Binaries, make_broker: BrokerFactory, sandbox: Sandbox
) -> None:
    broker = make_broker()
    public = sandbox.public_bins(bins)
    assert get_as(public, broker, ATTACKER, "ORDERS_DB").returncode != 0
    # The attacker rewrites the config (mode 0666) to give themselves every secret.
    sandbox.config.write_text(sandbox.config.read_text() + EXPANDED.format(uid=ATTACKER))
    sandbox.config.chmod(0o666)
    reload = broker.cli("reload")
    assert reload.returncode != 0, reload
    assert says_code(reload.stderr, "FAILED_PRECONDITION"), reload.stderr
    assert f"{sandbox.config}: writable by group/other (mode 0666)" in reload.stderr
    got = get_as(public, broker, ATTACKER, "ORDERS_DB")
    assert got.returncode != 0, got
    assert says_code(got.stderr.decode(), "PERMISSION_DENIED") or says_code(
        got.stderr.decode(), "NOT_FOUND"
    ), got
    # Owned by the attacker, 0644: the same.
    sandbox.config.chmod(0o644)
    os.chown(sandbox.config, ATTACKER, ATTACKER)
    reload = broker.cli("reload")
    assert reload.returncode != 0, reload
    assert f"{sandbox.config}: owned by uid {ATTACKER}" in reload.stderr
    assert get_as(public, broker, ATTACKER, "ORDERS_DB").returncode != 0
    # Control: once root owns it again the reload goes through (and now grants it).
    os.chown(sandbox.config, 0, 0)
    assert broker.cli("reload").returncode == 0
    assert get_as(public, broker, ATTACKER, "ORDERS_DB").returncode == 0


def secret_dir(sandbox: Sandbox, name: str = "secrets") -> Path:
    directory = sandbox.root / name
    directory.mkdir(mode=0o700)
    return directory


def test_a_files_dir_owned_by_another_uid_is_refused(
    bins: Binaries, make_broker: BrokerFactory, sandbox: Sandbox
) -> None:
    files = attacker_dir(sandbox.root, "secrets")
    attacker_writes(files / "DB_PASSWORD", "chosen-by-the-attacker")
    make_public_dir(sandbox.run_dir)
    sandbox.config.write_text(broker_config(sandbox, READER_SCOPES, (0,), (files,)))
    check = run_broker(bins, "check", "--config", str(sandbox.config))
    assert check.returncode == 1, check
    assert check.stderr == f"secretd: {files}: owned by uid {ATTACKER}\n"
    serve = run_broker(bins, "serve", "--config", str(sandbox.config))
    assert serve.returncode == 1, serve
    assert f"{files}: owned by uid {ATTACKER}" in serve.stderr

    # Added by a reload: refused, the broker keeps serving what it had.
    good = secret_dir(sandbox, "good")
    (good / "API_KEY").write_text("k-" + secrets.token_hex(8))
    sandbox.config.write_text(broker_config(sandbox, READER_SCOPES, (0,), (good,)))
    broker = make_broker(scopes=READER_SCOPES, files_dirs=(good,))
    public = sandbox.public_bins(bins)
    assert get_as(public, broker, BILLING_UID, "API_KEY").returncode == 0
    sandbox.config.write_text(broker_config(sandbox, READER_SCOPES, (0,), (good, files)))
    reload = broker.cli("reload")
    assert reload.returncode != 0, reload
    assert f"{files}: owned by uid {ATTACKER}" in reload.stderr
    assert get_as(public, broker, BILLING_UID, "API_KEY").returncode == 0
    assert get_as(public, broker, BILLING_UID, "DB_PASSWORD").returncode != 0


def test_a_symlink_out_of_the_files_dir_is_not_followed(
    bins: Binaries, make_broker: BrokerFactory, sandbox: Sandbox
) -> None:
    # A root-only file standing in for /etc/shadow.
    shadow_dir = secret_dir(sandbox, "etc-private")
    shadow = shadow_dir / "shadow"
    value = "root:$6$" + secrets.token_hex(16)
    shadow.write_text(value)
    shadow.chmod(0o600)
    files = secret_dir(sandbox)
    (files / "SHADOW").symlink_to(shadow)
    (files / "ETC_SHADOW").symlink_to("/etc/shadow")
    # Kubernetes' layout inside the same directory keeps working.
    data = files / "..2026_12_01_00_00_00.1"
    data.mkdir(mode=0o755)
    (data / "DB_URL").write_text("postgres://k8s")
    (files / "..data").symlink_to(data.name)
    (files / "DB_URL").symlink_to("..data/DB_URL")

    check = run_broker(bins, "check", "--config", str(write_config(sandbox, files)))
    assert check.returncode == 0, check
    assert (
        f"warning: {files / 'SHADOW'}: symlink to {shadow} leads outside {files}; not followed"
        in check.stdout
    )
    broker = make_broker(scopes=READER_SCOPES, files_dirs=(files,))
    public = sandbox.public_bins(bins)
    got = get_as(public, broker, BILLING_UID, "DB_URL")
    assert (got.returncode, got.stdout) == (0, b"postgres://k8s"), got
    for name in ("SHADOW", "ETC_SHADOW"):
        got = get_as(public, broker, BILLING_UID, name)
        assert got.returncode != 0, got
        assert value.encode() not in got.stdout + got.stderr
    assert "leads outside" in broker.log()
    assert value not in broker.log()


def write_config(sandbox: Sandbox, files: Path) -> Path:
    make_public_dir(sandbox.run_dir)
    sandbox.config.write_text(broker_config(sandbox, READER_SCOPES, (0,), (files,)))
    return sandbox.config


def test_a_fifo_in_the_files_dir_is_skipped_and_never_blocks_a_reload(
    bins: Binaries, make_broker: BrokerFactory, sandbox: Sandbox
) -> None:
    files = secret_dir(sandbox)
    (files / "API_KEY").write_text("k1")
    broker = make_broker(scopes=READER_SCOPES, files_dirs=(files,))
    public = sandbox.public_bins(bins)
    # A FIFO nobody ever writes to (opening it for reading would wait forever).
    os.mkfifo(files / "PIPE", 0o600)
    (files / "API_KEY").write_text("k2")
    reload = broker.cli("reload", timeout=20)
    assert reload.returncode == 0, reload
    got = get_as(public, broker, BILLING_UID, "API_KEY")
    assert (got.returncode, got.stdout) == (0, b"k2"), got
    assert get_as(public, broker, BILLING_UID, "PIPE").returncode != 0
    assert f"{files / 'PIPE'}: not a regular file (FIFO); skipped" in broker.log()
