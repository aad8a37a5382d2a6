"""The daemon's configuration: a TOML file, then command-line overrides.

A missing *default* config file means defaults; a missing file that was asked
for by name is an error.  Unknown keys and wrong types are refused with the
key named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from overlay._native import GrpcLimits
from overlay.errors import InvalidArgumentError
from overlay.metastore import DEFAULT_MAP_SIZE, DEFAULT_MAP_SIZE_MAX, MIN_MAP_SIZE

__all__ = ["DEFAULT_CONFIG_PATH", "LIMIT_KEYS", "Config", "load_config", "parse_size"]

DEFAULT_CONFIG_PATH = "/etc/overlay-snapshotter/config.toml"

_LEVELS = ("debug", "info", "warning", "error", "critical")

_DEFAULT_LIMITS = GrpcLimits()
#: the keys that bound what clients may hold: GrpcLimits' fields but max_message
LIMIT_KEYS = ("max_connections", "max_streams", "max_header_bytes",
              "max_connection_header_bytes", "max_connection_buffer_bytes", "max_buffer_bytes",
              "request_timeout", "idle_timeout")


@dataclass(frozen=True, slots=True)
class Config:
    #: the snapshotter's root directory
    root: str = "/var/lib/overlay-snapshotter"
    #: the unix socket containerd's proxy_plugins.<name>.address points at
    address: str = "/run/overlay-snapshotter/overlay.sock"
    #: delete right after remove instead of at cleanup
    sync_remove: bool = False
    #: add containerd.io/snapshot/overlay.upperdir to Stat/Update/List results
    upperdir_label: bool = False
    #: extra options for overlay mounts (never for bind mounts)
    mount_options: tuple[str, ...] = ()
    log_level: str = "info"
    #: host:port for Prometheus metrics; "" disables them
    metrics_address: str = ""
    #: threads deleting the trash in the background
    cleanup_threads: int = 2
    #: gRPC worker threads
    workers: int = 16
    # What clients may hold (overlay._native.GrpcLimits documents each):
    max_connections: int = _DEFAULT_LIMITS.max_connections
    max_streams: int = _DEFAULT_LIMITS.max_streams
    max_header_bytes: int = _DEFAULT_LIMITS.max_header_bytes
    max_connection_header_bytes: int = _DEFAULT_LIMITS.max_connection_header_bytes
    max_connection_buffer_bytes: int = _DEFAULT_LIMITS.max_connection_buffer_bytes
    max_buffer_bytes: int = _DEFAULT_LIMITS.max_buffer_bytes
    request_timeout: float = _DEFAULT_LIMITS.request_timeout
    idle_timeout: float = _DEFAULT_LIMITS.idle_timeout
    #: the metadata map (LMDB) a fresh start maps, in bytes: it doubles when full
    metadata_map_size: int = DEFAULT_MAP_SIZE
    #: the most the metadata map grows to; a full map there is RESOURCE_EXHAUSTED
    metadata_map_size_max: int = DEFAULT_MAP_SIZE_MAX

    def validate(self) -> Config:
        if not os.path.isabs(self.root):
            raise InvalidArgumentError(f"config root {self.root!r} must be an absolute path")
        address = self.address.removeprefix("unix://")
        if not os.path.isabs(address):
            raise InvalidArgumentError(
                f"config address {self.address!r} must be an absolute unix socket path"
            )
        if self.log_level.lower() not in _LEVELS:
            raise InvalidArgumentError(
                f"config log_level {self.log_level!r} must be one of {', '.join(_LEVELS)}"
            )
        if self.metrics_address:
            _host, sep, port = self.metrics_address.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidArgumentError(
                    f"config metrics_address {self.metrics_address!r} must be host:port"
                )
        for name in ("cleanup_threads", "workers"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"config {name} must be at least 1")
        try:
            self.limits()
        except ValueError as exc:
            raise InvalidArgumentError(f"config {exc}") from None
        if self.metadata_map_size < MIN_MAP_SIZE:
            raise InvalidArgumentError(
                f"config metadata_map_size {self.metadata_map_size!r} must be at least "
                f"{MIN_MAP_SIZE} (64 KiB)"
            )
        if self.metadata_map_size_max < self.metadata_map_size:
            raise InvalidArgumentError(
                f"config metadata_map_size_max {self.metadata_map_size_max!r} must be at least "
                f"metadata_map_size ({self.metadata_map_size})"
            )
        return replace(self, address=address)

    def limits(self) -> GrpcLimits:
        """The gRPC transport's limits (ValueError names a bad one)."""
        return GrpcLimits(**{k: getattr(self, k) for k in LIMIT_KEYS})

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))


#: each key's TOML type; "size": bytes, as an integer or a string with a unit
_TYPES: dict[str, type | str] = {
    "root": str,
    "address": str,
    "sync_remove": bool,
    "upperdir_label": bool,
    "mount_options": list,
    "log_level": str,
    "metrics_address": str,
    "cleanup_threads": int,
    "workers": int,
    "max_connections": int,
    "max_streams": int,
    "max_header_bytes": int,
    "max_connection_header_bytes": int,
    "max_connection_buffer_bytes": int,
    "max_buffer_bytes": int,
    "request_timeout": float,
    "idle_timeout": float,
    "metadata_map_size": "size",
    "metadata_map_size_max": "size",
}

_SIZE = re.compile(r"\s*(\d+)\s*(?:([KMGTP])i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """Bytes of ``"8 GiB"``, ``"512MiB"``, ``"64K"``, ``"4096"`` (binary units)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (an integer, or e.g. \"8 GiB\", \"512 MiB\")")
    return int(match.group(1)) << _UNITS[(match.group(2) or "").upper()]


def _coerce(key: str, value: Any, source: str) -> Any:
    want = _TYPES.get(key)
    if want is None:
        known = ", ".join(sorted(_TYPES))
        raise InvalidArgumentError(f"{source}: unknown key {key!r} (known keys: {known})")
    if want == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError as exc:
                raise InvalidArgumentError(f"{source}: {key}: {exc}") from None
        raise InvalidArgumentError(
            f"{source}: {key} must be a size in bytes or a string like \"8 GiB\", "
            f"not {type(value).__name__} {value!r}"
        )
    assert isinstance(want, type)
    if want is int and isinstance(value, bool):
        raise InvalidArgumentError(f"{source}: {key} must be an integer, not {value!r}")
    if want is float:  # seconds: 30 and 30.0 alike
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgumentError(
                f"{source}: {key} must be a number of seconds, not {value!r}")
        return float(value)
    if not isinstance(value, want):
        raise InvalidArgumentError(
            f"{source}: {key} must be a {want.__name__}, not {type(value).__name__} {value!r}"
        )
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise InvalidArgumentError(f"{source}: {key} must be a list of strings")
        return tuple(value)
    return value


def load_config(
    path: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Defaults, then the TOML file (``path`` or the default location), then
    ``overrides`` (command-line flags; ``None`` values are ignored)."""
    values: dict[str, Any] = {}
    source = path or DEFAULT_CONFIG_PATH
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if path is not None:
            raise InvalidArgumentError(f"config file {path!r} does not exist") from None
        data = {}
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"config file {source!r} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read config file {source!r}: {exc}") from exc
    for key, value in data.items():
        values[key] = _coerce(key, value, f"config file {source!r}")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, "command line")
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in names}).validate()
