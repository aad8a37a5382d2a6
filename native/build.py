"""cffi builder (API mode) for overlay's C core: ``overlay._ovl``.

``native/ovl.h`` is both the C header and the cdef.  The sha256 of the C
sources is compiled in, so ``overlay._native`` can refuse a stale build.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ("ovl.h", "ovl.c", "ovl_grpc.h", "ovl_grpc.c")
HEADERS = ("ovl.h", "ovl_grpc.h")


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()


def cdef_text() -> str:
    """The headers minus the preprocessor lines cffi cannot read (keeps #define)."""
    lines = []
    for line in "\n".join((HERE / h).read_text() for h in HEADERS).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not re.match(r"#define\s+OVL_\w+\s+\d+", stripped):
            continue
        lines.append(line)
    return "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.cdef(
    """
    extern "Python" void ovl_py_report(void *ctx, const char *path, int err);
    #define MS_RDONLY ...
    #define MS_NOSUID ...
    #define MS_NODEV ...
    #define MS_NOEXEC ...
    #define MS_SYNCHRONOUS ...
    #define MS_REMOUNT ...
    #define MS_MANDLOCK ...
    #define MS_DIRSYNC ...
    #define MS_NOATIME ...
    #define MS_NODIRATIME ...
    #define MS_BIND ...
    #define MS_MOVE ...
    #define MS_REC ...
    #define MS_SILENT ...
    #define MS_UNBINDABLE ...
    #define MS_PRIVATE ...
    #define MS_SLAVE ...
    #define MS_SHARED ...
    #define MS_RELATIME ...
    #define MS_STRICTATIME ...
    #define MNT_FORCE ...
    #define MNT_DETACH ...
    #define MNT_EXPIRE ...
    #define UMOUNT_NOFOLLOW ...
    """
)
ffibuilder.set_source(
    "overlay._ovl",
    """
    #include <sys/mount.h>
    #include "ovl.h"
    #include "ovl_grpc.h"
    static void ovl_py_report(void *ctx, const char *path, int err);
    """,
    # setuptools wants sources relative to setup.py's directory (the cwd).
    sources=[os.path.relpath(HERE / name) for name in SOURCES if name.endswith(".c")],
    include_dirs=[str(HERE)],
    define_macros=[("OVL_SOURCE_HASH", f'"{source_hash()}"')],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread", "nghttp2"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
