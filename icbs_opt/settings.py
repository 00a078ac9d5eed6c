"""Settings of a pruning run, without torch (the CLI reads them cheaply).

:class:`PruneConfig` holds every option of the method (DESIGN.md section 1),
:class:`RunSettings` how long a run goes and how it is scored, and a
:class:`Preset` both: each task provides a complete one, and the command line
replaces only the fields it is given (:meth:`Preset.replace`). Every field is a
:func:`setting`, whose metadata gives its command-line flag and help text.

Example:
    >>> preset = Preset(PruneConfig(density=0.1), RunSettings(steps=300))
    >>> preset.replace(block_size=64, steps=10).config.block_size
    64
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from icbs_opt.checks import check_float, check_int
from icbs_opt.errors import PruningError

#: Hessian models of DESIGN step 3.
HESSIAN_MODELS = ("gradient_per_sample", "gradient_mean", "exact", "exact_piecewise")
SCORE_METHODS = ("magnitude", "wanda", "gradient", "random")
INIT_METHODS = (
    *SCORE_METHODS,
    "sparsegpt",
    *(
        f"{m}{suffix}"
        for m in ("magnitude", "wanda", "gradient")
        for suffix in ("_per_output", "_per_input")
    ),
)
SELECTION_METHODS = ("random", "magnitude", "wanda", "gradient")
SCHEDULES = ("uniform", "log")
TAPE_DTYPES = ("float32", "bfloat16")
#: Whose inputs a refit applies the original layer to (icbs_opt.pruning.refit).
REFIT_TARGETS = ("dense", "current")
#: How a refit solves its least-squares problems (icbs_opt.pruning.refit).
REFIT_SOLVERS = ("pcg", "exact")
#: The pattern without groups; any other is ``"N:M"`` (DESIGN "N:M patterns").
UNSTRUCTURED = "unstructured"


def setting(
    default: Any, help: str, *, flag: str | None = None, metavar: str | None = None
) -> Any:
    """A dataclass field of a setting or task option, with its command-line flag.

    The flag is ``--field-name`` unless ``flag`` names another; ``help`` is its
    help text (:mod:`icbs_opt.cli.flags` makes the flags from these fields).

    Example:
        >>> dataclasses.fields(PruneConfig)[0].metadata["help"][:20]
        'fraction of weights '
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def parse_pattern(pattern: Any) -> tuple[int, int] | None:
    """``(N, M)`` of an ``"N:M"`` pattern, or None for ``"unstructured"``.

    Example:
        >>> parse_pattern("2:4"), parse_pattern("unstructured")
        ((2, 4), None)

    Raises:
        PruningError: Unless ``pattern`` is ``"unstructured"`` or ``"N:M"`` with
            integers ``0 < N < M``.
    """
    if pattern == UNSTRUCTURED:
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise PruningError(
        f"pattern must be {UNSTRUCTURED!r} or 'N:M' with integers 0 < N < M "
        f"(such as '2:4'), got {pattern!r}"
    )


#: The paper's method settings, on top of PruneConfig's; every built-in preset uses
#: them.
PAPER_CLASSIFIER_SETTINGS: dict[str, Any] = {
    "selection": "gradient",
    "hessian": "gradient_per_sample",
    "grad_multiplier": 0.75,
    "ridge_multiplier": 1e-3,
    "tabu_frac": 0.4,
    "fix_frac_prune": 0.42,
    "fix_frac_keep": 0.35,
}


@dataclass
class PruneConfig:
    """Every setting of the method (DESIGN section 1), validated on construction.

    Attributes:
        density: Fraction of each pruned layer's weights kept, in (0, 1); a layer
            keeps ``round(density * numel)`` weights. None: ``N / M`` of an N:M
            ``pattern`` (which a density given must equal).
        pattern: ``unstructured``, or ``"N:M"`` (``0 < N < M``, such as ``2:4``):
            every group of M consecutive weights along a row's input dimension
            (Conv2d: the flattened input) keeps exactly N. Every pruned layer's
            input size must then be a multiple of M.
        block_size: ``n``, weights per block step (>= 2); with N:M a multiple of
            M: a block is the free weights of at most ``n / M`` whole groups.
        k: Pruned weights per block, in [1, block_size - 1]; None: block_size // 2,
            with N:M ``block_size * (M - N) / M`` (the only value allowed).
        init: Initial pruning: ``magnitude``, ``wanda``, ``gradient``, ``random``,
            the first three also ``*_per_output`` / ``*_per_input``; or
            ``sparsegpt`` (DESIGN section 1b: its mask, and its updated kept
            weights become the values steps restore). With N:M each group keeps
            its top N (``*_per_output`` is the same, ``*_per_input`` refused).
        selection: Block selection: ``random``, ``magnitude``, ``wanda``,
            ``gradient``.
        hessian: ``gradient_per_sample``, ``gradient_mean``, ``exact`` or
            ``exact_piecewise``.
        grad_multiplier: ``lambda_g``, weight of the gradient term.
        ridge_multiplier: ``lambda_r``, weight of ``|delta|^2``.
        tabu_frac: Tabu list capacity as a fraction of a layer's free weights, [0, 1).
        fix_frac_prune: Fraction of the initially pruned weights (lowest init
            scores) frozen pruned, [0, 1].
        fix_frac_keep: Fraction of the initially kept weights (highest init
            scores) frozen kept, [0, 1].
        schedule: ``uniform`` (a random layer each step) or ``log`` (epochs giving
            each layer ``max(min_steps_per_layer, round(log10(numel)))`` steps).
        min_steps_per_layer: Floor of the ``log`` schedule's steps per layer.
        remove_zero_rows: Prune all-zero Q rows for free and solve the rest.
        max_batch_size: Largest sub-batch per forward/backward (None: whole batch).
        blocks_per_step: Blocks one forward/backward pass feeds (M): the next M
            layers of the schedule, several disjoint blocks per layer when M
            exceeds the number of layers. A step is then a pass of M blocks.
        workers: Block problems solved at once (None: the machine's cores).
        executor: Where the problems of a pass are solved: None or ``threads``
            (this process), or ``dask://HOST:PORT`` (a Dask cluster).
        tape_dtype: Storage of the recorded layer inputs and output gradients:
            ``float32``, or ``bfloat16`` for half the memory.
        check_pass: After a pass, compare the batch loss with the one before
            and undo the pass's moves if it rose (one forward of the batch).
        check_blocks: After a pass, apply its moves one at a time and undo
            each one that raises the batch loss (one forward per accepted block;
            for models whose forward is cheap). Implies ``check_pass``.
        hessian_chunk_size: Hessian rows per pass for ``exact_piecewise``.
        refit: After the last step, refit every layer's kept weights to the
            original layer's outputs on the calibration batch (DESIGN 1b).
        refit_every: Also refit every this many steps (0: never during the run).
        refit_target: The outputs a refit reconstructs: the original layer's on
            the ``current`` (pruned) model's inputs, SparseGPT's objective, or on
            the ``dense`` model's inputs (also correcting earlier layers' error:
            best on the digits MLP, worse than ``current`` on SmolLM2; see
            docs/pruning.md).
        refit_solver: ``pcg`` (conjugate gradients from the current weights, to
            a relative residual of 1e-3) or ``exact`` (Cholesky solves per row).
        seed: Seed of every random choice (init, layer, block, solver).
    """

    density: float | None = setting(
        None, "fraction of weights kept (with --pattern N:M: N/M unless given)"
    )
    pattern: str = setting(
        UNSTRUCTURED,
        "unstructured, or N:M (e.g. 2:4): keep N of every M consecutive weights "
        "of a row; sets --density to N/M",
        metavar="N:M",
    )
    block_size: int = setting(256, "weights per block, n")
    k: int | None = setting(
        None,
        "pruned weights per block (n // 2 if unset; with --pattern N:M it is "
        "n (M-N)/M)",
        flag="--k",
    )
    init: str = setting(
        "magnitude",
        "initial mask: magnitude, wanda, gradient, random; the first three also "
        "*_per_output, *_per_input; or sparsegpt (mask and updated weights)",
    )
    selection: str = setting("random", "gradient, magnitude, wanda or random")
    hessian: str = setting(
        "gradient_per_sample",
        "gradient_per_sample, gradient_mean, exact or exact_piecewise",
    )
    grad_multiplier: float = setting(1.0, "lambda_g")
    ridge_multiplier: float = setting(0.0, "lambda_r", flag="--ridge")
    tabu_frac: float = setting(0.0, "tabu size, fraction of free weights")
    fix_frac_prune: float = setting(0.0, "pruned fraction frozen")
    fix_frac_keep: float = setting(0.0, "kept fraction frozen")
    schedule: str = setting("uniform", "layer schedule: uniform or log")
    min_steps_per_layer: int = setting(1, "floor of the log schedule")
    remove_zero_rows: bool = setting(False, "prune zero Q rows for free")
    max_batch_size: int | None = setting(None, "samples per forward/backward")
    hessian_chunk_size: int = setting(32, "Hessian rows per exact_piecewise pass")
    blocks_per_step: int = setting(1, "blocks one pass feeds (M distinct layers)")
    workers: int | None = setting(
        None, "block problems solved at once (None: the machine's cores)"
    )
    executor: str | None = setting(
        None, "where a pass's problems are solved: threads or dask://HOST:PORT"
    )
    tape_dtype: str = setting(
        "float32",
        "storage of recorded activations: float32 or bfloat16 (half the memory)",
    )
    check_pass: bool = setting(False, "undo a pass that raised the batch loss")
    check_blocks: bool = setting(
        False,
        "undo each block of a pass that raised the batch loss (a forward per "
        "block: for small models)",
    )
    refit: bool = setting(
        False,
        "after the last step, refit the kept weights to the dense layers' outputs "
        "(least squares)",
    )
    refit_every: int = setting(
        0, "also refit every S steps (0: never during the run)", metavar="S"
    )
    refit_target: str = setting(
        "current",
        "refit to the original layers' outputs on the pruned model's inputs "
        "(current) or the dense model's (dense)",
    )
    refit_solver: str = setting(
        "pcg", "pcg (conjugate gradients, default) or exact (Cholesky per row)"
    )
    seed: int = setting(0, "seed of every random choice")

    def __post_init__(self) -> None:
        err = {"error": PruningError}
        nm = parse_pattern(self.pattern)
        if self.density is None and nm is None:
            raise PruningError(
                "density is required (a number in (0, 1)) unless pattern is N:M"
            )
        if self.density is not None:
            self.density = check_float(self.density, "density", above=0, below=1, **err)
        self.block_size = check_int(self.block_size, "block_size", minimum=2, **err)
        if nm is not None:
            self.pattern = f"{nm[0]}:{nm[1]}"  # one spelling: " 02:4" is "2:4"
            self._check_pattern(*nm)
        if self.k is None:
            self.k = self.block_size // 2
        top = self.block_size - 1
        self.k = check_int(self.k, "k", minimum=1, maximum=top, **err)
        for name, choices in (
            ("init", INIT_METHODS),
            ("selection", SELECTION_METHODS),
            ("hessian", HESSIAN_MODELS),
            ("schedule", SCHEDULES),
            ("tape_dtype", TAPE_DTYPES),
            ("refit_target", REFIT_TARGETS),
            ("refit_solver", REFIT_SOLVERS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise PruningError(
                    f"{name} must be one of {', '.join(choices)}, got {value!r}"
                )
        for name, bounds in (
            ("grad_multiplier", {}),
            ("ridge_multiplier", {}),
            ("tabu_frac", {"minimum": 0, "below": 1}),
            ("fix_frac_prune", {"minimum": 0, "maximum": 1}),
            ("fix_frac_keep", {"minimum": 0, "maximum": 1}),
        ):
            setattr(self, name, check_float(getattr(self, name), name, **bounds, **err))
        for name in ("min_steps_per_layer", "hessian_chunk_size", "blocks_per_step"):
            setattr(self, name, check_int(getattr(self, name), name, minimum=1, **err))
        for name in ("max_batch_size", "workers"):
            if getattr(self, name) is not None:
                setattr(
                    self, name, check_int(getattr(self, name), name, minimum=1, **err)
                )
        if self.executor is not None and not isinstance(self.executor, str):
            raise PruningError(f"executor must be a string, got {self.executor!r}")
        self.seed = check_int(self.seed, "seed", minimum=0, **err)
        self.refit_every = check_int(self.refit_every, "refit_every", minimum=0, **err)
        for name in ("remove_zero_rows", "check_pass", "check_blocks", "refit"):
            if not isinstance(getattr(self, name), bool):
                raise PruningError(
                    f"{name} must be True or False, got {getattr(self, name)!r}"
                )

    def _check_pattern(self, n: int, m: int) -> None:
        """Density, block size, k and init as an N:M pattern implies them."""
        if self.density is not None and abs(self.density - n / m) > 1e-6:
            raise PruningError(
                f"density {self.density!r} disagrees with pattern {self.pattern!r}, "
                f"which keeps {n / m:g}: give the density {n / m:g} or none"
            )
        self.density = n / m  # exactly: a density given agrees to 6 digits
        if self.block_size % m:
            raise PruningError(
                f"block_size must be a multiple of M = {m} with pattern "
                f"{self.pattern!r} (a block holds whole groups), got {self.block_size}"
            )
        implied = self.block_size // m * (m - n)  # M - N pruned in every group
        if self.k is None:
            self.k = implied
        elif self.k != implied:
            raise PruningError(
                f"k must be block_size * (M - N) / M = {implied} with pattern "
                f"{self.pattern!r} and block_size {self.block_size} (or unset), "
                f"got {self.k!r}"
            )
        if self.init.endswith("_per_input"):
            raise PruningError(
                f"init {self.init!r} ranks weights per input column, across the "
                f"groups of pattern {self.pattern!r}; use {self.init_method!r}, "
                "which keeps the top N of every group"
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M ``pattern``; None when unstructured."""
        return parse_pattern(self.pattern)

    @property
    def init_method(self) -> str:
        """The scoring of ``init`` without its ``_per_*`` suffix."""
        return self.init.split("_per_")[0]

    @property
    def init_grouping(self) -> str:
        """``layer``, ``output`` or ``input``: where init scores are ranked."""
        return self.init.split("_per_")[1] if "_per_" in self.init else "layer"

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a JSON-ready dictionary."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSettings:
    """How long a run goes and how it is scored, beside the method's settings.

    Attributes:
        steps: Steps (>= 0); a step is one pass of ``blocks_per_step`` blocks.
        eval_every: Evaluate every this many steps (0: only before and after).
        threads: Torch CPU threads (None: torch's default).
        keep_best: Score the task's validation split at every evaluation, keep
            the best mask seen and end the run with it (needs ``eval_every``).
        time_budget: Minutes after which the run stops at the end of the step
            that crosses them (None: no limit).
        checkpoint_every: Write a checkpoint every this many steps (0: only
            when a run is stopped early).
    """

    steps: int = setting(
        300,
        "steps; a step is one forward/backward pass feeding --blocks-per-step blocks",
    )
    eval_every: int = setting(
        0, "evaluate every S steps (0: only before and after)", metavar="S"
    )
    threads: int | None = setting(None, "torch CPU threads")
    keep_best: bool = setting(
        False,
        "end with the mask that scored best on the validation split (needs "
        "--eval-every; see --val-fraction, --val-windows)",
    )
    time_budget: float | None = setting(
        None,
        "stop after the step that crosses MINUTES since the command started",
        metavar="MINUTES",
    )
    checkpoint_every: int = setting(
        0,
        "write a checkpoint every S steps (0: only when stopped early)",
        metavar="S",
    )

    def __post_init__(self) -> None:
        err = {"error": PruningError}
        object.__setattr__(
            self, "steps", check_int(self.steps, "steps", minimum=0, **err)
        )
        every = check_int(self.eval_every, "eval_every", minimum=0, **err)
        object.__setattr__(self, "eval_every", every)
        if self.threads is not None:
            threads = check_int(self.threads, "threads", minimum=1, **err)
            object.__setattr__(self, "threads", threads)
        if not isinstance(self.keep_best, bool):
            raise PruningError(
                f"keep_best must be True or False, got {self.keep_best!r}"
            )
        if self.keep_best and not self.eval_every:
            raise PruningError(
                "keep_best needs eval_every > 0 (the steps between validations)"
            )
        if self.time_budget is not None:
            budget = check_float(self.time_budget, "time_budget", above=0, **err)
            object.__setattr__(self, "time_budget", budget)
        every = check_int(self.checkpoint_every, "checkpoint_every", minimum=0, **err)
        object.__setattr__(self, "checkpoint_every", every)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a JSON-ready dictionary."""
        return dataclasses.asdict(self)


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunSettings))
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(PruneConfig))


@dataclass(frozen=True)
class Preset:
    """A complete set of settings for a run: the method's and the run's.

    Attributes:
        config: The method's settings.
        run: Steps, evaluation period and threads.
    """

    config: PruneConfig
    run: RunSettings = RunSettings()

    def replace(self, **changes: Any) -> Preset:
        """A copy with the given fields of ``config`` or ``run`` replaced.

        ``k`` follows a new ``block_size`` or ``pattern`` unless given too, and
        ``density`` a new N:M ``pattern`` (its ``N / M``) unless given too.

        Raises:
            PruningError: For an unknown field or a bad value.
        """
        unknown = sorted(set(changes) - set(CONFIG_FIELDS) - set(RUN_FIELDS))
        if unknown:
            raise PruningError(
                f"unknown setting {unknown[0]!r}; settings are: "
                f"{', '.join(CONFIG_FIELDS + RUN_FIELDS)}"
            )
        config = {k: v for k, v in changes.items() if k in CONFIG_FIELDS}
        if ("block_size" in config or "pattern" in config) and "k" not in config:
            config["k"] = None
        if (
            "pattern" in config
            and "density" not in config
            and parse_pattern(config["pattern"])
        ):
            config["density"] = None  # the pattern's N / M
        run = {k: v for k, v in changes.items() if k in RUN_FIELDS}
        return Preset(
            dataclasses.replace(self.config, **config),
            dataclasses.replace(self.run, **run),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"config": {...}, "run": {...}}``, JSON-ready."""
        return {"config": self.config.to_dict(), "run": self.run.to_dict()}
