"""The compiled module matches its sources and its Python constants."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from overlay import _native


@pytest.mark.parametrize(
    ("flag", "c_name"),
    [(f, f"MS_{f.name}") for f in _native.MountFlag]
    + [(_native.UnmountFlag.FORCE, "MNT_FORCE"), (_native.UnmountFlag.DETACH, "MNT_DETACH"),
       (_native.UnmountFlag.EXPIRE, "MNT_EXPIRE"),
       (_native.UnmountFlag.NOFOLLOW, "UMOUNT_NOFOLLOW")],
)
def test_flags_equal_the_c_headers(flag: int, c_name: str) -> None:
    assert int(flag) == getattr(_native.lib, c_name)


def test_abi_and_hash() -> None:
    assert _native.lib.ovl_abi_version() == _native.ABI_VERSION
    assert len(_native.ffi.string(_native.lib.ovl_source_hash())) == 64


def test_the_hash_covers_what_the_builder_compiles() -> None:
    root = Path(_native.__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("ovl_native_build", root / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert tuple(builder.SOURCES) == _native._SOURCES


@pytest.mark.parametrize("edited", _native._SOURCES)
def test_stale_build_fails_at_import_with_the_rebuild_command(tmp_path: Path,
                                                              edited: str) -> None:
    # Copy the package next to a changed native source: importing must refuse.
    root = Path(_native.__file__).resolve().parent.parent
    shutil.copytree(root / "overlay", tmp_path / "overlay",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "native").mkdir()
    for name in _native._SOURCES:
        text = (root / "native" / name).read_text()
        (tmp_path / "native" / name).write_text(
            text + "\n/* edited */\n" if name == edited else text)
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
        try:
            import overlay._native
        except ImportError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, check=False, cwd=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "stale" in result.stdout, result.stdout
    assert "pip install -e ." in result.stdout


def test_missing_build_fails_with_the_rebuild_command(tmp_path: Path) -> None:
    root = Path(_native.__file__).resolve().parent.parent
    shutil.copytree(root / "overlay", tmp_path / "overlay",
                    ignore=shutil.ignore_patterns("__pycache__", "_ovl*.so"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]; "
        "import overlay._native; print(overlay._native.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, check=False, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "overlay._ovl is missing" in result.stderr
    assert "pip install -e ." in result.stderr
