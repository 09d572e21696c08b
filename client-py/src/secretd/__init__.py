"""secretd: read secrets from the secretd broker instead of the environment.

    import secretd
    dsn = secretd.get("ORDERS_DB")

The broker listens on a Unix socket (`SECRETD_SOCKET`, default /run/secretd/secretd.sock) and
decides from this process's kernel credentials which secrets it may read. The module-level
functions share one lazily created `Client` per process (a forked child gets its own);
`secretd.Client` and `secretd.aio.Client` give control over the socket, timeout, retries and
caching. Every failure is a `SecretdError`; no error message, repr or log line holds a value.
"""

from __future__ import annotations

import builtins
import importlib
import os
import threading
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING

from ._common import DEFAULT_SOCKET, Identity, Retry
from .client import Client
from .errors import InvalidName, NotFound, PermissionDenied, SecretdError, Unavailable

if TYPE_CHECKING:
    from . import aio

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "Identity",
    "InvalidName",
    "NotFound",
    "PermissionDenied",
    "Retry",
    "SecretdError",
    "Unavailable",
    "aio",
    "get",
    "get_bytes",
    "get_many",
    "list",
    "watch",
    "whoami",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `secretd.aio` (asyncio and grpc.aio) is imported on first use, not by `import secretd`:
    # most functions never touch it, and a cold start pays for every module imported.
    if name == "aio":
        # import_module, not `from . import aio`: that would look the name up here again.
        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_default_lock = threading.Lock()
_default_client: Client | None = None
# Clients inherited from a parent process: kept referenced (never closed or collected in the
# child, where touching the parent's channel is unsafe) and never used again.
_inherited: builtins.list[Client] = []


def _after_fork_in_child() -> None:
    global _default_lock, _default_client
    _default_lock = threading.Lock()  # another thread may have held it at fork time
    if _default_client is not None:
        _inherited.append(_default_client)
    _default_client = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _default() -> Client:
    global _default_client
    client = _default_client
    if client is not None:
        return client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


def get(name: str) -> str:
    """The secret `name` as UTF-8 text (`secretd.Client.get` on the default client)."""
    return _default().get(name)


def get_bytes(name: str) -> bytes:
    """The secret `name` as bytes."""
    return _default().get_bytes(name)


def get_many(names: Iterable[str]) -> dict[str, str]:
    """Several secrets in one call: all of them, or one error for the whole call."""
    return _default().get_many(names)


def list() -> builtins.list[str]:
    """Names of the secrets this process may read (never values), sorted."""
    return _default().list()


def whoami() -> Identity:
    """What the broker knows about this process."""
    return _default().whoami()


def watch(name: str) -> Generator[str, None, None]:
    """The current value of `name`, then each rotation (`secretd.Client.watch`)."""
    return _default().watch(name)
