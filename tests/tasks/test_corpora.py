"""Corpora: named or files, seeded calibration windows, held-out evaluation windows."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from icbs_opt.errors import DataError  # noqa: E402
from icbs_opt.tasks import causal_lm as llm  # noqa: E402
from icbs_opt.tasks import corpora  # noqa: E402
from icbs_opt.tasks.options import TextOptions  # noqa: E402
from tests.tiny import tiny_llama, word_tokenizer  # noqa: E402

CALIB_WORDS = "the cat sat on a mat and".split()  # disjoint from EVAL_WORDS
EVAL_WORDS = "dog ran to big red house".split()


def document(words, n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g))


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def corpus(tmp_path):
    lengths = [5, 40, 12, 30, 3]  # documents of 5 to 40 words
    texts = [document(CALIB_WORDS, n, seed) for seed, n in enumerate(lengths)]
    return write_jsonl(tmp_path / "calib.jsonl", texts), texts


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_read_documents(tmp_path, corpus):
    path, texts = corpus
    assert corpora.read_documents(path) == texts
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert corpora.read_documents(tmp_path / "a.txt") == ["one\n\ntwo\n"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="line 2 has no string 'text' field"):
        corpora.read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    with pytest.raises(DataError, match="line 1 is not JSON"):
        corpora.read_documents(tmp_path / "broken.jsonl")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        corpora.read_documents(tmp_path / "empty.txt")


def test_sampled_windows_lie_in_one_long_document(corpus):
    path, texts = corpus
    tok = word_tokenizer()
    drawn = corpora.sample_windows(tok, path, seq_len=10, count=50, seed=3)
    assert drawn.windows.shape == (50, 10) and drawn.windows.dtype == torch.long
    assert (drawn.documents, drawn.eligible, drawn.span_documents) == (5, 3, False)
    long_docs = [ids(tok, t) for t in texts if len(t.split()) > 10]
    for row in drawn.windows.tolist():
        assert any(
            doc[i : i + 10] == row for doc in long_docs for i in range(len(doc) - 9)
        )
    again = corpora.sample_windows(tok, path, seq_len=10, count=50, seed=3)
    assert torch.equal(again.windows, drawn.windows)
    other = corpora.sample_windows(tok, path, seq_len=10, count=50, seed=4)
    assert not torch.equal(other.windows, drawn.windows)


def test_validation_windows_come_from_held_out_documents(tmp_path):
    texts = [document(CALIB_WORDS, 30, seed) for seed in range(20)]
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    tok = word_tokenizer()
    drawn = corpora.sample_windows(tok, path, 10, count=40, seed=1, held_out=6)
    docs = [ids(tok, t) for t in texts]

    def sources(rows):
        return {j for r in rows for j, d in enumerate(docs)
                if any(d[i : i + 10] == r for i in range(len(d) - 9))}  # fmt: skip

    assert drawn.held_out.shape == (6, 10)
    assert sources(drawn.held_out.tolist()) <= {18, 19}  # the last tenth
    assert not sources(drawn.windows.tolist()) & {18, 19}
    plain = corpora.sample_windows(tok, path, 10, count=40, seed=1)
    assert plain.held_out.shape == (0, 10)
    one = tmp_path / "one.txt"
    one.write_text(document(CALIB_WORDS, 15, 0))
    with pytest.raises(DataError, match="fewer than two windows of seq_len = 10"):
        corpora.sample_windows(tok, one, 10, count=1, seed=0, held_out=1)


def test_short_documents_are_joined_and_said_so(corpus, caplog):
    path, texts = corpus
    tok = word_tokenizer()
    drawn = corpora.sample_windows(tok, path, seq_len=45, count=4, seed=0)
    assert drawn.span_documents and drawn.eligible == 0
    assert "span documents" in caplog.text
    joined = ids(tok, corpora.DOCUMENT_SEPARATOR.join(texts))
    for row in drawn.windows.tolist():
        assert any(joined[i : i + 45] == row for i in range(len(joined) - 44))
    with pytest.raises(DataError, match="fewer than one window of seq_len = 200"):
        corpora.sample_windows(tok, path, seq_len=200, count=1, seed=0)
    with pytest.raises(DataError, match="window count must be an integer >= 1"):
        corpora.sample_windows(tok, path, seq_len=4, count=0, seed=0)


def test_contiguous_windows_of_a_jsonl_join_its_documents(corpus):
    path, texts = corpus
    tok = word_tokenizer()
    windows = corpora.contiguous_windows(tok, path, seq_len=8, max_windows=5)
    joined = ids(tok, corpora.DOCUMENT_SEPARATOR.join(texts))
    assert windows.reshape(-1).tolist() == joined[:40]


def test_named_corpora_and_the_data_folder(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "c4").mkdir(parents=True)
    write_jsonl(root / "c4/calibration.jsonl", ["a b"])
    got = corpora.resolve_corpus("c4", "calibration", root)
    assert got == corpora.Corpus("c4", root / "c4/calibration.jsonl")
    with pytest.raises(DataError, match=r"corpus 'c4' needs '.*validation\.jsonl'"):
        corpora.resolve_corpus("c4", "evaluation", root)
    monkeypatch.setenv(corpora.DATA_ENV, str(root))
    assert corpora.resolve_corpus("c4", "calibration").path.parent == root / "c4"
    monkeypatch.setenv(corpora.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(
        DataError, match=r"\(\$ICBS_OPT_DATA\) does not exist.*--data-dir"
    ):
        corpora.resolve_corpus("wikitext2", "evaluation")
    with pytest.raises(DataError, match=r"\(--data-dir\) does not exist"):
        corpora.resolve_corpus("c4", "evaluation", tmp_path / "nope")
    with pytest.raises(DataError, match="wikitext2, c4 or a .txt/.jsonl file, got 'x'"):
        corpora.resolve_corpus("x", "calibration", root)
    with pytest.raises(DataError, match="corpus file 'x.txt' does not exist"):
        corpora.resolve_corpus("x.txt", "calibration", root)
    old = tmp_path / "wikitext-2"
    old.mkdir()
    for name in ("valid.txt", "test.txt"):
        (old / name).write_text("a b c")
    with pytest.raises(DataError, match="--data-dir now names the folder holding"):
        corpora.resolve_corpus("wikitext2", "calibration", old)


def test_options_check_corpora_before_a_model_loads(tmp_path, corpus):
    path, _ = corpus
    text = tmp_path / "held.txt"
    text.write_text(document(EVAL_WORDS, 50, 0))
    ok = {"calib_data": str(path), "eval_data": f"{text}, {path}"}
    options = TextOptions(**ok)
    assert [c.name for c in options.eval_corpora] == ["held", "calib"]
    with pytest.raises(DataError, match=r"eval_data names '.*held\.txt' twice"):
        TextOptions(**{**ok, "eval_data": f"{text},{text}"})
    with pytest.raises(DataError, match="pruning_windows must be an integer >= 32"):
        TextOptions(**ok, pruning_windows=8)


def test_pruning_and_validation_windows_never_see_the_eval_text(tmp_path):
    calib = write_jsonl(
        tmp_path / "c.jsonl", [document(CALIB_WORDS, 30, s) for s in range(6)]
    )
    held = tmp_path / "e.txt"
    held.write_text(document(EVAL_WORDS, 200, 9))
    tok = word_tokenizer()
    options = TextOptions(calib_data=str(calib), eval_data=str(held), seq_len=8,
                          calib_windows=4, pruning_windows=20, val_windows=3,
                          eval_windows=5, batch_size=4)  # fmt: skip
    task = llm.causal_lm_task("tiny", tiny_llama(vocab=14), tok, "tiny", options)
    calib_ids = set(ids(tok, " ".join(CALIB_WORDS)))
    eval_ids = set(ids(tok, " ".join(EVAL_WORDS)))
    batches = task.batches(0)
    seen = torch.cat([next(batches)[0] for _ in range(5)])
    assert set(seen.unique().tolist()) <= calib_ids
    assert set(task.calibration[0].unique().tolist()) <= calib_ids
    assert task.info["pruning_windows"] == 20 and task.info["val_windows"] == 3
    assert task.info["calib_documents_drawn_from"] == 6
    assert task.validate is not None and task.info["eval_windows"] == {"e": 5}
    assert set(seen.unique().tolist()).isdisjoint(eval_ids)
    scores = task.evaluate(task.model)
    assert scores["metric"] == scores["perplexity_e"]


@pytest.mark.slow
def test_real_c4_files_are_disjoint_and_long_enough(data_root):
    calibration = corpora.read_documents(data_root / "c4/calibration.jsonl")
    validation = corpora.read_documents(data_root / "c4/validation.jsonl")
    assert len(calibration) == 1943 and len(validation) == 1025
    assert not set(calibration) & set(validation)
    assert sum(len(d.split()) > 512 for d in calibration) > 100
