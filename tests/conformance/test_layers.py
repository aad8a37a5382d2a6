"""Layered file trees on real mounts, each compared with a flat reference
directory that received the same changes (issue 3).

Every view is checked with ``snapshot_tree``: types, modes, owners, sizes,
contents, symlink targets, device numbers, xattrs (``user.*`` and
``trusted.*``) and hard-link groups.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlay.mount import OverlayStrategy
from tests.conformance._support import (
    OPT,
    apply,
    assert_same_tree,
    check_snapshots,
    chmod,
    chown,
    create_dir,
    create_file,
    link,
    mkfifo,
    mknod_char,
    mounted,
    new_dir,
    remove_all,
    remove_xattr,
    rename,
    set_xattr,
    symlink,
    write_file,
)
from tests.conformance.conftest import Env, Factory

pytestmark = pytest.mark.privileged


def test_layered_writes(env: Env) -> None:
    """New files, rewrites, in-place partial writes, appends and mode changes
    over three layers; the top write wins, lower-only files stay visible."""
    l1 = apply(
        create_file("/a", b"layer 1\n", 0o644),
        create_file("/b", b"b from layer 1\n", 0o600),
        create_dir("/d", 0o755),
        create_file("/d/deep", b"0123456789", 0o640),
        create_file("/empty", b"", 0o444),
    )
    l2 = apply(
        create_file("/a", b"layer 2 rewrote a\n", 0o644),
        write_file("/d/deep", b"XY", 4),
        create_file("/c", b"new in 2\n", 0o755),
        chmod("/b", 0o664),
    )
    l3 = apply(
        create_file("/a", b"top\n", 0o600),
        write_file("/d/deep", b"!", 10),  # an append through pwrite
        create_dir("/d/sub", 0o711),
        create_file("/d/sub/f", b"x" * 5000, 0o644),
    )
    names = check_snapshots(env, l1, l2, l3)
    with mounted(env.sn.view("top-view", names[-1], OPT), env.work / "top") as mp:
        assert (mp / "a").read_bytes() == b"top\n"
        assert (mp / "b").read_bytes() == b"b from layer 1\n"
        assert (mp / "d" / "deep").read_bytes() == b"0123XY6789!"
        assert (mp / "empty").read_bytes() == b""


def test_deletes_are_whiteouts(env: Env) -> None:
    """Files, symlinks, whole trees, special files removed in a child stay
    removed in every descendant; the parent still has them."""
    l1 = apply(
        create_file("/keep", b"keep\n", 0o644),
        create_file("/gone", b"gone\n", 0o644),
        symlink("keep", "/link-gone"),
        create_dir("/tree", 0o755),
        create_dir("/tree/sub", 0o700),
        create_file("/tree/sub/f", b"f\n", 0o600),
        create_file("/tree/g", b"g\n", 0o600),
        mkfifo("/fifo", 0o600),
        create_dir("/partial", 0o755),
        create_file("/partial/one", b"1", 0o644),
        create_file("/partial/two", b"2", 0o644),
    )
    l2 = apply(
        remove_all("/gone"),
        remove_all("/link-gone"),
        remove_all("/tree"),
        remove_all("/fifo"),
        remove_all("/partial/one"),
    )
    l3 = apply(create_file("/partial/three", b"3", 0o644))
    names = check_snapshots(env, l1, l2, l3)
    with mounted(env.sn.view("bottom-view", names[0], OPT), env.work / "bottom") as mp:
        assert sorted(os.listdir(mp)) == ["fifo", "gone", "keep", "link-gone", "partial", "tree"]


def test_directory_recreated_is_opaque(env: Env) -> None:
    """A directory removed and recreated in a child hides everything the
    lower one had (an opaque directory), also in grandchildren."""
    l1 = apply(
        create_dir("/lib", 0o755),
        create_file("/lib/hidden", b"old", 0o644),
        create_dir("/lib/olddir", 0o755),
        create_file("/lib/olddir/x", b"x", 0o644),
        create_dir("/etc", 0o755),
        create_file("/etc/conf", b"c", 0o644),
    )
    l2 = apply(
        remove_all("/lib"),
        create_dir("/lib", 0o750),
        create_file("/lib/not-hidden", b"new", 0o644),
        remove_all("/etc"),
        create_dir("/etc", 0o755),  # recreated empty
    )
    l3 = apply(create_file("/lib/newfile", b"", 0o644), create_dir("/lib/olddir", 0o700))
    check_snapshots(env, l1, l2, l3)


def test_type_changes(env: Env) -> None:
    """A file replaced by a directory, a directory by a file, a symlink by a
    file and a file by a symlink, in a child layer."""
    l1 = apply(
        create_file("/x", b"file", 0o644),
        create_dir("/y", 0o755),
        create_file("/y/child", b"c", 0o644),
        symlink("/x", "/s"),
        create_file("/t", b"t", 0o644),
    )
    l2 = apply(
        remove_all("/x"),
        create_dir("/x", 0o700),
        create_file("/x/inside", b"i", 0o600),
        remove_all("/y"),
        create_file("/y", b"now a file", 0o640),
        remove_all("/s"),
        create_file("/s", b"no longer a link", 0o644),
        remove_all("/t"),
        symlink("y", "/t"),
    )
    check_snapshots(env, l1, l2, apply())


def test_chown_copy_up(env: Env) -> None:
    """Ownership changes of lower files, directories and symlinks (copy-up of
    metadata only) and of the snapshot's root."""
    l1 = apply(
        create_dir("/srv", 0o755),
        create_file("/srv/data", b"data" * 100, 0o640),
        symlink("data", "/srv/link"),
        create_dir("/srv/sub", 0o700),
        create_file("/srv/sub/f", b"f", 0o600),
    )
    l2 = apply(
        chown("/srv/data", 1000, 1001),
        chown("/srv/link", 7, 8),
        chown("/srv/sub", 65534, 65534),
        chmod("/srv/sub", 0o751),
    )
    l3 = apply(chown("/srv/data", 0, 0), chown("/srv/sub/f", 2, 3))
    check_snapshots(env, l1, l2, l3)


def test_xattrs(env: Env) -> None:
    """user.* and trusted.* xattrs survive layering and copy-up, and can be
    changed and removed in a child."""
    l1 = apply(
        create_file("/f", b"f", 0o644),
        set_xattr("/f", "user.a", b"1"),
        set_xattr("/f", "trusted.t", b"secret"),
        create_dir("/d", 0o755),
        set_xattr("/d", "user.dir", b"d"),
        symlink("f", "/s"),
        set_xattr("/s", "trusted.on-link", b"l"),
        create_file("/g", b"g", 0o644),
        set_xattr("/g", "user.gone", b"x"),
    )
    l2 = apply(
        set_xattr("/f", "user.a", b"changed"),
        remove_xattr("/f", "trusted.t"),
        set_xattr("/d", "trusted.new", b"n"),
        create_file("/d/new", b"", 0o644),
        set_xattr("/d/new", "user.empty", b""),
        remove_xattr("/g", "user.gone"),
    )
    l3 = apply(
        chown("/s", 3, 3),
        set_xattr("/f", "user.b", b"\x00\xff binary"),
    )
    check_snapshots(env, l1, l2, l3)


def test_symlinks(env: Env) -> None:
    """Targets (absolute, relative, dangling, through directories) are kept
    exactly; a link is replaced in a child without touching its target."""
    l1 = apply(
        create_dir("/usr", 0o755),
        create_dir("/usr/lib", 0o755),
        create_file("/usr/lib/libc.so", b"elf", 0o755),
        symlink("usr/lib", "/lib"),
        symlink("/usr/lib/libc.so", "/abs"),
        symlink("../nowhere/at all", "/dangling"),
        symlink("lib/libc.so", "/through-dir"),
    )
    l2 = apply(
        remove_all("/abs"),
        symlink("/usr/lib/libc.so.6", "/abs"),
        create_file("/usr/lib/libc.so.6", b"elf6", 0o755),
        create_file("/lib/via-link", b"written through the link", 0o644),
    )
    check_snapshots(env, l1, l2)


def test_special_files(env: Env) -> None:
    """FIFOs and character devices (not 0/0, which is a whiteout) in layers."""
    l1 = apply(
        mkfifo("/fifo", 0o640),
        mknod_char("/null", 0o666, 1, 3),
        create_dir("/dev", 0o755),
        mknod_char("/dev/zero", 0o600, 1, 5),
    )
    l2 = apply(chown("/null", 5, 5), remove_all("/dev/zero"), mkfifo("/dev/zero", 0o644))
    check_snapshots(env, l1, l2)


def test_moves_and_hard_links_across_layers(env: Env) -> None:
    """Files of a lower layer renamed, moved to another directory, moved over
    an existing file, and hard-linked from a child layer."""
    l1 = apply(
        create_dir("/src", 0o755),
        create_file("/src/move-me", b"moving", 0o644),
        create_file("/src/rename-me", b"renaming", 0o600),
        create_file("/src/over", b"will overwrite", 0o644),
        create_file("/victim", b"overwritten", 0o644),
        create_file("/shared", b"linked", 0o644),
        create_file("/pair-a", b"pair", 0o644),
        link("/pair-a", "/pair-b"),  # a hard link inside one layer
        create_dir("/dst", 0o755),
    )
    l2 = apply(
        rename("/src/move-me", "/dst/moved"),
        rename("/src/rename-me", "/src/renamed"),
        rename("/src/over", "/victim"),
        link("/shared", "/dst/shared-link"),  # both names now share one inode
    )
    l3 = apply(
        link("/dst/moved", "/src/moved-back"),
        remove_all("/dst/moved"),  # a move done as link + unlink
        create_dir("/newdir", 0o755),
        create_file("/newdir/f", b"f", 0o644),
        rename("/newdir", "/renamed-newdir"),  # a directory made in this layer
    )
    check_snapshots(env, l1, l2, l3)


def test_hard_links_within_a_layer(env: Env) -> None:
    l1 = apply(
        create_file("/a", b"one inode", 0o644),
        link("/a", "/b"),
        create_dir("/d", 0o755),
        link("/a", "/d/c"),
    )
    l2 = apply(create_file("/x", b"x", 0o644), link("/x", "/y"), link("/x", "/d/z"))
    check_snapshots(env, l1, l2, apply())


def _deep_stack(
    env: Env, layers: int, strategy: OverlayStrategy, check_every: int
) -> None:
    """``layers`` layers, each Prepare → mount → write → unmount → Commit:
    every layer rewrites /top and adds /layer-<i>; some layers delete or
    shadow earlier files.  Checked against a flat directory now and then
    while building, and in full through a view of the whole stack."""
    sn = env.sn
    flat = new_dir(env.work, "flat-")
    parent = ""
    for i in range(layers):
        changes = [
            create_file("/top", f"layer {i}\n".encode(), 0o644),
            create_file(f"/layer-{i:03d}", f"only in {i}\n".encode(), 0o644),
        ]
        if i % 7 == 3:
            changes.append(remove_all(f"/layer-{i - 2:03d}"))
        if i % 11 == 5:
            changes.append(create_file(f"/layer-{i - 4:03d}", f"shadowed by {i}\n".encode(), 0o600))
        applier = apply(*changes)
        key = f"deep-{i}-prepare"
        with mounted(sn.prepare(key, parent, OPT), env.work / "mnt", strategy=strategy) as mp:
            if i % check_every == 0 or i == layers - 1:
                assert_same_tree(flat, mp, f"layer {i} before apply")
            applier(mp)
            applier(flat)
        parent = f"deep-{i}"
        sn.commit(parent, key, OPT)

    with mounted(sn.view("deep-view", parent, OPT), env.work / "view", strategy=strategy) as mp:
        assert (mp / "top").read_bytes() == f"layer {layers - 1}\n".encode()
        assert (mp / "layer-000").read_bytes() == b"only in 0\n"
        assert (mp / "layer-001").read_bytes() == b"shadowed by 5\n"  # removed by 3, back in 5
        assert not (mp / "layer-008").exists()  # removed by layer 10
        assert (mp / "layer-002").read_bytes() == b"only in 2\n"
        assert (mp / "layer-012").read_bytes() == b"shadowed by 16\n"
        assert_same_tree(flat, mp, "view of the whole stack")


@pytest.mark.slow
def test_128_layer_stack_legacy_mount(env: Env) -> None:
    """128 layers through mount(2): the absolute lowerdirs overflow a page,
    so every mount from layer ~50 on takes the relative-path route."""
    _deep_stack(env, 128, OverlayStrategy.LEGACY, check_every=16)


@pytest.mark.slow
def test_500_layer_stack(tmpfs: Path, snapshotter_factory: Factory) -> None:
    """The kernel's maximum stack depth: 500 lower layers in the last view
    (the new mount API's ``lowerdir+`` where the kernel has it)."""
    _deep_stack(snapshotter_factory(tmpfs), 500, OverlayStrategy.AUTO, check_every=100)
