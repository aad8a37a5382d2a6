"""The daemon's configuration: file, flags, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.errors import InvalidArgumentError
from overlay.server.config import Config, load_config

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def test_shipped_example_is_exactly_the_defaults() -> None:
    assert load_config(str(CONTRIB / "config.toml")) == Config()


def test_missing_default_file_means_defaults(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr("overlay.server.config.DEFAULT_CONFIG_PATH",
                        str(tmp_path / "none.toml"))
    assert load_config() == Config()
    assert load_config(overrides={"root": "/r", "address": "/s"}) == Config(root="/r",
                                                                             address="/s")


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('root = "/a"\nmount_options = ["volatile"]\nsync_remove = true\n')
    cfg = load_config(str(f), {"root": "/b", "sync_remove": None})
    assert cfg == Config(root="/b", mount_options=("volatile",), sync_remove=True)


def test_unix_prefix_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('address = "unix:///run/x.sock"\n')
    assert load_config(str(f)).address == "/run/x.sock"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('roo = "/x"', "unknown key 'roo'"),
        ("sync_remove = 1", "sync_remove must be a bool"),
        ("workers = true", "workers must be an integer"),
        ("workers = 0", "workers must be at least 1"),
        ('mount_options = "volatile"', "mount_options must be a list"),
        ("mount_options = [1]", "mount_options must be a list of strings"),
        ('root = "relative"', "must be an absolute path"),
        ('address = "x.sock"', "must be an absolute unix socket path"),
        ('log_level = "loud"', "log_level 'loud' must be one of"),
        ('metrics_address = "9090"', "must be host:port"),
        ("root = ", "is not valid TOML"),
        ("max_streams = 0", "config max_streams must be at least 1"),
        ("max_buffer_bytes = -1", "config max_buffer_bytes must be at least 1"),
        ('request_timeout = "30s"', "request_timeout must be a number of seconds"),
        ("idle_timeout = true", "idle_timeout must be a number of seconds"),
        ("idle_timeout = 0", "config idle_timeout must be between 0.001 and"),
        ('metadata_map_size = "lots"', "'lots' is not a size"),
        ('metadata_map_size = "8 GB!"', "is not a size"),
        ("metadata_map_size = true", "must be a size in bytes"),
        ("metadata_map_size = 4096", "must be at least 65536"),
        ('metadata_map_size = "2 GiB"\nmetadata_map_size_max = "1 GiB"',
         "metadata_map_size_max 1073741824 must be at least metadata_map_size (2147483648)"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    with pytest.raises(InvalidArgumentError) as info:
        load_config(str(f))
    assert message in str(info.value)


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_limits_reach_the_transport(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("max_streams = 7\nrequest_timeout = 2\nmax_buffer_bytes = 4096\n")
    limits = load_config(str(f)).limits()
    assert (limits.max_streams, limits.request_timeout, limits.max_buffer_bytes) == (7, 2.0, 4096)
    assert limits.max_connections == Config().max_connections


@pytest.mark.parametrize(
    ("value", "size"),
    [("65536", 65536), ('"64 KiB"', 64 << 10), ('"64K"', 64 << 10), ('"512MiB"', 512 << 20),
     ('"8 gib"', 8 << 30), ('"1 TiB"', 1 << 40), ('"100000 B"', 100_000)],
)
def test_map_sizes_in_bytes_or_binary_units(tmp_path: Path, value: str, size: int) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"metadata_map_size = {value}\nmetadata_map_size_max = {value}\n")
    cfg = load_config(str(f))
    assert (cfg.metadata_map_size, cfg.metadata_map_size_max) == (size, size)
