"""Zero-shot tasks through lm-eval on tiny task files, against a direct computation."""

import csv
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from icbs_opt import zeroshot  # noqa: E402
from icbs_opt.cli import main  # noqa: E402
from icbs_opt.errors import DataError  # noqa: E402
from icbs_opt.tasks import causal_lm as llm  # noqa: E402
from tests.tiny import WORDS, text_data, tiny_llama, word_tokenizer  # noqa: E402


def phrase(rng, n):
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_tasks(root, count=6, seed=0):
    """Tiny files in the local layouts of every task, words from the tokenizer."""
    rng = torch.Generator().manual_seed(seed)
    z = root / "zeroshot"

    def arc(i):
        labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3"]
        return {
            "question": {
                "stem": phrase(rng, 4),
                "choices": [
                    {"text": phrase(rng, 1 + j % 3), "label": lab}
                    for j, lab in enumerate(labels)
                ],
            },
            "answerKey": labels[i % len(labels)],
        }

    for name, file in (("arc_easy", "test.jsonl"), ("arc_challenge", "test.jsonl"),
                       ("openbookqa", "test.jsonl")):  # fmt: skip
        write_jsonl(z / name / file, [arc(i) for i in range(count)])
    write_jsonl(z / "boolq/validation.jsonl", [
        {"query": f"Passage: {phrase(rng, 6)}\nQuestion: {phrase(rng, 3)}?",
         "choices": ["no", "yes"], "gold": i % 2} for i in range(count)])  # fmt: skip
    write_jsonl(z / "hellaswag/validation.jsonl", [
        {"ctx": f"the cat: {phrase(rng, 4)} [title] {phrase(rng, 2)}",
         "endings": [phrase(rng, 1 + j) for j in range(4)], "label": i % 4}
        for i in range(count)])  # fmt: skip
    write_jsonl(z / "winogrande/dev.jsonl", [
        {"sentence": f"{phrase(rng, 3)} _ {phrase(rng, 3)}", "option1": "dog",
         "option2": "cat", "answer": str(1 + i % 2)}
        for i in range(count)])  # fmt: skip
    (z / "winogrande/dev-labels.lst").write_text("1\n" * count)
    write_jsonl(z / "piqa/valid.jsonl", [
        {"goal": phrase(rng, 3), "sol1": phrase(rng, 2), "sol2": phrase(rng, 3)}
        for _ in range(count)])  # fmt: skip
    (z / "piqa/valid-labels.lst").write_text(
        "".join(f"{i % 2}\n" for i in range(count))
    )
    (z / "rte").mkdir()
    with open(z / "rte/dev.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["sentence1", "sentence2", "label", "idx"])
        for i in range(count):
            writer.writerow([phrase(rng, 5), phrase(rng, 3), i % 2, i])
    write_jsonl(z / "lambada_openai/test.jsonl",
                [{"text": phrase(rng, 6)} for _ in range(count)])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def lm():
    tok = word_tokenizer()
    tok.eos_token = "<unk>"  # lm-eval's prefix for an empty context
    return tiny_llama(vocab=len(WORDS) + 1, seed=3), tok


def logprob(model, tok, context, continuation):
    """Sum of the continuation's log-probabilities after the context, and greedy."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    greedy = bool((rows.argmax(-1) == target).all())
    return float(rows[torch.arange(len(cont)), target].sum()), greedy


def prompt(name, d):
    """lm-eval's prompt of a multiple-choice task: context, choices, gold index."""
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        stem = d.get("question_stem") or f"Question: {d['question']}\nAnswer:"
        labels = d["choices"]["label"]
        return stem, d["choices"]["text"], labels.index(d["answerKey"])
    if name == "boolq":
        text = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
        return text, ["no", "yes"], d["label"]
    if name == "hellaswag":
        return d["query"], d["choices"], d["label"]
    if name == "rte":
        text = f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:"
        return text, ["True", "False"], d["label"]
    assert name == "piqa"
    return f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]


def expected(model, tok, name, data):
    """acc (and acc_norm) of ``name`` by a direct computation on its examples."""
    from icbs_opt.zeroshot.tasks import loaders  # the readers lm-eval calls

    reader = {"arc_easy": "arc", "arc_challenge": "arc", "lambada_openai": "lambada"}
    files = [f.removeprefix("zeroshot/") for f in zeroshot.task_files(name)]
    docs = getattr(loaders, reader.get(name, name))(
        data_dir=str(data / "zeroshot"), files=files
    )["test"]
    hits, norm_hits = [], []
    for d in docs:
        if name == "lambada_openai":
            words = d["text"].split(" ")
            hits.append(logprob(model, tok, " ".join(words[:-1]), " " + words[-1])[1])
            continue
        if name == "winogrande":
            contexts = loaders.winogrande_contexts(d)
            tail = loaders.winogrande_continuation(d)
            scores = [logprob(model, tok, c, " " + tail)[0] for c in contexts]
            hits.append(max(range(2), key=scores.__getitem__) == int(d["answer"]) - 1)
            continue
        context, choices, gold = prompt(name, d)
        scores = [logprob(model, tok, context, " " + c)[0] for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        hits.append(best == gold)
        norm_hits.append(max(range(len(choices)), key=normed.__getitem__) == gold)
    return sum(hits) / len(hits), (
        sum(norm_hits) / len(norm_hits) if norm_hits else None
    )


@pytest.mark.slow
def test_every_task_equals_a_direct_computation(lm, data):
    model, tok = lm
    result = zeroshot.evaluate_zero_shot(
        model, tok, list(zeroshot.ALL_TASKS), data_dir=data, progress=False
    )
    assert list(result["tasks"]) == list(zeroshot.ALL_TASKS)
    for name, scores in result["tasks"].items():
        acc, acc_norm = expected(model, tok, name, data)
        assert scores["examples"] == 6, name
        assert scores["acc"] == pytest.approx(acc), name
        if acc_norm is not None and name not in ("boolq", "rte"):
            assert scores["acc_norm"] == pytest.approx(acc_norm), name
    assert result["mean_acc"] == pytest.approx(
        sum(s["acc"] for s in result["tasks"].values()) / len(zeroshot.ALL_TASKS)
    )
    paper = [result["tasks"][n]["acc"] for n in zeroshot.PAPER_TASKS]
    assert result["paper_mean_acc"] == pytest.approx(sum(paper) / 7)
    assert result["tasks"]["lambada_openai"]["perplexity"] > 1
    assert "acc_norm" not in result["tasks"]["boolq"]


def test_models_not_packed_are_scored_by_lm_eval(data, monkeypatch):
    from icbs_opt.zeroshot import packed

    tok = word_tokenizer()
    tok.eos_token = "<unk>"
    model = tiny_llama(vocab=len(WORDS) + 1, seed=3)
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; not packable

    def refuse(*args, **kwargs):
        raise AssertionError("packed.score ran on a model it cannot pack")

    monkeypatch.setattr(packed, "score", refuse)
    result = zeroshot.evaluate_zero_shot(
        model, tok, ["arc_easy", "winogrande"], data_dir=data, progress=False
    )
    for name in ("arc_easy", "winogrande"):
        assert result["tasks"][name]["acc"] == pytest.approx(
            expected(model, tok, name, data)[0]
        )


def test_bfloat16_evaluation_leaves_the_model(lm, data):
    model, tok = lm
    before = [p.clone() for p in model.parameters()]
    result = zeroshot.evaluate_zero_shot(
        model, tok, ["arc_easy"], data_dir=data, dtype="bfloat16", progress=False
    )
    assert result["dtype"] == "bfloat16" and result["tasks"]["arc_easy"]["examples"]
    assert all(
        p.dtype == torch.float32 and torch.equal(p, q)
        for p, q in zip(model.parameters(), before, strict=True)
    )
    with pytest.raises(DataError, match="one of float32, bfloat16, not 'float16'"):
        zeroshot.evaluate_zero_shot(model, tok, ["rte"], data_dir=data, dtype="float16")


def test_limit_takes_the_first_examples(lm, data):
    model, tok = lm
    result = zeroshot.evaluate_zero_shot(
        model, tok, ["rte"], data_dir=data, limit=2, progress=False
    )
    assert result["tasks"]["rte"]["examples"] == 2 and result["limit"] == 2
    assert "paper_mean_acc" not in result
    assert any("--limit" in line for line in zeroshot.format_zero_shot(result))


def test_readers_of_the_local_layouts(tmp_path):
    from icbs_opt.zeroshot.tasks import loaders

    write_jsonl(tmp_path / "b.jsonl", [{"query": "Passage: A b.\nQ c\nQuestion: is "
                "it?", "choices": ["no", "yes"], "gold": 1}])  # fmt: skip
    doc = loaders.boolq(data_dir=str(tmp_path), files=["b.jsonl"])["test"][0]
    assert doc == {"passage": "A b.\nQ c", "question": "is it", "label": 1}
    write_jsonl(tmp_path / "h.jsonl", [{"ctx": "Act: x [title] y [step] z",
                                        "endings": [" e "], "label": "0"}])  # fmt: skip
    doc = loaders.hellaswag(data_dir=str(tmp_path), files=["h.jsonl"])["test"][0]
    assert doc == {"query": "Act: x. y z", "choices": ["e"], "label": 0}
    write_jsonl(tmp_path / "p.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    (tmp_path / "p.lst").write_text("1\n0\n")
    with pytest.raises(DataError, match="PIQA has 1 questions but 2 labels"):
        loaders.piqa(data_dir=str(tmp_path), files=["p.jsonl", "p.lst"])
    write_jsonl(tmp_path / "x.jsonl", [{"query": "no passage here"}])
    with pytest.raises(DataError, match="a BoolQ query is not 'Passage"):
        loaders.boolq(data_dir=str(tmp_path), files=["x.jsonl"])


def test_task_names():
    assert zeroshot.resolve_zero_shot("paper") == list(zeroshot.PAPER_TASKS)
    assert zeroshot.resolve_zero_shot("all")[-2:] == ["piqa", "lambada_openai"]
    with pytest.raises(DataError, match="unknown zero-shot task 'mmlu'; known: paper"):
        zeroshot.resolve_zero_shot("rte,mmlu")
    with pytest.raises(DataError, match="names 'rte' twice"):
        zeroshot.resolve_zero_shot("rte,rte")


def test_missing_lm_eval_or_files_are_named(tmp_path, monkeypatch, data):
    with pytest.raises(DataError, match=r"needs '.*zeroshot/rte/dev\.tsv'"):
        zeroshot.check_zero_shot(["rte"], tmp_path)
    assert zeroshot.check_zero_shot(["rte", "piqa"], data) == data
    monkeypatch.setattr(zeroshot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r'pip install "icbs-opt\[eval\]"'):
        zeroshot.check_zero_shot(["rte"], data)


@pytest.mark.slow
def test_cli_evaluate_and_prune_run_zero_shot(lm, data, text_dir, tmp_path, capsys):
    model, tok = lm
    llm.save_causal_lm(model, tok, tmp_path / "m")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in text_data(text_dir).items()]
    flags += ["--data-dir", str(data), "--seq-len", "16", "--calib-windows", "4"]
    argv = ["evaluate", "--model", str(tmp_path / "m"), *flags, "--zero-shot"]
    assert main([*argv[:-1], "--zero-shot-dtype", "bfloat16"]) == 2
    assert "--zero-shot-dtype needs --zero-shot" in capsys.readouterr().err
    assert main([*argv, "rte,piqa", "--limit", "3", "--json", "-"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert list(record["zero_shot"]["tasks"]) == ["rte", "piqa"]
    assert record["zero_shot"]["tasks"]["piqa"]["examples"] == 3
    direct = zeroshot.evaluate_zero_shot(
        model, tok, ["rte", "piqa"], data_dir=data, limit=3, progress=False
    )
    assert record["zero_shot"]["mean_acc"] == pytest.approx(direct["mean_acc"])
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tmp_path / "m"), *flags, "--steps", "1"]
    argv += ["--block-size", "8", "--backend", "exhaustive", "--no-progress"]
    argv += ["--batch-size", "4", "--out", str(out), "--zero-shot", "boolq"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "boolq" in printed and "mean" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["zero_shot"]["tasks"]["boolq"]["examples"] == 6
