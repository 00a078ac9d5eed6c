"""Saved causal LMs in the compressed-tensors format: tiny seeded Llama models."""

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from compressed_tensors.config import SparsityCompressionConfig  # noqa: E402
from compressed_tensors.utils import match_named_modules  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_llm import WORDS, tiny_llama, word_tokenizer, write_text  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from icbs_opt.errors import DataError  # noqa: E402
from icbs_opt.pruning import nonzero_density  # noqa: E402
from icbs_opt.tasks import causal_lm as llm  # noqa: E402
from icbs_opt.tasks import compressed  # noqa: E402
from icbs_opt.tasks.options import TextOptions  # noqa: E402

VOCAB = len(WORDS) + 1


def pruned_llama(structure: str, seed: int = 0):
    """A tiny tied Llama with half of every prunable layer's weights at zero."""
    model = tiny_llama(vocab=VOCAB, tie=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in llm.prunable_layers(model):
            w = model.get_submodule(name).weight
            if structure == "2:4":  # two random places of each group of four
                order = torch.rand(w.numel() // 4, 4, generator=g).argsort(dim=1)
                w.view(-1, 4).scatter_(1, order[:, :2], 0.0)
            else:
                w[torch.rand(w.shape, generator=g) < 0.5] = 0
    return model


def saved_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def payload_bytes(folder):
    """Bytes of the tensors in the folder's weight files (headers left out)."""
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(file))
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize(
    ("structure", "save_format", "fmt"),
    [
        ("unstructured", "compressed", "sparse-bitmask"),
        ("2:4", "compressed", "sparse-24-bitmask"),
        ("unstructured", "dense", "dense"),
        ("2:4", "dense", "dense"),
    ],
)
def test_round_trip_gives_the_saved_weights(tmp_path, structure, save_format, fmt):
    model, tok = pruned_llama(structure), word_tokenizer()
    layers = llm.prunable_layers(model)
    folder = tmp_path / "out"
    llm.save_causal_lm(model, tok, folder, "bfloat16", save_format)
    assert model.dtype == torch.float32  # the caller's model is left as it was
    saved = saved_config(folder)
    assert saved["quant_method"] == "compressed-tensors"
    sparse = saved["sparsity_config"]
    config = SparsityCompressionConfig.load_from_registry(sparse["format"], **sparse)
    assert config.format == fmt and config.sparsity_structure == structure
    assert config.global_sparsity == pytest.approx(1 - nonzero_density(model, layers))
    targets = match_named_modules(model, config.targets, config.ignore)
    assert [name for name, _ in targets] == layers
    rounded = compressed.cast_parameters(model, torch.bfloat16)
    loaded, _ = llm.load_causal_lm(folder)
    assert loaded.dtype == torch.float32
    for key, value in rounded.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float()), key
    windows = torch.randint(
        0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1)
    )
    assert llm.perplexity(loaded, windows) == llm.perplexity(
        compressed.cast_parameters(rounded, torch.float32), windows
    )
    in_bf16, _ = llm.load_causal_lm(folder, dtype=torch.bfloat16)
    assert llm.perplexity(in_bf16, windows) == llm.perplexity(rounded, windows)


def test_compressed_weights_leave_the_zeros_out(tmp_path):
    model, tok = pruned_llama("unstructured"), word_tokenizer()
    for save_format in ("dense", "compressed"):
        llm.save_causal_lm(model, tok, tmp_path / save_format, "bfloat16", save_format)
    llm.save_causal_lm(model, tok, tmp_path / "float32")
    dense = payload_bytes(tmp_path / "dense")
    assert payload_bytes(tmp_path / "float32") == 2 * dense
    expected = dense
    for name in llm.prunable_layers(model):
        w = model.get_submodule(name).weight
        rows, cols = w.shape
        zeros = w.numel() - int(torch.count_nonzero(w))
        # values, bitmask (8 a byte), shape and row offsets (int64)
        expected += -2 * zeros + rows * -(-cols // 8) + 2 * 8 + rows * 8
    assert payload_bytes(tmp_path / "compressed") == expected < dense
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # compressed-
    rounded = compressed.cast_parameters(model, torch.bfloat16)  # tensors is here
    assert plain.dtype == torch.bfloat16
    for key, value in rounded.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


def test_dense_format_loads_without_compressed_tensors(tmp_path, monkeypatch):
    model, tok = pruned_llama("unstructured"), word_tokenizer()
    llm.save_causal_lm(model, tok, tmp_path / "dense", "float16", "dense")
    llm.save_causal_lm(model, tok, tmp_path / "compressed", "float16", "compressed")
    for name in [m for m in sys.modules if m.startswith("compressed_tensors")]:
        monkeypatch.setitem(sys.modules, name, None)  # import now fails
    monkeypatch.setattr(compressed, "compressed_tensors_available", lambda: False)
    loaded, _ = llm.load_causal_lm(tmp_path / "dense")
    for key, value in (
        compressed.cast_parameters(model, torch.float16).state_dict().items()
    ):
        assert torch.equal(loaded.state_dict()[key], value.float()), key
    with pytest.raises(DataError, match="sparse-bitmask weights need compressed-tens"):
        llm.load_causal_lm(tmp_path / "compressed")
    with pytest.raises(DataError, match="'compressed' needs compressed-tensors"):
        llm.save_causal_lm(model, tok, tmp_path / "again", "float16", "compressed")
    llm.save_causal_lm(model, tok, tmp_path / "bare", "bfloat16", "dense")
    assert "quantization_config" not in json.loads(
        (tmp_path / "bare" / "config.json").read_text()
    )


def test_options_check_the_save_settings(monkeypatch):
    assert compressed.resolve_save_format(None) == "compressed"
    with pytest.raises(DataError, match="save_dtype must be one of .*, got 'int8'"):
        TextOptions(save_dtype="int8")
    with pytest.raises(
        DataError, match="save_format must be compressed or dense, got 'zip'"
    ):
        TextOptions(save_format="zip")
    monkeypatch.setattr(compressed, "compressed_tensors_available", lambda: False)
    assert compressed.resolve_save_format(None) == "dense"
    with pytest.raises(
        DataError, match=r"install it with: pip install \"icbs-opt\[compress"
    ):
        TextOptions(save_format="compressed")


def test_cli_refuses_compressed_without_the_package(monkeypatch, capsys):
    from icbs_opt.cli import main

    monkeypatch.setattr(compressed, "compressed_tensors_available", lambda: False)
    argv = ["prune", "--task", "smollm2-135m", "--save-format", "compressed"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("icbs-opt: error: --save-format 'compressed' needs")
    assert err.count("\n") == 1, err


def test_a_layer_that_is_not_2_4_is_refused():
    model = pruned_llama("unstructured")
    state = model.state_dict()
    with pytest.raises(
        DataError, match="layer 'model.layers.0.self_attn.q_proj' is not 2:4"
    ):
        compressed.compress_state_dict(
            state, llm.prunable_layers(model), compressed.BITMASK_24
        )


def test_an_unknown_sparsity_format_is_refused(tmp_path):
    model, tok = pruned_llama("2:4"), word_tokenizer()
    llm.save_causal_lm(model, tok, tmp_path, "bfloat16", "dense")
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="holds sparsity format 'marlin-24'"):
        llm.load_causal_lm(tmp_path)


def test_cli_prune_out_saves_compressed_bfloat16(tmp_path, capsys):
    from icbs_opt.cli import main

    model, tok = tiny_llama(vocab=VOCAB), word_tokenizer()
    llm.save_causal_lm(model, tok, tmp_path / "m")
    text = write_text(tmp_path / "text.txt", 400, seed=1)
    data = ["--calib-data", str(text), "--eval-data", str(text), "--seq-len", "16"]
    data += ["--eval-windows", "3", "--calib-windows", "4", "--pruning-windows", "8"]
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tmp_path / "m"), *data, "--batch-size", "4"]
    argv += ["--density", "0.5", "--steps", "0", "--init", "wanda_per_output"]
    argv += ["--pattern", "2:4", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    sparse = saved_config(out)["sparsity_config"]
    assert (sparse["format"], sparse["sparsity_structure"]) == (
        "sparse-24-bitmask",
        "2:4",
    )
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["pattern"] == "2:4" and evaluated["density"] == 0.5
