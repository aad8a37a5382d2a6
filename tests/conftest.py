"""Shared fixtures: privilege checks, private tmpfs mounts, mount hygiene.

Under ``CI=true`` nothing may silently skip: a skipped test is reported as a
failure (DESIGN §7).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import mounts_under, require_privileges, unmount_all_under


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {report.longrepr}"


@pytest.fixture
def privileged() -> None:
    """Root and a kernel with overlayfs; skips locally, fails under CI."""
    require_privileges()


@pytest.fixture(autouse=True)
def _no_leaked_mounts(tmp_path: Path) -> Iterator[None]:
    """Unmount whatever a test left mounted below its tmp_path, then fail it."""
    yield
    leaked = mounts_under(tmp_path)
    if leaked:
        unmount_all_under(tmp_path)
        pytest.fail(f"test left mounts behind: {leaked}")


@pytest.fixture
def tmpfs(tmp_path: Path, privileged: None) -> Iterator[Path]:
    """A private tmpfs (CPU-bound removal, big trees stay off the disk)."""
    from overlay import _native

    target = tmp_path / "tmpfs"
    target.mkdir()
    _native.mount("tmpfs", target, "tmpfs", 0, "mode=0755,size=4g")
    try:
        yield target
    finally:
        unmount_all_under(target)
