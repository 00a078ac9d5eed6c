"""Readers of the local zero-shot files, named by the task YAMLs beside this file.

lm-eval calls a task's ``custom_dataset`` with the task's metadata (``data_dir``,
the ``zeroshot/`` folder, set by :func:`icbs_opt.zeroshot.evaluate_zero_shot`)
and its ``dataset_kwargs`` (``files``, relative to ``data_dir``). Each reader
returns the examples as a ``datasets.DatasetDict`` with one ``test`` split, in
memory (nothing is cached or downloaded), with the fields the prompt of lm-eval's
own task reads.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import datasets

from icbs_opt.errors import DataError


def _path(data_dir: str, name: str) -> Path:
    return Path(data_dir) / name


def _jsonl(data_dir: str, name: str) -> list[dict[str, Any]]:
    path = _path(data_dir, name)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise DataError(f"{str(path)!r} line {number}: {exc}") from None
    return records


def _lines(data_dir: str, name: str) -> list[str]:
    text = _path(data_dir, name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _split(records: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def _field(record: dict[str, Any], *keys: str) -> Any:
    """``record[k1][k2]...``; a missing field is a DataError naming it."""
    value: Any = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"zero-shot example lacks field {'.'.join(keys)!r}")
        value = value[key]
    return value


def _choices(record: dict[str, Any]) -> dict[str, list[str]]:
    choices = _field(record, "question", "choices")
    return {
        "text": [c["text"] for c in choices],
        "label": [c["label"] for c in choices],
    }


def _arc_like(data_dir: str, file: str, stem: str) -> datasets.DatasetDict:
    """AI2's multiple-choice jsonl; the question stem in field ``stem``."""
    return _split(
        [
            {
                stem: _field(r, "question", "stem"),
                "choices": _choices(r),
                "answerKey": _field(r, "answerKey"),
            }
            for r in _jsonl(data_dir, file)
        ]
    )


def arc(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """ARC (AI2 jsonl): ``question``, ``choices`` (text, label), ``answerKey``."""
    return _arc_like(data_dir, files[0], "question")


def openbookqa(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """OpenBookQA (ARC-like jsonl): ``question_stem``, ``choices``, ``answerKey``."""
    return _arc_like(data_dir, files[0], "question_stem")


_BOOLQ = re.compile(
    r"\APassage: (?P<passage>.*)\nQuestion: (?P<question>.*?)\??\Z", re.S
)


def boolq(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """BoolQ (``query`` = "Passage: P", newline, "Question: Q?"; ``gold``)."""
    records = []
    for r in _jsonl(data_dir, files[0]):
        match = _BOOLQ.match(_field(r, "query"))
        if match is None:
            raise DataError(
                "a BoolQ query is not 'Passage: ...\\nQuestion: ...': "
                f"{r['query'][:60]!r}"
            )
        records.append({**match.groupdict(), "label": int(_field(r, "gold"))})
    return _split(records)


def _clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow artifacts removed, as lm-eval's hellaswag does."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """HellaSwag (text form): ``query``, ``choices``, ``label``."""
    return _split(
        [
            {
                "query": _clean_hellaswag(_field(r, "ctx")),
                "choices": [_clean_hellaswag(e) for e in _field(r, "endings")],
                "label": int(_field(r, "label")),
            }
            for r in _jsonl(data_dir, files[0])
        ]
    )


def winogrande(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """WinoGrande: ``sentence`` (with ``_``), ``option1``, ``option2``, ``answer``."""
    keys = ("sentence", "option1", "option2", "answer")
    return _split(
        [{k: str(_field(r, k)) for k in keys} for r in _jsonl(data_dir, files[0])]
    )


def winogrande_answer(doc: dict[str, Any]) -> int:
    """The index of the right context: ``answer`` is "1" or "2"."""
    return int(doc["answer"]) - 1


def winogrande_continuation(doc: dict[str, Any]) -> str:
    """The sentence after the blank, scored after each context."""
    return doc["sentence"].split("_", 1)[1].strip()


def winogrande_contexts(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    head = doc["sentence"].split("_", 1)[0]
    return [head + doc["option1"], head + doc["option2"]]


def rte(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """GLUE RTE (tab-separated): ``sentence1``, ``sentence2``, ``label``."""
    with open(_path(data_dir, files[0]), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return _split(
        [
            {
                "sentence1": _field(r, "sentence1"),
                "sentence2": _field(r, "sentence2"),
                "label": int(_field(r, "label")),
            }
            for r in rows
        ]
    )


def piqa(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """PIQA: ``goal``, ``sol1``, ``sol2`` from the jsonl, ``label`` from the list."""
    records, labels = _jsonl(data_dir, files[0]), _lines(data_dir, files[1])
    if len(records) != len(labels):
        raise DataError(
            f"PIQA has {len(records)} questions but {len(labels)} labels "
            f"({files[0]}, {files[1]})"
        )
    return _split(
        [
            {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(records, labels, strict=True)
        ]
    )


def lambada(*, data_dir: str, files: list[str], **_: Any) -> datasets.DatasetDict:
    """LAMBADA (OpenAI's jsonl): ``text``, whose last word is the target."""
    return _split([{"text": _field(r, "text")} for r in _jsonl(data_dir, files[0])])
