"""Block problems: validation, energies, BQM/Ising forms, repair and file I/O."""

from icbs_opt.problems.block import ZERO_CUTOFF, BlockProblem, random_problem

__all__ = ["ZERO_CUTOFF", "BlockProblem", "random_problem"]
