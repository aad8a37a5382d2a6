"""Run the fuzz targets, long or short (README: Fuzzing).

    sudo .venv/bin/python -m tests.fuzz --long              # 1 h for the C target, 100x examples
    sudo .venv/bin/python -m tests.fuzz --seconds 600 --jobs 2 --merge
    sudo .venv/bin/python -m tests.fuzz --coverage          # llvm-cov over corpus + what was found

The C target keeps what it finds across runs in ``build/fuzz/work/grpc``
(``--merge`` folds the new inputs that add coverage into the committed
corpus); a finding's input lands in ``build/fuzz/work/grpc/artifacts``: fix
it, then copy the input to ``tests/fuzz/regressions/grpc/``.  The Python
targets are hypothesis tests run through pytest with ``OVL_FUZZ_SCALE``
times their CI examples.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tests.fuzz import native

WORK = native.BUILD / "work"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true",
                        help="1 hour for the C target, 100x the examples for the Python ones")
    parser.add_argument("--seconds", type=int, help="the C target's time (default 30, long 3600)")
    parser.add_argument("--scale", type=int, help="examples x SCALE for the Python targets")
    parser.add_argument("--jobs", type=int, default=1, help="libFuzzer -fork=N processes")
    parser.add_argument("--merge", action="store_true",
                        help="fold new inputs that add coverage into the committed corpus")
    parser.add_argument("--coverage", action="store_true",
                        help="print llvm-cov's report of ovl_grpc.c over the corpus and finds")
    parser.add_argument("--only", choices=["c", "python"], help="run one side only")
    args = parser.parse_args(argv)
    seconds = args.seconds or (3600 if args.long else 30)
    scale = args.scale or (100 if args.long else 1)
    failed = False
    if args.only != "python":
        work = WORK / "grpc"
        result = native.fuzz("grpc", work, seconds, jobs=args.jobs)
        print(result.summary())
        if result.found:
            failed = True
            print(result.log[-8000:], file=sys.stderr)
            print(f"FOUND: {[str(p) for p in result.artifacts]}", file=sys.stderr)
        if args.merge:
            proc = native.merge("grpc", work)
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr else "merged")
        if args.coverage:
            print(native.coverage_report(
                "grpc", [native.corpus("grpc"), native.regressions("grpc"), work / "corpus"],
                work))
    if args.only != "c":
        env = {**os.environ, "OVL_FUZZ_SCALE": str(scale)}
        tests = [str(native.HERE / name) for name in
                 ("test_requests.py", "test_filters.py", "test_mountinfo.py")]
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--hypothesis-show-statistics", *tests], env=env,
                              check=False).returncode
        failed |= code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
