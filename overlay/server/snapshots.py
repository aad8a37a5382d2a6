"""containerd's snapshots gRPC service over any :class:`~overlay.snapshots.Snapshotter`.

What a proxy snapshotter plugin must answer (SPEC §6.3), the way containerd's
``contrib/snapshotservice`` does, plus what containerd 1.6 needs on the wire:

* the ``snapshotter`` field of every request is ignored (one backend per server);
* a labels map is passed down as a dict, an empty map as ``None``;
* ``Commit`` accepts ``parent`` (containerd 2.x rebase; 1.6 never sends it);
* ``Update`` passes ``update_mask.paths`` (absent or empty = replace all labels);
* ``info``, ``created_at`` and ``updated_at`` are always sent (1.6 decodes them
  as non-nullable), at nanosecond precision;
* ``List`` sends the matches in messages of exactly :data:`LIST_BATCH` infos,
  then the remainder, and no message at all when nothing matches;
* ``Cleanup`` without a backend ``cleanup`` is UNIMPLEMENTED
  ``snapshotter does not implement Cleanup method: not implemented``.

Every exception becomes a status through :mod:`overlay.server.errors`; a
request that does not parse is INVALID_ARGUMENT (the handlers take the raw
bytes so the parse error is ours to report, not a generic INTERNAL).

The ``containerd-namespace`` (and ``containerd-lease``) request headers are
optional: containerd's GC calls without them.  While a call runs they are
readable through :func:`current_namespace` / :func:`current_lease`, for a
namespaced backend; the plain overlay backend ignores them.

This module also holds the proto ↔ value conversions and address handling
the client shares.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from contextvars import ContextVar
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message

from overlay._proto.services.snapshots.v1 import snapshots_pb2 as pb
from overlay._proto.types import mount_pb2
from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    OverlayError,
    UnavailableError,
    UnimplementedError,
)
from overlay.mount import Mount
from overlay.server.errors import to_status
from overlay.snapshots import Info, Kind, Snapshotter

__all__ = [
    "CHANNEL_OPTIONS",
    "LEASE_HEADER",
    "LIST_BATCH",
    "MAX_MESSAGE_SIZE",
    "NAMESPACE_HEADER",
    "SERVICE_NAME",
    "SnapshotsServicer",
    "add_to_server",
    "current_lease",
    "current_namespace",
    "info_from_proto",
    "info_to_proto",
    "kind_from_proto",
    "kind_to_proto",
    "make_server",
    "method_path",
    "mount_from_proto",
    "mount_to_proto",
    "ns_from_timestamp",
    "socket_path",
    "unix_target",
]

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "containerd.services.snapshots.v1.Snapshots"
NAMESPACE_HEADER: Final = "containerd-namespace"
LEASE_HEADER: Final = "containerd-lease"
#: Infos per ListSnapshotsResponse (containerd's snapshotservice).
LIST_BATCH: Final = 100
#: containerd's default gRPC message limits (16 MiB both ways).
MAX_MESSAGE_SIZE: Final = 16 << 20
CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
)
#: sun_path is 108 bytes, NUL included.
_MAX_SOCKET_PATH: Final = 107

_namespace: ContextVar[str | None] = ContextVar("overlay_namespace", default=None)
_lease: ContextVar[str | None] = ContextVar("overlay_lease", default=None)


def current_namespace() -> str | None:
    """The ``containerd-namespace`` header of the call being served (None if absent)."""
    return _namespace.get()


def current_lease() -> str | None:
    """The ``containerd-lease`` header of the call being served (None if absent)."""
    return _lease.get()


def method_path(method: str) -> str:
    """``/containerd.services.snapshots.v1.Snapshots/<method>``."""
    return f"/{SERVICE_NAME}/{method}"


# ----------------------------------------------------------------------------- conversions


def kind_to_proto(kind: Kind) -> pb.Kind:
    """ACTIVE and VIEW as such; everything else (UNKNOWN too) is COMMITTED (SPEC §1.1)."""
    if kind is Kind.ACTIVE:
        return pb.ACTIVE
    if kind is Kind.VIEW:
        return pb.VIEW
    return pb.COMMITTED


def kind_from_proto(kind: int) -> Kind:
    """ACTIVE and VIEW as such; everything else (UNKNOWN too) is COMMITTED (SPEC §1.1)."""
    if kind == pb.ACTIVE:
        return Kind.ACTIVE
    if kind == pb.VIEW:
        return Kind.VIEW
    return Kind.COMMITTED


def ns_from_timestamp(ts: Any) -> int:
    """Nanoseconds since the epoch of a ``google.protobuf.Timestamp``."""
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def info_to_proto(info: Info) -> pb.Info:
    """An ``Info`` message with both timestamps always present."""
    msg = pb.Info(
        name=info.name,
        parent=info.parent,
        kind=kind_to_proto(info.kind),
        labels=dict(info.labels),
    )
    # Marked present explicitly: a zero timestamp must still go on the wire
    # (containerd 1.6 decodes them as non-nullable).
    for ts, ns in ((msg.created_at, info.created_ns), (msg.updated_at, info.updated_ns)):
        ts.SetInParent()
        ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)
    return msg


def info_from_proto(msg: pb.Info) -> Info:
    return Info(
        kind=kind_from_proto(msg.kind),
        name=msg.name,
        parent=msg.parent,
        labels=dict(msg.labels),
        created_ns=ns_from_timestamp(msg.created_at),
        updated_ns=ns_from_timestamp(msg.updated_at),
    )


def mount_to_proto(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)


def mount_from_proto(msg: mount_pb2.Mount) -> Mount:
    return Mount(msg.type, msg.source, msg.target, tuple(msg.options))


def _labels(labels: Mapping[str, str]) -> dict[str, str] | None:
    # proto3 maps have no presence: empty is what Go's nil map encodes to.
    return dict(labels) if labels else None


# ----------------------------------------------------------------------------- addresses


_ABSTRACT: Final = "unix-abstract:"


def socket_path(address: str) -> str:
    """The filesystem path of ``unix:///abs/path``, ``unix:path`` or a plain path."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
    elif address.startswith("unix:"):
        path = address[len("unix:") :]
    elif "://" in address or address.startswith((_ABSTRACT, "dns:")):
        raise InvalidArgumentError(f"address {address!r} is not a unix socket path")
    else:
        path = address
    if not path:
        raise InvalidArgumentError(f"address {address!r} has no socket path")
    return os.path.abspath(path)


def unix_target(address: str) -> str:
    """The gRPC target for a socket address: ``unix:///abs/path`` for a path
    (``unix://…``, ``unix:…`` or plain); ``unix-abstract:name`` as is."""
    if address.startswith(_ABSTRACT):
        if len(address) == len(_ABSTRACT):
            raise InvalidArgumentError(f"address {address!r} has no socket name")
        return address
    return "unix://" + socket_path(address)


def _make_dirs(path: str) -> None:
    """Create the missing directories above a socket, 0711 whatever the umask
    (the daemon narrows the umask for the socket itself)."""
    missing: list[str] = []
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o711)
        os.chmod(d, 0o711)


def _claim_socket(path: str) -> None:
    """Refuse a path something is listening on; remove a stale socket file.

    gRPC unlinks an existing socket file before binding, so without this a
    second server would silently steal the address of a live one.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPreconditionError(f"{path!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UnavailableError(f"cannot probe socket {path!r}: {exc}") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise AlreadyExistsError(f"socket {path!r}: a server is already listening there")


# ----------------------------------------------------------------------------- servicer


class SnapshotsServicer:
    """The ten RPCs of ``containerd.services.snapshots.v1.Snapshots`` over ``backend``.

    Each method takes a parsed request and the call context and returns the
    response (``List``: an iterator of responses), raising domain errors;
    :func:`add_to_server` wraps them with request parsing, the namespace
    headers and the error table.  The method names are the RPC names, so the
    generated ``add_SnapshotsServicer_to_server`` accepts this class too (but
    then exceptions are not mapped).
    """

    def __init__(self, backend: Snapshotter) -> None:
        self.backend = backend

    def Prepare(  # noqa: N802
        self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSnapshotResponse:
        mounts = self.backend.prepare(request.key, request.parent, _labels(request.labels))
        return pb.PrepareSnapshotResponse(mounts=[mount_to_proto(m) for m in mounts])

    def View(  # noqa: N802
        self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.ViewSnapshotResponse:
        mounts = self.backend.view(request.key, request.parent, _labels(request.labels))
        return pb.ViewSnapshotResponse(mounts=[mount_to_proto(m) for m in mounts])

    def Mounts(  # noqa: N802
        self, request: pb.MountsRequest, context: grpc.ServicerContext
    ) -> pb.MountsResponse:
        mounts = self.backend.mounts(request.key)
        return pb.MountsResponse(mounts=[mount_to_proto(m) for m in mounts])

    def Commit(  # noqa: N802
        self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.backend.commit(request.name, request.key, _labels(request.labels), request.parent)
        return empty_pb2.Empty()

    def Remove(  # noqa: N802
        self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.backend.remove(request.key)
        return empty_pb2.Empty()

    def Stat(  # noqa: N802
        self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=info_to_proto(self.backend.stat(request.key)))

    def Update(  # noqa: N802
        self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.UpdateSnapshotResponse:
        info = info_from_proto(request.info)
        updated = self.backend.update(info, *request.update_mask.paths)
        return pb.UpdateSnapshotResponse(info=info_to_proto(updated))

    def List(  # noqa: N802
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        # walk runs to the end here, so its errors come before any message.
        infos: list[pb.Info] = []
        self.backend.walk(lambda info: infos.append(info_to_proto(info)), *request.filters)
        return (
            pb.ListSnapshotsResponse(info=infos[i : i + LIST_BATCH])
            for i in range(0, len(infos), LIST_BATCH)
        )

    def Usage(  # noqa: N802
        self, request: pb.UsageRequest, context: grpc.ServicerContext
    ) -> pb.UsageResponse:
        usage = self.backend.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(  # noqa: N802
        self, request: pb.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        cleanup = getattr(self.backend, "cleanup", None)
        if not callable(cleanup):
            raise UnimplementedError("snapshotter does not implement Cleanup method")
        cleanup()
        return empty_pb2.Empty()


# ----------------------------------------------------------------------------- wiring

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    code, message = to_status(exc)
    if isinstance(exc, OverlayError):
        log.debug("%s: %s %s", method, code.name, message)
    else:
        log.error("%s: unexpected %s", method, message, exc_info=exc)
    context.abort(code, message)


def _parse(request_type: type[_Req], data: bytes) -> _Req:
    try:
        return request_type.FromString(data)
    except (DecodeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"malformed {request_type.DESCRIPTOR.name} ({len(data)} bytes): {exc}"
        ) from exc


@contextlib.contextmanager
def _headers(context: grpc.ServicerContext) -> Iterator[None]:
    namespace = lease = None
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER and namespace is None:
            namespace = value
        elif key == LEASE_HEADER and lease is None:
            lease = value
    ns_token = _namespace.set(namespace)
    lease_token = _lease.set(lease)
    try:
        yield
    finally:
        _lease.reset(lease_token)
        _namespace.reset(ns_token)


def _unary(
    name: str,
    request_type: type[_Req],
    fn: Callable[[_Req, grpc.ServicerContext], _Resp],
) -> Any:
    def handler(data: bytes, context: grpc.ServicerContext) -> _Resp:
        try:
            with _headers(context):
                return fn(_parse(request_type, data), context)
        except Exception as exc:  # every exception is answered by the table
            failure = exc
        _abort(context, name, failure)
        raise AssertionError("unreachable: abort raises")

    return grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=None, response_serializer=_serialize
    )


def _stream(
    name: str,
    request_type: type[_Req],
    fn: Callable[[_Req, grpc.ServicerContext], Iterable[_Resp]],
) -> Any:
    def handler(data: bytes, context: grpc.ServicerContext) -> Iterator[_Resp]:
        try:
            with _headers(context):
                responses = fn(_parse(request_type, data), context)
        except Exception as exc:  # every exception is answered by the table
            _abort(context, name, exc)
            return
        for response in responses:
            if not context.is_active():
                return  # the client went away
            yield response

    return grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=None, response_serializer=_serialize
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def add_to_server(server: grpc.Server, backend: Snapshotter) -> SnapshotsServicer:
    """Register the snapshots service over ``backend`` on ``server``."""
    servicer = SnapshotsServicer(backend)
    s = servicer
    handlers = {
        "Prepare": _unary("Prepare", pb.PrepareSnapshotRequest, s.Prepare),
        "View": _unary("View", pb.ViewSnapshotRequest, s.View),
        "Mounts": _unary("Mounts", pb.MountsRequest, s.Mounts),
        "Commit": _unary("Commit", pb.CommitSnapshotRequest, s.Commit),
        "Remove": _unary("Remove", pb.RemoveSnapshotRequest, s.Remove),
        "Stat": _unary("Stat", pb.StatSnapshotRequest, s.Stat),
        "Update": _unary("Update", pb.UpdateSnapshotRequest, s.Update),
        "List": _stream("List", pb.ListSnapshotsRequest, s.List),
        "Usage": _unary("Usage", pb.UsageRequest, s.Usage),
        "Cleanup": _unary("Cleanup", pb.CleanupRequest, s.Cleanup),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
    return servicer


def make_server(
    backend: Snapshotter,
    address: str,
    *,
    max_workers: int = 16,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Server:
    """A gRPC server with the snapshots service over ``backend``, bound to
    ``address`` but not started: add more services if needed, then ``start()``.

    ``address`` is a unix socket path (``unix:///abs/path``, ``unix:path`` or a
    plain path) or ``unix-abstract:name``.  For a path, missing directories are
    created (0711), a stale socket file is replaced, a socket something still
    listens on is AlreadyExistsError and a path too long for a unix socket
    InvalidArgumentError.  ``interceptors`` are ``grpc.ServerInterceptor``s
    (metrics); they see the raw request bytes and the statuses set here.
    """
    target = unix_target(address)
    if not target.startswith(_ABSTRACT):
        path = socket_path(address)
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise InvalidArgumentError(
                f"socket path {path!r} is longer than {_MAX_SOCKET_PATH} bytes (the unix limit)"
            )
        _make_dirs(path)
        _claim_socket(path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ovl-grpc"),
        interceptors=list(interceptors),
        options=[*CHANNEL_OPTIONS, *options],
    )
    add_to_server(server, backend)
    try:
        port = server.add_insecure_port(target)
    except RuntimeError as exc:
        server.stop(None)
        raise UnavailableError(f"cannot listen on {target!r}: {exc}") from exc
    if port == 0:
        server.stop(None)
        raise UnavailableError(f"cannot listen on {target!r}")
    return server
