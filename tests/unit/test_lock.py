"""The lock (.ci/requirements.lock) pins what pyproject.toml asks for, and is what is installed."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / ".ci" / "requirements.lock"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _lock() -> tuple[dict[str, Version], dict[str, int], list[str]]:
    """(pins by canonical name, hash count by name, apt lines)."""
    pins: dict[str, Version] = {}
    hashes: dict[str, int] = {}
    apt: list[str] = []
    current = ""
    for line in LOCK.read_text().splitlines():
        if line.startswith("# apt: "):
            apt.append(line.removeprefix("# apt: "))
        elif m := _PIN.match(line):
            current = canonicalize_name(m[1])
            assert current not in pins, f"{current} pinned twice"
            pins[current] = Version(m[2])
            hashes[current] = 0
        elif line.strip().startswith("--hash=sha256:") and current:
            hashes[current] += 1
    return pins, hashes, apt


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [*project["project"]["dependencies"],
            *project["project"]["optional-dependencies"]["test"],
            *project["build-system"]["requires"]]
    return [Requirement(r) for r in reqs]


def test_lock_satisfies_pyproject() -> None:
    pins, _, _ = _lock()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) is not in the lock: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {name}=={pins[name]}, outside pyproject.toml's {req}: run .ci/lock")


def test_every_pin_has_hashes_and_pip_is_pinned() -> None:
    pins, hashes, _ = _lock()
    assert "pip" in pins and "setuptools" in pins and "wheel" in pins
    missing = sorted(name for name, n in hashes.items() if n == 0)
    assert not missing, f"pinned without a hash: {missing}"


def test_apt_packages_pinned_to_upstream_versions() -> None:
    _, _, apt = _lock()
    assert "containerd" in {line.split("=", 1)[0] for line in apt}
    for line in apt:
        name, sep, glob = line.partition("=")
        assert sep and re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", name), line
        # an upstream version, then any Debian revision
        assert re.fullmatch(r"(\d+:)?[0-9][A-Za-z0-9.+~]*(-\*|\*)", glob), line


def test_installed_environment_is_the_lock() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not running in .ci/setup's .venv (a developer's own environment may differ)")
    pins, _, _ = _lock()
    wrong = {}
    for name, version in pins.items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = "missing"
            continue
        if have != version:
            wrong[name] = f"{have} (lock: {version})"
    assert not wrong, f"installed packages differ from the lock: {wrong}"
