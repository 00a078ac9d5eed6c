"""Tiny seeded models, data and settings shared by the tests.

Everything here is built in the test run (nothing downloaded) and is the same for a
given seed. The Llama helpers import transformers when called, so a module using them
calls ``pytest.importorskip("transformers")`` first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.cli import main
from icbs_opt.problems import BlockProblem, random_problem
from icbs_opt.pruning import Pruner

#: Test-speed options for slow backends (user-given options still win).
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "braket-local": {"p": 1, "maxiter": 6, "shots": 500},
    # Device-side sampling is unseeded: enough shots that n <= 12 optima are seen.
    "braket": {"p": 1, "maxiter": 6, "shots": 2000},
}


# ------------------------------------------------------------ grouped problems
#: Group ids per variable and ones per group: consecutive groups of 2, 3 and 4,
#: interleaved (non-contiguous) groups, and groups of size one.
GROUPINGS = [
    ([0, 0, 1, 1, 2, 2], [1, 1, 1]),
    ([0, 0, 0, 1, 1, 1], [1, 2]),
    ([0, 0, 0, 0, 1, 1, 1, 1], [2, 2]),
    ([0, 1, 2, 0, 1, 2, 0, 1], [1, 2, 2]),
    ([0, 0, 1, 1, 1, 1, 2, 3], [1, 2, 0, 1]),
]


def grouped_problem(
    groups: list[int], counts: list[int], seed: int = 0
) -> BlockProblem:
    """A seeded random problem with these group ids per variable and counts."""
    Q = random_problem(len(groups), seed=seed).Q
    return BlockProblem(Q, counts, groups=groups)


def per_group_feasible(problem: BlockProblem, bits: np.ndarray) -> np.ndarray:
    """Whether each row of ``bits`` has the right number of ones in every group."""
    groups = np.asarray(problem.groups)
    ones = np.stack(
        [bits[:, groups == g].sum(axis=1) for g in range(len(problem.group_counts))],
        axis=1,
    )
    return (ones == np.asarray(problem.group_counts)).all(axis=1)


# ------------------------------------------------------------ classifiers
def ce_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model(X)`` against the labels ``y``."""
    return F.cross_entropy(model(X), y)


def mlp(sizes: tuple[int, ...] = (6, 8, 3), seed: int = 0) -> nn.Sequential:
    """Linear layers of the given widths with a ReLU between each two."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def data(
    size: int, shape: tuple[int, ...], classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal inputs of ``(size, *shape)`` and uniform labels below ``classes``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(size, *shape, generator=g)
    return X, torch.randint(0, classes, (size,), generator=g)


# ------------------------------------------------------------ a loop to resume
#: Settings of ``make_pruner``: every random choice of the loop is exercised.
LOOP_SETTINGS = {
    "block_size": 16,
    "init": "random",
    "selection": "random",
    "schedule": "log",
    "tabu_frac": 0.3,
    "fix_frac_prune": 0.2,
    "fix_frac_keep": 0.2,
    "seed": 3,
}


def make_pruner(**changes: Any) -> Pruner:
    """A native pruner at density 0.4 of a seeded 16-32-4 MLP (``LOOP_SETTINGS``)."""
    model = mlp((16, 32, 4))
    settings = {**LOOP_SETTINGS, **changes}
    return Pruner(model, ce_loss, 0.4, backend="native", workers=1, **settings)


def batches(seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless seeded stream of 32 samples of 16 inputs and 4 classes."""
    rng = np.random.default_rng(seed)
    while True:
        X = torch.from_numpy(rng.standard_normal((32, 16))).float()
        yield X, torch.from_numpy(rng.integers(0, 4, 32))


def evaluate(model: nn.Module) -> dict[str, float]:
    """Accuracy (%) and loss of ``model`` on a held-out batch of ``batches``."""
    X, y = next(batches(99))
    with torch.no_grad():
        logits = model(X)
    acc = (logits.argmax(1) == y).double().mean().item() * 100
    return {"metric": acc, "loss": F.cross_entropy(logits, y).item()}


def equal_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two ``Pruner.masks()`` hold the same layers and masks."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------ the CLI
#: Skips a test of a refused unwritable folder when run as root (root writes anyway).
not_root = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root may write into a read-only folder: nothing to refuse",
)


def run_cli(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, float]:
    """Run ``icbs-opt`` on ``argv`` (paths allowed): exit status, stderr, seconds."""
    start = time.perf_counter()
    status = main([str(a) for a in argv])
    seconds = time.perf_counter() - start
    return status, capsys.readouterr().err, seconds


def prune_digits(cache: Path, summary: Path, *extra: str) -> dict:
    """Run ``icbs-opt prune`` on digits with the exhaustive backend; its summary."""
    argv = ["prune", "--task", "digits-mlp", "--cache-dir", str(cache)]
    argv += ["--backend", "exhaustive", "--block-size", "12", "--no-progress"]
    assert main([*argv, "--json", str(summary), *extra]) == 0
    return json.loads(summary.read_text())


# ------------------------------------------------------------ causal LMs
WORDS = "the cat sat on a mat and dog ran to big red house".split()


def tiny_llama(vocab: int = 32, tie: bool = False, seed: int = 0, layers: int = 2):
    """A seeded two-block Llama (hidden size 16), prepared as the LLM task does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from icbs_opt.tasks import causal_lm as llm

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return llm._prepare(LlamaForCausalLM(config))


def word_tokenizer():
    """A whitespace word-level tokenizer over ``WORDS`` (id 0 is ``<unk>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def write_text(path: Path, n_words: int, seed: int) -> Path:
    """Write ``n_words`` seeded words of ``WORDS``, ten a line."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[j : j + 10]) for j in range(0, n_words, 10)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_data(folder: Path) -> dict:
    """Options reading ``text_dir``'s files as the calibration and eval corpora."""
    return {"calib_data": str(folder / "valid.txt"),
            "eval_data": str(folder / "test.txt"), "pruning_windows": 32}  # fmt: skip


# ------------------------------------------------------------ pruner checks
def block_energies(
    model: nn.Module,
    calibration: tuple[torch.Tensor, torch.Tensor],
    settings: dict,
    before_steps: Callable[[Pruner], Any] | None = None,
    steps: int = 4,
) -> tuple[Pruner, list[float]]:
    """Prune to density 0.5 by exhaustive 8-weight blocks on ``calibration``.

    Returns the pruner and, per block, its QUBO's energy at the current mask plus
    the QUBO's constant: zero wherever the QUBO is exact at the current weights.
    """
    seen: list[float] = []

    def hook(problem):
        seen.append(problem.energy(problem.meta["x_cur"]) + problem.meta["const"])

    pruner = Pruner(model, ce_loss, 0.5, backend="exhaustive", block_size=8,
                    calibration=calibration, problem_hook=hook, **settings)  # fmt: skip
    if before_steps is not None:
        before_steps(pruner)
    for _ in range(steps):
        pruner.step(*calibration)
    return pruner, seen


def assert_masks_describe_the_zeros(pruner: Pruner) -> None:
    """Every pruned layer's zeros are exactly its pruned weights."""
    for name, keep in pruner.masks().items():
        w = pruner.model.get_submodule(name).weight
        assert torch.equal(w != 0, keep)


def two_block_llama() -> nn.Module:
    """A two-decoder-block Llama with weights large enough for pruning to matter."""
    import transformers

    from icbs_opt.tasks import causal_lm as llm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # large enough for pruning errors to matter
    )
    return llm._prepare(transformers.LlamaForCausalLM(config))


def local_cluster(workers: int, **options: Any) -> Any:
    """A real Dask LocalCluster on the loopback interface (skips without Dask).

    ``options`` go to ``LocalCluster`` (``processes``, ``threads_per_worker``).
    """
    distributed = pytest.importorskip("distributed")
    return distributed.LocalCluster(
        n_workers=workers,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address="127.0.0.1:0",
        **options,
    )
