"""GLUE finetuning: the paper's yardstick for a pretrained model.

The paper judges its pretrained model by finetuning it on GLUE with a small grid of
hyperparameters, 5 seeds per configuration, and reporting the median score of the best
configuration. This package runs that procedure, for a bbert checkpoint or a transformers BERT,
with BERT's grid in place of the paper's own (see config.py):

    tasks.py      TaskSpec, the nine GLUE tasks, TaskData (a loaded task)
    loaders.py    GLUE's examples: the original GLUE download on disk, or the hub
    custom.py     your own task (TSV, CSV, JSONL) and the offline task from the shipped corpus
    metrics.py    the GLUE metrics, the score that ranks runs, predictions for the leaderboard
    config.py     FinetuneConfig (one run) and GridConfig (the grid), with the grid presets
                  (bert, official, tiny) and their sources
    finetuning.py one run: classification head, AdamW + warm-up/decay, length grouping, best epoch
    grid.py       the grid (restartable), median of the best configuration, results table,
                  leaderboard submission, the grid's cost in GPU-hours
    command.py    ``bbert finetune``

Every public name is re-exported here (``from bbert.glue import finetune``). They load lazily:
the submodules import torch, transformers and scikit-learn, which ``bbert finetune --help``
should not wait for. Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

from bbert.lazy import lazy_exports

_EXPORTS = {
    "bbert.glue.tasks": [
        "TsvLayout", "TaskSpec", "TaskData", "GLUE_TASKS", "GLUE_TRAIN_SIZES", "get_task",
        "PAPER_24HBERT_TEST", "BERT_BASE_TEST"],
    "bbert.glue.loaders": ["load_glue_dir", "load_glue_hub", "load_task"],
    "bbert.glue.custom": ["custom_task", "load_custom_task", "make_corpus_source_task"],
    "bbert.glue.metrics": ["compute_metrics", "prediction_strings", "predictions_tsv", "main_score"],
    "bbert.glue.config": [
        "FinetuneConfig", "GridConfig", "GRID_PRESETS", "GRID_SOURCES", "BERT_GRID_TABLE", "PRECISIONS",
        "grid_preset"],
    "bbert.glue.finetuning": [
        "RESULT_VERSION", "load_classifier", "length_grouped_batches", "random_batches",
        "resolve_precision", "predict", "evaluate", "Progress", "finetune"],
    "bbert.glue.grid": [
        "run_dir", "load_result", "grid_search", "select_best", "results_rows",
        "write_results_table", "write_submission", "run_glue", "gpu_seconds_per_example",
        "grid_cost"],
    "bbert.glue.command": ["build_parser", "build_grid", "main"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
