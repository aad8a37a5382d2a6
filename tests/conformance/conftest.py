"""The conformance suite's backends and the ``snapshotter_factory`` fixture.

One suite, written once, runs against every backend (DESIGN §7, §9 example 4,
containerd's ``core/snapshots/testsuite``).  A backend is a name, a way to
open a snapshotter on a fresh root directory, and the few traits in which
backends may legitimately differ (so a test never asks "which backend is
this?").  **To add a backend, append one** :class:`Backend` **to**
:data:`BACKENDS`: every test in ``tests/conformance/`` (except the
overlay-specific file) then runs against it too.

Each test gets its own ``tmp_path``; :func:`snapshotter_factory` hands out
:class:`Env` objects, each with a fresh snapshotter on a fresh root and a
fresh ``work`` directory for mount points, and closes every snapshotter it
made at teardown.  Most tests just take the ``env`` fixture (one Env).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from overlay.snapshots import Snapshotter

#: Opens a snapshotter whose state lives under the given (existing, empty)
#: root directory; leaving the context closes it (and stops whatever it started).
Opener = Callable[[Path], AbstractContextManager[Snapshotter]]


@dataclass(frozen=True, slots=True)
class Backend:
    """One snapshotter implementation the suite runs against."""

    name: str
    open: Opener
    #: Backed by overlayfs: renaming a directory that comes from a lower
    #: layer fails with EXDEV unless the kernel enables ``redirect_dir``
    #: (containerd skips that part of its Rename check for overlayfs).
    overlay_family: bool = True


from tests.integration.grpc_backend import daemon_overlay, remote_overlay  # noqa: E402


@contextlib.contextmanager
def _open_overlay(root: Path) -> Iterator[Snapshotter]:
    from overlay.overlayfs import OverlaySnapshotter

    sn = OverlaySnapshotter(root)
    try:
        yield sn
    finally:
        sn.close()


#: Every backend the suite runs against.  Later backends (the gRPC client
#: talking to the daemon, the namespaced metadata layer) add themselves here.
BACKENDS: tuple[Backend, ...] = (
    Backend("overlay", _open_overlay),
    # the same backend through the gRPC client and server, in-process
    Backend("grpc", remote_overlay),
    # client → the whole daemon (deferred cleanup, interceptors) → overlay
    Backend("daemon", daemon_overlay),
)


@dataclass(frozen=True, slots=True)
class Env:
    """A snapshotter on a fresh root, and a play area for mount points."""

    backend: Backend
    sn: Snapshotter
    #: the directory handed to the backend: everything it stores is below
    root: Path
    #: empty at first; tests make their mount points and flat trees here
    work: Path


class Factory(Protocol):
    """What ``snapshotter_factory`` yields."""

    def __call__(self, base: Path | None = None) -> Env: ...


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def snapshotter_factory(
    request: pytest.FixtureRequest, tmp_path: Path, privileged: None
) -> Iterator[Factory]:
    """``factory(base=None) -> Env``: a fresh snapshotter on a fresh root.

    ``base`` is where the root and work directories go (default: the test's
    ``tmp_path``; pass the ``tmpfs`` fixture for big trees, requesting
    ``tmpfs`` *before* this fixture so it is unmounted after the close).
    Every snapshotter made is closed at teardown, newest first.
    """
    backend: Backend = request.param
    counter = itertools.count()
    with contextlib.ExitStack() as stack:

        def factory(base: Path | None = None) -> Env:
            home = (base if base is not None else tmp_path) / f"env-{next(counter)}"
            root, work = home / "root", home / "work"
            root.mkdir(parents=True)
            work.mkdir()
            sn = stack.enter_context(backend.open(root))
            return Env(backend, sn, root, work)

        yield factory


@pytest.fixture
def env(snapshotter_factory: Factory) -> Env:
    """One fresh snapshotter (see :func:`snapshotter_factory`)."""
    return snapshotter_factory()
