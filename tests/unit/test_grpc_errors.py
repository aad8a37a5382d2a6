"""The exception ↔ status table, both ways, and Go's FromGRPC round trip (SPEC §6.5)."""

from __future__ import annotations

import errno

import grpc
import pytest

from overlay import errors
from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
    ReadOnlyError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    UnsupportedError,
)
from overlay.server.errors import (
    MAX_MESSAGE_BYTES,
    STATUS_TABLE,
    CancelledError,
    DeadlineExceededError,
    class_for,
    code_for,
    from_rpc_error,
    from_status,
    to_status,
)

C = grpc.StatusCode

EXPECTED = {
    NotFoundError: C.NOT_FOUND,
    AlreadyExistsError: C.ALREADY_EXISTS,
    FailedPreconditionError: C.FAILED_PRECONDITION,
    InvalidArgumentError: C.INVALID_ARGUMENT,
    ResourceExhaustedError: C.RESOURCE_EXHAUSTED,
    UnavailableError: C.UNAVAILABLE,
    UnimplementedError: C.UNIMPLEMENTED,
    UnknownError: C.UNKNOWN,
    CancelledError: C.CANCELLED,
    DeadlineExceededError: C.DEADLINE_EXCEEDED,
}

# containerd 1.6 errdefs.FromGRPC: code -> the class whose text ends the message
GO_KIND_TEXT = {
    C.INVALID_ARGUMENT: "invalid argument",
    C.ALREADY_EXISTS: "already exists",
    C.NOT_FOUND: "not found",
    C.UNAVAILABLE: "unavailable",
    C.FAILED_PRECONDITION: "failed precondition",
    C.UNIMPLEMENTED: "not implemented",
    C.CANCELLED: "context canceled",
    C.DEADLINE_EXCEEDED: "context deadline exceeded",
}
# containerd HEAD (github.com/containerd/errdefs/pkg/errgrpc) knows more kinds
GO_KIND_TEXT_HEAD = {**GO_KIND_TEXT, C.RESOURCE_EXHAUSTED: "resource exhausted"}


def go_from_grpc(code: grpc.StatusCode, desc: str, *, head: bool = False) -> tuple[str, str]:
    """A transcription of containerd's ``FromGRPC`` + ``rebaseMessage``:
    (class text, resulting error text)."""
    cls = (GO_KIND_TEXT_HEAD if head else GO_KIND_TEXT).get(code, "unknown")
    msg = "" if desc == cls else desc.removesuffix(": " + cls)
    return cls, (f"{msg}: {cls}" if msg else cls)


def test_the_table_is_exactly_the_spec() -> None:
    assert dict(STATUS_TABLE) == EXPECTED


@pytest.mark.parametrize(("cls", "code"), list(EXPECTED.items()), ids=str)
def test_table_both_ways(cls: type[OverlayError], code: grpc.StatusCode) -> None:
    assert code_for(cls) is code
    assert class_for(code) is cls
    assert cls.grpc_code == code.name  # the class attribute agrees with the table


def test_every_domain_error_has_a_code() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, OverlayError)
        assert code_for(cls) is C[cls.grpc_code], name


@pytest.mark.parametrize(("kind", "text"), [
    (UnsupportedError, "the kernel lacks lowerdir+"),
    (ReadOnlyError, "root '/r' is on a read-only filesystem"),
], ids=["unsupported", "read-only"])
def test_failed_precondition_kinds_come_back_as_such(kind: type[OverlayError], text: str) -> None:
    code, message = to_status(kind(text))
    assert code is C.FAILED_PRECONDITION
    assert message == f"{text}: failed precondition"
    back = from_status(code, message)
    assert type(back) is FailedPreconditionError
    assert str(back) == message


def test_resource_exhausted_both_ways() -> None:
    exc = ResourceExhaustedError("no space left on /dev/loop3 mounted at /x: 64.0 MiB, 0 B free")
    assert to_status(exc) == (
        C.RESOURCE_EXHAUSTED,
        "no space left on /dev/loop3 mounted at /x: 64.0 MiB, 0 B free: resource exhausted")
    back = from_status(*to_status(exc))
    assert type(back) is ResourceExhaustedError
    assert str(back) == str(exc)


def test_non_domain_classes_are_unknown() -> None:
    assert code_for(ValueError) is C.UNKNOWN
    assert code_for(KeyError) is C.UNKNOWN


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
@pytest.mark.parametrize("context", ["snapshot 'a/b c'", "", "x: y: z", "unicode key 'ключ'"])
def test_round_trip_through_go_and_python(cls: type[OverlayError], context: str) -> None:
    exc = cls(context)
    code, message = to_status(exc)
    assert code is EXPECTED[cls]
    assert message == str(exc)
    assert message == exc.kind_text or message.endswith(": " + exc.kind_text)
    # a Go client rebuilds the same text, in the class of the same kind
    go_class, go_text = go_from_grpc(code, message, head=True)
    assert go_class == exc.kind_text
    assert go_text == message
    if code in GO_KIND_TEXT_HEAD.keys() - GO_KIND_TEXT.keys():
        # containerd 1.6: Unknown, with the whole message kept in front
        assert go_from_grpc(code, message) == ("unknown", f"{message}: unknown")
    else:
        assert go_from_grpc(code, message) == (go_class, go_text)
    # and so does ours
    back = from_status(code, message)
    assert type(back) is cls
    assert str(back) == message


def test_message_equal_to_kind_text_and_empty_message() -> None:
    assert to_status(NotFoundError()) == (C.NOT_FOUND, "not found")
    assert go_from_grpc(C.NOT_FOUND, "not found") == ("not found", "not found")
    assert str(from_status(C.NOT_FOUND, "not found")) == "not found"
    assert str(from_status(C.NOT_FOUND, "")) == "not found"
    assert str(from_status(C.NOT_FOUND, None)) == "not found"


def test_status_from_a_go_server_without_kind_text_gets_it_appended() -> None:
    # what a Go server's ToGRPC would send for a message without the suffix
    back = from_status(C.ALREADY_EXISTS, "snapshot k")
    assert type(back) is AlreadyExistsError
    assert str(back) == "snapshot k: already exists"
    assert go_from_grpc(C.ALREADY_EXISTS, "snapshot k")[1] == str(back)


def test_cancel_and_deadline() -> None:
    c = from_status(C.CANCELLED, "context canceled")
    assert type(c) is CancelledError and str(c) == "context canceled"
    d = from_status(C.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert type(d) is DeadlineExceededError
    assert str(d) == "Deadline Exceeded: context deadline exceeded"
    assert to_status(DeadlineExceededError()) == (C.DEADLINE_EXCEEDED, "context deadline exceeded")


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ValueError("bad thing"), "ValueError: bad thing: unknown"),
        (KeyError("x"), "KeyError: 'x': unknown"),
        (RuntimeError(), "RuntimeError: unknown"),
        (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero: unknown"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/x"),
            "PermissionError: [Errno 13] Permission denied: '/x': unknown",
        ),
        (RuntimeError("already: unknown"), "RuntimeError: already: unknown"),
    ],
)
def test_non_domain_exception_is_unknown_with_its_type_and_text(
    exc: Exception, message: str
) -> None:
    assert to_status(exc) == (C.UNKNOWN, message)
    back = from_status(C.UNKNOWN, message)
    assert type(back) is UnknownError
    assert str(back) == message
    assert go_from_grpc(C.UNKNOWN, message) == ("unknown", message)


def test_codes_outside_the_table_come_back_unknown_with_the_code_name() -> None:
    back = from_status(C.DATA_LOSS, "message lost")
    assert type(back) is UnknownError
    assert str(back) == "DATA_LOSS: message lost: unknown"
    internal = from_status(C.INTERNAL, "")
    assert type(internal) is UnknownError
    assert str(internal) == "INTERNAL: unknown"


def test_long_messages_are_cut_keeping_the_kind_text() -> None:
    code, message = to_status(NotFoundError(f"snapshot {'k' * 100_000!r}"))
    assert code is C.NOT_FOUND
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.startswith("snapshot 'kkk")
    assert message.endswith(" ...(truncated): not found")
    assert type(from_status(code, message)) is NotFoundError
    # multi-byte characters are never split
    code, message = to_status(InvalidArgumentError("é" * 10_000))
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    message.encode("utf-8")  # valid
    assert message.endswith(": invalid argument")
    # a short message is untouched
    assert to_status(NotFoundError("k"))[1] == "k: not found"


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_from_rpc_error() -> None:
    exc = from_rpc_error(FakeRpcError(C.FAILED_PRECONDITION, "snapshot 'v' is not active"))
    assert type(exc) is FailedPreconditionError
    assert str(exc) == "snapshot 'v' is not active: failed precondition"
