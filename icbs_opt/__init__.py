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

__all__ = [
    "Backend",
    "BlockProblem",
    "Solution",
    "available_backends",
    "get_backend",
    "register_backend",
    "__version__",
]
