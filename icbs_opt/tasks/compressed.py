"""Sparse causal-LM checkpoints in the compressed-tensors format.

A pruned model is saved as a Hugging Face folder whose ``config.json`` carries
``quantization_config.sparsity_config``: compressed-tensors' own description of a
sparse model (``format``, ``sparsity_structure``, ``global_sparsity`` over the
targeted layers, ``targets``, ``ignore``), built and serialised by its
``SparsityCompressionConfig`` classes. The weights are either plain (``dense``) or
bitmask-compressed, with the zeros of the targeted layers left out:

- ``sparse-bitmask``: per layer the non-zero values, a bitmask of their places
  (8 weights a byte), the dense shape and each row's first value;
- ``sparse-24-bitmask`` (every layer 2:4): per layer the two kept values of each
  group of four, as a ``(rows, cols / 2)`` tensor, the bitmask and the shape.

These are the tensor layouts of compressed-tensors' sparse compressors. Its
releases from 0.15 on (the ones transformers 5 accepts) keep the config classes
and the bitmask packing but no longer ship those compressors, and transformers 5
cannot decompress such weights, so this module stores and reads them with the
library's packing helpers; :func:`load_state_dict` gives the dense weights back.

Example:
    >>> resolve_save_format("dense")
    'dense'
    >>> resolve_save_format("zip")
    Traceback (most recent call last):
    ...
    icbs_opt.errors.DataError: save_format must be compressed or dense, got 'zip'
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icbs_opt.errors import DataError

logger = logging.getLogger(__name__)

#: ``--save-dtype`` choices: torch dtype names.
SAVE_DTYPES = ("bfloat16", "float16", "float32")
#: ``--save-format`` choices.
SAVE_FORMATS = ("compressed", "dense")
COMPRESS_INSTALL = 'pip install "icbs-opt[compress]"'

DENSE, BITMASK, BITMASK_24 = "dense", "sparse-bitmask", "sparse-24-bitmask"
#: Stored tensors of one compressed layer, besides its ``bitmask``.
_PARTS = ("compressed", "shape", "row_offsets")


def compressed_tensors_available() -> bool:
    """Whether the ``compressed-tensors`` package is installed."""
    return importlib.util.find_spec("compressed_tensors") is not None


def check_save_dtype(name: str) -> str:
    """``name`` if it is one of :data:`SAVE_DTYPES`.

    Raises:
        DataError: For another value.
    """
    if name not in SAVE_DTYPES:
        raise DataError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, "
                        f"got {name!r}")  # fmt: skip
    return name


def resolve_save_format(save_format: str | None) -> str:
    """The format to save in: ``save_format`` or the default.

    The default is ``compressed`` where compressed-tensors is installed and
    ``dense`` where it is not.

    Raises:
        DataError: For an unknown format, or ``compressed`` without the package.
    """
    if save_format is None:
        return "compressed" if compressed_tensors_available() else "dense"
    if save_format not in SAVE_FORMATS:
        raise DataError(f"save_format must be {' or '.join(SAVE_FORMATS)}, "
                        f"got {save_format!r}")  # fmt: skip
    if save_format == "compressed" and not compressed_tensors_available():
        raise DataError(
            f"save_format 'compressed' needs compressed-tensors; install it with: "
            f"{COMPRESS_INSTALL}, or pass --save-format dense"
        )
    return save_format


# -------------------------------------------------------------------- saving
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with its parameters in ``dtype``, buffers as they are.

    This is the model ``from_pretrained(..., dtype=dtype)`` builds from a saved
    folder: transformers keeps buffers such as rotary frequencies in float32.
    """
    lm = copy.deepcopy(model)
    for param in lm.parameters():
        param.data = param.data.to(dtype)
    return lm


def sparsity_config(model: nn.Module, layers: list[str], save_format: str) -> Any:
    """compressed-tensors' ``SparsityCompressionConfig`` of the model's mask.

    ``targets`` are the ``Linear`` modules, ``ignore`` those not in ``layers``;
    ``global_sparsity`` is the fraction of zeros over ``layers``. A model whose
    layers are all 2:4 is compressed as ``sparse-24-bitmask``, any other as
    ``sparse-bitmask``.
    """
    from compressed_tensors.config import SparsityCompressionConfig

    from icbs_opt.pruning import nonzero_density, sparsity_pattern

    pattern = sparsity_pattern(model, layers)
    structure = "unstructured" if pattern == DENSE else pattern
    fmt = (
        DENSE if save_format == "dense" else BITMASK_24 if pattern == "2:4" else BITMASK
    )
    chosen = set(layers)
    ignore = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in chosen
    ]
    return SparsityCompressionConfig.load_from_registry(
        fmt,
        global_sparsity=1.0 - nonzero_density(model, layers),
        sparsity_structure=structure,
        targets=["Linear"],
        ignore=ignore,
    )


def compress_state_dict(
    state_dict: dict[str, torch.Tensor], layers: list[str], fmt: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` with each layer's ``weight`` replaced by its ``fmt`` tensors.

    Raises:
        DataError: For ``sparse-24-bitmask`` and a layer that is not 2:4.
    """
    from compressed_tensors.utils import pack_bitmasks

    out = dict(state_dict)
    for name in layers:
        w = out.pop(f"{name}.weight").cpu()
        if fmt == BITMASK_24:
            groups = w.reshape(-1, 4)  # the two largest of each group are kept
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
            if torch.count_nonzero(groups[~keep]):
                raise DataError(f"layer {name!r} is not 2:4 sparse")
            keep = keep.view(w.shape)
            parts = {
                "compressed": w[keep].reshape(w.shape[0], -1),
                "shape": torch.tensor(w.shape).reshape(-1, 1),
            }
        else:
            keep = w != 0
            counts = keep.sum(dim=-1)
            parts = {
                "compressed": w[keep],
                "shape": torch.tensor(w.shape),
                "row_offsets": torch.cumsum(counts, 0) - counts,
            }
        parts["bitmask"] = pack_bitmasks(keep)  # (rows, ceil(cols / 8)) uint8
        out.update({f"{name}.{part}": value for part, value in parts.items()})
    return out


def decompress_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``state_dict`` with every bitmask-compressed layer's dense ``weight`` back."""
    from compressed_tensors.utils import unpack_bitmasks

    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        bitmask, values = out.pop(key), out.pop(f"{name}.compressed")
        shape = out.pop(f"{name}.shape").flatten().tolist()
        out.pop(f"{name}.row_offsets", None)
        weight = values.new_zeros(shape)  # masked_scatter_: 4x faster than w[m] = v
        weight.masked_scatter_(unpack_bitmasks(bitmask, shape), values.flatten())
        out[f"{name}.weight"] = weight
    return out


def save_sparse_lm(
    model: nn.Module,
    folder: str | os.PathLike,
    layers: list[str],
    dtype: str | None = None,
    save_format: str = "compressed",
) -> None:
    """``save_pretrained`` of the model in ``dtype`` with its sparsity config.

    ``dense`` writes plain weights; ``compressed`` bitmask-compresses ``layers``.
    The caller's model is left as it is. Without compressed-tensors a ``dense``
    folder gets no sparsity config (a warning says so).

    Args:
        model: A Hugging Face causal LM.
        folder: Where ``save_pretrained`` writes (the caller moves the files).
        layers: The prunable layers (the sparsity config's targets).
        dtype: One of :data:`SAVE_DTYPES` (None: the model's own).
        save_format: ``compressed`` or ``dense``.

    Raises:
        DataError: For a bad ``dtype`` or ``save_format``, or ``compressed``
            without compressed-tensors.
    """
    save_format = resolve_save_format(save_format)
    target = getattr(torch, check_save_dtype(dtype)) if dtype else model.dtype
    lm = model if target == model.dtype else cast_parameters(model, target)
    if not compressed_tensors_available():
        logger.warning("compressed-tensors is not installed: %s gets no sparsity "
                       "config (%s)", folder, COMPRESS_INSTALL)  # fmt: skip
        lm.save_pretrained(folder, safe_serialization=True)
        return
    config = sparsity_config(lm, layers, save_format)
    state = None
    if config.format != DENSE:
        state = compress_state_dict(lm.state_dict(), layers, config.format)
    lm.save_pretrained(folder, state_dict=state, safe_serialization=True)
    _write_sparsity_config(Path(folder) / "config.json", config)
    logger.info("saved the model in %s, %s weights", lm.dtype, config.format)


def _write_sparsity_config(path: Path, config: Any) -> None:
    """Add the compressed-tensors block that holds ``config`` to ``config.json``."""
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )

    data = json.loads(path.read_text(encoding="utf-8"))
    data[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: config.model_dump(),
        TRANSFORM_CONFIG_NAME: {},
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


# ------------------------------------------------------------------- loading
def read_sparsity_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sparsity_config`` in ``folder/config.json``; None when it has none.

    Raises:
        DataError: If ``config.json`` is unreadable or names a format other
            than ``dense``, ``sparse-bitmask`` and ``sparse-24-bitmask``.
    """
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from exc
    quant = data.get("quantization_config") or {}
    config = quant.get("sparsity_config") or None
    if config is not None and config.get("format") not in (DENSE, BITMASK, BITMASK_24):
        raise DataError(
            f"{str(path)!r} holds sparsity format {config.get('format')!r}; "
            f"icbs-opt reads {DENSE}, {BITMASK} and {BITMASK_24}"
        )
    return config


def load_state_dict(
    folder: str | os.PathLike, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The dense weights of every ``*.safetensors`` file in ``folder``.

    Raises:
        DataError: If the folder has no weights, or holds compressed weights and
            compressed-tensors is missing.
    """
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise DataError(f"{str(folder)!r} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    if config["format"] == DENSE:
        return state
    if not compressed_tensors_available():
        raise DataError(
            f"{config['format']} weights need compressed-tensors; install it with: "
            f"{COMPRESS_INSTALL}"
        )
    return decompress_state_dict(state)


def from_pretrained(transformers: Any, folder: Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)``, sparse folders too.

    A folder with a sparsity config loads from its dense weights (decompressed
    if need be) with the config's compressed-tensors block dropped, so a
    ``dense`` folder needs no extra package.
    """
    sparse = read_sparsity_config(folder)
    if sparse is None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    config = transformers.AutoConfig.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    del config.quantization_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    state = load_state_dict(folder, sparse)
    return model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
