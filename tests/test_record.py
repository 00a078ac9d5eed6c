"""The run record (issue 20): one reader and writer of a run's settings files, one
flag per setting, one signal mechanism, one model-folder check, and every setting
checked before the model loads.

``tests/data/run-0fa6a77`` holds files written by the code before the record
(commit 0fa6a77): a digits run's ``prune_config.json`` and ``results.json`` (2
steps, ``--block-size 64 --ridge 0.002``, ``cache_dir`` blanked) and a checkpoint
of a one-layer model whose header holds the settings of ``prune --steps 6
--block-size 8 --ridge 0.002 --checkpoint-every 3 --out runs/old``, kept as JSON
(``checkpoint.json``) and written back to a safetensors file when the tests load.
"""

import atexit
import dataclasses
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from icbs_opt.cli import build_parser, main
from icbs_opt.cli.common import Interrupts, Terminated
from icbs_opt.cli.flags import flag_of, given_settings, given_task_options
from icbs_opt.errors import DataError, PruningError
from icbs_opt.pruning.checkpoint import load_checkpoint
from icbs_opt.record import CHECKPOINT_FILE, RunRecord, read_checkpoint_texts
from icbs_opt.settings import Preset, PruneConfig, RunSettings
from icbs_opt.tasks import digits as digits_module
from icbs_opt.tasks import load_saved_task, task_names, task_spec
from icbs_opt.tasks.options import CausalLMOptions, check_model_dir


def _old_run() -> Path:
    """``tests/data/run-0fa6a77`` as a run folder, its checkpoint rebuilt from JSON.

    The checkpoint's header and tensors are kept as JSON (no binary file in the
    repository) and written back to ``checkpoint.safetensors`` byte for byte as
    the old code's writer left them.
    """
    source = Path(__file__).parent / "data" / "run-0fa6a77"
    folder = Path(tempfile.mkdtemp(prefix="icbs-old-run-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name in ("prune_config.json", "results.json"):
        shutil.copy(source / name, folder / name)
    saved = json.loads((source / "checkpoint.json").read_text())
    tensors = {
        name: torch.tensor(t["data"], dtype=getattr(torch, t["dtype"])).reshape(
            t["shape"]
        )
        for name, t in saved["tensors"].items()
    }
    save_file(tensors, folder / CHECKPOINT_FILE, metadata=saved["metadata"])
    return folder


OLD = _old_run()


# ------------------------------------------------------------------ old files
def test_reads_a_checkpoint_written_before_the_record():
    record = RunRecord.read_checkpoint(OLD)
    assert record.task == "digits-mlp" and record.backend == "native"
    assert record.task_options["batch_size"] == 200
    assert record.backend_options["num_restarts"] == 10
    assert record.preset.config.ridge_multiplier == 0.002
    assert (record.preset.config.block_size, record.preset.config.k) == (8, 4)
    assert (record.preset.run.steps, record.preset.run.checkpoint_every) == (6, 3)
    assert record.layers is None and record.outputs == {"out": "runs/old"}
    texts = read_checkpoint_texts(OLD / CHECKPOINT_FILE)
    assert record.to_dict() == json.loads(texts["settings"])  # the same format
    saved = load_checkpoint(OLD)
    assert saved.settings == record.to_dict() and saved.result.steps_done == 3


def test_reads_and_rewrites_an_out_folder_written_before_the_record(tmp_path):
    record = RunRecord.read_config(OLD)
    assert record.preset.config.block_size == 64 and record.layers == ["0", "2", "4"]
    assert record.preset.config.ridge_multiplier == 0.002
    old = json.loads((OLD / "prune_config.json").read_text())
    record.write_config(tmp_path, layers=old["layers"], task_info=old["task_info"])
    new = json.loads((tmp_path / "prune_config.json").read_text())
    assert new.keys() == old.keys() and new.pop("versions") and old.pop("versions")
    assert new == old
    results = RunRecord.read_results(OLD)
    assert results["steps_done"] == 2 and len(results["steps"]) == 2
    RunRecord.write_results(tmp_path, {"steps_done": 2}, results["steps"])
    assert RunRecord.read_results(tmp_path)["steps"] == results["steps"]


def test_settings_added_since_take_defaults_and_removed_ones_are_ignored(caplog):
    data = RunRecord.read_checkpoint(OLD).to_dict()
    del data["config"]["tape_dtype"], data["run"]["time_budget"], data["outputs"]
    data["config"]["retired_knob"] = 3
    with caplog.at_level(logging.WARNING, logger="icbs_opt.record"):
        record = RunRecord.from_dict(data, "old.json")
    assert record.preset.config.tape_dtype == "float32"
    assert record.preset.run.time_budget is None and record.outputs == {}
    assert "ignoring settings no longer known in old.json: retired_knob" in caplog.text


def test_bad_record_files_give_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="cannot read the checkpoint .*notes.txt"):
        RunRecord.read_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="cannot read the checkpoint") as raised:
        RunRecord.read_checkpoint(tmp_path)  # no checkpoint.safetensors
    assert str(raised.value).count("cannot read") == 1
    data = RunRecord.read_checkpoint(OLD).to_dict()
    del data["config"]
    with pytest.raises(DataError, match="cannot read the run settings in x: 'config'"):
        RunRecord.from_dict(data, "x")
    data = RunRecord.read_checkpoint(OLD).to_dict()
    data["config"]["k"] = 99
    with pytest.raises(PruningError, match="k must be an integer in"):
        RunRecord.from_dict(data)
    (tmp_path / "prune_config.json").write_text("{")
    with pytest.raises(DataError, match="cannot read the run settings"):
        RunRecord.read_config(tmp_path)
    assert RunRecord.read_config(tmp_path / "empty") is None
    with pytest.raises(DataError, match="cannot read the results"):
        RunRecord.read_results(tmp_path)


def test_changed_names_the_first_setting_a_resume_may_not_change():
    record = RunRecord("digits-mlp", {"batch_size": 200}, "native", {},
                       Preset(PruneConfig(0.1), RunSettings()))  # fmt: skip

    def changed(**fields):
        settings = {k: v for k, v in fields.items() if not hasattr(record, k)}
        fields = {k: v for k, v in fields.items() if k not in settings}
        preset = record.preset.replace(**settings)
        return record.changed(dataclasses.replace(record, preset=preset, **fields))

    assert changed(time_budget=5.0, checkpoint_every=2) is None
    assert changed(ridge_multiplier=0.5) == ("ridge_multiplier", 0.0, 0.5)
    assert changed(task_options={"batch_size": 100}) == ("batch_size", 200, 100)
    assert changed(layers=["0"]) == ("layers", None, ["0"])
    assert changed(backend="exhaustive") == ("backend", "native", "exhaustive")


# ---------------------------------------------------------------------- flags
def test_every_setting_and_task_option_has_one_flag():
    settings = [*dataclasses.fields(PruneConfig), *dataclasses.fields(RunSettings)]
    classes = [task_spec(t).options for t in task_names()]
    options = {f.name for cls in classes for f in dataclasses.fields(cls)}
    names = [f.name for f in settings] + sorted(options)
    flags = [flag_of(name) for name in names]
    assert len(set(flags)) == len(flags)
    assert flag_of("ridge_multiplier") == "--ridge" and flag_of("k") == "--k"
    assert flag_of("val_fraction") == "--val-fraction"
    assert all(f.metadata["help"] for f in settings)
    args = build_parser().parse_args(
        ["prune", "--ridge", "0.5", "--keep-best", "--seq-len", "64", "--k", "3"]
    )
    assert given_settings(args) == {"ridge_multiplier": 0.5, "keep_best": True, "k": 3}
    assert given_task_options(args) == {"seq_len": 64}


def test_help_shows_the_defaults_of_task_options_too(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ridge RIDGE_MULTIPLIER lambda_r (default 0.001)" in text
    assert "samples per pruning batch (default digits-mlp: 200; smollm2-135m, " \
        "causal-lm: 8)" in text  # fmt: skip
    assert "tokens per window (default smollm2-135m, causal-lm: 512)" in text


def test_old_task_options_name_their_replacement(capsys):
    assert main(["prune", "--calib-file", "a.txt"]) == 2
    assert "--calib-file was replaced by --calib-data" in capsys.readouterr().err


# -------------------------------------------------------------------- signals
@pytest.mark.parametrize(
    ("kind", "error"),
    [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)],
)
def test_a_signal_raises_and_the_handlers_come_back(kind, error):
    before = signal.getsignal(kind)
    with pytest.raises(error) as raised, Interrupts().installed():
        os.kill(os.getpid(), kind)
    assert isinstance(raised.value, Terminated) == (kind == signal.SIGTERM)
    assert signal.getsignal(kind) is before


def test_stop_first_records_the_first_signal_and_raises_at_the_second(capsys):
    interrupts = Interrupts(stop_first=True, notice="stopping")
    with Interrupts().installed(), interrupts.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.received == "SIGTERM" and interrupts.exit_status == 143
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        interrupts.abandonable = False  # writing the results: nothing stops it
        os.kill(os.getpid(), signal.SIGINT)
    assert capsys.readouterr().err == "icbs-opt: SIGTERM: stopping\n"
    assert Interrupts(stop_first=True).exit_status == 0


# --------------------------------------------------------------- model folder
def test_one_model_folder_check(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "missing"
    for call in (
        lambda: check_model_dir(missing),
        lambda: check_model_dir(missing, hugging_face=False),
        lambda: load_saved_task("digits-mlp", missing),
        lambda: CausalLMOptions(model=str(missing)),
        lambda: check_model_dir(tmp_path / "a-file"),
    ):
        with pytest.raises(DataError, match="model directory '.*' does not exist"):
            call()
    with pytest.raises(DataError, match="not a Hugging Face model directory"):
        CausalLMOptions(model=str(tmp_path / "empty"))
    assert check_model_dir(tmp_path / "empty", hugging_face=False).is_dir()
    assert main(["evaluate", "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not a Hugging Face model directory (no config.json)" in err


# ------------------------------------------------- checked before model loads
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(digits_module, "load_or_train_digits_mlp", refuse)


@pytest.mark.usefixtures("no_model")
def test_plot_without_matplotlib_fails_before_loading(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a),
    )
    assert main(["prune", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "0,,4"], "--layers must be comma-separated module names"),
        (["--resume", str(OLD), "--task", "smollm2-135m"],
         "cannot resume with --task 'smollm2-135m': the checkpoint's run has "
         "'digits-mlp'"),
        (["--resume", str(OLD), "--ridge", "0.5"], "cannot resume with --ridge 0.5"),
        (["--resume", str(OLD), "--backend", "exhaustive"],
         "cannot resume with --backend 'exhaustive'"),
        (["--resume", str(OLD), "--layers", "0"], "cannot resume with --layers"),
        (["--resume", str(OLD), "--executor", "mpi://x"], "unknown executor"),
    ],
)  # fmt: skip
def test_settings_are_checked_before_loading(argv, message, capsys):
    assert main(["prune", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.usefixtures("one_thread")
def test_resume_reads_the_record_it_wrote(cache, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", "--cache-dir", str(cache), "--steps", "4", "--block-size", "16"]
    argv += ["--time-budget", "0.00001", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    record = RunRecord.read_checkpoint(out)
    assert record.preset.run.steps == 4 and record.outputs == {"out": str(out)}
    assert RunRecord.read_config(out).preset == record.preset
    assert main(["prune", "--resume", str(out), "--time-budget", "60"]) == 0
    results = RunRecord.read_results(out)
    assert results["steps_done"] == 4 and results["resumed_from"]
    assert torch.equal(
        load_checkpoint(out).state["layers"]["0"]["pruned"],
        ~_masks(out)["0"].reshape(-1),
    )


def _masks(out):
    from safetensors.torch import load_file

    return load_file(str(out / "masks.safetensors"))
