"""Exceptions ↔ gRPC status codes: the one table, for the server and the client.

The server turns any exception into ``(code, message)`` with :func:`to_status`;
the client turns a status back into the same exception class with
:func:`from_status`.  Both read :data:`STATUS_TABLE`.

Messages follow containerd's convention (SPEC §6.5): they end in the kind
text of their class (``snapshot 'k': already exists``), so Go's
``errdefs.FromGRPC`` — which strips a trailing ``": <kind>"`` and wraps the
rest in the class picked by the code — rebuilds exactly the same text, and so
does :func:`from_status`.  An exception that is not an
:class:`~overlay.errors.OverlayError` becomes UNKNOWN with the text
``"<ExcType>: <text>: unknown"``: never a bare status without a message,
never a traceback on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import grpc

from overlay.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "STATUS_TABLE",
    "CancelledError",
    "DeadlineExceededError",
    "class_for",
    "code_for",
    "from_rpc_error",
    "from_status",
    "to_status",
]


#: The one table (SPEC §6.5).  Subclasses map like their nearest listed base
#: (``UnsupportedError``, ``ReadOnlyError`` → FAILED_PRECONDITION); codes not listed come back as
#: ``UnknownError``, as in containerd 1.6.
STATUS_TABLE: Final[Mapping[type[OverlayError], grpc.StatusCode]] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    # containerd HEAD's errdefs maps it both ways; 1.6 reads it as Unknown
    # and keeps the message (SPEC §6.5)
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
    CancelledError: grpc.StatusCode.CANCELLED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnknownError: grpc.StatusCode.UNKNOWN,
}

_BY_CLASS: Final[Mapping[type, grpc.StatusCode]] = dict(STATUS_TABLE)
_BY_CODE: Final[Mapping[grpc.StatusCode, type[OverlayError]]] = {
    code: cls for cls, code in STATUS_TABLE.items()
}

#: Longest status message sent, in UTF-8 bytes: a message travels in an
#: HTTP/2 trailer (percent-encoded, up to 3x), and peers cap header lists at
#: 8 KiB or so.  Keys can be far longer than that.
MAX_MESSAGE_BYTES: Final = 2048


def code_for(cls: type[BaseException]) -> grpc.StatusCode:
    """The status code of an exception class (UNKNOWN for non-domain ones)."""
    for base in cls.__mro__:
        code = _BY_CLASS.get(base)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def class_for(code: grpc.StatusCode) -> type[OverlayError]:
    """The exception class a status code comes back as (UnknownError by default)."""
    return _BY_CODE.get(code, UnknownError)


def _truncate(message: str, kind_text: str) -> str:
    raw = message.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    tail = f" ...(truncated): {kind_text}"
    keep = MAX_MESSAGE_BYTES - len(tail.encode())
    head = raw[:keep].decode("utf-8", "ignore")  # never split a character
    return head + tail


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """``(code, message)`` to answer a call that raised ``exc`` with.

    A domain error keeps its message (which ends in its kind text); anything
    else is UNKNOWN ``"<ExcType>: <text>: unknown"``.  Messages longer than
    :data:`MAX_MESSAGE_BYTES` are shortened in the middle of the context,
    keeping the kind text at the end.
    """
    if isinstance(exc, OverlayError):
        code = code_for(type(exc))
        err: OverlayError = exc
        if class_for(code).kind_text != exc.kind_text:
            # a subclass with its own kind text: re-word it for its code
            err = class_for(code)(exc.message)
    else:
        code = grpc.StatusCode.UNKNOWN
        text = str(exc).strip()
        name = type(exc).__qualname__
        err = UnknownError(f"{name}: {text}" if text else name)
    return code, _truncate(err.message, err.kind_text)


def from_status(code: grpc.StatusCode, message: str | None) -> OverlayError:
    """The exception a status stands for, like Go's ``errdefs.FromGRPC``.

    The class comes from the code; a message already ending in the class's
    kind text is kept as is, otherwise the kind text is appended (a message
    equal to the kind text, or empty, gives just the kind text).  For a code
    outside the table the code's name is kept in front of the message.
    """
    cls = class_for(code)
    text = message or ""
    if code not in _BY_CODE:
        name = str(getattr(code, "name", code))
        text = f"{name}: {text}" if text else name
    return cls(text)


def from_rpc_error(err: grpc.RpcError) -> OverlayError:
    """:func:`from_status` for an error raised by a gRPC call."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details)
