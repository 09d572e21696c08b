"""What the sync and asyncio clients share: names, socket resolution, retry policy, identity."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Union

from .errors import InvalidName, SecretdError

DEFAULT_SOCKET = "/run/secretd/secretd.sock"
SOCKET_ENV = "SECRETD_SOCKET"

# tonic (the broker's HTTP/2 stack) rejects grpcio's default :authority for unix: targets (the
# %-encoded socket path), so every channel names a fixed authority.
_CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.default_authority", "localhost"),
    # grpcio's reconnect backoff starts at 1 s; while it runs, calls fail at once. A local
    # socket is cheap to retry, so keep it in step with Retry below: a broker that restarts in
    # ~1 s is reached again within the retry window.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]

PathLike = Union[str, "os.PathLike[str]"]

_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-/]{1,256}")


def channel_options() -> list[tuple[str, str | int]]:
    return list(_CHANNEL_OPTIONS)


def resolve_socket(socket_path: PathLike | None) -> str:
    """The argument, else $SECRETD_SOCKET, else /run/secretd/secretd.sock (made absolute)."""
    if socket_path is not None:
        path = os.fspath(socket_path)
    else:
        path = os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    if not path:
        raise SecretdError("secretd: the socket path is empty")
    return os.path.abspath(path)


def check_name(name: object) -> str:
    """`name` if it is a valid secret name; raises `InvalidName` (or `TypeError`) otherwise."""
    if name.__class__ is str and name in _valid_names:
        return name
    _check_name(name)
    assert isinstance(name, str)
    if len(_valid_names) < 4096:  # a program reads a handful of names, again and again
        _valid_names.add(name)
    return name


_valid_names: set[str] = set()


def _check_name(name: object) -> None:
    """Validate a secret name as the broker does (contract: 1-256 bytes of [A-Za-z0-9_.-/], no
    leading '/', no empty or '..' segment). The message never echoes an invalid name: a value
    passed by mistake where a name belongs must not end up in a log."""
    if not isinstance(name, str):
        raise TypeError(f"secret name must be str, not {type(name).__name__}")
    rule = (
        "names are 1-256 characters of A-Z a-z 0-9 _ . - /, without a leading '/' "
        "or an empty or '..' segment"
    )
    if not _NAME_CHARS.fullmatch(name):
        if not name:
            problem = "it is empty"
        elif len(name) > 256:
            problem = f"it is {len(name)} characters long"
        else:
            bad = next(i for i, c in enumerate(name) if not _NAME_CHARS.fullmatch(c))
            problem = f"the character at index {bad} is not allowed"
        raise InvalidName(f"secretd: invalid secret name ({problem}); {rule}")
    if any(seg in ("", "..") for seg in name.split("/")):
        raise InvalidName(f"secretd: invalid secret name (empty or '..' segment); {rule}")


def check_names(names: Iterable[str]) -> list[str]:
    """Validated names in first-seen order, without duplicates."""
    if isinstance(names, (str, bytes)):
        raise TypeError("get_many() takes a list of names, not a single string")
    seen: dict[str, None] = {}
    for name in names:
        seen[check_name(name)] = None
    return list(seen)


def decode(name: str, value: bytes) -> str:
    """UTF-8 text of a value, or an error that does not carry the bytes along."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Raised outside the except block on purpose: UnicodeDecodeError holds the whole value in
    # `.object`, and chaining it as __context__ would carry the value into tracebacks.
    raise SecretdError(
        f"secretd: secret {name!r} is not valid UTF-8 text; read it with get_bytes()", name=name
    )


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds, or None")
    return timeout


def fork_error(created_pid: int) -> SecretdError:
    return SecretdError(
        f"secretd: this client was created in process {created_pid} and cannot be used in "
        f"process {os.getpid()} after fork(). Create clients after forking (the module-level "
        "functions such as secretd.get() do this for you)."
    )


@dataclass(frozen=True)
class Retry:
    """How long calls keep trying while the broker is unavailable.

    Only UNAVAILABLE (broker not running, socket refused, broker restarting) is retried; every
    other failure, including a timeout, is raised at once. Sleeps grow from `initial` by
    `multiplier` up to `maximum` and add up to at most `total` seconds: the default waits
    0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.25 s (2.5 s, nine attempts), which covers a broker
    restart. `Retry(total=0)` disables retrying.
    """

    total: float = 2.5
    initial: float = 0.05
    multiplier: float = 2.0
    maximum: float = 0.5

    def __post_init__(self) -> None:
        if self.total < 0 or self.initial <= 0 or self.multiplier < 1 or self.maximum <= 0:
            raise ValueError("Retry needs total >= 0, initial > 0, multiplier >= 1, maximum > 0")

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts, in order."""
        left = self.total
        delay = self.initial
        while left > 1e-9:
            step = min(delay, self.maximum, left)
            yield step
            left -= step
            delay *= self.multiplier


@dataclass(frozen=True)
class Identity:
    """What the broker knows about the calling process (`secretd.whoami()`)."""

    pid: int
    uid: int
    gid: int
    #: The function this process (or an ancestor) was registered under by secretd-shim, if any.
    function: str | None
    #: Names of the broker's [[scope]] entries this process matches.
    scopes: tuple[str, ...]
    #: /proc/<pid>/exe as the broker read it.
    exe: str
