"""overlay: an overlayfs-native container snapshotter."""

from __future__ import annotations

__all__: list[str] = []
