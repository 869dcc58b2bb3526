"""GLUE tasks: what each task is, where its examples come from, and how it is scored.

    tasks      TaskSpec per GLUE task (columns, labels, metrics, file layout, submission name)
    loaders    the original GLUE download on disk, the hub (nyu-mll/glue), custom TSV/CSV/JSONL,
               and the offline corpus-source task built from the shipped corpus
    metrics    Matthews corr., accuracy, F1, Pearson, Spearman (scikit-learn, scipy)
    outputs    predictions as the leaderboard writes them

Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from bbert.data.readers import read_sample_corpus
from bbert.utils import atomic_write_text, require_hub

# ---- tasks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TsvLayout:
    """Where the fields sit in one GLUE file: column names (header) or positions (no header)."""

    texts: tuple[str | int, ...]
    label: str | int | None = None
    index: str | int | None = None  # None: the row number is the index
    header: bool = True


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE (or custom) task: its text columns, labels, metrics and files.

    ``labels`` are the label strings exactly as the GLUE files and the leaderboard write them,
    in the hub's class-id order (so hub id ``i`` is ``labels[i]``); ``None`` means regression.
    ``main_metric`` picks the best configuration and is the number in the results table (the
    one the BERT and 24hBERT papers report: F1 for MRPC/QQP, Spearman for STS-B).
    """

    name: str                      # hub config name: "cola", "sst2", ...
    display: str                   # GLUE folder / leaderboard name: "CoLA", "SST-2", ...
    text_columns: tuple[str, ...]  # hub column names
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    files: dict[str, str] = field(default_factory=dict)        # split -> file in glue_data/<display>/
    layouts: dict[str, TsvLayout] = field(default_factory=dict)  # split -> layout
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    columns: dict[str, str] = field(default_factory=dict)      # dev split -> results-table column
    submission_files: dict[str, str] = field(default_factory=dict)  # test split -> leaderboard file
    score_range: tuple[float, float] | None = None             # regression: clip predictions

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def _glue(name, display, text_columns, labels, metrics, main_metric, train_dev, test,
          files=None, **kw) -> TaskSpec:
    files = files or {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    layouts = {split: (test if split.startswith("test") else train_dev) for split in files}
    kw.setdefault("columns", {"validation": display})
    kw.setdefault("submission_files", {"test": f"{display}.tsv"})
    return TaskSpec(name, display, tuple(text_columns), labels, tuple(metrics), main_metric,
                    files, layouts, **kw)


_PAIR = ("sentence1", "sentence2")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    # CoLA's train/dev files have no header: source, label, original mark, sentence.
    _glue("cola", "CoLA", ["sentence"], ("0", "1"), ["matthews_corr"], "matthews_corr",
          TsvLayout(texts=(3,), label=1, header=False), TsvLayout(("sentence",), index="index")),
    _glue("sst2", "SST-2", ["sentence"], ("0", "1"), ["accuracy"], "accuracy",
          TsvLayout(("sentence",), label="label"), TsvLayout(("sentence",), index="index")),
    _glue("mrpc", "MRPC", _PAIR, ("0", "1"), ["accuracy", "f1"], "f1",
          TsvLayout(("#1 String", "#2 String"), label="Quality"),
          TsvLayout(("#1 String", "#2 String"), index="index")),
    _glue("stsb", "STS-B", _PAIR, None, ["pearson", "spearman"], "spearman",
          TsvLayout(_PAIR, label="score", index="index"), TsvLayout(_PAIR, index="index"),
          score_range=(0.0, 5.0)),
    _glue("qqp", "QQP", ("question1", "question2"), ("0", "1"), ["accuracy", "f1"], "f1",
          TsvLayout(("question1", "question2"), label="is_duplicate", index="id"),
          TsvLayout(("question1", "question2"), index="id")),
    _glue("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          ["accuracy"], "accuracy",
          TsvLayout(_PAIR, label="gold_label", index="index"), TsvLayout(_PAIR, index="index"),
          files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                 "validation_mismatched": "dev_mismatched.tsv",
                 "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv",
                 # the diagnostic set (AX) is predicted with the MNLI model
                 "test_ax": "../diagnostic/diagnostic.tsv"},
          dev_splits=("validation_matched", "validation_mismatched"),
          test_splits=("test_matched", "test_mismatched", "test_ax"),
          columns={"validation_matched": "MNLI-m", "validation_mismatched": "MNLI-mm"},
          submission_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv",
                            "test_ax": "AX.tsv"}),
    _glue("qnli", "QNLI", ("question", "sentence"), _NLI2, ["accuracy"], "accuracy",
          TsvLayout(("question", "sentence"), label="label", index="index"),
          TsvLayout(("question", "sentence"), index="index")),
    _glue("rte", "RTE", _PAIR, _NLI2, ["accuracy"], "accuracy",
          TsvLayout(_PAIR, label="label", index="index"), TsvLayout(_PAIR, index="index")),
    # WNLI's files use 0/1; the hub's class 0 is not_entailment.
    _glue("wnli", "WNLI", _PAIR, ("0", "1"), ["accuracy"], "accuracy",
          TsvLayout(_PAIR, label="label", index="index"), TsvLayout(_PAIR, index="index")),
]}

# Names people type: "SST-2", "sst-2", "MNLI", "sts-b" ...
_ALIASES = {k.replace("-", "").lower(): k for k in GLUE_TASKS}
_ALIASES.update({t.display.replace("-", "").lower(): t.name for t in GLUE_TASKS.values()})


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a GLUE task by hub or GLUE name (``"sst2"`` or ``"SST-2"``)."""
    key = _ALIASES.get(str(name).replace("-", "").replace("_", "").lower())
    if key is None:
        raise ValueError(f"unknown GLUE task {name!r}; choose from {', '.join(GLUE_TASKS)} "
                         "(or pass a custom task with --train-file/--dev-file)")
    return GLUE_TASKS[key]


# Training-set sizes (examples): the rows of each train split in the nyu-mll/glue dataset card,
# the same files as the original GLUE download. They size the full-scale grid's cost.
GLUE_TRAIN_SIZES = {"cola": 8_551, "sst2": 67_349, "mrpc": 3_668, "stsb": 5_749, "qqp": 363_846,
                    "mnli": 392_702, "qnli": 104_743, "rte": 2_490, "wnli": 635}

# Paper numbers: GLUE *test* scores (the leaderboard), x100. Ours are dev-set medians.
PAPER_24HBERT_TEST = {"MNLI-m": 84.4, "MNLI-mm": 83.8, "QNLI": 90.6, "QQP": 70.7, "RTE": 57.7,
                      "SST-2": 93.0, "MRPC": 87.5, "CoLA": 57.1, "STS-B": 82.0}
BERT_BASE_TEST = {"MNLI-m": 84.6, "MNLI-mm": 83.4, "QQP": 71.2, "QNLI": 90.5, "SST-2": 93.5,
                  "CoLA": 52.1, "STS-B": 85.8, "MRPC": 88.9, "RTE": 66.4}


# ---- loaders --------------------------------------------------------------------------


@dataclass
class TaskData:
    """A task's examples: ``splits[split]`` is a list of dicts ``{idx, text_a, text_b, label}``.

    ``label`` is a class id (int), a float score (regression) or None (unlabeled test set).
    """

    spec: TaskSpec
    splits: dict[str, list[dict]]
    source: str = ""

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"TaskData({self.spec.display}: {sizes}; from {self.source})"

    def fingerprint(self) -> str:
        """A hash of the labels and every example: a re-run on other data is told apart by it."""
        digest = hashlib.sha256(json.dumps([self.spec.name, self.spec.labels]).encode())
        for split in sorted(self.splits):
            for e in self.splits[split]:
                digest.update(json.dumps([split, e["idx"], e["text_a"], e["text_b"], e["label"]]).encode())
        return digest.hexdigest()[:16]


def _label_id(spec: TaskSpec, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: score {raw!r} is not a number; is this the "
                             f"{spec.display} file in the original GLUE format?") from None
    if raw not in spec.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of {list(spec.labels)} for task "
                         f"{spec.display}; is this the {spec.display} file in the original GLUE format?")
    return spec.labels.index(raw)


def _read_table(path: Path, layout: TsvLayout, spec: TaskSpec, delimiter: str = "\t",
                skip_short_rows: bool = False) -> list[dict]:
    """Rows of one file as examples; QUOTE_NONE because GLUE text holds stray quote marks.

    ``skip_short_rows`` skips rows with too few cells, and says how many: some GLUE downloads of
    QQP's train.tsv hold a few broken lines. Elsewhere a short row is an error.
    """
    examples, short = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None) if layout.header else None
        if layout.header and header is None:
            raise ValueError(f"{path}: the file is empty (a header line was expected)")

        def position(col: str | int) -> int:
            if isinstance(col, int):
                return col
            if col not in header:
                raise ValueError(f"{path}: no column {col!r} in the header {header}; is this the "
                                 f"{spec.display} file in the original GLUE format?")
            return header.index(col)

        text_pos = [position(c) for c in layout.texts]
        label_pos = None if layout.label is None else position(layout.label)
        index_pos = None if layout.index is None else position(layout.index)
        needed = max(text_pos + [p for p in (label_pos, index_pos) if p is not None]) + 1
        for row_no, row in enumerate(reader):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            line = row_no + (2 if layout.header else 1)
            if len(row) < needed:
                if skip_short_rows:
                    short.append(line)
                    continue
                raise ValueError(f"{path}, line {line}: {len(row)} columns, expected at least "
                                 f"{needed} for task {spec.display}")
            texts = [row[p] for p in text_pos]
            examples.append({
                "idx": int(row[index_pos]) if index_pos is not None else len(examples),
                "text_a": texts[0],
                "text_b": texts[1] if len(texts) > 1 else None,
                "label": None if label_pos is None else _label_id(spec, row[label_pos],
                                                                  f"{path}, line {line}"),
            })
    if short:
        print(f"{path}: skipped {len(short)} broken line(s) with fewer than {needed} columns "
              f"(line(s) {', '.join(map(str, short[:5]))}{', ...' if len(short) > 5 else ''}); "
              f"kept {len(examples):,} examples")
    return examples


def load_glue_dir(task: str | TaskSpec, glue_dir: str | os.PathLike) -> TaskData:
    """Load a task from the original GLUE download layout: ``glue_dir/<TASK>/train.tsv`` ...

    ``glue_dir`` may be the ``glue_data`` folder or the task's own folder. Train and dev files
    are required; test files are optional (without them no submission is written).
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    glue_dir = Path(glue_dir)
    if not glue_dir.is_dir():
        raise FileNotFoundError(f"--glue-dir {glue_dir} is not a folder: pass the GLUE download's "
                                "glue_data folder (glue_data/RTE/train.tsv ...)")
    folder = glue_dir / spec.display if (glue_dir / spec.display).is_dir() else glue_dir
    other = next((t for t in GLUE_TASKS.values() if t.display == glue_dir.name), spec)
    if folder == glue_dir and other.name != spec.name:
        raise FileNotFoundError(f"--glue-dir {glue_dir} is {other.display}'s folder, not "
                                f"{spec.display}'s: pass the glue_data folder above it, "
                                f"or --tasks {other.name}")
    if folder == glue_dir and not (glue_dir / spec.files["train"]).exists():
        found = sorted(p.name for p in glue_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no {spec.display} folder in {glue_dir} (its folders: {', '.join(found) or 'none'}): "
            f"add glue_data/{spec.display}/ from the GLUE download, leave {spec.name} out of --tasks, "
            "or use --hub where the Hugging Face hub is reachable")
    splits = {}
    for split, name in spec.files.items():
        path = (folder / name).resolve()
        if not path.exists():
            if split.startswith("test"):
                continue
            raise FileNotFoundError(
                f"{path} not found: expected the original GLUE layout "
                f"<glue_dir>/{spec.display}/{name} (the GLUE download script's glue_data folder), "
                "or use --hub where the Hugging Face hub is reachable")
        # a broken training line costs one example; a dev or test line would change the scores
        splits[split] = _read_table(path, spec.layouts[split], spec, skip_short_rows=split == "train")
        if not splits[split] and not split.startswith("test"):
            raise ValueError(f"{path} holds no examples (only a header line?): restore it from the "
                             f"GLUE download (glue_data/{spec.display}/{name}) or point --glue-dir "
                             "at a complete copy")
    return TaskData(spec, splits, source=str(folder))


def load_glue_hub(task: str | TaskSpec) -> TaskData:
    """Load a task from the Hugging Face hub (``nyu-mll/glue``); fails at once offline."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    require_hub(f"GLUE task {spec.display} from nyu-mll/glue",
                "the original GLUE download layout on disk (--glue-dir glue_data, with "
                f"glue_data/{spec.display}/train.tsv ...), or your own files "
                "(--train-file/--dev-file)")
    import datasets  # deferred: only the hub path needs it, and it takes ~2 s to import

    hub = datasets.load_dataset("nyu-mll/glue", spec.name)
    if "test_ax" in spec.test_splits:
        hub["test_ax"] = datasets.load_dataset("nyu-mll/glue", "ax")["test"]
    splits = {}
    for split in spec.files:
        if split not in hub:
            continue
        rows = hub[split]
        cols = spec.text_columns  # the hub's AX uses MNLI's premise/hypothesis columns too
        splits[split] = [{
            "idx": int(r["idx"]),
            "text_a": r[cols[0]],
            "text_b": r[cols[1]] if len(cols) > 1 else None,
            # the hub marks unlabeled test rows with -1
            "label": (None if split.startswith("test") or r["label"] == -1 else
                      (float(r["label"]) if spec.is_regression else int(r["label"]))),
        } for r in rows]
    return TaskData(spec, splits, source="hub:nyu-mll/glue")


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


def load_task(task: str, glue_dir: str | os.PathLike | None = None, hub: bool = False) -> TaskData:
    """Load a GLUE task from ``glue_dir`` (original layout) or, with ``hub=True``, the hub."""
    if hub:
        return load_glue_hub(task)
    if glue_dir is None:
        raise ValueError("say where GLUE comes from: glue_dir=<glue_data folder> (offline) "
                         "or hub=True (needs the Hugging Face hub)")
    return load_glue_dir(task, glue_dir)


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


# ---- metrics --------------------------------------------------------------------------


def compute_metrics(metrics: Sequence[str], predictions, references) -> dict[str, float]:
    """The official GLUE metrics, with scikit-learn and scipy.

    ``matthews_corr`` (CoLA), ``accuracy``, ``f1`` (binary, positive class 1: MRPC, QQP),
    ``pearson`` and ``spearman`` (STS-B).
    """
    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape or preds.size == 0:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be "
                         "non-empty and the same length")
    out = {}
    for m in metrics:
        if m == "matthews_corr":
            out[m] = float(matthews_corrcoef(refs, preds))
        elif m == "accuracy":
            out[m] = float(accuracy_score(refs, preds))
        elif m == "f1":
            binary = set(np.unique(refs)) | set(np.unique(preds)) <= {0, 1}
            out[m] = float(f1_score(refs, preds, average="binary" if binary else "macro"))
        elif m in ("pearson", "spearman"):
            # constant predictions have no correlation: 0, as scikit-learn's Matthews gives
            if np.ptp(preds) == 0 or np.ptp(refs) == 0:
                out[m] = 0.0
            else:
                out[m] = float((pearsonr if m == "pearson" else spearmanr)(preds, refs)[0])
        else:
            raise ValueError(f"unknown metric {m!r}")
    return out


# ---- predictions in the leaderboard format ---------------------------------------------


def prediction_strings(spec: TaskSpec, predictions: Sequence) -> list[str]:
    """Predictions as the leaderboard writes them: label strings, or scores with 3 decimals."""
    if spec.is_regression:
        lo, hi = spec.score_range or (-math.inf, math.inf)
        return [f"{min(max(float(p), lo), hi):.3f}" for p in predictions]
    return [spec.labels[int(p)] for p in predictions]


def predictions_tsv(spec: TaskSpec, examples: list[dict], predictions: Sequence) -> str:
    """One test split's predictions as the leaderboard's ``index``/``prediction`` TSV."""
    lines = ["index\tprediction"]
    lines += [f"{e['idx']}\t{p}" for e, p in zip(examples, prediction_strings(spec, predictions))]
    return "\n".join(lines) + "\n"


def main_score(spec: TaskSpec, dev_scores: dict) -> float:
    """The number that ranks runs: the main metric on the first dev split (MNLI: matched)."""
    return dev_scores[spec.dev_splits[0]][spec.main_metric]

