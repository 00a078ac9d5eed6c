"""``icbs-opt backends``, ``solve`` and ``compare``: the solver half's commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from icbs_opt.backends import Backend, available_backends, backend_class, get_backend
from icbs_opt.cli.common import (
    EXIT_WRITE_FAILED,
    Terminated,
    add_backend_option_flag,
    add_json_flag,
    check_output,
    interrupt_status,
    parse_key_values,
    progress_bar,
    write_each,
    write_json,
)
from icbs_opt.cli.report import check_plot_path
from icbs_opt.errors import BackendError, BackendUnavailable, DataError, ProblemError
from icbs_opt.problems import BlockProblem


def add_backends(sub: argparse._SubParsersAction) -> None:
    """Add the ``backends`` command."""
    p = sub.add_parser(
        "backends", help="list solver backends, their status and options"
    )
    add_json_flag(p, "the list")
    p.set_defaults(func=_cmd_backends)


def _cmd_backends(args: argparse.Namespace) -> int:
    _check_outputs(args.json)
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
                    {
                        "name": o.name,
                        "kind": o.kind,
                        "default": o.default,
                        "help": o.help,
                    }
                    for o in cls.options
                ],
            }
        )
    if args.json:
        write_json(args.json, rows)
        if args.json == "-":
            return 0
    for row in rows:
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        limit = f", n <= {row['max_n']}" if row["max_n"] is not None else ""
        print(f"{row['name']}  ({status}{limit})")
        for o in row["options"]:
            print(f"    {o['name']} [{o['kind']}] = {o['default']!r}  {o['help']}")
    return 0


# ---------------------------------------------------------------------- solve
def add_solve(sub: argparse._SubParsersAction) -> None:
    """Add the ``solve`` command."""
    p = sub.add_parser(
        "solve", help="solve one block problem file (.npz, UBQP text or .cqm)"
    )
    p.add_argument(
        "file",
        help="problem file: .npz (arrays Q, k and, when grouped, groups), UBQP "
        "text or a dimod .cqm file",
    )
    p.add_argument("--backend", default="native", help="backend name (default native)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="override the file's k (for a grouped problem: the count in every group)",
    )
    add_backend_option_flag(p)
    add_json_flag(p, "the answer")
    p.set_defaults(func=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> int:
    _check_outputs(args.json)
    problem = BlockProblem.load(args.file, k=args.k)
    options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(args.backend, **options)
    sol = backend.solve(problem, seed=args.seed)
    if args.json:
        record: dict[str, Any] = {
            "backend": args.backend,
            "n": problem.n,
            "k": problem.k,
        }
        if problem.is_grouped:  # ungrouped answers keep their keys
            record.update(
                groups=problem.num_groups,
                group_counts=problem.group_counts.tolist(),
            )
        write_json(args.json, {**record, **sol.to_dict()})
        if args.json == "-":
            return 0
    grouped = f" in {problem.num_groups} groups" if problem.is_grouped else ""
    print(
        f"backend {args.backend}: n = {problem.n}, k = {problem.k}{grouped}, "
        f"energy = {sol.energy:.10g}, feasible = {sol.feasible}, "
        f"{sol.seconds:.4f} s"
    )
    return 0


# -------------------------------------------------------------------- compare
def add_compare(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` command."""
    p = sub.add_parser(
        "compare", help="run several backends on block problems and compare them"
    )
    p.add_argument(
        "--problems",
        nargs="+",
        required=True,
        metavar="PATH",
        help="problem files and/or folders of .npz/.ubqp/.qubo/.cqm files",
    )
    p.add_argument(
        "--backends",
        required=True,
        help="comma-separated backend names, e.g. native,neal,exhaustive",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per problem (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument(
        "--backend-option",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="an option for one backend, e.g. neal.num_reads=20 (repeatable)",
    )
    add_json_flag(p, "the summary and every run")
    p.add_argument("--csv", metavar="FILE", help="write one row per run as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="plot gap and time against n")
    p.add_argument(
        "--executor",
        default="threads",
        metavar="SPEC",
        help="where runs are solved: 'threads' (default) or 'dask://HOST:PORT', a "
        "running Dask scheduler (docs/cluster.md)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="threads, or Dask tasks in flight, at once (default: the machine's "
        "cores for threads, braket one per problem; the whole batch for Dask)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it shows only when stderr is a terminal)",
    )
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from icbs_opt import compare as cmp
    from icbs_opt.executors import make_executor

    if args.csv == "-":
        raise DataError("--csv needs a file name: standard output ('-') takes none")
    if args.plot == "-":
        check_plot_path(args.plot)
    _check_outputs(args.json, args.csv, args.plot)
    if args.plot:  # its format, once the path itself is known good
        check_plot_path(args.plot)
    backends = _compare_backends(args.backends, args.backend_option)
    problems, unreadable = cmp.load_problems(cmp.find_problem_files(args.problems))
    if not problems:
        raise ProblemError(
            f"none of the {len(unreadable)} problem files could be read "
            "(each is named in a warning above)"
        )
    total = len(problems) * len(backends) * max(args.repeats, 1)
    finished: list[cmp.Run] = []  # what an interrupt still writes
    try:
        with (
            make_executor(args.executor, workers=args.workers) as executor,
            progress_bar(total, "compare", "run", enabled=not args.no_progress) as bar,
        ):

            def advance(run: cmp.Run) -> None:
                finished.append(run)
                bar.update(args.repeats - run.repeat if run.status == "skipped" else 1)

            result = cmp.compare(
                problems,
                backends,
                repeats=args.repeats,
                seed=args.seed,
                unreadable=unreadable,
                progress=advance,
                executor=executor,
            )
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: keep the finished runs
        partial = cmp.Comparison.of_runs(
            problems, backends, finished, unreadable, interrupted=True
        )
        return _compare_interrupted(args, partial, total, exc)
    return EXIT_WRITE_FAILED if _write_comparison(args, result) else 0


def _write_comparison(args: argparse.Namespace, result: Any) -> list[str]:
    """The table on standard output and the ``--json/--csv/--plot`` files.

    Each file is written on its own (:func:`write_each`).

    Returns:
        The files that could not be written.
    """
    if args.json != "-":  # standard output holds the JSON alone
        _print_comparison(result, args.repeats)
    title = f"{len(result.problems)} block problems"
    writes = [
        (args.json, lambda: write_json(args.json, result.to_dict())),
        (args.csv, lambda: result.write_csv(args.csv)),
        (args.plot, lambda: result.plot(args.plot, title=title)),
    ]
    return write_each([(path, write) for path, write in writes if path])


def _compare_interrupted(
    args: argparse.Namespace, partial: Any, total: int, exc: KeyboardInterrupt
) -> int:
    """Write the runs finished before an interrupt; return 130 (143: SIGTERM)."""
    writes = [
        (args.json, lambda: write_json(args.json, partial.to_dict())),
        (args.csv, lambda: partial.write_csv(args.csv)),
    ]
    failed = write_each([(path, write) for path, write in writes if path])
    files = [f for f in (args.json, args.csv) if f and f != "-" and f not in failed]
    done = sum(run.status == "ok" for run in partial.runs)
    where = f"; partial results in {', '.join(files)}" if files else ""
    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
    print(f"icbs-opt: {what} after {done} of {total} runs{where}", file=sys.stderr)
    return interrupt_status(exc)


def _check_outputs(*paths: str | None) -> None:
    """Check each output file given before any work (``check_output``)."""
    for path in paths:
        if path:
            check_output(path, folder=False)


def _compare_backends(spec: str, items: list[str] | None) -> dict[str, Backend]:
    """The backends of ``--backends a,b`` with their ``NAME.KEY=VALUE`` options."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise BackendError(f"--backends needs at least one backend name, got {spec!r}")
    per_backend: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_key_values(items, "--backend-option").items():
        bname, dot, option = key.partition(".")
        if not dot or bname not in per_backend:
            raise BackendError(
                f"--backend-option expects NAME.key=value with NAME one of "
                f"{', '.join(names)}, got {key!r}"
            )
        per_backend[bname][option] = value
    backends = {}
    for name, options in per_backend.items():
        try:
            backends[name] = get_backend(name, **options)
        except BackendUnavailable as exc:  # say it in compare's NAME.KEY syntax
            text = str(exc).replace("--backend-option ", f"--backend-option {name}.")
            raise BackendUnavailable(text) from None
    return backends


def _print_comparison(result: Any, repeats: int) -> None:
    """The per-backend table of ``compare``."""
    grouped = {r.problem for r in result.runs if r.groups > 1}
    print(
        f"{len(result.problems)} problems ({len(result.unreadable)} unreadable, "
        f"skipped{f'; {len(grouped)} grouped' if grouped else ''}), "
        f"{repeats} repeat(s) per backend"
    )
    header = (
        "backend",
        "runs",
        "skipped",
        "mean gap",
        "median gap",
        "feasible",
        "success",
        "mean s",
    )
    print("  ".join(f"{h:>11}" for h in header))
    for row in result.summary():
        cells = [
            row["backend"],
            row["runs"],
            row["skipped"],
            row["mean_gap"],
            row["median_gap"],
            row["feasible_fraction"],
            row["success_rate"],
            row["mean_seconds"],
        ]
        print("  ".join(_cell(c) for c in cells))


def _cell(value: Any) -> str:
    if value is None:
        return f"{'-':>11}"
    if isinstance(value, float):
        return f"{value:>11.4g}"
    return f"{value!s:>11}"
