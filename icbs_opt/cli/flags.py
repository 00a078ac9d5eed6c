"""Flags of `prune` and `evaluate`: settings, task options and zero-shot tasks.

Every field of :class:`~icbs_opt.settings.PruneConfig`,
:class:`~icbs_opt.settings.RunSettings` and of each task's options is one flag:
``--field-name`` unless its :func:`~icbs_opt.settings.setting` names another
(``ridge_multiplier``: ``--ridge``), with the field's help, a type from its
annotation and, in ``--help``, the default of each task. Messages name a setting
by its flag (:func:`flag_of`), so a setting has one name wherever a user meets it.

Example:
    >>> flag_of("ridge_multiplier"), flag_of("seq_len"), flag_of("backend_options")
    ('--ridge', '--seq-len', '--backend-option')
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from icbs_opt.checks import check_int
from icbs_opt.errors import DataError
from icbs_opt.settings import PruneConfig, RunSettings
from icbs_opt.tasks import TaskSpec, task_names, task_spec
from icbs_opt.tasks.options import TextOptions
from icbs_opt.zeroshot import DTYPES, PAPER_TASKS, check_zero_shot, resolve_zero_shot

#: Flags of a run's settings that are not fields of a dataclass.
OTHER_FLAGS = {
    "task": "--task",
    "backend": "--backend",
    "backend_options": "--backend-option",
    "layers": "--layers",
}
#: Task options of earlier versions -> the message naming what replaced them.
REPLACED_OPTIONS = {
    "calib_file": "--calib-file was replaced by --calib-data (a corpus name: "
    "wikitext2, c4; or a .txt/.jsonl file)",
    "eval_file": "--eval-file was replaced by --eval-data (comma-separated corpus "
    "names: wikitext2, c4; or .txt/.jsonl files)",
}
_SETTINGS = (PruneConfig, RunSettings)


def _fields(classes: tuple[type, ...]) -> dict[str, dataclasses.Field]:
    """The fields of ``classes`` by name (the first class with a name wins)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f)
    return fields


def _option_classes() -> tuple[type, ...]:
    return tuple(task_spec(name).options for name in task_names())


def flag_of(name: str) -> str:
    """The flag of a setting or task option named ``name`` (a field name)."""
    if name in OTHER_FLAGS:
        return OTHER_FLAGS[name]
    f = _fields(_SETTINGS + _option_classes()).get(name)
    flag = f.metadata.get("flag") if f is not None else None
    return flag or "--" + name.replace("_", "-")


def _setting_names() -> list[str]:
    """Every setting and task option name, longest first (for replacing)."""
    names = {*_fields(_SETTINGS + _option_classes()), *OTHER_FLAGS}
    return sorted(names, key=len, reverse=True)


#: Reprs of numpy and torch in messages (``np.int64(5)``, ``array([2, 2, 1])``,
#: ``torch.Size([3, 3])``) -> the value.
_REPRS = (
    (re.compile(r"\btorch\.Size\((\[[^()]*\])\)"), r"\1"),
    (re.compile(r"\bnp\.[a-z_]+\d*_?\(([^()]*)\)"), r"\1"),
    (re.compile(r"\barray\((\[[^()]*\])(?:, dtype=\w+)?\)"), r"\1"),
    (re.compile(r"\bnp\.(True|False)_"), r"\1"),
)


def cli_message(text: str) -> str:
    """An error message as the command line shows it: one line, flags, no numpy.

    A setting's field name becomes its flag: every name with an underscore, a
    one-word name that starts the message before ``must``, ``needs`` or ``is
    required``, and each name of a list after ``options:``. Lines are joined
    with ``; ``.

    Example:
        >>> cli_message("block_size must be an integer >= 2, got np.int64(1)")
        '--block-size must be an integer >= 2, got 1'
        >>> cli_message("k must be block_size * (M - N) / M")
        '--k must be --block-size * (M - N) / M'
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    text = lines[0]
    for line in lines[1:]:  # "...for Sequential:" and its list: one sentence
        text += f" {line}" if text.endswith(":") else f"; {line}"
    for pattern, value in _REPRS:
        text = pattern.sub(value, text)
    names = _setting_names()
    text = re.sub(  # a list of options: "its options: cache_dir, device"
        r"(options: )([\w, ]+)",
        lambda m: (
            m[1] + ", ".join(flag_of(n) if n in names else n for n in m[2].split(", "))
        ),  # fmt: skip
        text,
    )
    for name in names:
        if "_" in name:
            text = re.sub(rf"(?<![\w/.'\"-]){name}(?![\w/'\"-])", flag_of(name), text)
        elif re.match(rf"{name} (must|needs|is required)\b", text):
            text = flag_of(name) + text[len(name) :]
    return text


def _argument(f: dataclasses.Field, default_text: str) -> dict[str, Any]:
    """``add_argument`` keywords of a field: type, metavar, help with defaults."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    kind = kind.removesuffix(" | None")
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", f.name) + default_text}
    if kind == "bool":
        return {**kwargs, "action": "store_const", "const": True}
    if kind in ("int", "float"):
        kwargs["type"] = int if kind == "int" else float
    kwargs["metavar"] = f.metadata.get("metavar") or f.name.upper()
    return kwargs


def _defaults(spec: TaskSpec) -> dict[str, Any]:
    """A task's default of every setting (its preset) and option (its fields)."""
    options = {f.name: f.default for f in dataclasses.fields(spec.options)}
    return {**options, **spec.preset.config.to_dict(), **spec.preset.run.to_dict()}


def _default_text(name: str) -> str:
    """`` (default ...)``: one value, or the value of each group of tasks."""
    by_value: dict[str, list[str]] = {}
    for task in task_names():
        defaults = _defaults(task_spec(task))
        if name in defaults:
            by_value.setdefault(str(defaults[name]), []).append(task)
    if len(by_value) == 1 and len(by_value[next(iter(by_value))]) == len(task_names()):
        return f" (default {next(iter(by_value))})"
    parts = [f"{', '.join(tasks)}: {value}" for value, tasks in by_value.items()]
    return f" (default {'; '.join(parts)})"


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every pruning setting (PruneConfig and RunSettings)."""
    group = parser.add_argument_group("pruning settings (default: the task's preset)")
    for name, f in _fields(_SETTINGS).items():
        kwargs = _argument(f, _default_text(name))
        group.add_argument(flag_of(name), dest=name, default=None, **kwargs)


def add_task_flags(
    parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()
) -> None:
    """Add a flag for every option of every task, but those in ``exclude``."""
    group = parser.add_argument_group("task options (passed to the task when given)")
    for name, f in _fields(_option_classes()).items():
        if name not in exclude:
            kwargs = _argument(f, _default_text(name))
            group.add_argument(
                flag_of(name), dest=f"task_{name}", default=None, **kwargs
            )
    for old in REPLACED_OPTIONS:
        group.add_argument(flag_of(old), dest=f"replaced_{old}", help=argparse.SUPPRESS)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, ``{field: value}``."""
    given = {name: getattr(args, name, None) for name in _fields(_SETTINGS)}
    return {k: v for k, v in given.items() if v is not None}


def given_task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The task options given on the command line, ``{field: value}``.

    Raises:
        DataError: For an option of an earlier version; the message names what
            replaced it.
    """
    for old, message in REPLACED_OPTIONS.items():
        if getattr(args, f"replaced_{old}", None) is not None:
            raise DataError(message)
    names = _fields(_option_classes())
    given = {name: getattr(args, f"task_{name}", None) for name in names}
    return {k: v for k, v in given.items() if v is not None}


def add_zero_shot_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--zero-shot TASKS``, ``--limit N`` and ``--zero-shot-dtype``."""
    group = parser.add_argument_group("zero-shot evaluation (causal LMs; lm-eval)")
    group.add_argument(
        "--zero-shot",
        metavar="TASKS",
        help="evaluate zero-shot accuracy with lm-eval on local task files: paper "
        f"({', '.join(PAPER_TASKS)}), all (adds piqa, lambada_openai), or a "
        "comma-separated list",
    )
    group.add_argument(
        "--limit", type=int, metavar="N", help="zero-shot: first N examples per task"
    )
    group.add_argument(
        "--zero-shot-dtype",
        choices=DTYPES,
        help="zero-shot: precision of the forward passes (default float32; "
        "bfloat16 runs the matrix products under autocast, about 1.5x faster on "
        "CPUs with AVX-512 BF16, log-likelihoods within a few percent)",
    )


def zero_shot_tasks(
    args: argparse.Namespace, spec: TaskSpec, options: Any
) -> list[str] | None:
    """The zero-shot tasks asked for, with lm-eval and their files found.

    Raises:
        DataError: For ``--limit`` or ``--zero-shot-dtype`` without
            ``--zero-shot``, a ``--limit`` below 1, a task
            without a causal LM, an unknown zero-shot task or a missing file.
    """
    if args.zero_shot is None:
        for flag in ("limit", "zero_shot_dtype"):
            if getattr(args, flag) is not None:
                raise DataError(f"--{flag.replace('_', '-')} needs --zero-shot")
        return None
    if not isinstance(options, TextOptions):
        raise DataError(
            f"--zero-shot needs a causal language model; task {spec.name!r} has none"
        )
    if args.limit is not None:
        check_int(args.limit, "--limit", minimum=1, error=DataError)
    names = resolve_zero_shot(args.zero_shot)
    check_zero_shot(names, options.data_dir)
    return names
