"""Gradients, per-sample gradients and Hessian blocks for iCBS.

Every function takes ``loss_fn(model, X, y) -> scalar``, the mean over the batch's
samples of per-sample losses, and works on the weight of one ``nn.Linear`` or
``nn.Conv2d`` module. Weights are addressed by flat indices into
``weight.reshape(d_out, -1)``: index ``i`` is row ``i // d_in``, column ``i % d_in``
(for a Conv2d, ``d_in = C_in * kh * kw`` in :func:`torch.nn.functional.unfold`
order).

:func:`record_layers` serves any set of layers with ONE forward/backward of each
(sub-)batch: the recording engine (:func:`icbs_opt.recording.recording`) keeps
each layer's input rows ``x`` and the backward pass asks for the gradients
``delta = dL/d(out)`` of the layer outputs only. A block's per-sample gradients are then
``G[s, i] = N * sum_t delta[s, t, row_i] * x[s, t, col_i]`` (the factor ``N``
undoes the mean over samples); the per-sample gradients of a whole layer are
formed only where they are no larger than the rows (:meth:`LayerTape.gradient`).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> loss_fn = lambda m, X, y: F.cross_entropy(m(X), y)
    >>> X, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> G = per_sample_block_gradients(model, loss_fn, X, y, model[0], [0, 5, 11])
    >>> G.shape
    torch.Size([5, 3])
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.errors import PruningError
from icbs_opt.recording import recording
from icbs_opt.settings import HESSIAN_MODELS

#: ``loss_fn(model, X, y) -> scalar tensor``: mean of per-sample losses.
LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


# --------------------------------------------------------------------- helpers
def check_prunable(module: nn.Module, name: str = "module") -> None:
    """Raise ``PruningError`` unless ``module`` is a supported prunable layer.

    Supported: ``nn.Linear`` and ungrouped ``nn.Conv2d``.
    """
    if not isinstance(module, PRUNABLE_TYPES):
        raise PruningError(
            f"layer {name!r} is a {type(module).__name__}; only Linear and Conv2d "
            "weights can be pruned"
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise PruningError(
            f"layer {name!r} is a grouped Conv2d (groups = {module.groups}); only "
            "groups = 1 is supported"
        )


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of the module's weight seen as a matrix."""
    w = module.weight
    return w.shape[0], w.numel() // w.shape[0]


def split_batch(X: Any, y: Any, max_batch_size: int | None) -> list[tuple[Any, Any]]:
    """Split a batch along dim 0 into sub-batches of at most ``max_batch_size``.

    ``X`` and ``y`` are tensors (or anything sliceable with ``len``) with the
    samples on their first dimension; ``None`` keeps the batch whole.
    """
    n = len(X)
    if n == 0:
        raise PruningError("the batch is empty (0 samples)")
    if max_batch_size is None or max_batch_size >= n:
        return [(X, y)]
    return [
        (X[i : i + max_batch_size], y[i : i + max_batch_size])
        for i in range(0, n, max_batch_size)
    ]


@contextlib.contextmanager
def _requires_grad(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily switch on ``requires_grad`` for ``params``."""
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, old, strict=True):
            p.requires_grad_(flag)


def _scalar_loss(loss_fn: LossFn, model: nn.Module, X: Any, y: Any) -> torch.Tensor:
    loss = loss_fn(model, X, y)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
        raise PruningError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss


def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a Conv2d, resolving 'same'/'valid'."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size[::-1], module.dilation[::-1], strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as ``(N, T, d_in)`` rows that multiply the weight matrix.

    Linear: ``(N, d_in)`` becomes ``(N, 1, d_in)``, ``(N, *, d_in)`` is flattened
    to ``(N, T, d_in)``. Conv2d: the unfolded patches ``(N, L, C_in*kh*kw)``.
    """
    if isinstance(module, nn.Conv2d):
        pad = _conv_padding(module)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, module.kernel_size, module.dilation, 0, module.stride)
        return cols.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_grads(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """The gradient of the layer output as ``(N, T, d_out)``, matching inputs."""
    if isinstance(module, nn.Conv2d):
        return delta.flatten(2).transpose(1, 2)
    return delta.reshape(delta.shape[0], -1, delta.shape[-1])


# ------------------------------------------------------------------ gradients
def layer_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    modules: Sequence[nn.Module],
    *,
    max_batch_size: int | None = None,
) -> list[torch.Tensor]:
    """Full gradients of the loss w.r.t. the weights of ``modules``.

    One backward per sub-batch; sub-batch gradients are weighted by their share
    of the samples so the result is the gradient of the whole batch's mean loss.
    ``.grad`` fields are left untouched.

    Returns:
        One tensor per module, shaped like its weight.
    """
    weights = [m.weight for m in modules]
    total = [torch.zeros_like(w) for w in weights]
    n = len(X)
    with _requires_grad(weights):
        for Xb, yb in split_batch(X, y, max_batch_size):
            loss = _scalar_loss(loss_fn, model, Xb, yb)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g, alpha=len(Xb) / n)
    return [t.detach() for t in total]


class LayerTape:
    """A layer's inputs and per-sample output gradients over one batch.

    Recorded by :func:`record_layers`. Holds, per sub-batch, the rows ``x``
    ``(b, T, d_in)`` that multiply the weight and the per-sample output gradients
    ``b * dL/d(out)`` ``(b, T, d_out)``: enough for the layer's gradient and any
    block's per-sample gradients without another forward/backward. Layers fed the
    same input tensor (q/k/v, gate/up) share its storage.

    :meth:`gradient` forms the per-sample gradients of the whole layer (its
    products are those of the gradient) and, when they take no more memory than
    the rows, keeps them instead of the rows: a block's per-sample gradients are
    then a lookup (sequence models, where ``T`` is large); otherwise they are
    summed from the rows (``T = 1``: the rows are the smaller form).

    Attributes:
        module: The layer.
        xs: ``(b, T, d_in)`` input rows per sub-batch (calls concatenated on T);
            empty once the per-sample gradients replace them.
        deltas: ``(b, T, d_out)`` per-sample output gradients, aligned with ``xs``.
        seconds: Wall time of the recording pass.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.xs: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor] = []
        self.seconds = 0.0
        self._per_sample: torch.Tensor | None = None  # (N, numel) once formed

    @property
    def samples(self) -> int:
        """Samples of the batch."""
        if self._per_sample is not None:
            return self._per_sample.shape[0]
        return sum(len(x) for x in self.xs)

    def gradient(self) -> torch.Tensor:
        """Gradient of the batch's mean loss, shaped like the weight."""
        w = self.module.weight
        d_out, d_in = weight_matrix_shape(self.module)
        smaller = self.samples * d_out * d_in * 4 <= self.nbytes()
        if self._per_sample is None and smaller:
            G = self.xs[0].new_empty(self.samples, d_out, d_in, dtype=torch.float32)
            start = 0
            for x, d in zip(self.xs, self.deltas, strict=True):  # per sub-batch
                out = G[start : start + len(x)]
                torch.bmm(_wide(d).transpose(1, 2), _wide(x), out=out)
                start += len(x)
            self._per_sample = G.reshape(self.samples, -1)
            self.xs, self.deltas = [], []  # the rows of q/k/v live while one needs them
        if self._per_sample is not None:
            grad = self._per_sample.sum(0)
        else:
            grad = sum(  # (d_out, d_in), sub-batch by sub-batch
                torch.einsum("bto,bti->oi", _wide(d), _wide(x))
                for x, d in zip(self.xs, self.deltas, strict=True)
            )
        return (grad / self.samples).reshape(w.shape).to(w.dtype)

    def per_sample_block_gradients(self, idx: Any) -> torch.Tensor:
        """``(N, n)`` float64 per-sample gradients of the flat weight indices idx."""
        _, d_in = weight_matrix_shape(self.module)
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.module.weight.device)
        if self._per_sample is not None:
            return self._per_sample[:, idx].to(torch.float64)
        rows, cols = idx // d_in, idx % d_in
        parts = [  # (b, n) per sub-batch: sum over T of delta * x
            (_wide(d[..., rows]) * _wide(x[..., cols])).sum(1)
            for x, d in zip(self.xs, self.deltas, strict=True)
        ]
        return torch.cat(parts).to(torch.float64)

    def nbytes(self) -> int:
        """Bytes of the tensors held (a storage shared with another tape counts)."""
        held = self.xs + self.deltas
        if self._per_sample is not None:
            held.append(self._per_sample)
        return sum(t.numel() * t.element_size() for t in held)


def record_layers(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    modules: Sequence[nn.Module],
    *,
    max_batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    memory_limit: int | None = None,
) -> tuple[list[LayerTape], float]:
    """One forward/backward per sub-batch, keeping the layers' inputs and deltas.

    The backward pass asks only for the layer outputs' gradients, so no weight
    gradient is formed.

    Args:
        model: The model; ``loss_fn(model, X, y)`` is its mean per-sample loss.
        loss_fn: The loss.
        X: Inputs, samples on dim 0.
        y: Targets, samples on dim 0.
        modules: Distinct ``nn.Linear``/``nn.Conv2d`` modules of the model.
        max_batch_size: Largest sub-batch per forward/backward (None: whole batch).
        dtype: Storage dtype of the tapes (None: at least float32); ``bfloat16``
            halves their memory, products are still taken in float32.
        memory_limit: Bytes the tapes may take, checked on an estimate after the
            first sub-batch.

    Returns:
        One :class:`LayerTape` per module and the batch's mean loss.

    Raises:
        PruningError: If a module is never called or the tapes would not fit.
    """
    for m in modules:
        check_prunable(m)
    start = time.perf_counter()
    tapes = {id(m): LayerTape(m) for m in modules}
    recorder = _Recorder(tapes, dtype, len(X))
    loss_sum, chunks = 0.0, split_batch(X, y, max_batch_size)
    try:
        with recording(modules, recorder.hook):
            for i, (Xb, yb) in enumerate(chunks):
                recorder.b = len(Xb)
                loss = _scalar_loss(loss_fn, model, Xb, yb)
                recorder.backward(loss)
                loss_sum += float(loss.detach()) * len(Xb)
                if i == 0 and memory_limit is not None:
                    _check_memory(recorder, len(chunks), memory_limit)
    finally:
        recorder.calls.clear()
        recorder.buffers.clear()
    seconds = time.perf_counter() - start
    for tape in tapes.values():
        _check_called(tape.module, bool(tape.xs), "forward")
        tape.seconds = seconds
    return list(tapes.values()), loss_sum / len(X)


def _check_called(module: nn.Module, called: bool, what: str) -> None:
    if not called:
        raise PruningError(
            f"the {what} pass never called layer {type(module).__name__}"
            f" {tuple(module.weight.shape)}; is it part of the model?"
        )


class _Recorder:
    """Forward hooks keep layer inputs; gradient hooks keep the output gradients.

    Every recorded output is handed on as ``out + anchor``, with ``anchor`` a
    zero scalar that requires grad, and the backward asks for the gradient of
    ``anchor`` alone: it flows through every recorded output, whose gradient hook
    stores it in the tape's dtype as it is formed. No weight gradient is formed
    and the float32 output gradients are never held all at once. A hook
    registered before an in-place change (``ReLU(inplace=True)``) receives the
    gradient of the value before the change, which is the layer's output.

    Each layer's inputs and output gradients go into one buffer for the whole
    batch (``samples`` rows), allocated at its first sub-batch: a pass holds a few
    large tensors, which the allocator gives back whole when the pass is done,
    instead of many small ones interleaved with the forward's temporaries.
    """

    def __init__(
        self, tapes: dict[int, LayerTape], dtype: torch.dtype | None, samples: int
    ):
        self.tapes, self.dtype, self.b = tapes, dtype, 1
        self.samples, self.start = samples, 0  # the sub-batch's first sample
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.anchor = torch.zeros((), requires_grad=True)
        #: per layer call, in forward order: [module, input rows, output gradient]
        self.calls: list[list[Any]] = []
        self.shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by id

    def hook(
        self, mod: nn.Module, inputs: tuple, kwargs: dict, out: torch.Tensor
    ) -> torch.Tensor | None:
        if not torch.is_grad_enabled():  # a call outside the differentiated forward
            return None
        x = inputs[0].detach()
        dtype = self.dtype or torch.promote_types(x.dtype, torch.float32)
        key = id(inputs[0])
        held = self.shared.get(key) if isinstance(mod, nn.Linear) else None
        rows = held[1] if held is not None else layer_inputs(mod, x).to(dtype)
        if held is None and isinstance(mod, nn.Linear):
            # the input is held too: while it lives, no other tensor takes its id
            self.shared[key] = (inputs[0], rows)
        call = [mod, rows, None]
        self.calls.append(call)
        out = out if out.requires_grad else out.detach().requires_grad_()
        anchored = out + self.anchor.to(out.dtype)

        def keep(g: torch.Tensor) -> None:  # the loss is a mean over b samples
            call[2] = (_wide(layer_output_grads(mod, g)) * self.b).to(rows.dtype)

        anchored.register_hook(keep)  # also fires if it is later changed in place
        return anchored

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` w.r.t. the recorded outputs, onto the tapes."""
        torch.autograd.grad(loss, self.anchor, allow_unused=True)
        per_module: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for mod, x, d in self.calls:
            if d is None:  # the output does not reach the loss
                b, t = x.shape[:2]
                d = x.new_zeros(b, t, weight_matrix_shape(mod)[0])
            per_module.setdefault(id(mod), []).append((x, d))
        kept: dict[int, torch.Tensor] = {}  # shared input rows, stored once
        for key, calls in per_module.items():  # several calls: concatenate on T
            xs, ds = zip(*calls, strict=True)
            if len(xs) > 1:
                x = self._keep(("x", key), torch.cat(xs, 1))
            elif id(xs[0]) in kept:
                x = kept[id(xs[0])]
            else:  # the first layer fed these rows owns their buffer
                x = kept[id(xs[0])] = self._keep(("x", key), xs[0])
            d = self._keep(("d", key), ds[0] if len(ds) == 1 else torch.cat(ds, 1))
            self.tapes[key].xs.append(x)
            self.tapes[key].deltas.append(d)
        self.start += self.b
        self.calls.clear()
        self.shared.clear()

    def _keep(self, key: tuple[str, int], t: torch.Tensor) -> torch.Tensor:
        """``t`` copied into the sub-batch's rows of the batch buffer ``key``."""
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = t.new_empty((self.samples, *t.shape[1:]))
        if buf.shape[1:] != t.shape[1:]:  # another shape: it keeps its own tensor
            return t
        rows = buf[self.start : self.start + len(t)]
        rows.copy_(t)
        return rows


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (a bfloat16 tape is widened for arithmetic)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_memory(recorder: _Recorder, chunks: int, limit: int) -> None:
    """Refuse a pass whose tapes would take more than ``limit`` bytes.

    Called after the first of ``chunks`` sub-batches: a batch buffer is counted
    once, any other tensor once per sub-batch.
    """
    whole = {b.untyped_storage().data_ptr() for b in recorder.buffers.values()}
    storages = {}
    for tape in recorder.tapes.values():
        for t in tape.xs + tape.deltas:
            ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            storages[ptr] = size if ptr in whole else size * chunks
    need = sum(storages.values())
    if need > limit:
        raise PruningError(
            f"recording {len(recorder.tapes)} layers for this batch needs about "
            f"{need / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB "
            "available; use fewer blocks per step (--blocks-per-step), the "
            "bfloat16 tape (--tape-dtype bfloat16) or a smaller batch"
        )


def per_sample_block_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    module: nn.Module,
    idx: Any,
    *,
    max_batch_size: int | None = None,
) -> torch.Tensor:
    """Per-sample gradients of the block ``idx`` of ``module.weight``.

    A convenience over :func:`record_layers` for one layer.

    Returns:
        ``(N, n)`` float64 tensor ``G`` with ``G[s, i]`` the gradient of sample
        ``s``'s loss w.r.t. weight ``idx[i]``; ``G.mean(0)`` is the batch gradient.
        A module called several times in one forward gets the sum over calls.
    """
    (tape,), _ = record_layers(
        model, loss_fn, X, y, [module], max_batch_size=max_batch_size
    )
    return tape.per_sample_block_gradients(idx)


# ------------------------------------------------------------------- Hessians
def exact_block_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    module: nn.Module,
    idx: Any,
    *,
    chunk_size: int | None = None,
    max_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and exact Hessian of the block ``idx`` by double backward.

    Rows of the Hessian come from batched backward passes through the gradient
    graph, ``chunk_size`` rows at a time (None: all n rows in one pass).

    Returns:
        ``g`` ``(n,)`` and ``H`` ``(n, n)``, float64, ``H`` symmetrised.
    """
    check_prunable(module)
    w = module.weight
    idx = torch.as_tensor(idx, dtype=torch.long, device=w.device)
    n = idx.numel()
    step = n if chunk_size is None else max(1, int(chunk_size))
    g_total = torch.zeros(n, dtype=torch.float64, device=w.device)
    H_total = torch.zeros(n, n, dtype=torch.float64, device=w.device)
    N = len(X)
    with _requires_grad([w]):
        for Xb, yb in split_batch(X, y, max_batch_size):
            share = len(Xb) / N
            loss = _scalar_loss(loss_fn, model, Xb, yb)
            (grad,) = torch.autograd.grad(loss, w, create_graph=True)
            gB = grad.reshape(-1)[idx]  # (n,) block gradient, with its graph
            g_total += share * gB.detach().double()
            if not gB.requires_grad:  # the loss is linear in w: H = 0
                continue
            eye = torch.eye(n, dtype=gB.dtype, device=gB.device)
            for start in range(0, n, step):
                stop = min(start + step, n)
                (rows,) = torch.autograd.grad(
                    gB,
                    w,
                    grad_outputs=eye[start:stop],
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
                if rows is not None:  # (stop - start, *w.shape)
                    H_total[start:stop] += (
                        share * rows.reshape(stop - start, -1)[:, idx].double()
                    )
    return g_total, (H_total + H_total.T) / 2


def block_derivatives(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    module: nn.Module,
    idx: Any,
    hessian: str,
    *,
    max_batch_size: int | None = None,
    chunk_size: int = 32,
    tape: LayerTape | None = None,
    factor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Block gradient and Hessian model (DESIGN step 3) with their timings.

    Args:
        model: The model.
        loss_fn: Mean per-sample loss.
        X: Inputs, samples on dim 0.
        y: Targets, samples on dim 0.
        module: The layer whose weight holds the block.
        idx: ``(n,)`` flat weight indices of the block.
        hessian: One of :data:`HESSIAN_MODELS`:
            ``gradient_per_sample`` ``H = G^T G / N`` (empirical Fisher),
            ``gradient_mean`` ``H = g g^T / N``, ``exact`` (double backward),
            ``exact_piecewise`` (``chunk_size`` rows at a time).
        max_batch_size: Largest sub-batch per forward/backward.
        chunk_size: Rows per pass for ``exact_piecewise``.
        tape: A :class:`LayerTape` of ``module`` on this batch; with
            ``gradient_per_sample`` the per-sample gradients come from it.
        factor: Return the gradient models' Hessian as its factor ``F``
            ``(m, n)`` with ``H = F^T F`` (m: samples, or 1 for ``gradient_mean``),
            without forming H; refused for the exact models.

    Returns:
        ``(g (n,), H (n, n) or F, gradient_seconds, hessian_seconds)``, float64.
    """
    if hessian not in HESSIAN_MODELS:
        raise PruningError(
            f"hessian must be one of {', '.join(HESSIAN_MODELS)}, got {hessian!r}"
        )
    if factor and hessian.startswith("exact"):
        raise PruningError(f"hessian {hessian!r} has no low-rank factor")
    t0 = time.perf_counter()
    mbs = max_batch_size
    if hessian.startswith("exact"):  # gradient and Hessian come from one graph
        chunk = chunk_size if hessian == "exact_piecewise" else None
        g, H = exact_block_hessian(
            model, loss_fn, X, y, module, idx, chunk_size=chunk, max_batch_size=mbs
        )
        return g, H, time.perf_counter() - t0, 0.0
    if hessian == "gradient_mean":
        (full,) = layer_gradients(model, loss_fn, X, y, [module], max_batch_size=mbs)
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=full.device)
        G = full.reshape(-1)[idx_t].double()[None]  # (1, n) the mean gradient
    elif tape is not None:
        G = tape.per_sample_block_gradients(idx)  # (N, n)
    else:
        G = per_sample_block_gradients(
            model, loss_fn, X, y, module, idx, max_batch_size=mbs
        )  # (N, n)
    g = G.mean(0)  # (n,)
    t1 = time.perf_counter()
    samples = len(X) if hessian == "gradient_mean" else G.shape[0]
    if factor:  # H = F^T F
        return g, G / math.sqrt(samples), t1 - t0, time.perf_counter() - t1
    H = G.T @ G  # (n, n)
    H /= samples
    return g, H, t1 - t0, time.perf_counter() - t1


def batch_loss(
    model: nn.Module, loss_fn: LossFn, X: Any, y: Any, max_batch_size: int | None
) -> float:
    """The batch's mean loss, forward only (a third of a forward/backward)."""
    total = 0.0
    with torch.no_grad():
        for Xb, yb in split_batch(X, y, max_batch_size):
            total += float(_scalar_loss(loss_fn, model, Xb, yb)) * len(Xb)
    return total / len(X)


# --------------------------------------------------------------- activations
def input_column_norms(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    modules: Sequence[nn.Module],
    *,
    max_batch_size: int | None = None,
) -> list[torch.Tensor]:
    """``||X_j||_2`` of each layer input column over a calibration batch (Wanda).

    The batch runs through ``loss_fn(model, X, y)`` without gradients.

    Linear: one norm per input feature over samples and tokens, shape ``(d_in,)``.
    Conv2d: one norm per input channel over samples and spatial positions, shape
    ``(C_in,)`` (padding excluded).
    """
    sums: dict[int, torch.Tensor] = {}
    last: dict[str, Any] = {"input": None, "sq": None}  # q/k/v share their input

    def hook(mod: nn.Module, inputs: tuple, kwargs: dict, out: Any) -> None:
        x = inputs[0].detach()
        if isinstance(mod, nn.Conv2d):
            sq = x.double().pow(2).sum(dim=(0, 2, 3))  # (C_in,)
        elif last["input"] is inputs[0]:
            sq = last["sq"]
        else:
            sq = x.double().pow(2).reshape(-1, x.shape[-1]).sum(0)  # (d_in,)
            last.update(input=inputs[0], sq=sq)
        key = id(mod)
        sums[key] = sums[key] + sq if key in sums else sq

    try:
        with torch.no_grad(), recording(modules, hook):
            for Xb, yb in split_batch(X, y, max_batch_size):
                loss_fn(model, Xb, yb)
    finally:
        last.clear()
    for m in modules:
        _check_called(m, id(m) in sums, "calibration forward")
    return [sums[id(m)].sqrt() for m in modules]


def wanda_scores(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """``|w0_ij| * ||X_j||`` for every weight, shaped like the weight."""
    w = module.weight.detach().double().abs()
    if isinstance(module, nn.Conv2d):
        return w * norms.to(w.device)[None, :, None, None]
    return w * norms.to(w.device)[None, :]
