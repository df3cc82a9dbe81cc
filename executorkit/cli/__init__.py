"""The ``executorkit`` command line: ``run SPEC``, ``status DIR``, ``report DIR``, ``info``.

Also ``python -m executorkit ...``. Each subcommand lives in its own module; this one only
parses arguments and turns expected errors into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from executorkit.errors import ExecutorkitError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from executorkit.cli._run import EXECUTORS

    parser = argparse.ArgumentParser(prog="executorkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the ensembles of a spec file (TOML, JSON, YAML)")
    run.add_argument("spec")
    run.add_argument("--executor", choices=list(EXECUTORS), default="single")
    run.add_argument("--cache-directory", help="default: <spec>.cache beside the spec")
    run.add_argument("--max-workers", type=int)
    run.add_argument("--dry-run", action="store_true", help="print the calls, run nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    status = sub.add_parser("status", help="a campaign's live status, or its cache summary")
    status.add_argument("directory")
    status.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until interrupted")

    report = sub.add_parser("report", help="a self-contained HTML report of a campaign")
    report.add_argument("directory")
    report.add_argument("-o", "--output", default="report.html")

    sub.add_parser("info", help="what this machine offers executorkit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from executorkit.cli._run import run

            if args.max_workers is not None and args.max_workers < 1:
                raise ExecutorkitError(f"--max-workers must be >= 1, got {args.max_workers}")
            return run(args.spec, executor=args.executor, cache_directory=args.cache_directory,
                       max_workers=args.max_workers, dry=args.dry_run,
                       progress=not args.no_progress)
        if args.command == "status":
            from executorkit.cli._status import status

            return status(args.directory, watch=args.watch)
        if args.command == "report":
            from executorkit._report import load_calls, write_report

            if not load_calls(args.directory):
                raise ExecutorkitError(f"{args.directory} holds no cache entries: nothing to "
                                       f"report (give the cache_directory of a campaign)")
            path = write_report(args.directory, args.output)
            print(f"report written to {path}")
            return 0
        from executorkit.cli._info import info

        return info()
    except ExecutorkitError as exc:
        print(f"executorkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
