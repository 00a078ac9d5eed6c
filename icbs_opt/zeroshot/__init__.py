"""Zero-shot accuracy of a causal LM through the LM Evaluation Harness, offline.

The tasks are lm-eval task definitions shipped in ``icbs_opt/zeroshot/tasks/``
(one YAML file each, with lm-eval's own prompts), reading the local files under
``<data folder>/zeroshot/`` (see :mod:`icbs_opt.tasks.corpora` for where the data
folder is looked for). lm-eval's built-in task index is not loaded and nothing is
downloaded: the examples are read into memory by ``tasks/loaders.py``. lm-eval's
HF wrapper scores the requests through :mod:`icbs_opt.zeroshot.packed` (each
context run once for all its continuations).

``paper`` names the seven tasks the iCBS paper, Wanda and SparseGPT report
(boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa); ``all``
adds piqa and lambada_openai. lm-eval is an optional extra:
``pip install "icbs-opt[eval]"``.

Example:
    >>> resolve_zero_shot("paper")[:3]
    ['boolq', 'rte', 'hellaswag']
    >>> resolve_zero_shot("rte, piqa")
    ['rte', 'piqa']
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from icbs_opt.errors import DataError
from icbs_opt.tasks.corpora import resolve_data_dir, split_names

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "tasks"
#: The seven tasks of the iCBS paper, Wanda and SparseGPT, in the paper's order.
PAPER_TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
#: Every task shipped: the paper's seven, then piqa and lambada_openai.
ALL_TASKS = (*PAPER_TASKS, "piqa", "lambada_openai")
EVAL_EXTRA_INSTALL = 'pip install "icbs-opt[eval]"'
#: Requests per forward pass where lm-eval's HF wrapper scores them itself.
DEFAULT_BATCH_SIZE = 16
#: Precisions of the zero-shot forward passes (``--zero-shot-dtype``).
DTYPES = ("float32", "bfloat16")


def resolve_zero_shot(spec: str) -> list[str]:
    """Task names of ``spec``: ``paper``, ``all`` or a comma-separated list.

    Raises:
        DataError: For an unknown or repeated task name.
    """
    text = str(spec).strip()
    if text in ("paper", "all"):
        return list(PAPER_TASKS if text == "paper" else ALL_TASKS)
    names = split_names(text, "--zero-shot")
    for name in names:
        if name not in ALL_TASKS:
            raise DataError(
                f"unknown zero-shot task {name!r}; known: paper, all, "
                f"{', '.join(ALL_TASKS)}"
            )
    return names


def task_files(name: str) -> list[str]:
    """The data files task ``name`` reads, relative to the data folder."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: None)
    config = yaml.load((TASK_DIR / f"{name}.yaml").read_text(), Loader=_Loader)  # noqa: S506
    return [f"zeroshot/{f}" for f in config["dataset_kwargs"]["files"]]


def check_zero_shot(
    tasks: Sequence[str], data_dir: str | os.PathLike | None = None
) -> Path:
    """The data folder, once lm-eval and every task's files are found.

    Raises:
        DataError: If lm-eval is missing (the message gives the install command)
            or a task's file is missing (the message names it and the folder).
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise DataError(
            f"--zero-shot needs lm-eval; install it with: {EVAL_EXTRA_INSTALL}"
        )
    folder = resolve_data_dir(data_dir)
    for name in tasks:
        for file in task_files(name):
            if not (folder / file).is_file():
                raise DataError(
                    f"zero-shot task {name!r} needs {str(folder / file)!r}, which does "
                    "not exist (nothing is downloaded; see --data-dir)"
                )
    return folder


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """No hub access by datasets, transformers or lm-eval; lm-eval logs errors only."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    quiet = not logger.isEnabledFor(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [log.level for log in loggers]
    if quiet:
        for log in loggers:
            log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@contextlib.contextmanager
def _precision(model: Any, dtype: str) -> Iterator[None]:
    """Autocast to bfloat16 for ``dtype == "bfloat16"``; nothing for float32."""
    if dtype == "float32":
        yield
        return
    import torch

    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        yield


def evaluate_zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
    pack: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on ``tasks`` with lm-eval.

    Args:
        model: A Hugging Face causal LM (evaluated as it is, on its device).
        tokenizer: Its tokenizer.
        tasks: Names from :data:`ALL_TASKS`.
        data_dir: The data folder holding ``zeroshot/``.
        limit: At most this many examples per task (the first ones); None: all.
        batch_size: Requests per forward pass, for models whose requests are not
            packed (see :func:`icbs_opt.zeroshot.packed.packable`).
        dtype: ``float32``, or ``bfloat16`` to run the matrix products in
            bfloat16 under autocast (about 1.5x faster on CPUs with AVX-512
            BF16; the model's weights are left as they are).
        pack: Score the continuations of a context behind one copy of it
            (:mod:`icbs_opt.zeroshot.packed`, 1.5x to 2x faster, the same
            log-likelihoods); False: lm-eval's own one row per pair.
        progress: Show lm-eval's progress bar.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
        "examples", ...}}, "mean_acc", "mean_acc_stderr", "paper_mean_acc" (when
        all seven paper tasks ran), "limit", "seconds"}``; ``acc_norm`` only where
        the task has it, ``perplexity`` for lambada_openai.

    Raises:
        DataError: For an unknown task, a bad limit, missing lm-eval or files.
    """
    from icbs_opt.checks import check_int

    if limit is not None:
        check_int(limit, "--limit", minimum=1, error=DataError)
    check_int(batch_size, "batch_size", minimum=1, error=DataError)
    if dtype not in DTYPES:
        raise DataError(
            f"zero-shot dtype must be one of {', '.join(DTYPES)}, not {dtype!r}"
        )
    names = resolve_zero_shot(",".join(tasks))  # unknown or repeated: one line
    folder = check_zero_shot(names, data_dir)
    start = time.perf_counter()
    with _offline_and_quiet():
        raw = _run_lm_eval(
            model, tokenizer, names, folder, limit, batch_size, dtype, pack, progress
        )
    per_task = {name: _task_scores(raw, name) for name in names}
    return {
        "tasks": per_task,
        **_means(per_task),
        "limit": limit,
        "dtype": dtype,
        "seconds": time.perf_counter() - start,
    }


def _run_lm_eval(
    model: Any,
    tokenizer: Any,
    names: list[str],
    folder: Path,
    limit: int | None,
    batch_size: int,
    dtype: str,
    pack: bool,
    progress: bool,
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    device = next(model.parameters()).device
    lm = _wrapper(dtype, pack, progress)(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device)
    )
    manager = TaskManager(
        include_path=str(TASK_DIR),
        include_defaults=False,
        metadata={"data_dir": str(folder / "zeroshot")},
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=limit,
        bootstrap_iters=1000,
        log_samples=False,
        num_fewshot=0,
    )
    if results is None:
        raise DataError("lm-eval returned no results")
    return results


def _wrapper(dtype: str, pack: bool, progress: bool) -> type:
    """lm-eval's HF wrapper class, scoring through :func:`packed.score` if it can."""
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    from icbs_opt.zeroshot import packed

    class _LM(HFLM):  # lm-eval's HF wrapper, scoring through packed.score
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm or not progress)

        def _loglikelihood_tokens(
            self, requests: Any, disable_tqdm: bool = False, override_bs: Any = None
        ) -> list[tuple[float, bool]]:
            with _precision(self.model, dtype):
                if not (pack and packed.packable(self.model)):
                    return super()._loglikelihood_tokens(
                        requests, disable_tqdm, override_bs
                    )
                bar = tqdm(
                    total=len(requests),
                    disable=disable_tqdm,
                    desc="Running loglikelihood requests",
                )
                with bar:
                    answers = packed.score(
                        self.model,
                        requests,
                        max_length=self.max_length,
                        on_done=bar.update,
                    )
            for (key, _, _), answer in zip(requests, answers, strict=True):
                if key is not None:  # None: a rolling window, cached by lm-eval
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return answers

    return _LM


def _task_scores(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """One task's metrics from lm-eval's results (``"acc,none"`` and so on)."""
    metrics = raw["results"][name]
    scores: dict[str, Any] = {}
    for metric in ("acc", "acc_norm", "perplexity"):
        if f"{metric},none" in metrics:
            scores[metric] = float(metrics[f"{metric},none"])
            stderr = metrics.get(f"{metric}_stderr,none")
            scores[f"{metric}_stderr"] = _number(stderr)
    scores["examples"] = int(raw["n-samples"][name]["effective"])
    return scores


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has none
        return None
    return number if math.isfinite(number) else None


def _means(per_task: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Mean accuracy over the tasks run and its standard error.

    Also the mean over the paper's seven tasks when all of them ran.
    """
    accs = [s["acc"] for s in per_task.values()]
    errors = [s.get("acc_stderr") for s in per_task.values()]
    out: dict[str, float | None] = {"mean_acc": sum(accs) / len(accs) if accs else None}
    known = [e for e in errors if e is not None]
    out["mean_acc_stderr"] = (
        math.sqrt(sum(e * e for e in known)) / len(known)
        if known and len(known) == len(errors)
        else None
    )
    if all(name in per_task for name in PAPER_TASKS):
        out["paper_mean_acc"] = sum(per_task[n]["acc"] for n in PAPER_TASKS) / len(
            PAPER_TASKS
        )
    return out


def format_zero_shot(result: dict[str, Any]) -> list[str]:
    """Lines of a table: each task's acc (± stderr), acc_norm, examples; the mean."""
    lines = [f"{'task':>15}  {'acc':>15}  {'acc_norm':>8}  {'examples':>8}"]
    for name, s in result["tasks"].items():
        stderr = s.get("acc_stderr")
        acc = f"{100 * s['acc']:.2f}" + (f" ± {100 * stderr:.2f}" if stderr else "")
        norm = f"{100 * s['acc_norm']:.2f}" if "acc_norm" in s else "-"
        lines.append(f"{name:>15}  {acc:>15}  {norm:>8}  {s['examples']:>8}")
    if result.get("mean_acc") is not None:
        stderr = result.get("mean_acc_stderr")
        mean = f"{100 * result['mean_acc']:.2f}" + (
            f" ± {100 * stderr:.2f}" if stderr else ""
        )
        lines.append(f"{'mean':>15}  {mean:>15}")
    if result.get("limit"):
        lines.append(f"(first {result['limit']} examples per task: --limit)")
    if result.get("dtype", "float32") != "float32":
        lines.append(f"({result['dtype']} forward passes: --zero-shot-dtype)")
    return lines
