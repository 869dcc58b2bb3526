"""The objective's seam: the model it builds, the masks validation scores, the FLOPs MFU counts."""
from __future__ import annotations

import pytest
import torch

from bbert.data import MaskingConfig, build_pretraining_loader
from bbert.engines import DistEnv
from bbert.model import BertForMaskedLM
from bbert.objective import VALIDATION_MLM_PROBABILITY, MaskedLM, build_objective
from bbert.speed import mfu
from bbert.train import Trainer, pretrain

from helpers_train import make_data_dir, records, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("objective") / "data")


def _predicted_per_batch(data_dir, masking: MaskingConfig, n: int) -> list[int]:
    loader = build_pretraining_loader(data_dir, "val", 4, seed=0, masking=masking, infinite=False)
    return [int((b["labels"] != -100).sum()) for b, _ in zip(loader, range(n))]


def test_validation_scores_15_percent_masks_whatever_the_training_rate(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", masking={"mlm_probability": 0.3, "max_predictions_per_seq": 30})
    trainer = Trainer(config, DistEnv())
    seen = []  # (predicted tokens, loss) of every val batch the engine scores

    def eval_loss(batch, original=trainer.engine.eval_loss):
        loss = original(batch)
        seen.append((int((batch["labels"] != -100).sum()), float(loss)))
        return loss

    trainer.engine.eval_loss = eval_loss
    val_loss = trainer.evaluate()

    at_15 = _predicted_per_batch(data_dir, MaskingConfig(max_predictions_per_seq=30), config.max_val_batches)
    at_30 = _predicted_per_batch(data_dir, config.masking, config.max_val_batches)
    assert [n for n, _ in seen] == at_15
    assert sum(at_30) > 1.5 * sum(at_15)  # the training rate would have scored about twice the tokens
    # token-weighted: each batch's mean loss counts by the tokens it predicts
    assert val_loss == pytest.approx(sum(n * loss for n, loss in seen) / sum(at_15))
    # the other masking settings are the training ones
    assert trainer.objective.validation_masking == MaskingConfig(mlm_probability=VALIDATION_MLM_PROBABILITY,
                                                                 max_predictions_per_seq=30)


def test_training_flops_follow_the_masking_rate_with_the_sparse_head(data_dir, tmp_path):
    def flops(rate: float, sparse: bool) -> float:
        config = tiny_config(data_dir, tmp_path / "run", masking={"mlm_probability": rate},
                             model_overrides={"hidden_size": 64, "num_attention_heads": 2,
                                              "num_hidden_layers": 2, "sparse_mlm_head": sparse})
        return build_objective(config).flops_per_sequence(config.model_config(2048), 64)

    model_config = tiny_config(data_dir, tmp_path).model_config(2048)
    h, v = model_config.hidden_size, model_config.padded_vocab_size
    head_per_token = 3 * 2 * (h * h + h * v)  # transform + decoder, forward and backward
    assert flops(0.3, True) - flops(0.15, True) == pytest.approx(0.15 * 64 * head_per_token)
    assert flops(0.3, False) == flops(0.15, False) == pytest.approx(flops(0.15, True) + 0.85 * 64 * head_per_token)


def test_the_loop_logs_mfu_of_the_objectives_flops(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", masking={"mlm_probability": 0.3}, peak_flops=1e12,
                         max_steps=2, validation_every_minutes=None, checkpoint_every_minutes=None,
                         checkpoint_fractions=[])
    run_dir = pretrain(config)
    flops = MaskedLM(config).flops_per_sequence(config.model_config(2048), 64)
    for r in records(run_dir, "train"):
        assert r["mfu"] == pytest.approx(mfu(flops, r["seq_per_s"], 1e12))


def test_the_objective_builds_and_scores_the_model(data_dir, tmp_path):
    objective = MaskedLM(tiny_config(data_dir, tmp_path))
    model_config = tiny_config(data_dir, tmp_path).model_config(2048)
    torch.manual_seed(0)
    model = objective.build_model(model_config)
    assert type(model) is objective.model_class is BertForMaskedLM and model.config == model_config
    batch = next(iter(build_pretraining_loader(data_dir, "val", 4, seed=0, infinite=False)))
    labels = batch["labels"]
    assert objective.predicted_tokens(batch) == int((labels != -100).sum())
    # the loss is the mean cross-entropy over the predicted tokens
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
        assert float(objective.loss(model, batch)) == pytest.approx(float(expected), rel=1e-5)


def test_a_run_at_30_percent_masking_learns(data_dir, tmp_path):
    # MosaicBERT's rate is a data option, no model change: the loop still trains on its masks
    config = tiny_config(data_dir, tmp_path / "run", masking={"mlm_probability": 0.3}, max_steps=20,
                         validation_every_minutes=None, checkpoint_every_minutes=None, checkpoint_fractions=[])
    losses = [r["loss"] for r in records(pretrain(config), "train")]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
