"""icbs-opt: the iterative Combinatorial Brain Surgeon and its block-QUBO solvers."""

from icbs_opt.backends import (
    Backend,
    Solution,
    available_backends,
    get_backend,
    register_backend,
)
from icbs_opt.problems import BlockProblem

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``BlockCQMSampler`` imports dimod, so it is loaded when first asked for."""
    if name == "BlockCQMSampler":
        from icbs_opt.ocean import BlockCQMSampler

        return BlockCQMSampler
    raise AttributeError(f"module 'icbs_opt' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BlockCQMSampler",
    "BlockProblem",
    "Solution",
    "available_backends",
    "get_backend",
    "register_backend",
    "__version__",
]
