"""GLUE finetuning: tasks, loaders, metrics, finetune, grid search, results table, submission.

The paper judges its pretrained model by finetuning it on GLUE with a small grid of
hyperparameters, several seeds per configuration, and reporting the median score of the best
configuration. This module does exactly that, for a bbert checkpoint or a transformers BERT.

    tasks      TaskSpec per GLUE task (columns, labels, metrics, file layout, submission name)
    loaders    the hub (nyu-mll/glue), the original GLUE download on disk, a custom TSV/CSV/JSONL
    metrics    Matthews corr., accuracy, F1, Pearson, Spearman (scikit-learn, scipy)
    finetune   one run: classification head, AdamW + linear warm-up/decay, bf16, dynamic padding
               with length grouping, evaluate each epoch, keep the best epoch
    grid       lr x batch size x epochs x seeds; re-runs skip finished runs; median of the best
    results    Markdown/CSV table beside the paper's numbers; leaderboard submission zip

Chapter: notebooks/05_finetuning.ipynb
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from bbert.utils import atomic_path, atomic_write_json, atomic_write_text, require_hub, set_seed

# ---- tasks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TsvLayout:
    """Where the fields sit in one GLUE file: column names (header) or positions (no header).

    Chapter: notebooks/05_finetuning.ipynb
    """

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
    Chapter: notebooks/05_finetuning.ipynb
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
    """The :class:`TaskSpec` of a GLUE task by hub or GLUE name (``"sst2"`` or ``"SST-2"``).

    Chapter: notebooks/05_finetuning.ipynb
    """
    key = _ALIASES.get(str(name).replace("-", "").replace("_", "").lower())
    if key is None:
        raise ValueError(f"unknown GLUE task {name!r}; choose from {', '.join(GLUE_TASKS)} "
                         "(or pass a custom task with --train-file/--dev-file)")
    return GLUE_TASKS[key]


# Paper numbers: GLUE *test* scores (the leaderboard), x100. Ours are dev-set medians.
PAPER_24HBERT_TEST = {"MNLI-m": 84.4, "MNLI-mm": 83.8, "QNLI": 90.6, "QQP": 70.7, "RTE": 57.7,
                      "SST-2": 93.0, "MRPC": 87.5, "CoLA": 57.1, "STS-B": 82.0}
BERT_BASE_TEST = {"MNLI-m": 84.6, "MNLI-mm": 83.4, "QQP": 71.2, "QNLI": 90.5, "SST-2": 93.5,
                  "CoLA": 52.1, "STS-B": 85.8, "MRPC": 88.9, "RTE": 66.4}


# ---- loaders --------------------------------------------------------------------------


@dataclass
class TaskData:
    """A task's examples: ``splits[split]`` is a list of dicts ``{idx, text_a, text_b, label}``.

    ``label`` is a class id (int), a float score (regression) or None (unlabelled test set).
    Chapter: notebooks/05_finetuning.ipynb
    """

    spec: TaskSpec
    splits: dict[str, list[dict]]
    source: str = ""

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"TaskData({self.spec.display}: {sizes}; from {self.source})"


def _label_id(spec: TaskSpec, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: score {raw!r} is not a number") from None
    if raw not in spec.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of {list(spec.labels)} "
                         f"for task {spec.display}")
    return spec.labels.index(raw)


def _read_table(path: Path, layout: TsvLayout, spec: TaskSpec, delimiter: str = "\t") -> list[dict]:
    """Rows of one file as examples; QUOTE_NONE because GLUE text holds stray quote marks."""
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
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
    return examples


def load_glue_dir(task: str | TaskSpec, glue_dir: str | os.PathLike) -> TaskData:
    """Load a task from the original GLUE download layout: ``glue_dir/<TASK>/train.tsv`` ...

    ``glue_dir`` may be the ``glue_data`` folder or the task's own folder. Train and dev files
    are required; test files are optional (without them no submission is written).
    Chapter: notebooks/05_finetuning.ipynb
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    glue_dir = Path(glue_dir)
    folder = glue_dir / spec.display if (glue_dir / spec.display).is_dir() else glue_dir
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
        splits[split] = _read_table(path, spec.layouts[split], spec)
    return TaskData(spec, splits, source=str(folder))


def load_glue_hub(task: str | TaskSpec) -> TaskData:
    """Load a task from the Hugging Face hub (``nyu-mll/glue``); fails at once offline.

    Chapter: notebooks/05_finetuning.ipynb
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    require_hub(f"GLUE task {spec.display} from nyu-mll/glue",
                "the original GLUE download layout on disk (--glue-dir glue_data, with "
                f"glue_data/{spec.display}/train.tsv ...), or your own files "
                "(--train-file/--dev-file)")
    import datasets

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
            # the hub marks unlabelled test rows with -1
            "label": (None if split.startswith("test") or r["label"] == -1 else
                      (float(r["label"]) if spec.is_regression else int(r["label"]))),
        } for r in rows]
    return TaskData(spec, splits, source="hub:nyu-mll/glue")


def custom_task(name: str, text_columns: Sequence[str], label_column: str,
                labels: Sequence[str] | None = None, regression: bool = False,
                index_column: str | None = None) -> TaskSpec:
    """A :class:`TaskSpec` for your own data: one or two text columns and a label column.

    Classification is scored by accuracy (and F1 when there are two labels), regression by
    Pearson and Spearman. ``labels`` fixes the class order; without it the sorted labels of
    the training file are used. Chapter: notebooks/05_finetuning.ipynb
    """
    text_columns = tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"a task has one or two text columns, got {list(text_columns)}")
    if regression:
        metrics, main = ("pearson", "spearman"), "spearman"
    else:
        metrics = ("accuracy", "f1") if labels is not None and len(labels) == 2 else ("accuracy",)
        main = "accuracy"
    layout = TsvLayout(text_columns, label=label_column, index=index_column)
    test_layout = TsvLayout(text_columns, index=index_column)
    return TaskSpec(name, name, text_columns, None if regression else tuple(labels or ()),
                    metrics, main, files={}, layouts={"train": layout, "validation": layout,
                                                       "test": test_layout},
                    columns={"validation": name}, submission_files={"test": f"{name}.tsv"})


def _read_records(path: Path) -> list[dict]:
    """Rows of a TSV, CSV or JSONL file as dicts of strings (by file extension)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix not in (".tsv", ".csv", ".txt"):
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .tsv, .csv or .jsonl")
    with open(path, newline="", encoding="utf-8") as f:
        if suffix == ".csv":
            return list(csv.DictReader(f))
        # TSV as GLUE writes it: no quoting, so a sentence may start with a quote mark
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_custom_task(train_file: str | os.PathLike, dev_file: str | os.PathLike,
                     text_columns: Sequence[str], label_column: str = "label",
                     test_file: str | os.PathLike | None = None, name: str = "custom",
                     labels: Sequence[str] | None = None, regression: bool = False,
                     index_column: str | None = None) -> TaskData:
    """Load your own task from TSV, CSV or JSONL files with named columns (a header line).

    Chapter: notebooks/05_finetuning.ipynb
    """
    files = {"train": Path(train_file), "validation": Path(dev_file)}
    if test_file is not None:
        files["test"] = Path(test_file)
    records = {}
    for split, path in files.items():
        if not path.exists():
            raise FileNotFoundError(f"{split} file {path} not found")
        records[split] = _read_records(path)
        if not records[split]:
            raise ValueError(f"{path} holds no rows")
        wanted = list(text_columns) + ([label_column] if split != "test" else [])
        wanted += [index_column] if index_column else []
        missing = [c for c in wanted if c not in records[split][0]]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; its columns are "
                             f"{list(records[split][0])}. Set --text-columns/--label-column.")
    if not regression and labels is None:
        labels = sorted({str(r[label_column]) for r in records["train"]})
    spec = custom_task(name, text_columns, label_column, labels, regression, index_column)
    splits = {}
    for split, rows in records.items():
        splits[split] = [{
            "idx": int(r[index_column]) if index_column else i,
            "text_a": str(r[spec.text_columns[0]]),
            "text_b": str(r[spec.text_columns[1]]) if len(spec.text_columns) > 1 else None,
            "label": (None if split == "test" else
                      _label_id(spec, str(r[label_column]), f"{files[split]}, row {i + 1}")),
        } for i, r in enumerate(rows)]
    return TaskData(spec, splits, source=str(files["train"].parent))


def load_task(task: str, glue_dir: str | os.PathLike | None = None, hub: bool = False) -> TaskData:
    """Load a GLUE task from ``glue_dir`` (original layout) or, with ``hub=True``, the hub.

    Chapter: notebooks/05_finetuning.ipynb
    """
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
    Chapter: notebooks/05_finetuning.ipynb
    """
    import random
    import re

    from bbert.data.readers import read_sample_corpus

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
    ``pearson`` and ``spearman`` (STS-B). Chapter: notebooks/05_finetuning.ipynb
    """
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

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


# ---- finetuning -----------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """One finetuning run. Defaults follow common BERT/RoBERTa GLUE practice.

    AdamW (betas 0.9/0.98, eps 1e-6 as in the pretraining recipe), linear warm-up over
    ``warmup_proportion`` of the steps then linear decay to zero, gradient clipping at 1.
    ``bf16=None`` means bf16 autocast on a GPU that supports it. Chapter: notebooks/05_finetuning.ipynb
    """

    learning_rate: float = 5e-5
    batch_size: int = 32
    num_epochs: int = 3
    seed: int = 0
    weight_decay: float = 0.01
    warmup_proportion: float = 0.06
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    eval_batch_size: int = 128
    max_train_examples: int | None = None
    length_grouping: bool = True
    bf16: bool | None = None
    save_best_model: bool = True
    device: str | None = None
    progress: bool = True

    @property
    def name(self) -> str:
        """The grid folder name of the hyperparameters (the seed is a sub-folder)."""
        return f"lr{self.learning_rate:g}-bs{self.batch_size}-ep{self.num_epochs}"


def load_classifier(model_path: str | os.PathLike, num_labels: int):
    """A ``BertForSequenceClassification`` whose encoder comes from ``model_path``, and its tokenizer.

    ``model_path`` is anything :func:`bbert.hf.load_pretrained` reads: a bbert model folder,
    a pretraining run dir or checkpoint, or a transformers BERT folder. The classifier head
    is new (randomly initialised). Chapter: notebooks/05_finetuning.ipynb
    """
    from bbert.hf import load_pretrained
    from bbert.model import BertForSequenceClassification

    from transformers.utils import logging as hf_logging

    # AutoTokenizer peeks at the folder's config.json (model_type "bbert") and warns that it
    # doesn't know it; the tokenizer itself loads fine, so keep that warning out of the way.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        mlm, tokenizer = load_pretrained(model_path)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = BertForSequenceClassification(mlm.config, num_labels)
    model.bert.load_state_dict(mlm.bert.state_dict())
    return model, tokenizer


def _encode(examples: list[dict], tokenizer, max_seq_length: int, with_types: bool) -> list[dict]:
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples and examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_seq_length)
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    return [{k: enc[k][i] for k in keys if k in enc} for i in range(len(examples))]


def _max_length(model, config: FinetuneConfig) -> int:
    # never longer than the position table the model was pretrained with
    return min(config.max_seq_length, model.bert.config.max_position_embeddings)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator,
                           mega_batches: int = 50) -> list[list[int]]:
    """Shuffle, sort by length within chunks of ``mega_batches`` batches, then shuffle the batches.

    Batches hold similar lengths (little padding) but come in random order: feeding them
    shortest-to-longest would also feed them sorted by whatever length correlates with (often
    the label). Chapter: notebooks/05_finetuning.ipynb
    """
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * mega_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _uses_token_types(model) -> bool:
    # The recipe pretrains one segment; a model without a second type embedding gets none.
    return int(getattr(model.bert.config, "type_vocab_size", 0) or 0) >= 2


def predict(model, tokenizer, examples: list[dict], config: FinetuneConfig | None = None):
    """Raw predictions for ``examples``: class ids, or scores for a regression head.

    Batches are sorted by length (less padding) and put back in order. Chapter: notebooks/05_finetuning.ipynb
    """
    import torch
    from transformers import DataCollatorWithPadding

    config = config or FinetuneConfig()
    device = next(model.parameters()).device
    features = _encode(examples, tokenizer, _max_length(model, config), _uses_token_types(model))
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    out: list = [None] * len(features)
    model.eval()
    with torch.no_grad(), _autocast(device, _want_bf16(config, device)):
        for start in range(0, len(order), config.eval_batch_size):
            ids = order[start:start + config.eval_batch_size]
            batch = {k: v.to(device) for k, v in collate([features[i] for i in ids]).items()}
            logits = _forward(model, batch)[1].float()
            values = (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).tolist()
            for i, v in zip(ids, values):
                out[i] = v
    return out


def _forward(model, batch: dict):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids"), labels=batch.get("labels"))
    return out.loss, out.logits


def _want_bf16(config: FinetuneConfig, device) -> bool:
    import torch

    if config.bf16 is not None:
        return bool(config.bf16)
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _autocast(device, enabled: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate(model, tokenizer, data: TaskData, config: FinetuneConfig | None = None) -> dict:
    """The task's metrics on each dev split: ``{split: {metric: value}}``.

    Chapter: notebooks/05_finetuning.ipynb
    """
    scores = {}
    for split in data.spec.dev_splits:
        examples = data.splits[split]
        preds = predict(model, tokenizer, examples, config)
        scores[split] = compute_metrics(data.spec.metrics, preds, [e["label"] for e in examples])
    return scores


def prediction_strings(spec: TaskSpec, predictions: Sequence) -> list[str]:
    """Predictions as the leaderboard writes them: label strings, or scores with 3 decimals.

    Chapter: notebooks/05_finetuning.ipynb
    """
    if spec.is_regression:
        lo, hi = spec.score_range or (-math.inf, math.inf)
        return [f"{min(max(float(p), lo), hi):.3f}" for p in predictions]
    return [spec.labels[int(p)] for p in predictions]


def _predictions_tsv(spec: TaskSpec, examples: list[dict], predictions: Sequence) -> str:
    lines = ["index\tprediction"]
    lines += [f"{e['idx']}\t{p}" for e, p in zip(examples, prediction_strings(spec, predictions))]
    return "\n".join(lines) + "\n"


def main_score(spec: TaskSpec, dev_scores: dict) -> float:
    """The number that ranks runs: the main metric on the first dev split (MNLI: matched)."""
    return dev_scores[spec.dev_splits[0]][spec.main_metric]


def finetune(model_path: str | os.PathLike, data: TaskData, config: FinetuneConfig,
             out_dir: str | os.PathLike | None = None) -> dict:
    """Finetune ``model_path`` on ``data`` with ``config``; return (and write) the result.

    Each epoch is evaluated on the dev split(s); the best epoch by the task's main metric is
    kept: its scores go in ``result.json``, its test predictions in ``predictions-<split>.tsv``
    (leaderboard format) and, with ``save_best_model``, its weights in ``best_model/``. All
    writes are atomic and ``result.json`` comes last, so it marks a finished run.
    Chapter: notebooks/05_finetuning.ipynb
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    from bbert.optim import StepBasedSchedule, build_optimizer, set_lr

    spec = data.spec
    for split in ("train",) + spec.dev_splits:
        if not data.splits.get(split):
            raise ValueError(f"{spec.display}: the {split!r} split is missing or empty")
    set_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_classifier(model_path, spec.num_labels)
    model.to(device)
    bf16 = _want_bf16(config, device)

    train = data.splits["train"]
    if config.max_train_examples:
        train = train[:config.max_train_examples]
    features = _encode(train, tokenizer, _max_length(model, config), _uses_token_types(model))
    for f, e in zip(features, train):
        f["labels"] = e["label"]
    generator = torch.Generator().manual_seed(config.seed)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def epoch_batches():
        if config.length_grouping:
            return length_grouped_batches([len(f["input_ids"]) for f in features],
                                          config.batch_size, generator)
        order = torch.randperm(len(features), generator=generator).tolist()
        return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]

    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = max(1, config.num_epochs * steps_per_epoch)
    schedule = StepBasedSchedule(config.learning_rate, total_steps, config.warmup_proportion)
    optimizer = build_optimizer(model, "adamw", config.learning_rate, betas=config.betas,
                                eps=config.eps, weight_decay=config.weight_decay)

    out_dir = Path(out_dir) if out_dir is not None else None
    history, best, step = [], None, 0
    start = time.time()
    bar = tqdm(total=total_steps, desc=f"{spec.display} {config.name} seed {config.seed}",
               disable=not config.progress)
    for epoch in range(1, config.num_epochs + 1):
        model.train()
        losses = []
        for ids in epoch_batches():
            batch = {k: v.to(device) for k, v in collate([features[i] for i in ids]).items()}
            if spec.is_regression:
                batch["labels"] = batch["labels"].float()
            set_lr(optimizer, schedule.lr_at(step))
            with _autocast(device, bf16):
                loss, _ = _forward(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        scores = evaluate(model, tokenizer, data, config)
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses), "dev": scores})
        if best is None or main_score(spec, scores) > main_score(spec, best["dev"]):
            best = {"epoch": epoch, "dev": scores}
            if out_dir is not None:
                _save_best(out_dir, model, tokenizer, data, config)
    bar.close()

    result = {
        "task": spec.name, "display": spec.display, "config": config.name, "seed": config.seed,
        "hyperparameters": asdict(config), "model_path": str(model_path),
        "best_epoch": best["epoch"], "dev": best["dev"], "score": main_score(spec, best["dev"]),
        "main_metric": spec.main_metric, "history": history, "train_examples": len(train),
        "seconds": round(time.time() - start, 2), "bf16": bf16, "device": str(device),
    }
    if out_dir is not None:
        atomic_write_json(out_dir / "result.json", result)
    return result


def _save_best(out_dir: Path, model, tokenizer, data: TaskData, config: FinetuneConfig) -> None:
    """Write the best epoch's test predictions and (optionally) its weights, atomically."""
    for split in data.spec.test_splits:
        examples = data.splits.get(split)
        if examples:
            preds = predict(model, tokenizer, examples, config)
            atomic_write_text(out_dir / f"predictions-{split}.tsv",
                              _predictions_tsv(data.spec, examples, preds))
    if config.save_best_model:
        with atomic_path(out_dir / "best_model") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


# ---- grid search ----------------------------------------------------------------------


@dataclass
class GridConfig:
    """The grid: every (lr, batch size, epochs) with every seed; the rest from ``base``.

    Defaults are BERT's standard finetuning grid (Devlin et al., appendix A.3) and the paper's
    5 seeds: the 24hBERT paper lists its own finetuning grid in its appendix, which we could
    not check here, so we use BERT's and say so. Chapter: notebooks/05_finetuning.ipynb
    """

    learning_rates: tuple[float, ...] = (2e-5, 3e-5, 5e-5)
    batch_sizes: tuple[int, ...] = (16, 32)
    num_epochs: tuple[int, ...] = (2, 3, 4)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    base: FinetuneConfig = field(default_factory=FinetuneConfig)

    def runs(self) -> list[FinetuneConfig]:
        """Every run of the grid, as a :class:`FinetuneConfig`."""
        if not (self.learning_rates and self.batch_sizes and self.num_epochs and self.seeds):
            raise ValueError("every grid axis needs at least one value")
        return [replace(self.base, learning_rate=lr, batch_size=bs, num_epochs=ep, seed=s)
                for lr, bs, ep, s in itertools.product(self.learning_rates, self.batch_sizes,
                                                       self.num_epochs, self.seeds)]


def run_dir(out_dir: str | os.PathLike, task: str, config: FinetuneConfig) -> Path:
    """``out_dir/runs/<task>/<config>/<seed>/``: where one run's results live."""
    return Path(out_dir) / "runs" / task / config.name / str(config.seed)


def load_result(path: str | os.PathLike) -> dict | None:
    """A finished run's ``result.json``, or None if the run has not finished."""
    path = Path(path)
    path = path / "result.json" if path.is_dir() or not path.suffix else path
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _run_one(args) -> dict:
    model_path, data, config, out = args
    return finetune(model_path, data, config, out)


def _pin_gpu(queue) -> None:
    # One worker per GPU: each worker takes a GPU id once, before torch touches CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def grid_search(model_path: str | os.PathLike, data: TaskData, grid: GridConfig,
                out_dir: str | os.PathLike, num_gpus: int | None = None) -> list[dict]:
    """Run the grid on one task; finished runs (with a ``result.json``) are skipped.

    With several GPUs, runs go in parallel, one process per GPU pinned by
    ``CUDA_VISIBLE_DEVICES``; otherwise in sequence. Returns every run's result.
    Chapter: notebooks/05_finetuning.ipynb
    """
    runs = grid.runs()
    todo = [c for c in runs if load_result(run_dir(out_dir, data.spec.name, c)) is None]
    if len(todo) < len(runs):
        print(f"{data.spec.display}: {len(runs) - len(todo)} of {len(runs)} runs already "
              f"finished in {out_dir}, skipping them")
    jobs = [(str(model_path), data, c, run_dir(out_dir, data.spec.name, c)) for c in todo]
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    if num_gpus > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for gpu in range(num_gpus):
            queue.put(gpu)
        with ProcessPoolExecutor(num_gpus, mp_context=ctx, initializer=_pin_gpu,
                                 initargs=(queue,)) as pool:
            list(pool.map(_run_one, [(m, d, replace(c, device="cuda:0", progress=False), o)
                                     for m, d, c, o in jobs]))
    else:
        for job in jobs:
            _run_one(job)
    return [load_result(run_dir(out_dir, data.spec.name, c)) for c in runs]


def select_best(results: list[dict], spec: TaskSpec) -> dict:
    """The paper's protocol: median over seeds per configuration; report the best median.

    Returns ``{"config", "score", "dev" (median of every metric of that config),
    "seeds", "median_run" (the seed whose score is the median, for test predictions),
    "per_config" {config: median score}}``. Chapter: notebooks/05_finetuning.ipynb
    """
    results = [r for r in results if r is not None]
    if not results:
        raise ValueError(f"{spec.display}: no finished runs to select from")
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    per_config = {c: statistics.median(r["score"] for r in rs) for c, rs in by_config.items()}
    best = max(per_config, key=lambda c: per_config[c])  # ties: the first config in the grid
    runs = sorted(by_config[best], key=lambda r: (r["score"], r["seed"]))
    dev = {split: {m: statistics.median(r["dev"][split][m] for r in runs) for m in spec.metrics}
           for split in spec.dev_splits}
    return {
        "task": spec.name, "config": best, "score": per_config[best], "dev": dev,
        "seeds": [r["seed"] for r in runs],
        "median_run": runs[(len(runs) - 1) // 2]["seed"],  # lower median when even
        "per_config": per_config,
    }


# ---- results --------------------------------------------------------------------------

_METRIC_NAMES = {"matthews_corr": "Matthews corr.", "accuracy": "accuracy", "f1": "F1",
                 "pearson": "Pearson", "spearman": "Spearman"}


def results_rows(selections: dict[str, dict], specs: dict[str, TaskSpec] | None = None) -> list[dict]:
    """One row per table column (MNLI gives two) with our dev median and the papers' test scores.

    Chapter: notebooks/05_finetuning.ipynb
    """
    rows = []
    for task, sel in selections.items():
        spec = (specs or {}).get(task) or get_task(task)
        for split in spec.dev_splits:
            column = spec.columns[split]
            scores = sel["dev"][split]
            rows.append({
                "task": column,
                "metric": _METRIC_NAMES[spec.main_metric],
                "dev_median": round(100 * scores[spec.main_metric], 1),
                "all_dev_metrics": " / ".join(f"{_METRIC_NAMES[m]} {100 * v:.1f}"
                                              for m, v in scores.items()),
                "best_config": sel["config"],
                "seeds": len(sel["seeds"]),
                "paper_24hbert_test": PAPER_24HBERT_TEST.get(column),
                "bert_base_test": BERT_BASE_TEST.get(column),
            })
    return rows


def write_results_table(rows: list[dict], out_dir: str | os.PathLike, model_name: str) -> dict[str, Path]:
    """Write ``results-<model>.md`` and ``results-<model>.csv``; return their paths.

    Our numbers are dev-set medians of the best configuration; the paper columns are GLUE
    test-set scores, so they compare the shape, not the decimals. Chapter: notebooks/05_finetuning.ipynb
    """
    import io

    out_dir = Path(out_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    header = ["task", "metric", "dev_median", "all_dev_metrics", "best_config", "seeds",
              "paper_24hbert_test", "bert_base_test"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    titles = ["Task", "Metric", f"{model_name} (dev, median)", "All dev metrics", "Best config",
              "Seeds", "24hBERT (paper, test)", "BERT-base (paper, test)"]
    md = [f"GLUE results for {model_name}: dev-set median over seeds of the best configuration; "
          "the paper columns are GLUE test-set scores.", "",
          "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        md.append("| " + " | ".join("–" if r[h] is None else str(r[h]) for h in header) + " |")
    paths = {"md": out_dir / f"results-{safe}.md", "csv": out_dir / f"results-{safe}.csv"}
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    atomic_write_text(paths["csv"], buf.getvalue())
    return paths


def write_submission(run_dirs: dict[str, str | os.PathLike], out_dir: str | os.PathLike,
                     specs: dict[str, TaskSpec] | None = None) -> Path:
    """Collect each task's chosen run's test predictions into the GLUE leaderboard's format.

    ``run_dirs`` maps a task to the run whose predictions to submit (the median seed of the
    best configuration). Writes ``out_dir/submission/<CoLA.tsv, MNLI-m.tsv, ...>`` (columns
    ``index``, ``prediction``) and ``out_dir/submission.zip``. Chapter: notebooks/05_finetuning.ipynb
    """
    out_dir = Path(out_dir)
    files = {}
    for task, rdir in run_dirs.items():
        spec = (specs or {}).get(task) or get_task(task)
        for split, name in spec.submission_files.items():
            src = Path(rdir) / f"predictions-{split}.tsv"
            if src.exists():
                files[name] = src.read_text()
    if not files:
        raise FileNotFoundError("no test predictions found in the chosen runs: load the tasks' "
                                "test.tsv files too (the GLUE download has them)")
    with atomic_path(out_dir / "submission") as tmp:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
    with atomic_path(out_dir / "submission.zip") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in sorted(files.items()):
                zf.writestr(name, text)
    return out_dir / "submission.zip"


def run_glue(model_path: str | os.PathLike, tasks: list[TaskData], grid: GridConfig,
             out_dir: str | os.PathLike, model_name: str | None = None) -> dict:
    """Grid-search every task, pick the median of the best config, write table and submission.

    Returns ``{"selections", "rows", "table" (paths), "submission" (path or None)}``.
    Chapter: notebooks/05_finetuning.ipynb
    """
    out_dir = Path(out_dir)
    model_name = model_name or Path(model_path).name
    selections, chosen, specs = {}, {}, {}
    for data in tasks:
        results = grid_search(model_path, data, grid, out_dir)
        sel = select_best(results, data.spec)
        selections[data.spec.name] = sel
        specs[data.spec.name] = data.spec
        chosen[data.spec.name] = out_dir / "runs" / data.spec.name / sel["config"] / str(sel["median_run"])
    atomic_write_json(out_dir / f"selections-{model_name}.json", selections)
    rows = results_rows(selections, specs)
    table = write_results_table(rows, out_dir, model_name)
    try:
        submission = write_submission(chosen, out_dir, specs)
    except FileNotFoundError:
        submission = None  # no test files were given
    return {"selections": selections, "rows": rows, "table": table, "submission": submission}


# ---- command line ---------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bbert finetune",
        description="Finetune a bbert checkpoint (or a transformers BERT folder) on GLUE with a "
                    "grid search over lr x batch size x epochs x seeds; report the median of the "
                    "best configuration beside the paper's numbers, and write a leaderboard "
                    "submission. Chapter: notebooks/05_finetuning.ipynb")
    p.add_argument("model", help="bbert model folder, pretraining run dir or checkpoint, "
                                 "or a transformers BERT folder")
    p.add_argument("--out", required=True, help="results dir (runs/<task>/<cfg>/<seed>/, tables, "
                                                "submission.zip); re-running skips finished runs")
    p.add_argument("--tasks", default=",".join(GLUE_TASKS),
                   help="comma-separated GLUE tasks (default: all nine)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--glue-dir", help="the original GLUE download (glue_data/<TASK>/train.tsv ...)")
    src.add_argument("--hub", action="store_true", help="load GLUE from the hub (nyu-mll/glue)")
    c = p.add_argument_group("custom task (instead of GLUE)")
    c.add_argument("--train-file", help="TSV, CSV or JSONL with a header / named fields")
    c.add_argument("--dev-file")
    c.add_argument("--test-file")
    c.add_argument("--task-name", default="custom")
    c.add_argument("--text-columns", default="sentence", help="one or two names, comma-separated")
    c.add_argument("--label-column", default="label")
    c.add_argument("--labels", help="comma-separated label values in class order")
    c.add_argument("--regression", action="store_true")
    g = p.add_argument_group("grid (defaults: BERT's standard grid, 5 seeds)")
    g.add_argument("--lrs", type=_floats, default=GridConfig.learning_rates)
    g.add_argument("--batch-sizes", type=_ints, default=GridConfig.batch_sizes)
    g.add_argument("--epochs", type=_ints, default=GridConfig.num_epochs)
    g.add_argument("--seeds", type=_ints, default=GridConfig.seeds)
    p.add_argument("--max-train-examples", type=int, help="cap the training set (quick runs)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--warmup-proportion", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--no-save-models", action="store_true",
                   help="don't keep each run's best checkpoint (saves disk on big grids)")
    p.add_argument("--model-name", help="name in the results table (default: the model folder)")
    return p


def _cli_tasks(args) -> list[TaskData]:
    if args.train_file or args.dev_file:
        if not (args.train_file and args.dev_file):
            raise ValueError("a custom task needs both --train-file and --dev-file")
        return [load_custom_task(args.train_file, args.dev_file,
                                 [c.strip() for c in args.text_columns.split(",")],
                                 args.label_column, args.test_file, args.task_name,
                                 args.labels.split(",") if args.labels else None, args.regression)]
    if not (args.glue_dir or args.hub):
        raise ValueError("say where GLUE is: --glue-dir glue_data (the original download layout) "
                         "or --hub; or give a custom task with --train-file/--dev-file")
    return [load_task(t, args.glue_dir, args.hub) for t in args.tasks.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    """``bbert finetune``. Chapter: notebooks/05_finetuning.ipynb"""
    args = build_parser().parse_args(argv)
    try:
        tasks = _cli_tasks(args)
    except (ConnectionError, FileNotFoundError, ValueError) as err:  # bad input: say so, no traceback
        raise SystemExit(f"bbert finetune: {err}") from None
    base = FinetuneConfig(max_train_examples=args.max_train_examples,
                          max_seq_length=args.max_seq_length,
                          warmup_proportion=args.warmup_proportion,
                          weight_decay=args.weight_decay,
                          bf16={"auto": None, "on": True, "off": False}[args.bf16],
                          save_best_model=not args.no_save_models)
    grid = GridConfig(args.lrs, args.batch_sizes, args.epochs, args.seeds, base)
    report = run_glue(args.model, tasks, grid, args.out, args.model_name)
    print(Path(report["table"]["md"]).read_text())
    if report["submission"]:
        print(f"leaderboard submission: {report['submission']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
