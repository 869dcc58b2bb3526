"""The pretraining objective in one room: masked language modelling, as 24hBERT trains it.

The loop (:mod:`bbert.train`) and the engines (:mod:`bbert.engines`) never name the model class
or the masked-LM loss; they ask the objective, built from the run's ``TrainConfig``:

    build_model(model_config)    the model it trains (``BertForMaskedLM``)
    model_class                  the class that saves and loads the checkpoints' model folders
    loss(model, batch)           the loss of a batch, through whatever wraps the model (DDP, DeepSpeed)
    predicted_tokens(batch)      the weight of a batch in the validation loss (its masked tokens)
    validation_masking           the masks validation scores: always the paper's 15%
    flops_per_sequence(seq_len)  training FLOPs of one sequence, for MFU

A new objective (or one that changes the model) is a class here beside :class:`MaskedLM`, chosen in
:func:`build_objective`, and its test.

Chapters: ``notebooks/04_pretraining.ipynb`` (the objective and its validation),
``notebooks/03_model.ipynb`` (the sparse MLM head).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from bbert.data import MaskingConfig
from bbert.model import BertConfig, BertForMaskedLM
from bbert.speed import training_flops_per_sequence

if TYPE_CHECKING:
    from bbert.train_config import TrainConfig

# BERT's rate. Validation masks at it whatever the training rate (0.3 = MosaicBERT), so that runs
# trained at other rates are scored on one yardstick.
VALIDATION_MLM_PROBABILITY = 0.15


class MaskedLM:
    """Masked-LM pretraining: predict the masked tokens, loss averaged over them."""

    model_class = BertForMaskedLM

    def __init__(self, config: TrainConfig):
        self.config = config

    def build_model(self, model_config: BertConfig) -> BertForMaskedLM:
        return self.model_class(model_config)

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Mean loss over the batch's predicted tokens; ``model`` may be wrapped (DDP, DeepSpeed)."""
        return model(**batch).loss

    def predicted_tokens(self, batch: dict) -> int:
        """The weight of a batch's mean loss in a token-weighted average: how many tokens it predicts."""
        return int((batch["labels"] != -100).sum())

    @property
    def validation_masking(self) -> MaskingConfig:
        """The training masking at :data:`VALIDATION_MLM_PROBABILITY`; its other settings kept."""
        return dataclasses.replace(self.config.masking, mlm_probability=VALIDATION_MLM_PROBABILITY)

    def flops_per_sequence(self, model_config: BertConfig, seq_len: int) -> float:
        """Training FLOPs of one sequence: the sparse head predicts the training rate's share of tokens."""
        return training_flops_per_sequence(model_config, seq_len, self.config.masking.mlm_probability,
                                           model_config.sparse_mlm_head)


def build_objective(config: TrainConfig) -> MaskedLM:
    """The objective a run trains (masked LM: the only one so far)."""
    return MaskedLM(config)
