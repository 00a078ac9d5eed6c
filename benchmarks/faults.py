"""Fault cases: hundreds of bad inputs through the command line, none a traceback.

The cases are generated from tables (docs/cli.md, "Outputs, interrupts and exit
status"): every numeric flag of ``prune`` with bad numbers, every flag that names
a choice with bad names, every output and input path with bad paths (a folder
that cannot be made, ``/dev/null``, a folder, a file, a link, a read-only or
foreign folder, random bytes), ``evaluate --model`` on broken folders (bad
``prune_config.json``, weights of the wrong shape, ``auto_map``), ``--resume`` of
what is not a checkpoint or with changed settings, and ``solve`` of bad problem
files. Each runs in this process (``icbs_opt.cli.main``) on the digits task (and
a tiny Llama when transformers is installed), and passes when it

- raises no exception out of ``main`` (no traceback) and exits with 0 or 2,
- and, exiting with 2, says so in exactly one ``icbs-opt...: error:`` line.

    python benchmarks/faults.py            # every case, a summary, exit 1 on a failure
    python benchmarks/faults.py -v         # one line per case

``tests/test_faults.py`` runs a fast subset (the cases that stop before a model
loads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Bad values of every numeric flag.
BAD_NUMBERS = ("abc", "1.5", "-1", "0", "nan", "inf", "1e400", "", " 7",
               "99999999999999999999999")  # fmt: skip
#: Bad values of every flag that names a choice (a method, a device, a corpus).
BAD_NAMES = ("nope", "", " ", "NATIVE", "../etc/passwd", "a,b", "\u00e9t\u00e9", "-")
#: Flags naming a choice, with the base command each needs.
CHOICE_FLAGS = ("--init", "--selection", "--hessian", "--schedule", "--tape-dtype",
                "--refit-target", "--refit-solver", "--pattern", "--executor",
                "--device", "--task", "--backend", "--layers", "--harvest-format",
                "--backend-option", "--zero-shot")  # fmt: skip
#: Flags of text tasks naming a choice.
TEXT_CHOICE_FLAGS = ("--calib-data", "--eval-data", "--save-dtype", "--save-format",
                     "--data-dir")  # fmt: skip


@dataclass
class Case:
    """One command line and what it may do.

    Attributes:
        name: Shown in the report.
        argv: The arguments of ``icbs-opt``.
        fast: Whether it stops before any model loads (the default tests' subset).
        errors: Most ``error:`` lines allowed (outputs that fail each say so).
    """

    name: str
    argv: list[str]
    fast: bool = True
    errors: int = 1


@dataclass
class Outcome:
    """What a case did, and why it failed (None: it passed)."""

    case: Case
    status: int | None
    stderr: str
    failure: str | None
    seconds: float


# ------------------------------------------------------------------ fixtures
def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def make_fixtures(root: Path, cache: Path) -> dict[str, Path]:
    """Bad files and folders, a finished digits run and a stopped one, in ``root``.

    Returns:
        The paths by name (``done``, ``stopped``, ``random``, ``ro``, ...).
    """
    from icbs_opt.cli import main

    f = {"root": root, "cache": cache}
    noise = bytes((i * 7919 + 13) % 256 for i in range(5000))
    f["random"] = _write(root / "files" / "random.bin", noise)
    f["empty"] = _write(root / "files" / "empty.bin", b"")
    f["short"] = _write(root / "files" / "short.bin", b"abc")
    f["text"] = _write(root / "files" / "text.txt", "hello\n")
    f["badjson"] = _write(root / "files" / "bad.json", "{")
    f["listjson"] = _write(root / "files" / "list.json", "[1, 2]")
    f["foreign"] = root / "foreign"
    _write(f["foreign"] / "notes.txt", "not icbs-opt's")
    f["link"] = root / "link"
    f["link"].symlink_to(f["foreign"])
    f["ro"] = root / "ro"
    f["ro"].mkdir()
    f["ro"].chmod(0o500)
    f["emptydir"] = root / "emptydir"
    f["emptydir"].mkdir()
    quiet = io.StringIO()
    base = ["prune", "--cache-dir", str(cache), "--backend", "exhaustive",
            "--block-size", "12", "--no-progress"]  # fmt: skip
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        f["done"] = root / "done"
        assert main([*base, "--steps", "1", "--out", str(f["done"])]) == 0
        f["stopped"] = root / "stopped"
        argv = [*base, "--steps", "3", "--time-budget", "1e-9"]
        assert main([*argv, "--out", str(f["stopped"])]) == 0
    _broken_folders(root / "broken", f)
    return f


def _broken_folders(root: Path, f: dict[str, Path]) -> None:
    """Copies of the finished run, each broken one way; and bad model folders."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(f["done"], target)
        return target

    config = json.loads((f["done"] / "prune_config.json").read_text())
    for name, text in (("cfg_notjson", "{"), ("cfg_list", "[1]"),
                       ("cfg_missing", '{"task": "digits-mlp"}')):  # fmt: skip
        _write(copy(name) / "prune_config.json", text)
    edits = {
        "cfg_badtask": {"task": "nope"},
        "cfg_badopt": {"task_options": {"batch_size": "x"}},
        "cfg_unknownopt": {"task_options": {"colour": "red"}},
        "cfg_density": {"config": {**config["config"], "density": "abc"}},
        "cfg_blocks": {"config": {**config["config"], "block_size": [2]}},
        "cfg_run": {"run": "steps"},
    }
    for name, change in edits.items():
        _write(copy(name) / "prune_config.json", json.dumps({**config, **change}))
    _write(copy("weights_random") / "model.safetensors", f["random"].read_bytes())
    (copy("weights_missing") / "model.safetensors").unlink()
    state = load_file(str(f["done"] / "model.safetensors"))
    save_file({**state, "2.weight": torch.zeros(3, 3)},
              str(copy("weights_shape") / "model.safetensors"))  # fmt: skip
    save_file(
        {"other": torch.zeros(2)}, str(copy("weights_foreign") / "model.safetensors")
    )
    llama = {"model_type": "llama"}
    hf = {"hf_automap": {**llama, "auto_map": {"AutoConfig": "x.C"}},
          "hf_unknown": {"model_type": "nope"}, "hf_bert": {"model_type": "bert"},
          "hf_llama_no_weights": {**llama, "vocab_size": 8},
          "hf_positions": {**llama, "max_position_embeddings": 4}}  # fmt: skip
    for name, data in hf.items():
        _write(root / name / "config.json", json.dumps(data))
    _write(root / "hf_notjson" / "config.json", "{")
    _write(root / "hf_list" / "config.json", "[]")
    f["broken"] = root


def make_lm(root: Path) -> Path | None:
    """A tiny Llama folder and its two text files, or None without transformers."""
    try:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError:
        return None
    from icbs_opt.tasks.causal_lm import save_causal_lm

    words = "the cat sat on a mat and dog ran to big red house".split()
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    folder = root / "lm"
    save_causal_lm(LlamaForCausalLM(config), PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>"), folder)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for name, n in (("valid.txt", 400), ("test.txt", 200)):
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines = [" ".join(words[i] for i in idx[j : j + 10]) for j in range(0, n, 10)]
        _write(root / name, "\n".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------- cases
def _numeric_flags() -> list[str]:
    """The flags of ``prune`` that take a number."""
    from icbs_opt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    prune = sub.choices["prune"]
    return [a.option_strings[0] for a in prune._actions
            if a.type in (int, float) and a.option_strings]  # fmt: skip


def cases(f: dict[str, Path], lm: Path | None) -> Iterator[Case]:
    """Every case, generated from the tables above and the fixtures ``f``."""
    digits = ["--cache-dir", str(f["cache"]), "--backend", "exhaustive",
              "--block-size", "12", "--steps", "1", "--no-progress"]  # fmt: skip
    text = _text_flags(lm)
    for flag in _numeric_flags():
        for value in BAD_NUMBERS:
            base = text if flag in _TEXT_NUMBERS and lm else digits
            yield Case(f"prune {flag} {value!r}", ["prune", *base, flag, value],
                       fast=False)  # fmt: skip
    for flag in CHOICE_FLAGS + (TEXT_CHOICE_FLAGS if lm else ()):
        base = text if flag in TEXT_CHOICE_FLAGS else digits
        for value in BAD_NAMES:
            yield Case(f"prune {flag} {value!r}", ["prune", *base, flag, value],
                       fast=False)  # fmt: skip
    yield from _path_cases(f, digits)
    yield from _evaluate_cases(f, lm)
    yield from _resume_cases(f)
    yield from _solve_cases(f)
    both = ["evaluate", "--task", "digits-mlp", "--model", str(f["done"])]
    for argv in ([], ["nope"], ["prune", "--nope"], ["evaluate"], both, ["solve"],
                 ["compare"], ["backends", "--json", "/proc/nope/x"]):  # fmt: skip
        yield Case(f"icbs-opt {' '.join(argv)}", argv)


_TEXT_NUMBERS = ("--seq-len", "--eval-windows", "--calib-windows", "--pruning-windows",
                 "--data-seed", "--eval-batch-size", "--val-windows")  # fmt: skip


def _text_flags(lm: Path | None) -> list[str]:
    if lm is None:
        return []
    data = lm.parent
    return ["--model", str(lm), "--calib-data", str(data / "valid.txt"),
            "--eval-data", str(data / "test.txt"), "--pruning-windows", "8",
            "--calib-windows", "2", "--batch-size", "2", "--eval-windows", "2",
            "--seq-len", "16", "--block-size", "8", "--blocks-per-step", "2",
            "--steps", "1", "--backend", "exhaustive", "--no-progress",
            "--save-dtype", "float32"]  # fmt: skip


def _bad_paths(f: dict[str, Path]) -> dict[str, str]:
    return {
        "uncreatable": "/proc/nope/x.json",
        "devnull": os.devnull,
        "folder": str(f["emptydir"]),
        "file": str(f["text"]),
        "link": str(f["link"]),
        "readonly": str(f["ro"] / "x" / "y.json"),
        "foreign": str(f["foreign"]),
        "empty": "",
        "dash": "-",
        "under-a-file": str(f["text"] / "x.json"),
        "random": str(f["random"]),
        "other-run": str(f["stopped"]),
    }


def _path_cases(f: dict[str, Path], digits: list[str]) -> Iterator[Case]:
    for flag in ("--out", "--checkpoint", "--harvest", "--json", "--plot"):
        for name, path in _bad_paths(f).items():
            argv = ["prune", *digits, flag, path]
            yield Case(f"prune {flag} {name}", argv, fast=False, errors=2)
    for flag in ("--cache-dir", "--resume"):
        for name, path in _bad_paths(f).items():
            yield Case(f"prune {flag} {name}", ["prune", *digits, flag, path],
                       fast=False)  # fmt: skip


def _evaluate_cases(f: dict[str, Path], lm: Path | None) -> Iterator[Case]:
    for folder in sorted(f["broken"].iterdir()):
        yield Case(f"evaluate --model {folder.name}",
                   ["evaluate", "--model", str(folder), "--no-progress"],
                   fast=folder.name.startswith("hf_"))  # fmt: skip
    for name, path in _bad_paths(f).items():
        yield Case(f"evaluate --model {name}", ["evaluate", "--model", path],
                   fast=name not in ("other-run",))  # fmt: skip
        argv = ["evaluate", "--task", "digits-mlp", "--cache-dir", str(f["cache"])]
        yield Case(f"evaluate --json {name}", [*argv, "--json", path], fast=False)
    if lm is not None:
        data = [str(lm.parent / "valid.txt"), str(lm.parent / "test.txt")]
        for seq_len in ("100000", "65", "1", "abc"):
            argv = ["evaluate", "--model", str(lm), "--calib-data", data[0],
                    "--eval-data", data[1], "--seq-len", seq_len]  # fmt: skip
            yield Case(f"evaluate lm --seq-len {seq_len}", argv)


def _resume_cases(f: dict[str, Path]) -> Iterator[Case]:
    stopped = str(f["stopped"])
    for name in ("random", "empty", "short", "text", "badjson", "listjson"):
        yield Case(f"prune --resume {name}", ["prune", "--resume", str(f[name])])
    yield Case("prune --resume masks", ["prune", "--resume",
               str(f["done"] / "masks.safetensors")])  # fmt: skip
    for change in (["--density", "0.2"], ["--seed", "1"], ["--backend", "native"],
                   ["--task", "smollm2-135m"], ["--block-size", "24"],
                   ["--layers", "0"], ["--steps", "5"], ["--cache-dir", "/tmp"],
                   ["--backend-option", "x=1"], ["--pattern", "2:4"]):  # fmt: skip
        yield Case(f"prune --resume {' '.join(change)}",
                   ["prune", "--resume", stopped, *change])  # fmt: skip


def _solve_cases(f: dict[str, Path]) -> Iterator[Case]:
    for name in ("random", "empty", "short", "text", "badjson", "listjson",
                 "emptydir", "foreign"):  # fmt: skip
        yield Case(f"solve {name}", ["solve", str(f[name])])
    for flag, value in (("--k", "abc"), ("--k", "1.5"), ("--seed", "-1"),
                        ("--backend", "nope"), ("--backend-option", "x")):  # fmt: skip
        yield Case(f"solve {flag} {value}", ["solve", str(f["text"]), flag, value])


# -------------------------------------------------------------------- runner
def run_case(case: Case) -> Outcome:
    """Run ``case`` in this process and judge it."""
    from icbs_opt.cli import main

    out, err = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()  # main's basicConfig logs to this case's stderr
    status, failure, start = None, None, time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(case.argv)
        except SystemExit as exc:  # the parser: --help, or its one-line error
            status = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - the very thing a case looks for
            failure = "traceback: " + traceback.format_exc().strip().splitlines()[-1]
    text = err.getvalue()
    errors = [line for line in text.splitlines() if "error:" in line]
    if failure is None and "Traceback" in text:
        failure = "a traceback on stderr"
    elif failure is None and status not in (0, 2):
        failure = f"exit status {status}"
    elif failure is None and status == 2 and not 1 <= len(errors) <= case.errors:
        failure = f"{len(errors)} error lines"
    elif failure is None and any(not e.startswith("icbs-opt") for e in errors):
        failure = "an error line not from icbs-opt"
    return Outcome(case, status, text, failure, time.perf_counter() - start)


def run_cases(selected: list[Case], verbose: bool = False) -> list[Outcome]:
    """Run every case; with ``verbose`` print one line per case."""
    outcomes = []
    for case in selected:
        outcome = run_case(case)
        outcomes.append(outcome)
        if verbose or outcome.failure:
            last = (outcome.stderr.strip().splitlines() or [""])[-1][:150]
            mark = "FAIL " + outcome.failure if outcome.failure else "ok"
            print(
                f"{mark:<8} [{outcome.status}] {case.name}: {last}", file=sys.__stdout__
            )
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run every case and print a summary; 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--fast", action="store_true", help="only the fast cases")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="icbs-faults-") as tmp:
        root = Path(tmp)
        fixtures = make_fixtures(root, root / "cache")
        lm = make_lm(root / "text")
        selected = [c for c in cases(fixtures, lm) if c.fast or not args.fast]
        start, here = time.perf_counter(), os.getcwd()
        os.chdir(root / "emptydir")  # what a case writes to '.' stays in the temp
        try:
            outcomes = run_cases(selected, args.verbose)
        finally:
            os.chdir(here)
            fixtures["ro"].chmod(0o700)
    failed = [o for o in outcomes if o.failure]
    by_status: dict[int | None, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    print(f"{len(outcomes)} cases in {time.perf_counter() - start:.0f} s: "
          f"{len(outcomes) - len(failed)} passed, {len(failed)} failed; exit "
          f"status {dict(sorted(by_status.items(), key=str))}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
