"""The finetuning configuration: one run (:class:`FinetuneConfig`) and the grid (:class:`GridConfig`).

Plain dataclasses with the same field names as pretraining's ``TrainConfig`` (``lr``,
``precision``, ``warmup_proportion``, ``batch_size``, ``seed``, ...), read from YAML and
``--set`` by :mod:`bbert.configs`. The grid presets say where each value comes from:

    bert       BERT's grid (Devlin et al. 2019, appendix A.3) with the 24hBERT paper's protocol
               (Izsak et al. 2021, appendix B: 5 seeds, the median of the best configuration);
               the default. Not the 24hBERT paper's own grid (BERT_GRID_TABLE says why)
    official   the IntelLabs/academic-budget-bert repository's finetuning example
    tiny       a small grid for the tiny model on a CPU (the chapter's and the tests')

This module imports nothing heavy, so ``bbert finetune --help`` and config errors stay quick.
Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace

from bbert.configs import build_config

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FinetuneConfig:
    """One finetuning run. Field names follow ``TrainConfig``; defaults follow BERT/RoBERTa practice.

    AdamW (betas 0.9/0.98, eps 1e-6 as in the pretraining recipe), linear warm-up over
    ``warmup_proportion`` of the steps (or ``warmup_steps`` steps, when set) then linear decay
    to zero, gradient clipping at ``max_grad_norm``. ``precision="auto"`` is bf16 autocast on a
    GPU that has it and fp32 elsewhere; ``"fp16"`` (a GPU only) adds a gradient scaler.
    """

    lr: float = 5e-5
    batch_size: int = 32
    num_epochs: int = 3
    seed: int = 0
    weight_decay: float = 0.01
    warmup_proportion: float = 0.06
    warmup_steps: int | None = None  # a fixed count instead of the proportion (the repo's example)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    precision: str = "auto"
    max_seq_length: int = 128
    eval_batch_size: int = 128
    max_train_examples: int | None = None
    length_grouping: bool = True
    save_best_model: bool = True
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("lr", "batch_size", "num_epochs", "max_seq_length", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_train_examples is not None and self.max_train_examples <= 0:
            raise ValueError(f"max_train_examples must be positive (or unset for all), "
                             f"got {self.max_train_examples!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be 0 or more, got {self.weight_decay!r}")
        if not 0 <= self.warmup_proportion < 1:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion!r}")

    @property
    def name(self) -> str:
        """The grid folder name of the hyperparameters (the seed is a sub-folder)."""
        return f"lr{self.lr:g}-bs{self.batch_size}-ep{self.num_epochs}"


@dataclass
class GridConfig:
    """The grid: every (``lr``, ``batch_size``, ``num_epochs``) with every ``seed``; the rest from ``base``.

    Each axis is named after the :class:`FinetuneConfig` field it varies. The default is the
    ``bert`` preset; see :data:`GRID_PRESETS` for every preset and its source.
    """

    lr: tuple[float, ...] = field(default_factory=lambda: _default("lr"))
    batch_size: tuple[int, ...] = field(default_factory=lambda: _default("batch_size"))
    num_epochs: tuple[int, ...] = field(default_factory=lambda: _default("num_epochs"))
    seed: tuple[int, ...] = field(default_factory=lambda: _default("seed"))
    base: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GridConfig":
        """A preset of :data:`GRID_PRESETS` (``bert``, ``official``, ``tiny``); keyword
        overrides replace fields (``base=FinetuneConfig(...)``)."""
        return build_config(cls, grid_preset(name), updates=overrides)

    def runs(self) -> list[FinetuneConfig]:
        """Every run of the grid, as a :class:`FinetuneConfig`."""
        if not (self.lr and self.batch_size and self.num_epochs and self.seed):
            raise ValueError("every grid axis (lr, batch_size, num_epochs, seed) needs at least one value")
        return [replace(self.base, lr=lr, batch_size=bs, num_epochs=ep, seed=s)
                for lr, bs, ep, s in itertools.product(self.lr, self.batch_size, self.num_epochs,
                                                       self.seed)]


# ---- the grid presets, each with its source -------------------------------------------------

BERT_GRID_TABLE = """
The `bert` grid (the default) is BERT's finetuning grid (Devlin et al. 2019, appendix A.3), run
with the 24hBERT paper's protocol (Izsak, Berchansky & Levy 2021, appendix B, "Finetuning
Hyperparameters": "We run each configuration using 5 random seeds and select the median of the
best configuration"). It is not the 24hBERT paper's own grid: that grid's values (the appendix
table, Table 7 in arXiv 2104.07705v2) are not transcribed in bbert, so a `bert` grid search
stands in for the paper's; it does not repeat it.

| hyperparameter | values | source |
|---|---|---|
| lr | 2e-5, 3e-5, 5e-5 | BERT's grid (Devlin et al. 2019, appendix A.3) |
| batch_size | 16, 32 | BERT's grid (Devlin et al. 2019, appendix A.3) |
| num_epochs | 2, 3, 4 | BERT's grid (Devlin et al. 2019, appendix A.3) |
| seeds | 5 | the 24hBERT paper's protocol (Izsak et al. 2021, appendix B) |
"""

GRID_PRESETS: dict[str, dict] = {
    # Devlin et al. (2019), BERT, appendix A.3: "Batch size: 16, 32; Learning rate (Adam): 5e-5,
    # 3e-5, 2e-5; Number of epochs: 2, 3, 4". (For its GLUE table, section 4.1 used batch 32,
    # 3 epochs and lr 5e-5, 4e-5, 3e-5 or 2e-5.) Seeds: the 24hBERT paper's protocol (5, median).
    # BERT_GRID_TABLE above is its source; tests/test_glue_grid.py checks the two agree.
    "bert": {"lr": (2e-5, 3e-5, 5e-5), "batch_size": (16, 32), "num_epochs": (2, 3, 4),
             "seed": (0, 1, 2, 3, 4)},
    # IntelLabs/academic-budget-bert README.md, "Example for finetuning on MRPC" (run_glue.py):
    # --learning_rate 5e-5 --per_device_train_batch_size 32 --num_train_epochs 5
    # --weight_decay 0.01 --max_grad_norm 1.0 --max_seq_length 128 --warmup_steps 50
    # --lr_scheduler_type polynomial (transformers' default power 1.0: linear decay to 0).
    # It leaves AdamW at transformers' defaults (betas 0.9/0.999, eps 1e-8) and evaluates every
    # 50 steps (bbert evaluates each epoch). One configuration; the example sets no seed, so the
    # paper's 5 seeds are used.
    "official": {"lr": (5e-5,), "batch_size": (32,), "num_epochs": (5,), "seed": (0, 1, 2, 3, 4),
                 "base": {"weight_decay": 0.01, "max_grad_norm": 1.0, "max_seq_length": 128,
                          "warmup_steps": 50, "betas": (0.9, 0.999), "eps": 1e-8}},
    # Not from a paper: a 2-layer, 128-wide model on a CPU wants a larger lr and few runs.
    "tiny": {"lr": (1e-3, 2e-3), "batch_size": (16,), "num_epochs": (3,), "seed": (0, 1, 2)},
}


GRID_SOURCES: dict[str, str] = {
    "bert": "BERT's grid (Devlin et al. 2019, appendix A.3) with the 24hBERT paper's 5 seeds "
            "and median (Izsak et al. 2021, appendix B); not the 24hBERT paper's own grid",
    "official": "IntelLabs/academic-budget-bert, README.md, 'Example for finetuning on MRPC'",
    "tiny": "none: chosen for the tiny model on a CPU",
}


def grid_preset(name: str) -> dict:
    """The fields of grid preset ``name`` as a dict (a base for ``bbert.configs.build_config``)."""
    if name == "paper":  # the old name of `bert`, which claimed a grid bbert does not have
        raise ValueError("grid preset 'paper' is now called 'bert': it is BERT's grid (Devlin et al. "
                         "2019) with the 24hBERT paper's 5 seeds, not that paper's own grid; use "
                         "--grid bert")
    if name not in GRID_PRESETS:
        raise ValueError(f"unknown grid preset {name!r}; choose one of {', '.join(GRID_PRESETS)}")
    return copy.deepcopy(GRID_PRESETS[name])


def _default(axis: str) -> tuple:
    return tuple(GRID_PRESETS["bert"][axis])
