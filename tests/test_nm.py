"""N:M semi-structured sparsity (issue 12): settings, init, blocks, outputs."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from icbs_opt.cli import main
from icbs_opt.errors import PruningError
from icbs_opt.problems import BlockProblem
from icbs_opt.pruning import (
    PAPER_CLASSIFIER_SETTINGS,
    Preset,
    PruneConfig,
    Pruner,
    prune,
    sparsity_pattern,
)
from icbs_opt.pruning.checkpoint import load_checkpoint, save_checkpoint
from icbs_opt.pruning.qubo import block_problem, prepare_solve
from icbs_opt.pruning.selection import select_groups
from icbs_opt.pruning.sparsegpt import sparsegpt_layer
from icbs_opt.pruning.state import LayerState, nm_violations
from icbs_opt.tasks.options import DIGITS_PRESET

pytestmark = pytest.mark.usefixtures("one_thread")


def ce_loss(model, X, y):
    return F.cross_entropy(model(X), y)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def convnet(seed=0):
    """Conv2d(2, 3, 2): 8 flattened inputs per output channel."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    )


def data(shape=(8,), size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=g), torch.randint(
        0, 4, (size,), generator=g
    )


def batches(shape=(8,), seed=0):
    return [data(shape, seed=seed + i) for i in range(4)]


def group_kept(keep, m):
    """Kept weights per group of m consecutive weights of a row."""
    return keep.reshape(-1, m).sum(1)


def assert_nm(pruner, n, m):
    """Every group of every pruned layer keeps exactly n, and the model agrees."""
    modules = dict(pruner.model.named_modules())
    for name, keep in pruner.masks().items():
        assert torch.all(group_kept(keep, m) == n), name
        w = modules[name].weight
        assert torch.all(w[~keep] == 0)
        assert nm_violations(w, n, m) == 0


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pattern": "4:2"}, "pattern must be 'unstructured' or 'N:M' with integers "
         "0 < N < M (such as '2:4'), got '4:2'"),
        ({"pattern": "0:4"}, "got '0:4'"),
        ({"pattern": "2-4"}, "got '2-4'"),
        ({"pattern": "a:b"}, "got 'a:b'"),
        ({"pattern": 24}, "got 24"),
        ({"pattern": "2:4", "density": 0.1}, "density 0.1 disagrees with pattern "
         "'2:4', which keeps 0.5: give the density 0.5 or none"),
        ({"pattern": "2:4", "block_size": 250}, "block_size must be a multiple of "
         "M = 4 with pattern '2:4' (a block holds whole groups), got 250"),
        ({"pattern": "2:4", "block_size": 16, "k": 4}, "k must be block_size * "
         "(M - N) / M = 8 with pattern '2:4' and block_size 16 (or unset), got 4"),
        ({"pattern": "2:4", "init": "wanda_per_input"}, "init 'wanda_per_input' "
         "ranks weights per input column"),
        ({}, "density is required"),
    ],
)  # fmt: skip
def test_config_refuses_bad_patterns(options, message):
    with pytest.raises(PruningError, match=re.escape(message)):
        PruneConfig(**options)


def test_config_pattern_implies_density_and_k():
    cfg = PruneConfig(pattern="2:4")
    assert (cfg.density, cfg.k, cfg.nm) == (0.5, 128, (2, 4))
    cfg = PruneConfig(density=0.25, pattern=" 01:4", block_size=16)
    assert (cfg.pattern, cfg.k) == ("1:4", 12)  # one spelling, M - N per group
    assert PruneConfig(pattern="4:8", init="magnitude_per_output").nm == (4, 8)
    assert PruneConfig(density=0.5).nm is None
    # a density given to 6 digits agrees, and becomes N / M exactly
    assert PruneConfig(density=0.333333, pattern="1:3", block_size=12).density == 1 / 3
    # a preset's density and k follow a new pattern unless given too
    preset = DIGITS_PRESET.replace(pattern="2:4")
    assert (preset.config.density, preset.config.k) == (0.5, 128)
    assert DIGITS_PRESET.replace(pattern="1:8", block_size=64).config.k == 56
    with pytest.raises(PruningError, match="density 0.1 disagrees"):
        DIGITS_PRESET.replace(pattern="2:4", density=0.1)
    back = Preset(PruneConfig(**preset.config.to_dict()), preset.run)
    assert back == preset  # a checkpoint's settings rebuild the same config


def test_layer_whose_inputs_do_not_split_into_groups_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(PruningError, match=r"layer '0' has 6 inputs per output "
                       r"row, not a multiple of M = 4 \(pattern '2:4'\)"):  # fmt: skip
        Pruner(model, ce_loss, backend="exhaustive", pattern="2:4", block_size=8)
    assert torch.all(model[0].weight != 0)  # refused before any pruning
    pruner = Pruner(
        model, ce_loss, None, "exhaustive", layers=["2"], pattern="2:4", block_size=8
    )
    assert_nm(pruner, 2, 4)
    assert torch.all(model[0].weight != 0)  # left out: dense


# ---------------------------------------------------------------------- init
@pytest.mark.parametrize(
    "init",
    ["magnitude", "wanda", "gradient", "random", "sparsegpt", "wanda_per_output"],
)
@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4)])
def test_init_keeps_the_top_n_of_every_group(init, make, pattern, n, m):
    model = make()
    shape = (8,) if make is mlp else (2, 5, 5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pruner = Pruner(
        model,
        ce_loss,
        backend="exhaustive",
        pattern=pattern,
        block_size=8,
        init=init,
        calibration=data(shape),
    )
    assert_nm(pruner, n, m)
    assert pruner.density() == n / m
    if init == "magnitude":  # the kept ones are each group's largest
        for name, keep in pruner.masks().items():
            w0 = before[f"{name}.weight"].abs().reshape(-1, m)
            keep = keep.reshape(-1, m)
            assert torch.all(w0[keep].reshape(-1, n).min(1).values
                             >= w0[~keep].reshape(-1, m - n).max(1).values)  # fmt: skip


def test_random_init_is_seeded():
    masks = [
        Pruner(mlp(), ce_loss, None, "exhaustive", pattern="2:4", init="random",
               block_size=8, seed=seed).masks()
        for seed in (3, 3, 4)
    ]  # fmt: skip
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert not all(torch.equal(masks[0][k], masks[2][k]) for k in masks[0])


# ---------------------------------------------------------------- SparseGPT
def test_sparsegpt_layer_nm():
    torch.manual_seed(0)
    X, W = torch.randn(128, 16), torch.randn(5, 16)
    X[:, 3] = 0  # a dead input: pruned first in its group
    for n, m, blocksize in ((2, 4, 128), (4, 8, 6), (1, 4, 4)):
        Wn, keep, s = sparsegpt_layer(
            W, X.T @ X, 0, blocksize=blocksize, pattern=(n, m)
        )
        assert torch.all(group_kept(keep, m) == n)
        assert torch.all(Wn[~keep] == 0) and not torch.allclose(
            Wn[keep], W[keep].double()
        )
        assert torch.all(s[:, 3] == 0) and not keep[:, 3].any()
        # each group prunes its M - N lowest saliencies (taken when it started)
        sg, kg = s.reshape(-1, m), keep.reshape(-1, m)
        assert torch.all(sg[~kg].reshape(-1, m - n).max(1).values
                         <= sg[kg].reshape(-1, n).min(1).values)  # fmt: skip


# -------------------------------------------------------------------- blocks
def layer_state(pruned, frozen=None):
    w0 = torch.arange(1.0, pruned.numel() + 1)
    frozen = torch.zeros_like(pruned) if frozen is None else frozen
    return LayerState("fc", nn.Linear(1, 1), w0, pruned, frozen)


def test_select_groups_takes_whole_movable_groups_by_margin():
    # 4 groups of 4, 2 pruned each (x = pruned)
    pruned = torch.tensor([1, 1, 0, 0] * 4, dtype=torch.bool)
    frozen = torch.zeros(16, dtype=torch.bool)
    frozen[[8, 9]] = True  # group 2: both pruned frozen, cannot move
    L = layer_state(pruned, frozen)
    S = torch.zeros(16)
    S[4] = 5.0  # group 1: a pruned weight scores high: likeliest wrong
    S[[14, 15]] = -1.0  # group 3: its kept ones score low: likely wrong too
    idx = select_groups(L, lambda: S, 8, 4)
    assert idx.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    # another block of the pass: the other movable group only
    taken = torch.zeros(16, dtype=torch.bool)
    taken[idx] = True
    assert select_groups(L, lambda: S, 8, 4, taken).tolist() == [0, 1, 2, 3]
    # frozen weights stay out of a block; the block fills up to block_size
    frozen[[0, 4]] = True
    L = layer_state(pruned, frozen)
    idx = select_groups(L, lambda: S, 8, 4)
    # group 3 (margin 1), then group 0 (margin 0, 3 free); group 1 would not fit
    assert idx.tolist() == [1, 2, 3, 12, 13, 14, 15]
    # tabu groups come last
    L = layer_state(pruned)
    L.setup_tabu(0.25, 8)
    L.push_tabu(torch.tensor([4, 5, 6, 7]))
    assert select_groups(L, lambda: S, 8, 4).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]


def test_select_groups_without_scores_when_all_fit():
    L = layer_state(torch.tensor([1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool))

    def never():
        raise AssertionError("scores asked for")

    assert select_groups(L, never, 8, 4).tolist() == [0, 1, 2, 3]  # group 1 all pruned


def test_block_problem_has_a_count_per_group():
    Q = torch.eye(6, dtype=torch.float64)
    x_cur = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
    idx = torch.tensor([8, 9, 10, 12, 13, 14])  # free weights of groups 2 and 3
    p = block_problem(Q, x_cur, idx // 4)
    assert p.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert p.group_counts.tolist() == [1, 2] and p.k == 3
    assert p.is_feasible(x_cur.numpy().astype(np.int8))
    assert block_problem(Q, x_cur).group_counts.tolist() == [3]


def test_prepare_solve_removes_zero_rows_per_group():
    Q = np.zeros((8, 8))
    Q[np.ix_([1, 2, 3, 6, 7], [1, 2, 3, 6, 7])] = np.eye(5) + 0.5
    p = BlockProblem(Q, [2, 2], groups=[0, 0, 0, 0, 1, 1, 1, 1])
    x0 = np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int8)
    prep = prepare_solve(p, x0, np.random.default_rng(0), remove_zero_rows=True)
    # group 0: row 0 is zero, pruned free; 1 of rows 1-3 left to choose
    # group 1: rows 4, 5 zero and pruned; 6, 7 kept: decided here
    assert prep.x.tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
    assert prep.rest.tolist() == [1, 2, 3]
    assert prep.scaled.k == 1 and not prep.scaled.is_grouped
    assert prep.scaled.is_feasible(prep.warm)


# ------------------------------------------------------------------ the run
def run(model, steps=6, shape=(8,), backend="native", **options):
    settings = {"pattern": "2:4", "block_size": 8, **options}
    pruner = Pruner(model, ce_loss, None, backend, calibration=data(shape), **settings)
    result = prune(pruner, batches(shape), steps)
    return pruner, result


@pytest.mark.parametrize("backend", ["native", "exhaustive"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"blocks_per_step": 3},
        {"block_size": 16, "selection": "gradient", "hessian": "exact"},
        {**PAPER_CLASSIFIER_SETTINGS, "blocks_per_step": 4, "check_blocks": True},
        {"pattern": "4:8", "selection": "magnitude", "remove_zero_rows": True},
        {"init": "sparsegpt", "refit": True, "tabu_frac": 0.3},
    ],
)
def test_icbs_keeps_every_group_nm(backend, options):
    pruner, result = run(mlp(), backend=backend, **options)
    n, m = pruner.config.nm
    assert_nm(pruner, n, m)
    assert pruner.density() == n / m
    assert result.accepted > 0  # moves happened, inside the groups
    for r in result.records:
        assert r.feasible and r.n <= pruner.config.block_size
        assert abs(r.dl_current) < 1e-9
    if pruner.config.blocks_per_step > 1:  # blocks of a pass are disjoint groups
        assert len(result.passes[0].blocks) == pruner.config.blocks_per_step


def test_icbs_nm_conv_with_frozen_weights():
    pruner, result = run(
        convnet(), steps=8, shape=(2, 5, 5), fix_frac_prune=0.5, fix_frac_keep=0.3
    )
    assert_nm(pruner, 2, 4)
    assert any(r.n % 4 for r in result.records)  # groups with frozen weights


def test_refit_keeps_the_pattern():
    model = mlp()
    w0 = model[0].weight.detach().clone()
    pruner, _ = run(model, refit=True, refit_every=2)
    assert_nm(pruner, 2, 4)
    keep = pruner.masks()["0"]
    assert not torch.allclose(model[0].weight[keep], w0[keep])  # refit values


def test_checkpoint_round_trip_and_a_mask_off_the_pattern(tmp_path):
    pruner, result = run(mlp(), steps=3, tabu_frac=0.3)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, pruner, result, {"config": pruner.config.to_dict()})
    saved = load_checkpoint(path)
    assert saved.settings["config"]["pattern"] == "2:4"
    again = Pruner(mlp(), ce_loss, None, "native", calibration=data(),
                   pattern="2:4", block_size=8, tabu_frac=0.3)  # fmt: skip
    again.load_state_dict(saved.state)
    assert all(torch.equal(again.masks()[k], v) for k, v in pruner.masks().items())
    state = again.state_dict()
    state["layers"]["0"]["pruned"] = torch.arange(128) % 4 == 0  # 3:4 kept
    with pytest.raises(PruningError, match="mask of layer '0' is not 2:4"):
        again.load_state_dict(state)
    assert_nm(again, 2, 4)  # refused before any change


def test_sparsity_pattern_of_models():
    model = mlp()
    assert sparsity_pattern(model, ["0", "2"]) == "dense"
    Pruner(model, ce_loss, None, "exhaustive", pattern="4:8", block_size=8)
    assert sparsity_pattern(model, ["0", "2"]) == "4:8"
    Pruner(model, ce_loss, None, "exhaustive", pattern="2:4", block_size=8)
    assert sparsity_pattern(model, ["0", "2"]) == "2:4"
    model = mlp()
    Pruner(model, ce_loss, 0.5, "exhaustive", block_size=8)
    assert sparsity_pattern(model, ["0", "2"]) == "unstructured"


# ---------------------------------------------------------------- the CLI
def test_cli_prune_nm_end_to_end(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--task", "digits-mlp", "--cache-dir", str(cache)]
    argv += ["--pattern", "2:4", "--steps", "20", "--no-progress"]
    argv += ["--out", str(out), "--json", "-"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["pattern"] == "2:4" and s["density"] == 0.5
    assert s["settings"]["config"]["pattern"] == "2:4"
    assert s["settings"]["config"]["k"] == 128
    assert s["final"]["density"] == pytest.approx(0.5)
    assert s["final"]["accepted"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["pattern"] == "2:4"
    masks = load_file(str(out / "masks.safetensors"))
    state = load_file(str(out / "model.safetensors"))
    for name in ("0", "2", "4"):
        keep, w = masks[name], state[f"{name}.weight"]
        assert torch.all(group_kept(keep, 4) == 2)
        assert torch.all(w[~keep] == 0) and nm_violations(w, 2, 4) == 0
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["pattern"] == "2:4" and evaluated["density"] == 0.5
    assert main(["evaluate", "--model", str(out)]) == 0
    assert "density 0.5000 (2:4) over 3" in capsys.readouterr().out
    assert main(["evaluate", "--task", "digits-mlp", "--cache-dir", str(cache)]) == 0
    assert "(dense)" in capsys.readouterr().out


def test_cli_resume_with_another_pattern_is_refused(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--cache-dir", str(cache), "--pattern", "2:4", "--steps", "2"]
    argv += ["--block-size", "16", "--checkpoint-every", "1", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--pattern", "4:8"]) == 2
    assert "cannot resume with --pattern '4:8'" in capsys.readouterr().err
    assert main(["prune", "--resume", str(out), "--pattern", "2:4"]) == 0


def test_cli_resumes_a_checkpoint_written_before_patterns(cache, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", "--cache-dir", str(cache), "--steps", "2", "--block-size", "16"]
    assert main([*argv, "--checkpoint-every", "1", "--out", str(out)]) == 0
    file = str(out / "checkpoint.safetensors")
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    settings = json.loads(meta["settings"])
    del settings["config"]["pattern"]  # as version 0.1 wrote it
    save_file(tensors, file, {**meta, "settings": json.dumps(settings)})
    assert main(["prune", "--resume", str(out), "--no-progress"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pattern", "2:4", "--density", "0.1"], "density 0.1 disagrees with "
         "pattern '2:4'"),
        (["--pattern", "3"], "pattern must be 'unstructured' or 'N:M'"),
        (["--pattern", "2:4", "--block-size", "10"], "--block-size must be a "
         "multiple of M = 4"),
        (["--pattern", "2:4", "--k", "3"], "--k must be --block-size * (M - N) / M"),
    ],
)  # fmt: skip
def test_cli_pattern_errors(extra, message, capsys):
    assert main(["prune", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
