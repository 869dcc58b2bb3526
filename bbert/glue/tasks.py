"""GLUE tasks: what each task is, and what a loaded task holds.

    TaskSpec     one task's text columns, labels, metrics, file layout and submission files
    GLUE_TASKS   the nine GLUE tasks (get_task finds one by hub or GLUE name)
    TaskData     a loaded task's examples, and the fingerprint a re-run checks

Where the examples come from: ``loaders.py`` (the GLUE download, the hub) and ``custom.py``
(your own files, the offline corpus-source task); how they are scored: ``metrics.py``.
Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


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
