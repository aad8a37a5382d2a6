"""Fixtures the integration tests share."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for unix sockets (their paths are limited to
    107 bytes), emptied and removed at the end."""
    d = Path(tempfile.mkdtemp(prefix="ovl-s-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
