"""Your own task: TSV, CSV or JSONL files with named columns, and the offline corpus-source task
(which source of the shipped corpus is a sentence from?) that the tiny scale finetunes on.

Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Sequence

from bbert.atomic import atomic_write_text
from bbert.data.readers import read_sample_corpus
from bbert.glue.tasks import TaskData, TaskSpec, TsvLayout


def custom_task(name: str, text_columns: Sequence[str], label_column: str,
                labels: Sequence[str] | None = None, regression: bool = False,
                index_column: str | None = None) -> TaskSpec:
    """A :class:`TaskSpec` for your own data: one or two text columns and a label column.

    ``labels`` are the classes in order (:func:`load_custom_task` takes the sorted labels of the
    training file when none are given). Classification is scored by accuracy (and, with two
    labels, F1 of the second label, ``labels[1]``), regression by Pearson and Spearman.
    """
    text_columns = tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"a task has one or two text columns, got {list(text_columns)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        # it names folders and the submission file
        raise ValueError(f"task name {name!r} must be letters, digits, '-', '_' or '.': "
                         "set another --task-name")
    if regression:
        if labels:
            raise ValueError("a regression task has scores, not labels: drop --labels or --regression")
        metrics, main = ("pearson", "spearman"), "spearman"
    else:
        if labels is None or len(set(labels)) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classification task needs two or more distinct labels, got "
                             f"{list(labels or ())}: list each class once with --labels, or use "
                             "--regression for scores")
        metrics = ("accuracy", "f1") if len(labels) == 2 else ("accuracy",)
        main = "accuracy"
    layout = TsvLayout(text_columns, label=label_column, index=index_column)
    test_layout = TsvLayout(text_columns, index=index_column)
    return TaskSpec(name, name, text_columns, None if regression else tuple(labels),
                    metrics, main, files={}, layouts={"train": layout, "validation": layout,
                                                       "test": test_layout},
                    columns={"validation": name}, submission_files={"test": f"{name}.tsv"})


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` for each row of a TSV, CSV or JSONL file (by file extension)."""
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".txt", ".jsonl", ".json"):
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .tsv, .csv or .jsonl")
    try:
        # utf-8-sig: spreadsheet programs start a file with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            if suffix in (".jsonl", ".json"):
                return [(n, _json_row(path, n, line)) for n, line in enumerate(f, 1) if line.strip()]
            if suffix == ".csv":
                reader = csv.DictReader(f)
            else:  # TSV as GLUE writes it: no quoting, so a sentence may start with a quote mark
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = []
            for row in reader:
                # DictReader files extra cells under None and fills missing ones with None
                if None in row or None in row.values():
                    raise ValueError(f"{path}, line {reader.line_num}: "
                                     f"{'more' if None in row else 'fewer'} cells than the "
                                     f"{len(reader.fieldnames)} columns of the header "
                                     f"{reader.fieldnames}; fix that row")
                rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                         "save it as UTF-8") from None


def _json_row(path: Path, line_no: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line_no}: not valid JSON ({e.msg}); the file must hold "
                         "one JSON object per line (JSON Lines)") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}, line {line_no}: expected one JSON object per line (JSON Lines), "
                         f"got a {type(row).__name__}")
    return row


def load_custom_task(train_file: str | os.PathLike, dev_file: str | os.PathLike,
                     text_columns: Sequence[str], label_column: str = "label",
                     test_file: str | os.PathLike | None = None, name: str = "custom",
                     labels: Sequence[str] | None = None, regression: bool = False,
                     index_column: str | None = None) -> TaskData:
    """Load your own task from TSV, CSV or JSONL files with named columns (a header line).

    Every row must have every column; a label cell may not be empty. Labels are matched as
    strings with the spaces around them removed (a JSONL ``1`` is the label ``"1"``).
    """
    files = {"train": Path(train_file), "validation": Path(dev_file)}
    if test_file is not None:
        files["test"] = Path(test_file)
    records = {}
    for split, path in files.items():
        if not path.exists():
            raise FileNotFoundError(f"{split} file {path} not found")
        if path.is_dir():
            raise ValueError(f"{split} file {path} is a folder: pass the file itself")
        records[split] = _read_records(path)
        if not records[split]:
            raise ValueError(f"{path} holds no rows: its first line names the columns "
                             "(sentence, label, ...) and each row follows on a line of its own")
        texts = list(text_columns) + ([index_column] if index_column else [])
        wanted = texts + ([label_column] if split != "test" else [])
        for line, row in records[split]:
            missing = [c for c in wanted if c not in row]
            if missing:
                raise ValueError(f"{path}, line {line}: no column(s) {missing}; its columns are "
                                 f"{list(row)}. Set --text-columns/--label-column.")
            for c in texts:
                if row[c] is None:  # a JSON null
                    raise ValueError(f"{path}, line {line}: {c!r} is null: give it a value or "
                                     "remove the row")
            if split != "test" and not _cell(row[label_column]):
                empty = [n for n, r in records[split] if not _cell(r[label_column])]
                raise ValueError(f"{path}: {len(empty)} row(s) with an empty {label_column!r} cell "
                                 f"(line(s) {', '.join(map(str, empty[:5]))}"
                                 f"{', ...' if len(empty) > 5 else ''}): label them or remove them")
    from_train = labels is None
    if not regression and from_train:
        labels = sorted({str(r[label_column]).strip() for _, r in records["train"]})
        if len(labels) < 2:
            raise ValueError(f"{files['train']}: every row has the label {labels[0]!r}; a classifier "
                             "needs two or more classes (or use --regression for scores)")
    spec = custom_task(name, text_columns, label_column, labels, regression, index_column)
    splits = {}
    for split, rows in records.items():
        splits[split] = [{
            "idx": int(r[index_column]) if index_column else i,
            "text_a": str(r[spec.text_columns[0]]),
            "text_b": str(r[spec.text_columns[1]]) if len(spec.text_columns) > 1 else None,
            "label": (None if split == "test" else
                      _custom_label(spec, str(r[label_column]), f"{files[split]}, line {line}",
                                    from_train)),
        } for i, (line, r) in enumerate(rows)]
    return TaskData(spec, splits, source=str(files["train"].parent))


def _cell(value) -> str:
    return "" if value is None else str(value).strip()


def _custom_label(spec: TaskSpec, raw: str, where: str, from_train: bool) -> int | float:
    raw = raw.strip()
    if spec.is_regression:
        if not _is_number(raw):
            raise ValueError(f"{where}: score {raw!r} is not a number; fix or remove that row")
        return float(raw)
    if raw in spec.labels:
        return spec.labels.index(raw)
    shown = ", ".join(repr(x) for x in spec.labels[:10]) + (", ..." if len(spec.labels) > 10 else "")
    fix = "list every class with --labels" if from_train else "add it to --labels"
    if all(_is_number(x) for x in spec.labels + (raw,)):
        fix += ", or add --regression if the labels are scores"
    raise ValueError(f"{where}: label {raw!r} is not one of "
                     f"{'the training file' if from_train else '--labels'}'s {len(spec.labels)} "
                     f"labels ({shown}): {fix}")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def make_corpus_source_task(out_dir: str | os.PathLike, train_per_source: int = 200,
                            eval_per_source: int = 60, seed: int = 0, min_words: int = 6,
                            max_words: int = 40) -> TaskData:
    """A learnable offline task from the shipped corpus: which source is a sentence from?

    Three classes (``kjv``, ``python_docs``, ``wordnet``), balanced, so chance is 1/3. Train,
    dev and test sentences come from *different documents*, so a model can't score by
    remembering a document. Writes ``train.tsv``/``dev.tsv``/``test.tsv`` (columns ``index``,
    ``sentence``, ``source``; the test file has no labels) into ``out_dir`` and loads them as a
    custom task. Deterministic for a given seed, so re-running rewrites the same files.
    """
    rng = random.Random(seed)
    by_source: dict[str, list[str]] = {}
    for doc in read_sample_corpus():
        by_source.setdefault(doc["source"], []).append(doc["text"])
    sizes = {"train": train_per_source, "dev": eval_per_source, "test": eval_per_source}
    rows: dict[str, list[tuple[str, str]]] = {split: [] for split in sizes}
    for source in sorted(by_source):
        docs = by_source[source][:]
        rng.shuffle(docs)
        cut1, cut2 = int(0.7 * len(docs)), int(0.85 * len(docs))
        for split, part in (("train", docs[:cut1]), ("dev", docs[cut1:cut2]), ("test", docs[cut2:])):
            sentences = [s.strip() for d in part for s in re.split(r"(?<=[.!?;])\s+|\n+", d)
                         if min_words <= len(s.split()) <= max_words]
            if len(sentences) < sizes[split]:
                raise ValueError(f"only {len(sentences)} {split} sentences from {source}; "
                                 f"ask for fewer than {sizes[split]} per source")
            rows[split] += [(s, source) for s in rng.sample(sentences, sizes[split])]
    out_dir = Path(out_dir)
    for split, items in rows.items():
        rng.shuffle(items)
        header = "index\tsentence" + ("" if split == "test" else "\tsource")
        lines = [header] + [f"{i}\t{' '.join(s.split())}" + ("" if split == "test" else f"\t{src}")
                            for i, (s, src) in enumerate(items)]
        atomic_write_text(out_dir / f"{split}.tsv", "\n".join(lines) + "\n")
    return load_custom_task(out_dir / "train.tsv", out_dir / "dev.tsv", ["sentence"], "source",
                            test_file=out_dir / "test.tsv", name="corpus-source",
                            labels=sorted(by_source), index_column="index")
