"""Layer-wise updates in forward order, each layer on the updated model's inputs.

The driver of SparseGPT and the refit (DESIGN.md section 1b):
:func:`sequential_update` hands each module, in forward call order, the Gram
matrix of its calibration inputs in the model as already updated, and may pair
them with the inputs the same module gets in the dense model (for a refit that
corrects the error of the layers before it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icbs_opt.derivatives import LossFn, layer_inputs, split_batch
from icbs_opt.errors import PruningError
from icbs_opt.recording import StopForward, decoder_blocks, recording


@dataclass
class LayerGrams:
    """What a layer update gets: Gram matrices of the layer's calibration inputs.

    Attributes:
        G: ``(d_in, d_in)`` float64 ``X^T X``, ``X`` the ``(rows, d_in)`` inputs
            in the model as updated so far (Conv2d: unfolded patches).
        C: ``(d_in, d_in)`` float64 ``X^T X_dense``, ``X_dense`` the inputs of
            the same samples in the dense model; None unless asked for.
        rows: Number of input rows.
    """

    G: torch.Tensor
    C: torch.Tensor | None
    rows: int


#: ``update(module, grams)``: change ``module.weight`` in place.
LayerUpdate = Callable[[nn.Module, LayerGrams], None]
#: One sub-batch's forward through what feeds the modules; returns its output.
_Run = Callable[[], Any]


def sequential_update(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    modules: Sequence[nn.Module],
    update: LayerUpdate,
    *,
    max_batch_size: int | None = None,
    dense: Mapping[nn.Module, torch.Tensor] | None = None,
) -> None:
    """Call ``update`` on every module in forward order, on the updated model's inputs.

    Two ways, chosen by a one-sample probe forward:

    - blocks (decoder blocks of a causal LM): when the model's blocks (see
      :func:`~icbs_opt.recording.decoder_blocks`) hold every module and
      chain (each block's input is the previous block's output), the first
      block's inputs are captured once per sub-batch (a forward stopped there)
      and the blocks are replayed one by one, as the paper does: a block runs
      once to collect its layers' Gram matrices, its layers are updated (all
      from the block's inputs before any of them changed), and it runs again
      to give the next block its inputs. Cost: about two forwards of the
      calibration batch. With ``dense`` the block's layers are updated in
      stages instead (layers fed the same tensor, such as q, k and v, form
      one stage), each stage on the inputs left by the stages before it: a
      layer fitted to the dense model's outputs corrects the error of its
      inputs, so it must see the inputs it will get. A stage runs the block
      on the current and the dense weights, stopping after the stage's last
      layer unless it is the block's last stage. Cost: about 5.6 block
      forwards per block of SmolLM2 (its four stages run up to 13%, 36%, 80%
      and 100% of its work, twice, and once more for the next block's inputs).
    - layer by layer otherwise (the digits MLP, Conv2d nets): one calibration
      forward per module (two with ``dense``), in the order the probe saw.

    Args:
        model: The model; ``update`` changes it in place.
        loss_fn: ``loss_fn(model, X, y)``; only its forward is used.
        X: Calibration inputs, samples on dim 0.
        y: Their targets.
        modules: The Linear/Conv2d modules to update.
        update: ``update(module, grams)`` (see :class:`LayerGrams`).
        max_batch_size: Largest sub-batch per forward (None: the whole batch).
        dense: ``{module: original weights}`` for every module: the dense model
            whose inputs ``LayerGrams.C`` pairs with (None: no ``C``).

    Raises:
        PruningError: If a module is never called by the forward.
    """
    found = decoder_blocks(model, modules)
    blocks = found[1] if found is not None else None
    probe = _probe(model, loss_fn, X, y, blocks)
    wanted = {id(m) for m in modules}
    order = [m for m in probe.order if id(m) in wanted]
    if len(order) != len(wanted):
        raise PruningError("the calibration forward never called some modules")
    if blocks is not None and probe.chain:
        stages = probe.stages(order) if dense is not None else [order]
        cur = _block_inputs(model, loss_fn, X, y, blocks[0], max_batch_size)
        _by_block(blocks, cur, stages, probe.calls, update, dense)
        return
    batches = split_batch(X, y, max_batch_size)
    for m in order:
        calls = [((model, *b), {}) for b in batches]
        runs = _runs(loss_fn, calls)
        pairs = _runs(loss_fn, calls, dense, list(dense)) if dense is not None else None
        grams, _ = _gather([m], runs, pairs)
        update(m, grams[id(m)])


def _runs(
    f: Callable[..., Any],
    calls: list[tuple[tuple, dict]],
    dense: Mapping[nn.Module, torch.Tensor] | None = None,
    mods: list[nn.Module] | None = None,
) -> list[_Run]:
    """One ``f(*args, **kwargs)`` per sub-batch (dense weights in ``mods``)."""
    if dense is None:
        return [functools.partial(f, *a, **k) for a, k in calls]
    return [functools.partial(_dense_run, dense, mods, f, a, k) for a, k in calls]


def _dense_run(
    dense: Mapping[nn.Module, torch.Tensor],
    mods: list[nn.Module],
    f: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> Any:
    with _weights_set(dense, mods):
        return f(*args, **kwargs)


@contextlib.contextmanager
def _weights_set(
    values: Mapping[nn.Module, torch.Tensor], mods: list[nn.Module]
) -> Iterator[None]:
    saved = [m.weight.detach().clone() for m in mods]
    try:
        with torch.no_grad():
            for m in mods:
                m.weight.copy_(values[m].reshape(m.weight.shape))
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(mods, saved, strict=True):
                m.weight.copy_(w)


# ------------------------------------------------------------ block by block
def _by_block(
    blocks: nn.ModuleList,
    cur: list[tuple[tuple, dict]],
    stages: list[list[nn.Module]],
    calls: Mapping[int, int],
    update: LayerUpdate,
    dense: Mapping[nn.Module, torch.Tensor] | None,
) -> None:
    """The block-by-block way of :func:`sequential_update`.

    Args:
        blocks: The blocks, in forward order.
        cur: The first block's ``(args, kwargs)``, one per sub-batch.
        stages: The modules in forward order, in groups updated together (a
            group spanning blocks is cut at their boundaries).
        calls: ``{id(module): calls per forward}``: a stage's runs stop after
            its modules' calls, unless the block's output is needed.
        update: As for :func:`sequential_update`.
        dense: As for :func:`sequential_update`.
    """
    den = list(cur)  # the dense model's block inputs (with ``dense``)
    order = [m for stage in stages for m in stage]
    last = max(i for i, b in enumerate(blocks) if _inside(b, order))
    for i, block in enumerate(blocks):
        mine = _inside(block, order)
        runs = _runs(block, cur)
        pairs = _runs(block, den, dense, mine) if dense is not None else None
        outs = None  # the dense block's outputs, from the last stage's runs
        parts = [s for s in (_inside(block, g) for g in stages) if s]
        for j, stage in enumerate(parts):  # runs see the earlier stages
            stop = calls if j < len(parts) - 1 else None  # before the end
            grams, outs = _gather(stage, runs, pairs, stop)
            for m in stage:
                update(m, grams[id(m)])
        if i == last:
            return
        with torch.no_grad():
            if pairs is not None:  # the dense block's outputs, once
                outs = outs if outs is not None else [run() for run in pairs]
                den = [_next_inputs(o, *c) for o, c in zip(outs, den, strict=True)]
            cur = [_next_inputs(run(), *c) for run, c in zip(runs, cur, strict=True)]


def _inside(block: nn.Module, order: list[nn.Module]) -> list[nn.Module]:
    ids = {id(m) for m in block.modules()}
    return [m for m in order if id(m) in ids]


def _block_inputs(
    model: nn.Module, loss_fn: LossFn, X: Any, y: Any, first: nn.Module, mbs: int | None
) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of the first block, one per sub-batch."""
    captured: list[tuple[tuple, dict]] = []

    def capture(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        captured.append((args, kwargs))
        raise StopForward  # the rest of the forward is not needed

    with torch.no_grad():
        for Xb, yb in split_batch(X, y, mbs):
            with recording([first], capture, before=True):
                loss_fn(model, Xb, yb)
    return captured


def _next_inputs(out: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next block's inputs: this block's output in place of its input."""
    hidden = out[0] if isinstance(out, tuple) else out
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# ------------------------------------------------------------------ probing
@dataclass
class _Probe:
    """What a one-sample forward tells: call order, inputs, block chaining.

    Attributes:
        order: Every module called, in the order its calls ended.
        chain: Whether the blocks chain: each one's first input is the
            previous one's output (its first element for a tuple), so they can
            be replayed one by one.
        inputs: ``{id(module): its first input}`` (held, so ids stay unique).
        calls: ``{id(module): how many times the forward called it}``.
    """

    order: list[nn.Module]
    chain: bool
    inputs: dict[int, Any]
    calls: dict[int, int]

    def stages(self, order: list[nn.Module]) -> list[list[nn.Module]]:
        """``order`` cut into runs of consecutive modules fed the same tensor."""
        out: list[list[nn.Module]] = []
        for m in order:
            if out and self.inputs[id(m)] is self.inputs[id(out[-1][-1])]:
                out[-1].append(m)
            else:
                out.append([m])
        return out


def _probe(
    model: nn.Module, loss_fn: LossFn, X: Any, y: Any, blocks: nn.ModuleList | None
) -> _Probe:
    """One-sample forward through every module (see :class:`_Probe`)."""
    seen: dict[int, list[Any]] = {}  # per module: [module, first input, output]
    calls: dict[int, int] = {}

    def note(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        first = args[0] if args else kwargs.get("hidden_states")
        seen.setdefault(id(mod), [mod, first, None])
        seen[id(mod)][2] = out[0] if isinstance(out, tuple) else out
        calls[id(mod)] = calls.get(id(mod), 0) + 1

    with torch.no_grad(), recording(list(model.modules()), note):
        loss_fn(model, *split_batch(X, y, 1)[0])
    chain = blocks is not None and all(id(b) in seen for b in blocks)
    if chain:
        pairs = zip(blocks[:-1], blocks[1:], strict=True)  # type: ignore[index]
        chain = all(seen[id(b)][1] is seen[id(a)][2] for a, b in pairs)
    order = [m for m, _, _ in seen.values()]
    return _Probe(order, chain, {k: v[1] for k, v in seen.items()}, calls)


# ------------------------------------------------------------- Gram matrices
def _gather(
    modules: list[nn.Module],
    runs: list[_Run],
    pairs: list[_Run] | None,
    calls: Mapping[int, int] | None = None,
) -> tuple[dict[int, LayerGrams], list[Any] | None]:
    """The modules' Gram matrices over the sub-batch runs (and dense pairs).

    With ``calls`` (``{id(module): calls per run}``) each run stops once the
    modules have made them, and returns no output.

    Returns:
        ``{id(module): LayerGrams}`` and the outputs of the dense runs.
    """
    acc: dict[int, LayerGrams] = {}
    outs = [] if pairs is not None else None
    for i, run in enumerate(runs):
        xc, _ = _capture(modules, run, calls)
        xd = None
        if pairs is not None:
            xd, out = _capture(modules, pairs[i], calls)
            outs.append(out)  # type: ignore[union-attr]
        _accumulate(acc, modules, xc, xd)
    for m in modules:
        if id(m) not in acc:
            raise PruningError(
                f"the calibration forward never called the {type(m).__name__} "
                "being updated"
            )
    return acc, outs


def _capture(
    modules: list[nn.Module], run: _Run, calls: Mapping[int, int] | None = None
) -> tuple[dict[int, list], Any]:
    """The input of every call of the modules during ``run()``, and its output.

    With ``calls``, the run stops once every module made its calls (output None).
    """
    seen: dict[int, list[torch.Tensor]] = {}

    def keep(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        # not detached (no graph under no_grad): layers fed one tensor (q, k, v)
        seen.setdefault(id(mod), []).append(args[0])  # share its Gram products
        if calls is not None and all(
            len(seen.get(id(m), ())) >= calls[id(m)] for m in modules
        ):
            raise StopForward  # the rest of the block is not needed

    out = None
    with torch.no_grad(), recording(modules, keep):
        out = run()
    return seen, out


def _accumulate(
    acc: dict[int, LayerGrams],
    modules: list[nn.Module],
    xc: dict[int, list[torch.Tensor]],
    xd: dict[int, list[torch.Tensor]] | None,
) -> None:
    """Add one sub-batch's ``X^T X`` (and ``X^T X_dense``) to ``acc``.

    Products are computed once per distinct input: layers fed the same tensor
    (q, k and v of an attention block) share them.
    """
    cache: dict[tuple, Any] = {}

    def rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = ("rows", id(x), id(m) if isinstance(m, nn.Conv2d) else None)
        if key not in cache:
            r = layer_inputs(m, x)
            cache[key] = r.reshape(-1, r.shape[-1]).float()  # (rows, d_in)
        return cache[key]

    def product(m: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        key = ("prod", id(a), id(b), id(m) if isinstance(m, nn.Conv2d) else None)
        if key not in cache:
            cache[key] = (rows(m, a).T @ rows(m, b)).double()
        return cache[key]

    for m in modules:
        calls = xc.get(id(m), [])
        dense_calls = xd.get(id(m), []) if xd is not None else None
        if dense_calls is not None and len(dense_calls) != len(calls):
            raise PruningError("the dense and the updated forward call a layer unlike")
        for j, x in enumerate(calls):
            got = acc.get(id(m))
            G = product(m, x, x)
            C = product(m, x, dense_calls[j]) if dense_calls is not None else None
            n = rows(m, x).shape[0]
            if got is None:
                acc[id(m)] = LayerGrams(G.clone(), None if C is None else C.clone(), n)
            else:
                got.G += G
                if C is not None:
                    got.C += C  # type: ignore[operator]
                got.rows += n
