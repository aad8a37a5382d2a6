"""``RemoteSnapshotter``: the :class:`~overlay.snapshots.Snapshotter` contract over gRPC.

It talks to any server of ``containerd.services.snapshots.v1.Snapshots`` on a
unix socket (ours, or anything containerd could use as a proxy plugin) the way
containerd's proxy snapshotter does (SPEC §6.4): labels are sent only when
given, ``update`` always sends an update mask, ``walk`` consumes every
streamed message.  Statuses come back as the same exception classes the
server raised (:func:`overlay.server.errors.from_status`), with the same
messages.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from overlay._proto.services.snapshots.v1 import snapshots_pb2 as pb
from overlay.errors import UnavailableError
from overlay.mount import Mount
from overlay.server.errors import from_rpc_error
from overlay.server.snapshots import (
    CHANNEL_OPTIONS,
    NAMESPACE_HEADER,
    info_from_proto,
    info_to_proto,
    method_path,
    mount_from_proto,
    unix_target,
)
from overlay.snapshots import CleanupReport, Info, Usage, WalkFunc

__all__ = ["RemoteSnapshotter"]

_Resp = TypeVar("_Resp", bound=Message)

_UNARY: Final[dict[str, tuple[type[Message], type[Message]]]] = {
    "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
    "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
    "Mounts": (pb.MountsRequest, pb.MountsResponse),
    "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty),
    "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty),
    "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse),
    "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
    "Usage": (pb.UsageRequest, pb.UsageResponse),
    "Cleanup": (pb.CleanupRequest, empty_pb2.Empty),
}


class RemoteSnapshotter:
    """A snapshotter served over gRPC at ``address``.

    ``address`` is ``unix:///abs/path``, ``unix:path`` or a plain socket path.
    ``namespace``, when given, is sent as the ``containerd-namespace`` header
    of every call; ``timeout`` (seconds) is every call's deadline (a whole
    ``walk`` included).  ``snapshotter`` fills the requests' ``snapshotter``
    field, which containerd sets to the plugin name and servers ignore.

    The channel connects lazily; a server that is not there yet or goes away
    shows up as ``UnavailableError`` on the next call.  ``close`` is
    idempotent; the object is also a context manager.
    """

    def __init__(
        self,
        address: str,
        *,
        namespace: str | None = None,
        timeout: float | None = None,
        snapshotter: str = "",
    ) -> None:
        self._target = unix_target(address)
        self._timeout = timeout
        self._snapshotter = snapshotter
        self._metadata: tuple[tuple[str, str], ...] = (
            ((NAMESPACE_HEADER, namespace),) if namespace else ()
        )
        self._channel: Any = grpc.insecure_channel(self._target, options=list(CHANNEL_OPTIONS))
        self._lock = threading.Lock()
        self._closed = False
        self._unary: dict[str, Any] = {
            name: self._channel.unary_unary(
                method_path(name),
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )
            for name, (req, resp) in _UNARY.items()
        }
        self._list: Any = self._channel.unary_stream(
            method_path("List"),
            request_serializer=pb.ListSnapshotsRequest.SerializeToString,
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )

    # ------------------------------------------------------------------ plumbing

    @property
    def target(self) -> str:
        """The gRPC target, ``unix:///abs/path``."""
        return self._target

    @property
    def namespace(self) -> str | None:
        return self._metadata[0][1] if self._metadata else None

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError(f"snapshotter client for {self._target!r} is closed")

    def _call(self, name: str, request: Message, response_type: type[_Resp]) -> _Resp:
        self._check_open()
        try:
            response = self._unary[name](
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!"
            self._check_open()
            raise UnavailableError(f"{name} on {self._target!r}: {exc}") from exc
        assert isinstance(response, response_type)
        return response

    # ------------------------------------------------------------------ inspect

    def stat(self, key: str) -> Info:
        req = pb.StatSnapshotRequest(snapshotter=self._snapshotter, key=key)
        return info_from_proto(self._call("Stat", req, pb.StatSnapshotResponse).info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = pb.UpdateSnapshotRequest(snapshotter=self._snapshotter, info=info_to_proto(info))
        # containerd always sends a mask, possibly without paths.
        req.update_mask.SetInParent()
        req.update_mask.paths.extend(fieldpaths)
        return info_from_proto(self._call("Update", req, pb.UpdateSnapshotResponse).info)

    def usage(self, key: str) -> Usage:
        req = pb.UsageRequest(snapshotter=self._snapshotter, key=key)
        resp = self._call("Usage", req, pb.UsageResponse)
        return Usage(inodes=resp.inodes, size=resp.size)

    def mounts(self, key: str) -> list[Mount]:
        req = pb.MountsRequest(snapshotter=self._snapshotter, key=key)
        return [mount_from_proto(m) for m in self._call("Mounts", req, pb.MountsResponse).mounts]

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        """Call ``fn`` for every snapshot matching any filter, as the messages
        arrive; an exception from ``fn`` cancels the stream and propagates."""
        self._check_open()
        req = pb.ListSnapshotsRequest(snapshotter=self._snapshotter, filters=filters)
        try:
            call = self._list(req, timeout=self._timeout, metadata=self._metadata)
        except ValueError as exc:
            self._check_open()
            raise UnavailableError(f"List on {self._target!r}: {exc}") from exc
        try:
            for info in self._infos(call):
                fn(info)
        finally:
            call.cancel()  # a no-op once the stream has ended

    @staticmethod
    def _infos(call: Iterator[pb.ListSnapshotsResponse]) -> Iterator[Info]:
        try:
            for response in call:
                for msg in response.info:
                    yield info_from_proto(msg)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # ------------------------------------------------------------------ create

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(
            snapshotter=self._snapshotter, key=key, parent=parent, labels=labels or None
        )
        resp = self._call("Prepare", req, pb.PrepareSnapshotResponse)
        return [mount_from_proto(m) for m in resp.mounts]

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.ViewSnapshotRequest(
            snapshotter=self._snapshotter, key=key, parent=parent, labels=labels or None
        )
        resp = self._call("View", req, pb.ViewSnapshotResponse)
        return [mount_from_proto(m) for m in resp.mounts]

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=self._snapshotter, name=name, key=key, labels=labels or None,
            parent=parent,
        )
        self._call("Commit", req, empty_pb2.Empty)

    def remove(self, key: str) -> None:
        req = pb.RemoveSnapshotRequest(snapshotter=self._snapshotter, key=key)
        self._call("Remove", req, empty_pb2.Empty)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> CleanupReport:
        """Ask the server to reclaim removed snapshots.  The RPC answers
        ``Empty``, so the report is empty; a server without cleanup raises
        ``UnimplementedError``."""
        self._call("Cleanup", pb.CleanupRequest(snapshotter=self._snapshotter), empty_pb2.Empty)
        return CleanupReport()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._channel.close()

    def __enter__(self) -> RemoteSnapshotter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

