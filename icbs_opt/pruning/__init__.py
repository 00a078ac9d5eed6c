"""The iterative Combinatorial Brain Surgeon: the pruner and its loop.

DESIGN.md section 1 is the specification. One concern per module:

- :mod:`~icbs_opt.pruning.state`: which layers, their masks, frozen and tabu sets;
- :mod:`~icbs_opt.pruning.scores`: the weight scores of the init and of selection;
- :mod:`~icbs_opt.pruning.init`: the initial mask;
- :mod:`~icbs_opt.pruning.selection`: the layer schedule and block selection;
- :mod:`~icbs_opt.pruning.qubo`: the block QUBO and its solve;
- :mod:`~icbs_opt.pruning.step`: the block step (select, model, solve, accept);
- :mod:`~icbs_opt.pruning.pruner`: :class:`Pruner`, the state and the pass;
- :mod:`~icbs_opt.pruning.loop`: :func:`prune`, steps over batches with evaluations.

docs/architecture.md maps the whole package.

Settings live in :mod:`icbs_opt.settings` (torch-free) and are re-exported here.
"""

from icbs_opt.pruning.loop import PruneResult, nonzero_density, prune, sparsity_pattern
from icbs_opt.pruning.pruner import Pruner, StepRecord, StepSeconds
from icbs_opt.pruning.qubo import block_qubo
from icbs_opt.settings import (
    INIT_METHODS,
    PAPER_CLASSIFIER_SETTINGS,
    SCHEDULES,
    SELECTION_METHODS,
    UNSTRUCTURED,
    Preset,
    PruneConfig,
    RunSettings,
)

__all__ = [
    "INIT_METHODS",
    "PAPER_CLASSIFIER_SETTINGS",
    "SCHEDULES",
    "SELECTION_METHODS",
    "UNSTRUCTURED",
    "Preset",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "RunSettings",
    "StepRecord",
    "StepSeconds",
    "block_qubo",
    "nonzero_density",
    "prune",
    "sparsity_pattern",
]
