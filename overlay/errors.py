"""The error taxonomy.

Every error the project raises on purpose is an :class:`OverlayError`.  Each
subclass carries the gRPC status code name it maps to (the server and client
share one table built from ``grpc_code``) and the containerd "kind text" that
ends its message, so a Go client's ``FromGRPC`` round-trips it (SPEC §6.5).

This module imports nothing from the project.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "OverlayError",
    "ReadOnlyError",
    "ResourceExhaustedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UnsupportedError",
]


class OverlayError(Exception):
    """Base of every domain error.

    ``str(err)`` always ends in ``": " + kind_text`` (or equals the kind text),
    which is what containerd's error mapping expects on the wire.
    """

    grpc_code: str = "UNKNOWN"
    kind_text: str = "unknown"

    def __init__(self, message: str = "") -> None:
        message = message.strip()
        if not message:
            message = self.kind_text
        elif message != self.kind_text and not message.endswith(": " + self.kind_text):
            message = f"{message}: {self.kind_text}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class NotFoundError(OverlayError):
    grpc_code = "NOT_FOUND"
    kind_text = "not found"


class AlreadyExistsError(OverlayError):
    grpc_code = "ALREADY_EXISTS"
    kind_text = "already exists"


class FailedPreconditionError(OverlayError):
    grpc_code = "FAILED_PRECONDITION"
    kind_text = "failed precondition"


class InvalidArgumentError(OverlayError):
    grpc_code = "INVALID_ARGUMENT"
    kind_text = "invalid argument"


class ResourceExhaustedError(OverlayError):
    """Something ran out: disk space or inodes (ENOSPC), a quota (EDQUOT), the
    metadata map at its configured maximum, memory, file descriptors.

    Retrying helps only once something was freed; the message says what ran
    out and where (``no space left on /dev/sdb1 mounted at /var/lib/…``).
    """

    grpc_code = "RESOURCE_EXHAUSTED"
    kind_text = "resource exhausted"


class UnavailableError(OverlayError):
    grpc_code = "UNAVAILABLE"
    kind_text = "unavailable"


class UnimplementedError(OverlayError):
    grpc_code = "UNIMPLEMENTED"
    kind_text = "not implemented"


class UnknownError(OverlayError):
    grpc_code = "UNKNOWN"
    kind_text = "unknown"


class CancelledError(OverlayError):
    """The call was cancelled (Go's ``context.Canceled``)."""

    grpc_code = "CANCELLED"
    kind_text = "context canceled"


class DeadlineExceededError(OverlayError):
    """The call's deadline passed (Go's ``context.DeadlineExceeded``)."""

    grpc_code = "DEADLINE_EXCEEDED"
    kind_text = "context deadline exceeded"


class ReadOnlyError(FailedPreconditionError):
    """The snapshotter's root is on a filesystem that refuses writes (EROFS):
    mounted read-only, or turned read-only by the kernel after an error
    (ext4 ``errors=remount-ro``).

    FAILED_PRECONDITION rather than UNAVAILABLE, after the rule in gRPC's
    status code guide (google.rpc.Code): UNAVAILABLE says the very same call
    may simply be retried, so a client with a retry policy would keep
    hammering a root that stays read-only until a person acts (remounts it;
    after an error: unmounts it, runs fsck, restarts the daemon), while
    FAILED_PRECONDITION says "do not retry until the system state has been
    explicitly fixed", which is the case.  It goes on the wire as its base
    class (exit status 5 in ``ovl``); reads keep working.
    """


class UnsupportedError(FailedPreconditionError):
    """The kernel or the backing filesystem lacks a feature we need.

    Maps to FAILED_PRECONDITION; the message says what to do about it.
    """
