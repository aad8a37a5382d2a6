"""``ovl``: the daemon and a ``ctr snapshots``-like command line.

Every command works either in-process on a root directory (``--root``) or
against a running daemon (``--address``, the default socket when neither is
given).  ``main(argv)`` returns the exit status, so tests call it directly.

Exit status: 0 success; 1 an unexpected failure; 2 bad usage; and for the
typed errors: 3 not found, 4 already exists, 5 failed precondition (also:
unsupported kernel or filesystem, a read-only root), 6 invalid argument,
7 unavailable (no daemon, closed store, a store that cannot be opened),
8 resource exhausted (no space or inodes left, the metadata map at its
maximum).  Errors go to stderr as ``ovl: <message>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from overlay import errors
from overlay.mount import Mount, mount_all, unmount_all
from overlay.snapshots import Info, Snapshotter

__all__ = ["EXIT_CODES", "main", "main_entry"]

DEFAULT_ADDRESS = "/run/overlay-snapshotter/overlay.sock"

EXIT_CODES: dict[type[errors.OverlayError], int] = {
    errors.NotFoundError: 3,
    errors.AlreadyExistsError: 4,
    errors.FailedPreconditionError: 5,
    errors.InvalidArgumentError: 6,
    errors.UnavailableError: 7,
    errors.ResourceExhaustedError: 8,
}


def _exit_code(exc: errors.OverlayError) -> int:
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


# --------------------------------------------------------------------- output


def _ts(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def _info_json(info: Info) -> dict[str, Any]:
    # ctr's JSON form: Kind as its String(), timestamps RFC 3339 with nanoseconds
    out: dict[str, Any] = {"Kind": str(info.kind), "Name": info.name}
    if info.parent:
        out["Parent"] = info.parent
    if info.labels:
        out["Labels"] = dict(sorted(info.labels.items()))
    out["Created"] = _ts(info.created_ns)
    out["Updated"] = _ts(info.updated_ns)
    return out


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in (header, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _mount_command(m: Mount, target: str) -> str:
    # ctr's `snapshots mounts` form: a shell command that mounts it
    opts = f" -o {','.join(m.options)}" if m.options else ""
    return f"mount -t {m.type} {m.source} {target}{opts}"


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.InvalidArgumentError(f"label {pair!r} must be key=value")
        labels[key] = value
    return labels


class _Progress:
    """A one-line progress bar on a terminal; silent elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._on = stream.isatty()
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self._on or time.monotonic() - self._started < 0.5:
            return
        width = 30
        filled = width * done // max(total, 1)
        self._stream.write(f"\rreclaiming [{'#' * filled}{' ' * (width - filled)}] {done}/{total}")
        self._stream.flush()
        if done == total:
            self._stream.write("\n")


# ------------------------------------------------------------------- backends


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[Snapshotter]:
    if args.root:
        from overlay.overlayfs import OverlaySnapshotter

        local = OverlaySnapshotter(args.root)
        try:
            yield local
        finally:
            local.close()
        return
    from overlay.client import RemoteSnapshotter

    address = args.address or DEFAULT_ADDRESS
    if not os.path.exists(address.removeprefix("unix://")):
        raise errors.UnavailableError(
            f"no daemon socket at {address!r}: start `ovl serve`, or pass --address SOCKET "
            "or --root DIR"
        )
    remote = RemoteSnapshotter(address, namespace=args.namespace, timeout=args.timeout)
    try:
        yield remote
    finally:
        remote.close()


# ------------------------------------------------------------------- commands


def _cmd_ls(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    infos: list[Info] = []
    sn.walk(infos.append, *args.filters)
    if args.format == "json":
        json.dump([_info_json(i) for i in infos], out, indent=2)
        out.write("\n")
    else:
        _table(out, ("KEY", "PARENT", "KIND"), [(i.name, i.parent, str(i.kind)) for i in infos])
    return 0


def _cmd_tree(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    infos: list[Info] = []
    sn.walk(infos.append)
    names = {i.name for i in infos}
    children: dict[str, list[Info]] = {}
    for i in infos:
        # a parent outside the list (cannot happen in one store) shows as a root
        children.setdefault(i.parent if i.parent in names else "", []).append(i)

    def node(i: Info) -> dict[str, Any]:
        return {"name": i.name, "kind": str(i.kind),
                "children": [node(c) for c in children.get(i.name, [])]}

    roots = children.get("", [])
    if args.format == "json":
        json.dump([node(r) for r in roots], out, indent=2)
        out.write("\n")
        return 0

    def show(i: Info, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        out.write(f"{prefix}{branch}{i.name} ({str(i.kind).lower()})\n")
        kids = children.get(i.name, [])
        pad = "" if top else ("    " if last else "│   ")
        for n, c in enumerate(kids):
            show(c, prefix + pad, n == len(kids) - 1, False)

    for r in roots:
        show(r, "", True, True)
    return 0


def _cmd_info(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    json.dump(_info_json(sn.stat(args.key)), out, indent=4)
    out.write("\n")
    return 0


def _cmd_usage(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    keys = list(args.keys)
    if not keys:
        infos: list[Info] = []
        sn.walk(infos.append)
        keys = [i.name for i in infos]
    rows = [(k, sn.usage(k)) for k in keys]
    if args.format == "json":
        json.dump([{"key": k, "size": u.size, "inodes": u.inodes} for k, u in rows], out,
                  indent=2)
        out.write("\n")
    else:
        _table(out, ("KEY", "SIZE", "INODES"),
               [(k, _human(u.size), str(u.inodes)) for k, u in rows])
    return 0


def _print_mounts(mounts: Sequence[Mount], args: argparse.Namespace, out: TextIO,
                  target: str = "<target>") -> None:
    if args.format == "json":
        json.dump([{"type": m.type, "source": m.source, "target": m.target,
                    "options": list(m.options)} for m in mounts], out, indent=2)
        out.write("\n")
    else:
        for m in mounts:
            out.write(_mount_command(m, target) + "\n")


def _cmd_prepare(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    create = sn.view if args.command == "view" else sn.prepare
    mounts = create(args.key, args.parent, _labels(args.label) or None)
    _print_mounts(mounts, args, out)
    return 0


def _cmd_commit(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    sn.commit(args.name, args.key, _labels(args.label) or None)
    return 0


def _cmd_rm(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    for key in args.keys:
        sn.remove(key)
    return 0


def _cmd_label(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    # ctr's semantics: key=value sets, key= removes; no pairs prints them
    info = sn.stat(args.key)
    if args.labels:
        changes = _labels(args.labels)
        paths = [f"labels.{k}" for k in changes]
        info = sn.update(Info(info.kind, info.name, info.parent, changes), *paths)
    if args.format == "json":
        json.dump(dict(sorted(info.labels.items())), out, indent=2)
        out.write("\n")
    else:
        for k, v in sorted(info.labels.items()):
            out.write(f"{k}={v}\n")
    return 0


def _cmd_mounts(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    _print_mounts(sn.mounts(args.key), args, out, args.target)
    return 0


def _cmd_mount(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    mounts = sn.mounts(args.key)
    try:
        mount_all(mounts, args.target)
    except OSError as exc:
        raise errors.FailedPreconditionError(f"mount {args.key!r} at {args.target!r}: {exc}"
                                             ) from exc
    return 0


def _cmd_umount(args: argparse.Namespace, out: TextIO) -> int:
    try:
        unmount_all(args.target, lazy=args.lazy)
    except OSError as exc:
        raise errors.FailedPreconditionError(f"unmount {args.target!r}: {exc}") from exc
    return 0


def _cmd_cleanup(sn: Snapshotter, args: argparse.Namespace, out: TextIO) -> int:
    from overlay.overlayfs import OverlaySnapshotter

    remote = not isinstance(sn, OverlaySnapshotter)
    if isinstance(sn, OverlaySnapshotter):
        report = sn.cleanup(progress=_Progress(sys.stderr))
    else:
        report = sn.cleanup()
    if args.format == "json":
        json.dump({"directories": report.directories, "entries": report.entries,
                   "bytes": report.bytes, "background": remote,
                   "busy": [{"path": p, "errno": e, "error": os.strerror(e)}
                            for p, e in report.busy]}, out, indent=2)
        out.write("\n")
    else:
        if remote:
            out.write("cleanup requested: the daemon deletes the orphans in the background\n")
        else:
            out.write(f"reclaimed {report.directories} directories, {report.entries} entries, "
                      f"{_human(report.bytes)}\n")
        for path, err in report.busy:
            out.write(f"left in place: {path}: {os.strerror(err)}\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from overlay.server.config import load_config
    from overlay.server.daemon import serve

    overrides = {
        "root": args.root, "address": args.address,
        "sync_remove": True if args.sync_remove else None,
        "upperdir_label": True if args.upperdir_label else None,
        "mount_options": args.mount_option or None, "log_level": args.log_level,
        "metrics_address": args.metrics_address,
    }
    return serve(load_config(args.config, overrides))


# --------------------------------------------------------------------- parser


def target_opts(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """--root or --address, --namespace, --timeout, --format: on the top-level
    parser with their defaults, on a command's with SUPPRESS (see _parser)."""
    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

    where = parser.add_mutually_exclusive_group()
    where.add_argument("--root", default=d(None),
                       help="work in-process on this root directory" + (
                           " (ovl serve: the daemon's root)" if top else ""))
    where.add_argument("-a", "--address", default=d(None),
                       help=f"talk to a daemon (default {DEFAULT_ADDRESS})" + (
                           " (ovl serve: the socket to listen on)" if top else ""))
    parser.add_argument("-n", "--namespace", default=d(None),
                        help="containerd-namespace header for --address")
    parser.add_argument("--timeout", type=float, default=d(None), help="seconds per call")
    parser.add_argument("--format", choices=("table", "json"), default=d("table"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ovl", description="overlay: an overlayfs-native container snapshotter",
        epilog=(__doc__ or "").split("Exit status:", 1)[-1].join(["Exit status:", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The options every command shares go before the verb as well as after it
    # (ovl --root DIR snapshots ls, as with ctr -a ADDR -n NS ...).  After the
    # verb they default to SUPPRESS, so an option left out there never
    # overwrites one given before it.
    target_opts(p, top=True)
    sub = p.add_subparsers(dest="group", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy snapshotter daemon")
    serve.add_argument("--config", help="TOML config (default /etc/overlay-snapshotter/"
                       "config.toml; a missing default file means defaults)")
    serve.add_argument("--root", default=argparse.SUPPRESS, help="snapshotter root directory")
    serve.add_argument("-a", "--address", default=argparse.SUPPRESS,
                       help="unix socket to listen on")
    serve.add_argument("--sync-remove", action="store_true", help="delete at remove time")
    serve.add_argument("--upperdir-label", action="store_true",
                       help="report the upperdir label in Stat/Update/List")
    serve.add_argument("--mount-option", action="append", metavar="OPT",
                       help="an extra overlay mount option (repeatable)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--metrics-address", metavar="HOST:PORT",
                       help="serve Prometheus metrics there")

    snaps = sub.add_parser("snapshots", aliases=["snapshot", "sn"],
                           help="manage snapshots (like ctr snapshots)")
    ssub = snaps.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = ssub.add_parser("ls", aliases=["list"], help="list snapshots")
    c.add_argument("filters", nargs="*", help="containerd filters (any one matches)")
    target_opts(c)
    c = ssub.add_parser("tree", help="show the parent/child tree")
    target_opts(c)
    c = ssub.add_parser("info", help="show one snapshot as JSON")
    c.add_argument("key")
    target_opts(c)
    c = ssub.add_parser("usage", help="disk usage of snapshots")
    c.add_argument("keys", nargs="*")
    target_opts(c)
    for name, what in (("prepare", "an active snapshot"), ("view", "a read-only view")):
        c = ssub.add_parser(name, help=f"create {what}")
        c.add_argument("key")
        c.add_argument("parent", nargs="?", default="")
        c.add_argument("--label", action="append", default=[], metavar="K=V")
        target_opts(c)
    c = ssub.add_parser("commit", help="commit an active snapshot")
    c.add_argument("name")
    c.add_argument("key")
    c.add_argument("--label", action="append", default=[], metavar="K=V")
    target_opts(c)
    c = ssub.add_parser("rm", aliases=["remove", "delete"], help="remove snapshots")
    c.add_argument("keys", nargs="+")
    target_opts(c)
    c = ssub.add_parser("label", help="show or change labels (k=v sets, k= removes)")
    c.add_argument("key")
    c.add_argument("labels", nargs="*")
    target_opts(c)
    c = ssub.add_parser("mounts", help="print the mount commands for a snapshot")
    c.add_argument("target")
    c.add_argument("key")
    target_opts(c)
    c = ssub.add_parser("mount", help="mount a snapshot at TARGET")
    c.add_argument("target")
    c.add_argument("key")
    target_opts(c)
    c = ssub.add_parser("umount", aliases=["unmount"], help="unmount everything at TARGET")
    c.add_argument("target")
    c.add_argument("--lazy", action="store_true", help="detach even if busy")

    c = sub.add_parser("cleanup", help="reclaim the disk of removed snapshots")
    target_opts(c)

    c = sub.add_parser("completion", help="print a shell completion script",
                       description="eval \"$(ovl completion bash)\" in ~/.bashrc")
    c.add_argument("shell", choices=("bash",))
    return p


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """Its options, and the fixed choices of its positional arguments."""
    words = sorted(o for a in parser._actions for o in a.option_strings)
    for a in parser._actions:
        if not a.option_strings and a.choices and not isinstance(
                a, argparse._SubParsersAction):
            words.extend(str(c) for c in a.choices)
    return words


def _bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script derived from the parser itself, so it never
    drifts from the commands: command words first, then that command's options."""
    table: list[tuple[str, list[str]]] = []  # (command path, words to offer)
    top = _subparsers(parser)
    table.append(("", [*top, *_options(parser)]))
    for name, group in top.items():
        subs = _subparsers(group)
        table.append((name, [*subs, *_options(group)]))
        table.extend((f"{name} {cmd}", _options(leaf)) for cmd, leaf in subs.items())
    # a word extends the path only when the longer path is a command; any
    # other word (an option's value, a key) leaves it as it is
    steps = "\n".join(f"            '{path}') path='{path}' ;;" for path, _ in table if path)
    offers = "\n".join(f"        '{path}') opts='{' '.join(words)}' ;;" for path, words in table)
    return f"""# bash completion for ovl: eval "$(ovl completion bash)"
_ovl() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" w i opts=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ $w == -* ]] && continue
        case "${{path:+$path }}$w" in
{steps}
        esac
    done
    case "$path" in
{offers}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -F _ovl ovl
"""


_SNAPSHOT_COMMANDS = {
    "ls": _cmd_ls, "list": _cmd_ls, "tree": _cmd_tree, "info": _cmd_info,
    "usage": _cmd_usage, "prepare": _cmd_prepare, "view": _cmd_prepare,
    "commit": _cmd_commit, "rm": _cmd_rm, "remove": _cmd_rm, "delete": _cmd_rm,
    "label": _cmd_label, "mounts": _cmd_mounts, "mount": _cmd_mount,
}


def _check_global(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot see across the verb: --root and --address given on
    either side for a client command, or an option the command does not take."""
    if args.group == "serve":
        extra = [f"--{k}" for k, v in (("namespace", args.namespace),
                                       ("timeout", args.timeout)) if v is not None]
        if args.format != "table":
            extra.append("--format")
        if extra:
            parser.error(f"ovl serve takes no {', '.join(extra)}")
    elif args.root and args.address:
        parser.error("--root and --address exclude each other: work on a root in-process, "
                     "or talk to a daemon")


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        _check_global(parser, args)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.group == "completion":
            out.write(_bash_completion(parser))
            return 0
        if args.group == "serve":
            return _cmd_serve(args)
        if args.group == "cleanup":
            with _open(args) as sn:
                return _cmd_cleanup(sn, args, out)
        if args.command in ("umount", "unmount"):
            return _cmd_umount(args, out)
        with _open(args) as sn:
            return _SNAPSHOT_COMMANDS[args.command](sn, args, out)
    except errors.OverlayError as exc:
        print(f"ovl: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except OSError as exc:
        print(f"ovl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main_entry() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
