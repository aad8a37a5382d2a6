"""The public API is exactly this list (python-trio's test_exports idea)."""

from __future__ import annotations

import overlay

EXPECTED = [
    "AlreadyExistsError", "CleanupReport", "FailedPreconditionError", "Info",
    "InvalidArgumentError", "Kind", "Mount", "NotFoundError", "OverlayError",
    "OverlaySnapshotter", "ReadOnlyError", "RemoteSnapshotter", "ResourceExhaustedError",
    "Snapshotter", "UnavailableError",
    "UnimplementedError", "UnknownError", "UnsupportedError", "Usage", "mount_all",
    "unmount", "unmount_all",
]


def test_public_names_are_pinned() -> None:
    assert sorted(overlay.__all__) == sorted(EXPECTED)


def test_every_public_name_resolves() -> None:
    for name in overlay.__all__:
        assert getattr(overlay, name) is not None, name
    from overlay.client import RemoteSnapshotter
    from overlay.overlayfs import OverlaySnapshotter

    assert overlay.OverlaySnapshotter is OverlaySnapshotter
    assert overlay.RemoteSnapshotter is RemoteSnapshotter


def test_errors_carry_kind_text_and_code() -> None:
    err = overlay.AlreadyExistsError("snapshot 'k'")
    assert str(err) == "snapshot 'k': already exists"
    assert err.grpc_code == "ALREADY_EXISTS"
    assert str(overlay.NotFoundError("x: not found")) == "x: not found"
    assert str(overlay.UnknownError()) == "unknown"
    assert issubclass(overlay.UnsupportedError, overlay.FailedPreconditionError)
