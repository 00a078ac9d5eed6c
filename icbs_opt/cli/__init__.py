"""The ``icbs-opt`` command line.

Each subcommand is a pair ``add_<name>(subparsers)`` / ``_cmd_<name>(args) -> int``:
the solver commands in :mod:`icbs_opt.cli.solvers`, the pruning commands in
:mod:`icbs_opt.cli.prune` and :mod:`icbs_opt.cli.evaluate`. Errors of the library
(bad input, unknown names, unavailable backends, missing files, unwritable
outputs) print one line on stderr and exit with status 2; Ctrl-C exits with 130
and SIGTERM with 143 (:class:`~icbs_opt.cli.common.Interrupts`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from icbs_opt import __version__
from icbs_opt.cli.common import (
    EXIT_USER_ERROR,
    USER_ERRORS,
    Interrupts,
    Terminated,
    interrupt_status,
)
from icbs_opt.cli.evaluate import add_evaluate
from icbs_opt.cli.flags import cli_message
from icbs_opt.cli.prune import add_prune
from icbs_opt.cli.solvers import add_backends, add_compare, add_solve


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage); exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit with 2."""
        self.exit(
            EXIT_USER_ERROR,
            f"{self.prog}: error: {cli_message(message)} (see {self.prog} --help)\n",
        )


def build_parser() -> argparse.ArgumentParser:
    """Return the ``icbs-opt`` argument parser with every subcommand."""
    parser = _Parser(
        prog="icbs-opt",
        description="Prune neural networks with iCBS and compare block-QUBO solvers.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-vv: debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (add_backends, add_solve, add_compare, add_prune, add_evaluate)
    for add in commands:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with Interrupts().installed():
            return args.func(args)
    except USER_ERRORS as exc:
        print(f"icbs-opt: error: {cli_message(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"icbs-opt: {what}", file=sys.stderr)
        return interrupt_status(exc)


if __name__ == "__main__":
    sys.exit(main())
