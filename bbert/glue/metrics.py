"""GLUE scores: the official metrics, the score that ranks runs, and predictions as the
leaderboard writes them.

Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from bbert.glue.tasks import TaskSpec


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
