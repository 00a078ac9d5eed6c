"""Pruning tasks: a model, its loss, data and metric, registered by name.

A task family declares, without importing torch: its options (a dataclass that
validates them, so bad input fails before a model loads), its :class:`Preset` (the
complete settings a run starts from) and a builder ``build(options) -> Task``. The
built-in families are ``digits-mlp`` (:mod:`icbs_opt.tasks.digits`) and the causal
language models ``smollm2-135m`` and ``causal-lm`` (:mod:`icbs_opt.tasks.causal_lm`).

Example:
    >>> "digits-mlp" in task_names()
    True
    >>> task_spec("digits-mlp").preset.config.block_size
    256
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icbs_opt.errors import DataError
from icbs_opt.settings import Preset
from icbs_opt.tasks.options import (
    CAUSAL_LM_PRESET,
    DIGITS_PRESET,
    CausalLMOptions,
    DigitsOptions,
    TextOptions,
    check_model_dir,
)

if TYPE_CHECKING:
    from torch import nn

    from icbs_opt.derivatives import LossFn

__all__ = [
    "Task",
    "TaskSpec",
    "get_task",
    "load_saved_task",
    "register_task",
    "task_names",
    "task_options",
    "task_spec",
]


@dataclass
class Task:
    """A model to prune with its loss, data and metric.

    Attributes:
        name: Registered name.
        model: The dense, trained model (pruned in place by a Pruner).
        loss_fn: ``loss_fn(model, X, y) -> scalar``, mean of per-sample losses.
        layers: Qualified names of the prunable modules.
        make_batches: ``make_batches(seed)`` -> endless iterator of ``(X, y)``
            pruning batches, the same sequence for the same seed.
        calibration: ``(X, y)`` batch for ``wanda``/``gradient`` init.
        evaluate: ``evaluate(model) -> {"metric": float, "loss": float}``.
        metric: Name of the metric, ``"accuracy"`` (in %) or ``"perplexity"``.
        save_model: ``save_model(model, directory) -> [files]`` writes the model.
        higher_is_better: Whether a larger metric is better.
        info: Facts shown to users and saved with results (e.g. dense accuracy).
        validate: Like ``evaluate``, on the held-out validation split that
            neither the pruning batches nor the calibration use (None: the
            task's options hold out none; see ``with_validation``).
        zero_shot: ``zero_shot(model, tasks, limit, **options) -> results`` runs
            zero-shot tasks on the model
            (:func:`icbs_opt.zeroshot.evaluate_zero_shot`; None: the task has
            none, as classifiers).
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    layers: list[str]
    make_batches: Callable[[int], Iterator[tuple[Any, Any]]]
    calibration: tuple[Any, Any]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    save_model: Callable[[nn.Module, str | os.PathLike], list[Path]]
    higher_is_better: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    validate: Callable[[nn.Module], dict[str, float]] | None = None
    zero_shot: Callable[..., dict[str, Any]] | None = None

    def batches(self, seed: int = 0) -> Iterator[tuple[Any, Any]]:
        """Endless seeded iterator of pruning batches."""
        return self.make_batches(seed)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task family member.

    Attributes:
        name: Registered name.
        options: The options dataclass; its fields are the task's options.
        preset: The settings a run of this task starts from.
        build: ``build(options) -> Task``.
        load_saved: ``load_saved(directory, options) -> Task`` with the model an
            ``icbs-opt prune --out`` folder holds (None: not supported).
    """

    name: str
    options: type
    preset: Preset
    build: Callable[[Any], Task]
    load_saved: Callable[[Path, Any], Task] | None = None

    def make_options(self, **options: Any) -> Any:
        """The validated options object.

        Raises:
            DataError: For an option the task does not take or a bad value.
        """
        known = [f.name for f in dataclasses.fields(self.options)]
        for key in options:
            if key not in known:
                raise DataError(
                    f"task {self.name!r} does not take option {key!r}; its options: "
                    f"{', '.join(known) or 'none'}"
                )
        return self.options(**options)


_TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str,
    build: Callable[[Any], Task],
    *,
    options: type,
    preset: Preset,
    load_saved: Callable[[Path, Any], Task] | None = None,
) -> None:
    """Register a task: ``build(options_object) -> Task`` under ``name``.

    Raises:
        DataError: If the name is taken, the builder is not callable or
            ``options`` is not a dataclass.
    """
    if not callable(build):
        raise DataError(f"task {name!r} needs a callable builder, got {build!r}")
    if not dataclasses.is_dataclass(options):
        raise DataError(f"task {name!r}: options must be a dataclass, got {options!r}")
    if name in _TASKS:
        raise DataError(f"a task named {name!r} is already registered")
    _TASKS[name] = TaskSpec(name, options, preset, build, load_saved)


def task_names() -> list[str]:
    """Names of the registered tasks."""
    return list(_TASKS)


def task_spec(name: str) -> TaskSpec:
    """The registered task ``name``.

    Raises:
        DataError: For an unknown name; the message lists the known ones.
    """
    try:
        return _TASKS[name]
    except KeyError:
        raise DataError(
            f"unknown task {name!r}; known tasks: {', '.join(_TASKS)}"
        ) from None


def task_options(name: str) -> list[str]:
    """Option names the task ``name`` takes."""
    return [f.name for f in dataclasses.fields(task_spec(name).options)]


def get_task(name: str, **options: Any) -> Task:
    """Build the task ``name`` with task-specific ``options``.

    Raises:
        DataError: For an unknown task (the message lists the known ones), an
            option the task does not take, or a bad option value.
    """
    spec = task_spec(name)
    return spec.build(spec.make_options(**options))


def load_saved_task(name: str, directory: str | os.PathLike, **options: Any) -> Task:
    """The task ``name`` with the model saved in ``directory`` by ``prune --out``.

    Raises:
        DataError: If the task cannot reload a saved model or the folder is
            unreadable.
    """
    spec = task_spec(name)
    if spec.load_saved is None:
        raise DataError(f"task {name!r} cannot load a saved model")
    folder = check_model_dir(directory, hugging_face=False)
    return spec.load_saved(folder, spec.make_options(**options))


# ------------------------------------------------------------------ built-ins
def _build_digits(options: DigitsOptions) -> Task:
    from icbs_opt.tasks.digits import build_digits_mlp

    return build_digits_mlp(options)


def _load_digits(directory: Path, options: DigitsOptions) -> Task:
    from icbs_opt.tasks.digits import load_saved_digits_mlp

    return load_saved_digits_mlp(directory, options)


def _build_smollm2(options: TextOptions) -> Task:
    from icbs_opt.tasks.causal_lm import build_smollm2_task

    return build_smollm2_task(options)


def _build_causal_lm(options: CausalLMOptions) -> Task:
    from icbs_opt.tasks.causal_lm import build_causal_lm_task

    return build_causal_lm_task(options)


def _load_causal_lm(directory: Path, options: TextOptions) -> Task:
    from icbs_opt.tasks.causal_lm import build_causal_lm_task

    text = dataclasses.asdict(options)
    text.pop("model", None)
    return build_causal_lm_task(CausalLMOptions(model=str(directory), **text))


register_task(
    "digits-mlp",
    _build_digits,
    options=DigitsOptions,
    preset=DIGITS_PRESET,
    load_saved=_load_digits,
)
register_task(
    "smollm2-135m",
    _build_smollm2,
    options=TextOptions,
    preset=CAUSAL_LM_PRESET,
    load_saved=_load_causal_lm,
)
register_task(
    "causal-lm",
    _build_causal_lm,
    options=CausalLMOptions,
    preset=CAUSAL_LM_PRESET,
    load_saved=_load_causal_lm,
)
