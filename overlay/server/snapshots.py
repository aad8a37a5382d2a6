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
* an ``Info``'s labels go out sorted by key, as gogo's marshaller writes
  them (upb alone would order a map by a hash seeded per process); Stat,
  Update and List send Infos encoded once and memoized (:class:`InfoWire`);
* ``Cleanup`` without a backend ``cleanup`` is UNIMPLEMENTED
  ``snapshotter does not implement Cleanup method: not implemented``.

Every exception becomes a status through :mod:`overlay.server.errors`; a
request that does not parse is INVALID_ARGUMENT (the service parses the raw
bytes itself, so the parse error is ours to report, not a generic INTERNAL).
The wire is :mod:`overlay.server.rpc` (HTTP/2 served from the C core).

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
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message

from overlay._native import GrpcCall, GrpcLimits
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
from overlay.server.rpc import Reply, RpcServer, frame
from overlay.snapshots import Info, Kind, Snapshotter

__all__ = [
    "CHANNEL_OPTIONS",
    "LEASE_HEADER",
    "LIST_BATCH",
    "MAX_MESSAGE_SIZE",
    "NAMESPACE_HEADER",
    "SERVICE_NAME",
    "InfoWire",
    "Observer",
    "SnapshotsService",
    "SnapshotsServicer",
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
#: The client's channel options (containerd's limits).
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


_KIND_TO_PROTO: Final[Mapping[Kind, pb.Kind]] = {Kind.ACTIVE: pb.ACTIVE, Kind.VIEW: pb.VIEW}


def kind_to_proto(kind: Kind) -> pb.Kind:
    """ACTIVE and VIEW as such; everything else (UNKNOWN too) is COMMITTED (SPEC §1.1)."""
    return _KIND_TO_PROTO.get(kind, pb.COMMITTED)


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


def _fill_info(msg: pb.Info, kind: Kind, name: str, parent: str,
               labels: Iterable[tuple[str, str]], created_ns: int, updated_ns: int) -> None:
    msg.name = name
    msg.parent = parent
    msg.kind = kind_to_proto(kind)
    for key, value in labels:
        msg.labels[key] = value
    # Set explicitly: a zero timestamp must still go on the wire (containerd
    # 1.6 decodes them as non-nullable); SetInParent marks it present.
    for ts, ns in ((msg.created_at, created_ns), (msg.updated_at, updated_ns)):
        ts.SetInParent()
        ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)


def info_to_proto(info: Info, msg: pb.Info | None = None) -> pb.Info:
    """An ``Info`` message with both timestamps always present; filled in
    place when ``msg`` is given (a repeated field's new element)."""
    if msg is None:
        msg = pb.Info()
    _fill_info(msg, info.kind, info.name, info.parent,
               info.labels.items() if info.labels else (), info.created_ns, info.updated_ns)
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


class InfoWire:
    """Infos as their wire form in a response, memoized by value.

    ``StatSnapshotResponse``, ``UpdateSnapshotResponse`` and
    ``ListSnapshotsResponse`` all carry their Info as field 1 (pinned by
    tests/unit/test_proto_wire.py), so one encoding of ``info = 1`` is the
    whole of the first two, and a List message is its infos' encodings one
    after the other (protobuf: concatenated messages merge, a repeated field
    appending).  Encoded with sorted map entries (``deterministic``), as
    gogo's marshaller writes them.

    The memo is keyed by every field of the Info (labels in their order), so
    an Info equal to one seen before, from any backend, gets the bytes it
    would be encoded to again, and one that differs in anything is encoded
    anew: a stale encoding is never sent.  It holds :attr:`ENTRIES` at most
    (the oldest leave first) and nothing over :attr:`MAX_BYTES` long.
    """

    ENTRIES: Final = 1 << 14
    MAX_BYTES: Final = 16 << 10

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], bytes] = {}
        self._lock = threading.Lock()

    def _encode(self, key: tuple[Any, ...]) -> bytes:
        msg = pb.StatSnapshotResponse()
        _fill_info(msg.info, *key)
        data = msg.SerializeToString(deterministic=True)
        if len(data) <= self.MAX_BYTES:
            with self._lock:  # (lookups need no lock: one dict operation each)
                if len(self._memo) >= self.ENTRIES:
                    del self._memo[next(iter(self._memo))]
                self._memo[key] = data
        return data

    def encode(self, info: Info) -> bytes:
        """``info`` as field 1 of a response."""
        return self.encode_all((info,))[0]

    def encode_all(self, infos: Iterable[Info]) -> list[bytes]:
        """Each of ``infos`` as field 1 of a response, in order."""
        get, encode = self._memo.get, self._encode
        out = []
        for i in infos:
            key = (i.kind, i.name, i.parent, tuple(i.labels.items()) if i.labels else (),
                   i.created_ns, i.updated_ns)
            data = get(key)
            out.append(encode(key) if data is None else data)
        return out


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

    Each method takes a parsed request and returns the response (``List``:
    the responses), raising domain errors; :class:`SnapshotsService` adds
    request parsing, the namespace headers and the error table.
    """

    def __init__(self, backend: Snapshotter) -> None:
        self.backend = backend
        self._wire = InfoWire()

    def Prepare(self, request: pb.PrepareSnapshotRequest) -> pb.PrepareSnapshotResponse:  # noqa: N802
        mounts = self.backend.prepare(request.key, request.parent, _labels(request.labels))
        return pb.PrepareSnapshotResponse(mounts=[mount_to_proto(m) for m in mounts])

    def View(self, request: pb.ViewSnapshotRequest) -> pb.ViewSnapshotResponse:  # noqa: N802
        mounts = self.backend.view(request.key, request.parent, _labels(request.labels))
        return pb.ViewSnapshotResponse(mounts=[mount_to_proto(m) for m in mounts])

    def Mounts(self, request: pb.MountsRequest) -> pb.MountsResponse:  # noqa: N802
        mounts = self.backend.mounts(request.key)
        return pb.MountsResponse(mounts=[mount_to_proto(m) for m in mounts])

    def Commit(self, request: pb.CommitSnapshotRequest) -> empty_pb2.Empty:  # noqa: N802
        self.backend.commit(request.name, request.key, _labels(request.labels), request.parent)
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest) -> empty_pb2.Empty:  # noqa: N802
        self.backend.remove(request.key)
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest) -> bytes:  # noqa: N802
        """A ``StatSnapshotResponse``, serialized."""
        return self._wire.encode(self.backend.stat(request.key))

    def Update(self, request: pb.UpdateSnapshotRequest) -> bytes:  # noqa: N802
        """An ``UpdateSnapshotResponse``, serialized."""
        info = info_from_proto(request.info)
        updated = self.backend.update(info, *request.update_mask.paths)
        return self._wire.encode(updated)

    def List(self, request: pb.ListSnapshotsRequest) -> list[bytes]:  # noqa: N802
        """The ``ListSnapshotsResponse`` messages, serialized: LIST_BATCH infos each."""
        infos: list[Info] = []
        self.backend.walk(infos.append, *request.filters)
        wire = self._wire.encode_all(infos)
        return [b"".join(wire[i : i + LIST_BATCH])
                for i in range(0, len(wire), LIST_BATCH)]

    def Usage(self, request: pb.UsageRequest) -> pb.UsageResponse:  # noqa: N802
        usage = self.backend.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: pb.CleanupRequest) -> empty_pb2.Empty:  # noqa: N802
        cleanup = getattr(self.backend, "cleanup", None)
        if not callable(cleanup):
            raise UnimplementedError("snapshotter does not implement Cleanup method")
        cleanup()
        return empty_pb2.Empty()


# ----------------------------------------------------------------------------- dispatch

_Req = TypeVar("_Req", bound=Message)

#: called after each call with (method, status code name, seconds)
Observer = Callable[[str, str, float], None]


@dataclass(frozen=True, slots=True)
class _Method:
    name: str
    request_type: type[Message]
    fn: Callable[[Any], Message | bytes | list[Any]]


def _parse(request_type: type[_Req], data: bytes) -> _Req:
    try:
        return request_type.FromString(data)
    except (DecodeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"malformed {request_type.DESCRIPTOR.name} ({len(data)} bytes): {exc}"
        ) from exc


@contextlib.contextmanager
def _headers(metadata: Sequence[tuple[str, str]]) -> Iterator[None]:
    namespace = lease = None
    for key, value in metadata:
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


class SnapshotsService:
    """Answers one call of the snapshots service: :data:`~overlay.server.rpc.Dispatch`.

    Parses the request (malformed: INVALID_ARGUMENT), sets the namespace and
    lease headers for the call, runs the servicer method and maps whatever it
    raises through the error table.  A path outside the service is
    UNIMPLEMENTED, worded as grpc-go words it.  ``observe`` (metrics) sees
    every call of the service.
    """

    def __init__(self, backend: Snapshotter, observe: Observer | None = None) -> None:
        s = self.servicer = SnapshotsServicer(backend)
        self._observe = observe
        self._methods = {
            method_path(m.name): m
            for m in (
                _Method("Prepare", pb.PrepareSnapshotRequest, s.Prepare),
                _Method("View", pb.ViewSnapshotRequest, s.View),
                _Method("Mounts", pb.MountsRequest, s.Mounts),
                _Method("Commit", pb.CommitSnapshotRequest, s.Commit),
                _Method("Remove", pb.RemoveSnapshotRequest, s.Remove),
                _Method("Stat", pb.StatSnapshotRequest, s.Stat),
                _Method("Update", pb.UpdateSnapshotRequest, s.Update),
                _Method("List", pb.ListSnapshotsRequest, s.List),
                _Method("Usage", pb.UsageRequest, s.Usage),
                _Method("Cleanup", pb.CleanupRequest, s.Cleanup),
            )
        }

    def __call__(self, call: GrpcCall) -> Reply:
        method = self._methods.get(call.path)
        if method is None:
            service, _, name = call.path.lstrip("/").rpartition("/")
            if service != SERVICE_NAME:
                return grpc.StatusCode.UNIMPLEMENTED, f"unknown service {service}", b""
            return (grpc.StatusCode.UNIMPLEMENTED,
                    f"unknown method {name} for service {service}", b"")
        start = time.perf_counter()
        try:
            with _headers(call.metadata):
                response = method.fn(_parse(method.request_type, call.message))
            body = frame(response if isinstance(response, list) else (response,))
            code, message = grpc.StatusCode.OK, ""
        except Exception as exc:  # every exception is answered by the table
            code, message = to_status(exc)
            body = b""
            if isinstance(exc, OverlayError):
                log.debug("%s: %s %s", method.name, code.name, message)
            else:
                log.error("%s: unexpected %s", method.name, message, exc_info=exc)
        if self._observe is not None:
            self._observe(method.name, code.name, time.perf_counter() - start)
        return code, message, body


# ----------------------------------------------------------------------------- the server


def _listen(address: str) -> socket.socket:
    target = unix_target(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if target.startswith(_ABSTRACT):
            sock.bind("\0" + target[len(_ABSTRACT):])
        else:
            path = socket_path(address)
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise InvalidArgumentError(
                    f"socket path {path!r} is longer than {_MAX_SOCKET_PATH} bytes (the unix limit)"
                )
            _make_dirs(path)
            _claim_socket(path)
            sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise UnavailableError(f"cannot listen on {target!r}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def make_server(
    backend: Snapshotter,
    address: str | socket.socket,
    *,
    max_workers: int = 16,
    observe: Observer | None = None,
    limits: GrpcLimits | None = None,
) -> RpcServer:
    """A server of the snapshots service over ``backend``, listening but not
    started: ``start()`` it, ``stop(grace)`` it.

    ``address`` is a unix socket path (``unix:///abs/path``, ``unix:path`` or a
    plain path), ``unix-abstract:name``, or a listening socket to adopt
    (systemd socket activation).  For a path, missing directories are created
    (0711), a stale socket file is replaced, a socket something still listens
    on is AlreadyExistsError and a path too long for a unix socket
    InvalidArgumentError.  ``observe`` sees every call (metrics); ``limits``
    bound what clients may hold (default: :class:`GrpcLimits`); the message
    limit is always containerd's, :data:`MAX_MESSAGE_SIZE`.
    """
    listener = address if isinstance(address, socket.socket) else _listen(address)
    limits = replace(limits or GrpcLimits(), max_message=MAX_MESSAGE_SIZE)
    return RpcServer(listener, SnapshotsService(backend, observe), workers=max_workers,
                     limits=limits)
