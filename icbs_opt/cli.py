"""The ``icbs-opt`` command line.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_cmd_<name>(args) -> int``.
Errors of the library (bad input, unknown names, unavailable backends, missing
files) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from icbs_opt.backends import available_backends, backend_class, get_backend
from icbs_opt.errors import (
    BackendError,
    BackendUnavailable,
    DataError,
    ProblemError,
    PruningError,
)
from icbs_opt.problems import BlockProblem

#: Exceptions reported as one line with exit status 2.
USER_ERRORS = (
    BackendError,
    BackendUnavailable,
    DataError,
    ProblemError,
    PruningError,
    OSError,
)


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """Turn ``["a=1", "b=x"]`` into ``{"a": "1", "b": "x"}``.

    Raises:
        BackendError: For an item without ``=``.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BackendError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _add_backend_option_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend-option",
        action="append",
        metavar="KEY=VALUE",
        help="a backend option (repeatable); see `icbs-opt backends`",
    )


# ------------------------------------------------------------------- backends
def _add_backends(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="list solver backends, their status and options")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_backends)


def _cmd_backends(args: argparse.Namespace) -> int:
    rows = []
    for name, reason in available_backends().items():
        cls = backend_class(name)
        rows.append(
            {
                "name": name,
                "available": reason is None,
                "reason": reason,
                "max_n": cls().size_limit(),
                "options": [
                    {"name": o.name, "kind": o.kind, "default": o.default, "help": o.help}
                    for o in cls.options
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        limit = f", n <= {row['max_n']}" if row["max_n"] is not None else ""
        print(f"{row['name']}  ({status}{limit})")
        for o in row["options"]:
            print(f"    {o['name']} [{o['kind']}] = {o['default']!r}  {o['help']}")
    return 0


# ---------------------------------------------------------------------- solve
def _add_solve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="solve one block problem file (.npz or UBQP text)")
    p.add_argument("file", help="problem file: .npz (arrays Q, k) or UBQP text")
    p.add_argument("--backend", default="native", help="backend name (default native)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--k", type=int, default=None, help="override the file's k")
    _add_backend_option_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> int:
    problem = BlockProblem.load(args.file, k=args.k)
    options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(args.backend, **options)
    sol = backend.solve(problem, seed=args.seed)
    if args.json:
        record = {"backend": args.backend, "n": problem.n, "k": problem.k}
        print(json.dumps({**record, **sol.to_dict()}, default=_json_default))
        return 0
    print(
        f"backend {args.backend}: n = {problem.n}, k = {problem.k}, "
        f"energy = {sol.energy:.10g}, feasible = {sol.feasible}, "
        f"{sol.seconds:.4f} s"
    )
    return 0


def _json_default(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in ``info``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# -------------------------------------------------------------------- compare
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="run several backends on block problems and compare them"
    )
    p.add_argument(
        "--problems",
        nargs="+",
        required=True,
        metavar="PATH",
        help="problem files and/or folders of .npz/.ubqp files",
    )
    p.add_argument(
        "--backends",
        required=True,
        help="comma-separated backend names, e.g. native,neal,exhaustive",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per problem (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument(
        "--backend-option",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="an option for one backend, e.g. neal.num_reads=20 (repeatable)",
    )
    p.add_argument("--json", metavar="FILE", help="write the summary and runs as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one row per run as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="plot gap and time against n")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from icbs_opt import compare as cmp

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    per_backend: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_key_values(args.backend_option, "--backend-option").items():
        bname, dot, option = key.partition(".")
        if not dot or bname not in per_backend:
            raise BackendError(
                f"--backend-option expects NAME.key=value with NAME one of "
                f"{', '.join(names)}, got {key!r}"
            )
        per_backend[bname][option] = value
    backends = {n: get_backend(n, **opts) for n, opts in per_backend.items()}
    problems, unreadable = cmp.load_problems(cmp.find_problem_files(args.problems))
    total = len(problems) * len(backends) * args.repeats
    with tqdm(total=total, desc="compare", unit="run") as bar:

        def advance(run: cmp.Run) -> None:
            skipped = args.repeats - run.repeat if run.status == "skipped" else 1
            bar.update(skipped)

        result = cmp.compare(
            problems,
            backends,
            repeats=args.repeats,
            seed=args.seed,
            unreadable=unreadable,
            progress=advance,
        )
    print(
        f"{len(problems)} problems ({len(unreadable)} unreadable, skipped), "
        f"{args.repeats} repeat(s) per backend"
    )
    header = ("backend", "runs", "skipped", "mean gap", "median gap", "feasible",
              "success", "mean s")
    print("  ".join(f"{h:>11}" for h in header))
    for row in result.summary():
        cells = [row["backend"], row["runs"], row["skipped"], row["mean_gap"],
                 row["median_gap"], row["feasible_fraction"], row["success_rate"],
                 row["mean_seconds"]]
        print("  ".join(_cell(c) for c in cells))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2, default=_json_default)
    if args.csv:
        result.write_csv(args.csv)
    if args.plot:
        result.plot(args.plot)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return f"{'-':>11}"
    if isinstance(value, float):
        return f"{value:>11.4g}"
    return f"{value!s:>11}"


# ----------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """Return the ``icbs-opt`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="icbs-opt",
        description="Prune neural networks with iCBS and compare block-QUBO solvers.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_backends, _add_solve, _add_compare):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"icbs-opt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icbs-opt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
