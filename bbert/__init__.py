"""bbert: budget BERT pretraining, the 24hBERT recipe as a course book and a package.

The public API, loaded lazily so that ``import bbert`` stays quick:

    bbert.prepare / PrepareConfig      raw text -> data dir            (notebooks/02_data.ipynb)
    bbert.BertConfig / BertForMaskedLM the model                        (notebooks/03_model.ipynb)
    bbert.TrainConfig / pretrain       the time-budgeted run            (notebooks/04_pretraining.ipynb)
    bbert.read_metrics                 a run's metrics history          (notebooks/04_pretraining.ipynb)
    bbert.latest_checkpoint            a run's most advanced checkpoint (notebooks/04_pretraining.ipynb)
    bbert.launch                       start a run from a notebook cell (notebooks/04_pretraining.ipynb)
    bbert.plan_budget                  what a budget buys               (notebooks/01_budget.ipynb)
    bbert.finetune / grid_search       GLUE                             (notebooks/05_finetuning.ipynb)
    bbert.search.search / search_table the budgeted hyperparameter search (notebooks/06_findings.ipynb)
    bbert.show_source                  a package object's live source, on the page
"""
from __future__ import annotations

from bbert.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "PrepareConfig": "bbert.data", "prepare": "bbert.data", "load_manifest": "bbert.data",
    "load_tokenizer": "bbert.data", "sample_corpus_path": "bbert.data",
    "MaskingConfig": "bbert.data", "build_pretraining_loader": "bbert.data",
    "BertConfig": "bbert.model", "BertModel": "bbert.model", "BertForMaskedLM": "bbert.model",
    "BertForSequenceClassification": "bbert.model",
    "load_pretrained": "bbert.hf", "export_to_transformers": "bbert.hf",
    "build_optimizer": "bbert.optim", "Schedule": "bbert.optim",
    "TrainConfig": "bbert.train_config", "pretrain": "bbert.train",
    "read_metrics": "bbert.run_dir", "latest_checkpoint": "bbert.run_dir",
    "launch": "bbert.launcher", "build_launch_command": "bbert.launcher",
    "plan_budget": "bbert.budget", "BudgetPlan": "bbert.budget",
    "FinetuneConfig": "bbert.glue", "GridConfig": "bbert.glue", "finetune": "bbert.glue",
    "grid_search": "bbert.glue", "load_task": "bbert.glue",
    "resolve_scale": "bbert.env", "set_seed": "bbert.env",
    "search_table": "bbert.search", "best_trial": "bbert.search",
    "show_source": "bbert.show", "DirLock": "bbert.locks", "check_data_dir": "bbert.data",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
