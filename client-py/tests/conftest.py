"""Fixtures for the client tests: a real broker (integration tests) when one can be built."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from broker_process import Broker, broker_skip_reason


def need_broker() -> None:
    """Skip without a broker binary, except in CI (CI=true), where that is a failure."""
    reason = broker_skip_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"integration tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """One broker for a test module; tests must not stop it (use `fresh_broker` for that)."""
    need_broker()
    with Broker() as b:
        yield b


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A broker of the test's own, which it may kill and restart."""
    need_broker()
    with Broker() as b:
        yield b
