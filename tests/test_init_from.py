"""Continued pretraining: ``bbert pretrain --init-from MODEL`` and ``bbert prepare --tokenizer MODEL``."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import bbert.run_dir as rd
from bbert.data import PrepareConfig, load_manifest, load_tokenizer, prepare, tokenizer_dir
from bbert.data.prepare import main as prepare_main
from bbert.data.tokenizer import tokenizer_fingerprint
from bbert.engines import init_distributed
from bbert.hf import export_to_transformers, load_pretrained
from bbert.model import BertForMaskedLM
from bbert.train import Trainer, main, pretrain

from helpers_train import make_data_dir, records, tiny_config

SOURCE_MODEL = {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("init") / "data")


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
    """A run of 8 steps that ends with a validation: the model the other runs continue from."""
    run_dir = tmp_path_factory.mktemp("init") / "source"
    pretrain(tiny_config(data_dir, run_dir, model_overrides=SOURCE_MODEL, max_steps=8,
                         checkpoint_fractions=[], checkpoint_every_minutes=None))
    return run_dir


def continued(data_dir, run_dir, init_from, **overrides):
    """One step at the warm-up's lr of 0 (the weights stay as loaded), then a validation."""
    overrides = {"max_steps": 1, "checkpoint_fractions": [], "checkpoint_every_minutes": None,
                 "model_overrides": {}, **overrides}
    return tiny_config(data_dir, run_dir, init_from=str(init_from), **overrides)


def weights(folder) -> dict:
    return BertForMaskedLM.from_pretrained(folder).state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_starts_from_the_weights_of_init_from(data_dir, source, tmp_path):
    run_dir = pretrain(continued(data_dir, tmp_path / "run", source))
    assert records(run_dir, "train")[0]["lr"] == 0.0
    # after a step at lr 0 the weights are still the source's, and so is the validation loss
    # (same data, same validation masks)
    assert_same_weights(weights(rd.model_dir(rd.final_dir(run_dir))),
                        weights(rd.model_dir(rd.final_dir(source))))
    first, last_of_source = records(run_dir, "val")[0], records(source, "val")[-1]
    assert last_of_source["step"] == 8
    assert first["val_loss"] == pytest.approx(last_of_source["val_loss"], rel=1e-6)
    # the model's shape came from init_from, not from the preset (tiny: 128 wide)
    saved = json.loads((rd.model_dir(rd.final_dir(run_dir)) / "config.json").read_text())
    assert (saved["hidden_size"], saved["max_position_embeddings"]) == (64, 64)
    # a new model of that shape scores worse: the loss above is the trained weights'
    scratch = pretrain(tiny_config(data_dir, tmp_path / "scratch", model_overrides=SOURCE_MODEL,
                                   max_steps=1, checkpoint_fractions=[], checkpoint_every_minutes=None))
    assert records(scratch, "val")[0]["val_loss"] > first["val_loss"] + 0.1


def test_init_from_a_transformers_folder_and_a_training_only_override(data_dir, source, tmp_path):
    model, tokenizer = load_pretrained(source)
    exported = export_to_transformers(model, tokenizer, tmp_path / "hf")  # RoBERTa-PreLN layout
    assert json.loads((exported / "config.json").read_text())["model_type"] == "roberta-prelayernorm"
    config = continued(data_dir, tmp_path / "run", exported,
                       model_overrides={"hidden_dropout_prob": 0.0, "hidden_size": 64})
    run_dir = pretrain(config)
    assert records(run_dir, "val")[0]["val_loss"] == pytest.approx(
        records(source, "val")[-1]["val_loss"], rel=1e-5)
    saved = json.loads((rd.model_dir(rd.final_dir(run_dir)) / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == 0.0 and saved["hidden_size"] == 64


def test_a_resumed_run_goes_on_from_its_checkpoint_not_from_init_from(data_dir, source, tmp_path):
    config = continued(data_dir, tmp_path / "run", source, max_steps=3, validation_every_minutes=None)
    pretrain(config)
    checkpoint = rd.latest_checkpoint(tmp_path / "run")
    assert rd.read_budget(checkpoint)["step"] == 3
    trainer = Trainer(config.with_overrides(["max_steps=5"]), init_distributed("torch"), resume=True)
    assert trainer.resume_from == checkpoint and trainer.step == 3
    now = trainer.engine.full_state_dict()
    assert_same_weights(now, weights(rd.model_dir(checkpoint)))
    init = weights(rd.model_dir(rd.final_dir(source)))
    assert not all(torch.equal(now[k], init[k]) for k in init)  # 2 steps at lr > 0 moved them


def test_prepare_tokenizer_model_takes_the_models_tokenizer_and_records_it(source, tmp_path):
    out = tmp_path / "data"
    warnings = logging.Handler()
    warnings.emit = lambda record: pytest.fail(f"transformers warned: {record.getMessage()[:80]}")
    logging.getLogger("transformers").addHandler(warnings)  # it does not propagate to caplog
    try:
        assert prepare_main([f"--tokenizer={source}", "--out", str(out), "--max-documents", "60",
                             "--max-seq-length", "32", "--val-fraction", "0.1", "--quiet"]) == 0
    finally:  # (about the bbert config.json beside the tokenizer: kept out of AutoTokenizer's way)
        logging.getLogger("transformers").removeHandler(warnings)
    manifest = load_manifest(out)
    _, model_tokenizer = load_pretrained(source)
    fingerprint = tokenizer_fingerprint(model_tokenizer)
    assert manifest["tokenizer"]["source"] == str(source)
    assert manifest["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"] == fingerprint
    assert load_tokenizer(tokenizer_dir(out)).get_vocab() == model_tokenizer.get_vocab()
    # the model continues on it
    run_dir = pretrain(continued(out, tmp_path / "run", source, max_seq_length=32))
    assert records(run_dir, "end")[-1]["reason"] == "max_steps"


@pytest.fixture(scope="module")
def other_data(source, tmp_path_factory):
    """Data dirs that don't fit the source model: another vocabulary of the same size (cased),
    one of another size, and sequences longer than its 64 positions."""
    root = tmp_path_factory.mktemp("other")
    common = dict(max_documents=300, val_fraction=0.05, seed=0, progress=False)
    prepare(PrepareConfig(out=str(root / "cased"), vocab_size=2048, lowercase=False,
                          max_seq_length=64, **common))
    prepare(PrepareConfig(out=str(root / "small"), vocab_size=1024, max_seq_length=64, **common))
    prepare(PrepareConfig(out=str(root / "long"), tokenizer=str(source), max_seq_length=128, **common))
    return root


@pytest.mark.parametrize("case, args, message", [
    ("cased", [], r"another vocabulary than init_from .* \(\d+ of its tokens have other ids\).*"
                  r"bbert prepare --tokenizer"),
    ("small", [], r"another vocabulary .*1024 tokens against the model's 2048"),
    ("long", ["--set", "max_seq_length=128"], r"max_seq_length=128 .* longer than the 64 positions"),
    (None, ["--set", "model.hidden_size=128"], r"model.hidden_size=128 contradicts init_from .*hidden_size=64"),
    (None, ["--set", "model.ffn_type=geglu"], r"model.ffn_type='geglu' contradicts"),
    (None, ["--init-from", "no/such/model"], r"init_from: no/such/model does not exist"),
])
def test_a_model_that_does_not_fit_is_refused_in_one_line_before_anything_is_written(
        data_dir, source, other_data, tmp_path, capsys, case, args, message):
    data = other_data / case if case else data_dir
    run_dir = tmp_path / "run"
    argv = ["--config", str(tmp_path / "run.yaml"), "--init-from", str(source), *args,
            "--data-dir", str(data), "--run-dir", str(run_dir)]
    continued(data_dir, run_dir, source).to_yaml(tmp_path / "run.yaml")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("bbert pretrain: error: ")
    assert re.search(message, err), err
    assert not run_dir.exists()


def test_seed_bands_figure_draws_the_mean_and_the_range_of_the_seeds():
    from bbert.plot import plot_seed_bands

    # two seeds validated at slightly different times; the grid is where both have points
    runs = {"continued": [[(1.0, 6.0), (3.0, 5.0)], [(1.5, 6.5), (4.0, 5.5)]],
            "from scratch": [[(1.0, 7.0), (3.0, 6.0)]]}
    ax = plot_seed_bands(runs).axes[0]
    mean = next(line for line in ax.get_lines() if line.get_label() == "continued (mean of 2)")
    xs, ys = mean.get_xdata(), mean.get_ydata()
    assert (xs[0], xs[-1]) == (1.5, 3.0) and "seconds" in ax.get_xlabel()
    # at t=3: seed 0 is at 5.0, seed 1 at 6.5 - 1.0 * 1.5 / 2.5 = 5.9
    assert ys[-1] == pytest.approx((5.0 + 5.9) / 2)
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(5.0) and band[:, 1].max() == pytest.approx(6.5)
    assert len(ax.get_legend().get_texts()) == 2
