"""Fuzzing /proc/self/mountinfo parsing (``overlay.mount``) with hypothesis.

The table is the kernel's, but its paths are anyone's: any process that can
mount in our namespace chooses a mount point, a source and (for an overlay)
layer paths, and cleanup's busy check reads them all.  The kernel writes
each line as ``show_mountinfo`` does (fs/proc_namespace.c): paths and the
source through ``seq_escape``/``mangle``, which turn space, tab, newline and
backslash into ``\\ooo`` octal and leave every other byte as it is (``\\r``,
``\\x0b``, U+0085 and U+2028 included: only ``\\n`` ends a line); superblock
options through ``seq_show_option``, which also escapes ``,`` (and ``=`` in
a name).  :func:`kernel_line` is that model; the properties are that every
line it writes parses back to what went in, and that any text at all parses
or raises ``ValueError``, never anything else.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from overlay import _native
from overlay.mount import MountInfo, _parse_table, _split_lowerdir, mount_table, unmount_all
from tests.fuzz._settings import examples

PATH_ESCAPES = b" \t\n\\"
OPTION_VALUE_ESCAPES = b", \t\n\\"
OPTION_NAME_ESCAPES = b",= \t\n\\"


def seq_escape(raw: bytes, escapes: bytes) -> bytes:
    """The kernel's seq_escape: the bytes in ``escapes`` as \\ooo, the rest as is."""
    return b"".join(b"\\%03o" % b if b in escapes else bytes([b]) for b in raw)


# any bytes but NUL: what a path, a source or an option value can hold
raw_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
# bytes the parser is most likely to get wrong, more often than chance gives them
tricky = st.lists(st.sampled_from([b" ", b"\t", b"\n", b"\\", b"\r", b"\x0b", b"\x0c", b"\x1c",
                                   b"\xc2\x85", b"\xe2\x80\xa8", b",", b"=", b":", b"-", b"\\134",
                                   b"\\9", b"\\777", b"\xff", b"a", b"/"]),
                  max_size=12).map(b"".join)
path_bytes = st.one_of(raw_bytes, tricky, st.tuples(raw_bytes, tricky).map(b"".join))
optional_fields = st.lists(st.sampled_from(["shared:1", "master:12", "propagate_from:3",
                                            "unbindable"]), max_size=3, unique=True)


@st.composite
def options(draw: st.DrawFn) -> list[tuple[bytes, bytes | None]]:
    names = st.one_of(st.sampled_from([b"size", b"mode", b"lowerdir", b"upperdir", b"uuid"]),
                      path_bytes.filter(bool))
    return draw(st.lists(st.tuples(names, st.one_of(st.none(), path_bytes)), max_size=5))


@st.composite
def rows(draw: st.DrawFn) -> tuple[bytes, MountInfo]:
    """One line as the kernel writes it, and what it must parse to."""
    mount_id = draw(st.integers(0, 2**31 - 1))
    root = b"/" + draw(path_bytes)
    target = b"/" + draw(path_bytes)
    fstype = draw(st.sampled_from([b"tmpfs", b"overlay", b"ext4"])
                  | st.tuples(st.just(b"fuse."), path_bytes.filter(bool)).map(b"".join))
    source = draw(path_bytes)  # may be empty: the field is then empty
    sb_opts = draw(options())
    super_text = b"rw" + b"".join(
        b"," + seq_escape(name, OPTION_NAME_ESCAPES)
        + (b"" if value is None else b"=" + seq_escape(value, OPTION_VALUE_ESCAPES))
        for name, value in sb_opts)
    line = b" ".join([
        str(mount_id).encode(), b"1", b"0:42", seq_escape(root, PATH_ESCAPES),
        seq_escape(target, PATH_ESCAPES), b"rw,relatime",
        *(f.encode() for f in draw(optional_fields)), b"-",
        seq_escape(fstype, PATH_ESCAPES), seq_escape(source, PATH_ESCAPES), super_text,
    ])
    expected = MountInfo(
        mount_id=mount_id, device="0:42", root=os.fsdecode(root), target=os.fsdecode(target),
        fstype=os.fsdecode(fstype), source=os.fsdecode(source),
        super_options=tuple(os.fsdecode(name if value is None else name + b"=" + value)
                            for name, value in [(b"rw", None), *sb_opts]),
    )
    return line, expected


def parse_bytes(data: bytes) -> list[MountInfo]:
    # as mount_table reads the file
    return _parse_table(data.decode("utf-8", "surrogateescape"))


@examples(1000)
@given(st.lists(rows(), min_size=1, max_size=3))
@example([(b"47 27 0:42 / /tmp/a\rb rw,relatime - tmpfs tmpfs rw",
           MountInfo(47, "0:42", "/", "/tmp/a\rb", "tmpfs", "tmpfs", ("rw",)))])
@example([(b"48 27 0:43 / /tmp/c\xc2\x85d rw - tmpfs src\x0bx rw",
           MountInfo(48, "0:43", "/", "/tmp/c\x85d", "tmpfs", "src\x0bx", ("rw",)))])
def test_kernel_lines_parse_back(table: list[tuple[bytes, MountInfo]]) -> None:
    """Whatever paths, sources and options the mounts have, each line gives them back."""
    text = b"".join(line + b"\n" for line, _ in table)
    assert parse_bytes(text) == [row for _, row in table]


def lowerdir_value(paths: list[bytes]) -> bytes:
    # what a mounter passes: ':' separates layers, '\' escapes ':' and itself
    return b":".join(p.replace(b"\\", b"\\\\").replace(b":", b"\\:") for p in paths)


@examples(2000)
@given(st.lists(path_bytes.filter(bool), min_size=1, max_size=5), path_bytes.filter(bool),
       path_bytes.filter(bool))
def test_overlay_layer_paths_parse_back(lowers: list[bytes], upper: bytes, work: bytes) -> None:
    """An overlay's layer paths, as the kernel shows its options, come back exactly."""
    lowers = [b"/" + p for p in lowers]
    upper, work = b"/" + upper, b"/" + work
    opts = b",".join([
        b"rw", b"lowerdir=" + seq_escape(lowerdir_value(lowers), OPTION_VALUE_ESCAPES),
        b"upperdir=" + seq_escape(upper, OPTION_VALUE_ESCAPES),
        b"workdir=" + seq_escape(work, OPTION_VALUE_ESCAPES), b"uuid=on",
    ])
    line = b"49 27 0:41 / /mnt rw,relatime - overlay overlay " + opts + b"\n"
    (row,) = parse_bytes(line)
    assert row.layer_paths() == tuple(os.fsdecode(p) for p in [*lowers, upper, work])


@examples(2000)
@given(st.lists(path_bytes, max_size=5))
def test_split_lowerdir_inverts_the_escaping(paths: list[bytes]) -> None:
    value = os.fsdecode(lowerdir_value(paths))
    assert _split_lowerdir(value) == [os.fsdecode(p) for p in paths if p]


@examples(3000)
@given(st.text(alphabet=st.sampled_from(list(" -\\0123456789:/ab\n\r\t,=\x85\u2028")),
               max_size=80)
       | st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")))
@example("1 2 3 4 5 6 -")
@example("a b c d e f - g h i")
@example("1 2 0:1 \\9 /x rw - t s rw")
@example("1 2 0:1 \\777 /x rw - t s rw")
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        rows = _parse_table(text)
    except ValueError:
        return
    for row in rows:
        assert isinstance(row, MountInfo)


def test_real_mounts_with_line_breaking_characters(tmp_path: Path, privileged: None) -> None:
    """The finding, for real: a mount point with a carriage return, U+0085 or
    U+2028 in its name, or a vertical tab in its source, once made every
    mount_table() raise (str.splitlines cut the line), cleanup's busy check
    with it."""
    names = {"cr": "a\rb", "nel": "c\x85d", "ls": "e\u2028f", "all": " \t\\,\r\x0b\x0c\x1c"}
    targets: dict[str, str] = {}
    try:
        for key, name in names.items():
            path = tmp_path / key / name
            path.mkdir(parents=True)
            _native.mount(f"src\x0b{key}", path, "tmpfs", 0, "size=1m")
            targets[str(path)] = f"src\x0b{key}"
        found = {row.target: row.source for row in mount_table()
                 if row.target.startswith(str(tmp_path))}
        assert found == targets
    finally:
        for target in targets:
            unmount_all(target)
