"""Exceptions raised by the secretd client, and the one place that maps gRPC statuses to them.

Every exception is a `SecretdError`; callers never need to import `grpc`. Messages say what
went wrong and what to do, and name at most the secret *name*, the socket path and the status:
never a value. A secret that arrives is only ever returned, never formatted into text.
"""

from __future__ import annotations

import os
import stat

import grpc

__all__ = [
    "InvalidName",
    "NotFound",
    "PermissionDenied",
    "SecretdError",
    "Unavailable",
]


class SecretdError(Exception):
    """Base class of every error the secretd client raises.

    Attributes:
        name: the secret name the call was about, if any (names are not secret).
        code: the gRPC status name (for example ``"PERMISSION_DENIED"``), or None when the
            error was detected by the client itself.
    """

    def __init__(self, message: str, *, name: str | None = None, code: str | None = None):
        super().__init__(message)
        self.name = name
        self.code = code


class PermissionDenied(SecretdError):
    """The broker's policy does not let this process read the secret.

    The broker answers the same whether or not the secret exists, so this never tells you which
    names exist outside your scopes. Check ``secretd.whoami()`` and the broker's ``[[scope]]``.
    """


class NotFound(SecretdError):
    """The secret is within this process's scopes, but the broker has no secret of that name."""


class InvalidName(SecretdError, ValueError):
    """The name is not a valid secret name (1-256 of ``A-Z a-z 0-9 _ . - /``, no leading ``/``,
    no empty or ``..`` segment). Also a ``ValueError``."""


class Unavailable(SecretdError):
    """The broker is not running, not reachable at the socket, or did not answer in time.

    Raised only after the client's bounded retry (see ``secretd.Retry``) has run out.
    """


def status_name(err: BaseException) -> str | None:
    """The gRPC status name of an `RpcError` (grpc's or a test fake's), or None."""
    code = getattr(err, "code", None)
    if not callable(code):
        return None
    value = code()
    return value.name if isinstance(value, grpc.StatusCode) else None


def _details(err: BaseException) -> str:
    details = getattr(err, "details", None)
    text = details() if callable(details) else None
    return text if isinstance(text, str) and text else "no details"


def _socket_problem(socket_path: str) -> str:
    """Why connecting to `socket_path` may have failed, from what the filesystem shows."""
    try:
        st = os.stat(socket_path)
    except FileNotFoundError:
        return "there is no socket file at that path"
    except PermissionError:
        return "this process may not look up that path (a parent directory denies search)"
    except OSError as exc:
        return f"the path cannot be checked ({exc.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return "that path exists but is not a socket"
    if not os.access(socket_path, os.W_OK):
        return "this process may not connect to it (the socket file's mode denies write)"
    return (
        "the socket file exists but nothing accepted the connection (broker stopped or restarting)"
    )


def unavailable(socket_path: str, reason: str, retried_for: float) -> Unavailable:
    retried = f"; retried for {retried_for:.1f} s" if retried_for > 0 else ""
    return Unavailable(
        f"secretd broker unavailable at {socket_path}: {reason}{retried}. "
        "Is the broker running, and does SECRETD_SOCKET name its socket?",
        code="UNAVAILABLE",
    )


def from_rpc_error(
    err: BaseException,
    *,
    rpc: str,
    name: str | None,
    socket_path: str,
    timeout: float | None,
    retried_for: float = 0.0,
) -> SecretdError:
    """Map a failed call to the matching `SecretdError`. The only status-to-exception mapping."""
    code = status_name(err)
    what = f"secret {name!r}" if name is not None else "this request"
    if code == "PERMISSION_DENIED":
        return PermissionDenied(
            f"secretd: permission denied for {what} (uid {os.getuid()}): no scope in the "
            "broker's policy grants it to this process. secretd.whoami() shows the scopes this "
            "process matches; the broker's [[scope]] entries decide.",
            name=name,
            code=code,
        )
    if code == "NOT_FOUND":
        return NotFound(
            f"secretd: {what} does not exist in the broker (it is within this process's scopes). "
            "Check the broker's sources and the spelling; secretd.list() shows the names you "
            "may read.",
            name=name,
            code=code,
        )
    if code == "INVALID_ARGUMENT":
        return InvalidName(
            f"secretd: the broker rejected {what}: {_details(err)}", name=name, code=code
        )
    if code == "UNAVAILABLE":
        reason = _socket_problem(socket_path)
        return unavailable(socket_path, f"{reason} ({_details(err)})", retried_for)
    if code == "DEADLINE_EXCEEDED":
        return Unavailable(
            f"secretd broker at {socket_path} did not answer {rpc} within {timeout} s "
            "(pass a larger timeout= to secretd.Client if the broker is just slow)",
            name=name,
            code=code,
        )
    if code == "UNIMPLEMENTED":
        return SecretdError(
            f"secretd broker at {socket_path} does not implement {rpc}: it is older than this "
            "client",
            name=name,
            code=code,
        )
    return SecretdError(
        f"secretd: {rpc} failed with {code or 'an unknown error'}: {_details(err)}",
        name=name,
        code=code,
    )
