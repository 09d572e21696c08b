"""Fixtures for the end-to-end suite; see tests/README.md for what each test proves."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from harness import (
    DEFAULT_SCOPES,
    NEEDS_ROOT,
    Binaries,
    Broker,
    BrokerFactory,
    HostSecrets,
    Launcher,
    Processes,
    Sandbox,
    Scope,
    StagedLib,
    broker_config,
    client_source_dir,
    find_bin_dir,
    is_root,
    missing,
    world_runnable,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"needs_root: {NEEDS_ROOT}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_root") is not None and not is_root():
        missing(NEEDS_ROOT)


def _missing(what: str) -> None:
    # In CI a missing build is a failure, not a skip: `make test` builds before it tests.
    missing(what)


@pytest.fixture(scope="session")
def bins() -> Binaries:
    directory = find_bin_dir()
    if directory is None:
        _missing("secretd/secretd-shim not built: run `make build` or set SECRETD_BIN_DIR")
    assert directory is not None
    return Binaries(secretd=directory / "secretd", shim=directory / "secretd-shim")


@pytest.fixture(scope="session")
def staged() -> Iterator[StagedLib]:
    try:
        client_source_dir()
    except RuntimeError:
        _missing("the secretd Python client is not available (client-py/src/secretd)")
    lib = StagedLib.create()
    if not world_runnable(lib.python):
        lib.remove()
        _missing(f"{lib.python} cannot be run by other uids (workers need /usr/bin/python3.X)")
    yield lib
    lib.remove()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox.create()
    yield box
    box.remove()


@pytest.fixture
def processes(sandbox: Sandbox) -> Iterator[Processes]:
    # Depends on sandbox so that every process is gone before its files are removed.
    procs = Processes()
    yield procs
    procs.cleanup()


@pytest.fixture
def host_secrets() -> HostSecrets:
    return HostSecrets.generate()


@pytest.fixture
def make_broker(
    bins: Binaries, sandbox: Sandbox, processes: Processes, host_secrets: HostSecrets
) -> Iterator[BrokerFactory]:
    started: list[Broker] = []

    def make(
        scopes: Sequence[Scope] = DEFAULT_SCOPES,
        admin_uids: Sequence[int] = (0,),
        files_dirs: Sequence[Path] = (),
    ) -> Broker:
        sandbox.run_dir.mkdir(mode=0o755, exist_ok=True)
        sandbox.run_dir.chmod(0o755)
        sandbox.config.write_text(broker_config(sandbox, scopes, admin_uids, files_dirs))
        broker = Broker(bins, sandbox, processes, host_secrets.host_environment())
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.stop()


@pytest.fixture
def broker(make_broker: BrokerFactory) -> Broker:
    return make_broker()


@pytest.fixture
def launcher(
    bins: Binaries,
    sandbox: Sandbox,
    staged: StagedLib,
    processes: Processes,
    host_secrets: HostSecrets,
) -> Launcher:
    return Launcher(bins, sandbox, staged, processes, host_secrets.host_environment())
