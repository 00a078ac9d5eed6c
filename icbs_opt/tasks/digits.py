"""The ``digits-mlp`` task: a 64-256-256-10 MLP on scikit-learn's 8x8 digits.

The model is trained on first use by a fixed recipe and cached (see
:func:`default_cache_dir`); its test accuracy is the metric.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.errors import DataError
from icbs_opt.executors import torch_threads
from icbs_opt.tasks import Task
from icbs_opt.tasks.options import DigitsOptions

logger = logging.getLogger(__name__)

#: Environment variable that overrides the cache directory.
CACHE_ENV = "ICBS_OPT_CACHE_DIR"


def default_cache_dir() -> Path:
    """The cache directory: ``$ICBS_OPT_CACHE_DIR`` or the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("icbs-opt"))


def save_state_dict(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Write ``model.state_dict()`` to ``directory/model.safetensors``, atomically.

    Returns:
        The written files.
    """
    from safetensors.torch import save_file

    from icbs_opt.atomic import atomic_path

    path = Path(directory) / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(str(path)) as tmp:  # a kill leaves the previous file
        save_file(state, tmp)
    return [path]


# ------------------------------------------------------------------ digits-mlp
#: The digits recipe; part of the cache key, so a change retrains.
DIGITS_RECIPE: dict[str, Any] = {
    "sizes": [64, 256, 256, 10],
    "test_size": 0.3,
    "split_seed": 0,
    "lr": 3e-3,
    "epochs": 200,
    "seed": 0,
    "version": 2,
}


def digits_mlp_model() -> nn.Sequential:
    """The untrained 64-256-256-10 ReLU MLP (prunable layers ``0``, ``2``, ``4``)."""
    sizes = DIGITS_RECIPE["sizes"]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn digits, inputs / 16, 70/30 split: ``X_tr, y_tr, X_te, y_te``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X / 16.0,
        y,
        test_size=DIGITS_RECIPE["test_size"],
        random_state=DIGITS_RECIPE["split_seed"],
    )
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return f(X_tr), i(y_tr), f(X_te), i(y_te)


def classification_loss(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``model(X)`` against class labels ``y``."""
    return F.cross_entropy(model(X), y)


def classifier_evaluator(
    X: torch.Tensor, y: torch.Tensor
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model)`` giving accuracy in % and mean cross-entropy on (X, y)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = model(X)
            acc = (logits.argmax(1) == y).double().mean().item() * 100
            return {"metric": acc, "loss": F.cross_entropy(logits, y).item()}

    return evaluate


def train_digits_mlp(
    X: torch.Tensor, y: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor
) -> tuple[nn.Sequential, float]:
    """Train the digits MLP by the recipe (Adam, full batch, seeded).

    Returns:
        The model (in eval mode) and its test accuracy in %.
    """
    torch.manual_seed(DIGITS_RECIPE["seed"])
    model = digits_mlp_model().to(X.device)
    opt = torch.optim.Adam(model.parameters(), lr=DIGITS_RECIPE["lr"])
    with torch_threads(1):  # this tiny model gains nothing from more threads
        for _ in range(DIGITS_RECIPE["epochs"]):
            opt.zero_grad()
            classification_loss(model, X, y).backward()
            opt.step()
    model.eval()
    return model, classifier_evaluator(X_test, y_test)(model)["metric"]


def _digits_cache_file(directory: Path) -> Path:
    return directory / f"digits-mlp-v{DIGITS_RECIPE['version']}.safetensors"


_DATA_KEYS = ("X_train", "y_train", "X_test", "y_test")


#: A trained digits MLP, its data split and its test accuracy in %.
Trained = tuple[nn.Sequential, tuple[torch.Tensor, ...], float]


def _read_cache(path: Path, instead: str) -> Trained | None:
    """The cached model, data and accuracy; None if missing, corrupt or outdated.

    ``instead`` (what the caller does without them) ends the log message.
    """
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if meta.get("recipe") != json.dumps(DIGITS_RECIPE, sort_keys=True):
            logger.info("cached digits MLP %s has another recipe; %s", path, instead)
            return None
        model = digits_mlp_model()
        model.load_state_dict(
            {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        data = tuple(tensors[f"data.{k}"] for k in _DATA_KEYS)
        logger.info("loaded the digits MLP from %s", path)
        return model.eval(), data, float(meta["accuracy"])
    except Exception as exc:  # a corrupt cache file is rebuilt, not fatal
        logger.warning("cannot read cached model %s (%s); %s", path, exc, instead)
        return None


def load_or_train_digits_mlp(directory: Path, *, retrain: bool = False) -> Trained:
    """The trained digits MLP and its data split, from the cache if possible.

    The cache file holds the model, the split data (so a warm start does not
    import scikit-learn) and the test accuracy; a missing, corrupt or outdated
    file is rebuilt.

    Returns:
        The model (CPU, eval mode), ``(X_train, y_train, X_test, y_test)`` and
        the test accuracy in %.
    """
    from safetensors.torch import save_file

    path = _digits_cache_file(directory)
    recipe = json.dumps(DIGITS_RECIPE, sort_keys=True)
    cached = None if retrain else _read_cache(path, "retraining")
    if cached is not None:
        return cached
    data = digits_data()
    start = time.perf_counter()
    model, accuracy = train_digits_mlp(*data)
    logger.info(
        "trained the digits MLP in %.1f s: test accuracy %.2f%%",
        time.perf_counter() - start,
        accuracy,
    )
    tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    tensors.update({f"data.{k}": v for k, v in zip(_DATA_KEYS, data, strict=True)})
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        meta = {"recipe": recipe, "accuracy": repr(accuracy)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), meta)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot cache the digits MLP in %s: %s", directory, exc)
    return model, data, accuracy


def build_digits_mlp(options: DigitsOptions) -> Task:
    """The ``digits-mlp`` task: test accuracy in %, calibration = the training set.

    Pruning batches are ``options.batch_size`` training samples drawn without
    replacement within a batch, seeded.
    """
    model, data, accuracy = load_or_train_digits_mlp(
        _cache_dir(options), retrain=options.retrain
    )
    return _digits_task(model, data, {"dense_accuracy": accuracy}, options)


def _cache_dir(options: DigitsOptions) -> Path:
    cache = options.cache_dir
    return Path(cache) if cache is not None else default_cache_dir()


def _digits_task(
    model: nn.Sequential,
    data: tuple[torch.Tensor, ...],
    info: dict[str, Any],
    options: DigitsOptions,
) -> Task:
    """The task of ``model`` on the digits ``data``; ``info`` joins its facts."""
    X_tr, y_tr, X_te, y_te = (t.to(options.device) for t in data)
    (X_tr, y_tr), (X_val, y_val) = holdout(X_tr, y_tr, options.val_fraction)
    batch_size = options.batch_size
    if batch_size > len(X_tr):
        raise DataError(f"batch_size must be in [1, {len(X_tr)}], got {batch_size!r}")
    model.to(options.device)

    def make_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(seed)
        while True:
            idx = torch.from_numpy(rng.choice(len(X_tr), batch_size, replace=False))
            idx = idx.to(X_tr.device)
            yield X_tr[idx], y_tr[idx]

    return Task(
        name="digits-mlp",
        model=model,
        loss_fn=classification_loss,
        layers=["0", "2", "4"],
        make_batches=make_batches,
        calibration=(X_tr, y_tr),
        evaluate=classifier_evaluator(X_te, y_te),
        metric="accuracy",
        save_model=save_state_dict,
        higher_is_better=True,
        info={
            **info,
            "train": len(X_tr),
            "test": len(X_te),
            "validation": len(X_val),
        },
        validate=classifier_evaluator(X_val, y_val) if len(X_val) else None,
    )


#: Seed of the validation split's draw from the training set.
VALIDATION_SEED = 2024


def holdout(
    X: torch.Tensor, y: torch.Tensor, fraction: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Split ``round(fraction * len(X))`` seeded random samples off ``(X, y)``.

    Returns:
        ``(X_rest, y_rest), (X_val, y_val)``; with ``fraction`` 0 the rest is
        ``(X, y)`` itself, in its order.
    """
    count = round(fraction * len(X))
    if not count:
        return (X, y), (X[:0], y[:0])
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(X))
    rest = torch.from_numpy(np.sort(order[count:])).to(X.device)
    val = torch.from_numpy(np.sort(order[:count])).to(X.device)
    return (X[rest], y[rest]), (X[val], y[val])


def load_saved_digits_mlp(directory: Path, options: DigitsOptions) -> Task:
    """The ``digits-mlp`` task with the weights ``prune --out`` saved in directory.

    Nothing is trained or written: the data comes from the digits cache when it
    holds them, else from scikit-learn.

    Raises:
        DataError: If ``model.safetensors`` is missing, unreadable or not a
            digits MLP.
    """
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    model = digits_mlp_model()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:  # safetensors and torch raise several types
        raise DataError(f"cannot load a digits MLP from {str(path)!r}: {exc}") from exc
    cache = _digits_cache_file(_cache_dir(options))
    cached = _read_cache(cache, "reading the digits from scikit-learn")
    data = cached[1] if cached is not None else digits_data()
    return _digits_task(model.eval(), data, {}, options)
