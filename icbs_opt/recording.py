"""The recording engine: every capture of layer calls goes through :func:`recording`.

The tapes of :func:`icbs_opt.derivatives.record_layers`, Wanda's input norms
(:func:`icbs_opt.derivatives.input_column_norms`) and the sequential updates of
SparseGPT and the refit (:mod:`icbs_opt.pruning.sequential`) read layer inputs
through it; :func:`decoder_blocks` is the one way to find a model's blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch import nn

#: ``on_call(module, args, kwargs, output)``: one call of a recorded module.
CallHook = Callable[[nn.Module, tuple, dict, Any], Any]


class StopForward(Exception):
    """Raised by a :func:`recording` callback once it has what it needs.

    It ends the forward early (the rest of the model need not run); the
    ``recording`` block swallows it.
    """


@contextlib.contextmanager
def recording(
    modules: Iterable[nn.Module], on_call: CallHook, *, before: bool = False
) -> Iterator[None]:
    """Hand every call of ``modules`` inside the ``with`` block to ``on_call``.

    Args:
        modules: The modules to watch.
        on_call: ``on_call(module, args, kwargs, output)`` after each call, with
            the call's positional and keyword arguments; a value it returns
            replaces the module's output (None keeps it). It may raise
            :class:`StopForward` to end the ``with`` block's body quietly.
        before: Call ``on_call`` ahead of each call instead, with ``output``
            None (its return value is then ignored).

    Example:
        >>> import torch
        >>> lin = nn.Linear(3, 2)
        >>> seen = []
        >>> with recording([lin], lambda m, a, k, out: seen.append(a[0].shape)):
        ...     _ = lin(torch.zeros(4, 3))
        >>> seen
        [torch.Size([4, 3])]
    """

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        on_call(mod, args, kwargs, None)

    handles = [
        m.register_forward_pre_hook(pre, with_kwargs=True)
        if before
        else m.register_forward_hook(on_call, with_kwargs=True)
        for m in modules
    ]
    try:
        yield
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def decoder_blocks(
    model: nn.Module, modules: Sequence[nn.Module] | None = None
) -> tuple[str, nn.ModuleList] | None:
    """The qualified name and ``nn.ModuleList`` of the model's blocks, if any.

    The outermost ``nn.ModuleList`` whose children hold every one of ``modules``
    (None: any list): of ``config.num_hidden_layers`` modules when the model
    has that setting (a Hugging Face model's decoder blocks), else of at least
    two.

    Example:
        >>> net = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
        >>> decoder_blocks(net)[0], decoder_blocks(net, [nn.Linear(2, 2)])
        ('0', None)
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    wanted = {id(m) for m in modules or ()}
    for name, lst in model.named_modules():
        if not isinstance(lst, nn.ModuleList):
            continue
        sized = len(lst) == count if count is not None else len(lst) >= 2
        if sized and wanted <= {id(m) for child in lst for m in child.modules()}:
            return name, lst
    return None
