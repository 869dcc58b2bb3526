"""The budgeted hyperparameter search: trials are run dirs, bad ones stop early, re-runs skip."""
from __future__ import annotations

import math

import pytest
import yaml

from bbert.search import (best_trial, budget_saved, expand_grid, main, parse_grid, search, search_table,
                          trial_name)
from bbert.run_dir import latest_checkpoint, read_metrics
from bbert.train_config import TrainConfig
from helpers_train import make_data_dir, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("search-data") / "data")


def base_config(data_dir, tmp_path) -> TrainConfig:
    # 10 simulated steps of 18 s in a 3-minute budget, validation every minute, early stop after one
    return tiny_config(data_dir, tmp_path / "unused", debug={"step_time_seconds": 18.0},
                       checkpoint_fractions=[], checkpoint_every_minutes=None, log_every_steps=2,
                       early_stop={"enabled": True, "after_minutes": 1.0, "max_val_loss": 20.0})


@pytest.fixture(scope="module")
def finished_search(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "trials"
    base = base_config(data_dir, out.parent)
    grid = {"lr": [1e-3, 3e-3, 1e3]}
    return base, grid, out, search(base, grid, out, verbose=False)


def test_expand_grid_and_names():
    points = expand_grid({"lr": [5e-4, 1e-3], "batch_size": [32, 64]})
    assert points == [{"lr": 5e-4, "batch_size": 32}, {"lr": 5e-4, "batch_size": 64},
                      {"lr": 1e-3, "batch_size": 32}, {"lr": 1e-3, "batch_size": 64}]
    assert trial_name(points[1]) == "lr=0.0005,batch_size=64"
    with pytest.raises(ValueError, match="non-empty list"):
        expand_grid({"lr": []})
    assert parse_grid(["lr=5e-4,1e-3", "warmup_proportion=0.02"]) == {"lr": ["5e-4", "1e-3"],
                                                                        "warmup_proportion": ["0.02"]}


def test_trials_are_ordinary_run_dirs(finished_search):
    base, grid, out, results = finished_search
    assert [r["trial"] for r in results] == ["lr=0.001", "lr=0.003", "lr=1000"]
    for row, lr in zip(results, grid["lr"]):
        run_dir = out / row["trial"]
        assert row["run_dir"] == str(run_dir)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["lr"] == lr and saved["batch_size"] == base.batch_size
        assert TrainConfig.from_yaml(run_dir / "config.yaml").lr == lr
        records = read_metrics(run_dir)
        assert records[0]["type"] == "start" and records[-1]["type"] == "end"
        assert latest_checkpoint(run_dir) is not None
    for row in results[:2]:  # the healthy trials spend their whole budget and end with a validation
        assert row["end_reason"] == "budget" and row["steps"] == 10
        assert row["elapsed_seconds"] == pytest.approx(180.0)
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < 20.0
        assert (out / row["trial"] / "final" / "model").is_dir()


def test_early_stop_ends_a_diverging_trial(finished_search):
    _, _, out, results = finished_search
    bad = results[2]
    assert bad["end_reason"] in ("early_stop", "nan")
    assert bad["steps"] < 10 and bad["elapsed_seconds"] < 180.0
    assert read_metrics(out / bad["trial"])[-1]["reason"] == bad["end_reason"]
    saved, total = budget_saved(results)
    assert total == pytest.approx(3 * 180.0)
    assert saved == pytest.approx(180.0 - bad["elapsed_seconds"]) and saved > 0
    table = search_table(results)
    bad_line = next(line for line in table.splitlines() if line.startswith("| 1000 |"))
    assert f"| {bad['end_reason']} |" in bad_line and "**best**" not in bad_line


def test_best_trial_has_the_lowest_final_loss(finished_search):
    _, _, _, results = finished_search
    best = best_trial(results)
    healthy = [r for r in results if r["end_reason"] == "budget"]
    assert best["val_loss"] == min(r["val_loss"] for r in healthy)
    best_line = next(line for line in search_table(results).splitlines() if "**best**" in line)
    assert best_line.startswith(f"| {best['lr']:g} |") and f"{best['val_loss']:.3f}" in best_line
    assert best_trial([{**results[2]}]) is None


def test_rerun_skips_finished_trials(finished_search):
    base, grid, out, results = finished_search
    before = {r["trial"]: ((out / r["trial"] / "metrics.jsonl").stat().st_mtime_ns,
                           (out / r["trial"] / "metrics.jsonl").read_text()) for r in results}
    again = search(base, grid, out, verbose=False)
    assert all(r["skipped"] for r in again)
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in results]
    for r in again:
        path = out / r["trial"] / "metrics.jsonl"
        assert (path.stat().st_mtime_ns, path.read_text()) == before[r["trial"]]


def test_bad_grid_value_fails_before_any_trial(data_dir, tmp_path):
    base = base_config(data_dir, tmp_path)
    with pytest.raises(ValueError, match="warmup_proportion"):
        search(base, {"warmup_proportion": [0.1, 1.5]}, tmp_path / "trials", verbose=False)
    assert not (tmp_path / "trials").exists()


def test_command_runs_one_trial_and_reports_errors(data_dir, tmp_path, capsys):
    base = base_config(data_dir, tmp_path)
    config_file = base.to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "cli"
    args = ["--config", str(config_file), "--grid", "lr=1e-3,2e-3", "--out", str(out), "--trial", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (out / "lr=0.002" / "metrics.jsonl").is_file() and not (out / "lr=0.001").exists()
    assert "best: " + str(out / "lr=0.002") in printed

    assert main(["--config", str(config_file), "--grid", "lr", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bbert search: error: --grid 'lr' must look like FIELD=V1,V2") and "\n" not in err
    assert main(["--config", str(config_file), "--grid", "lr=1e-3", "--out", str(out), "--trial", "5"]) == 2
    assert "outside the grid" in capsys.readouterr().err


def test_a_dict_value_sets_fields_together(data_dir, tmp_path):
    from bbert.search import trial_config

    base = base_config(data_dir, tmp_path)
    params = {"batch": {"batch_size": 16, "debug.step_time_seconds": 36.0}, "lr": 2e-3}
    assert trial_name(params) == "batch_size=16,debug.step_time_seconds=36,lr=0.002"
    config = trial_config(base, params, tmp_path / "t")
    assert (config.batch_size, config.debug.step_time_seconds, config.lr) == (16, 36.0, 2e-3)
    assert config.early_stop == base.early_stop and config.run_dir == str(tmp_path / "t")


def test_grid_values_may_be_lists_and_model_fields(data_dir, tmp_path):
    from bbert.search import trial_config

    # commas inside brackets belong to one value (this was a yaml traceback)
    assert parse_grid(["betas=[0.9,0.98],[0.9, 0.999]", "lr=1e-3"]) == {
        "betas": ["[0.9,0.98]", "[0.9, 0.999]"], "lr": ["1e-3"]}
    base = base_config(data_dir, tmp_path)
    # model.X reaches the model, as `--set model.X=...` does (it was "model must be a string")
    config = trial_config(base, {"model.hidden_size": "32", "betas": "[0.9, 0.999]"}, tmp_path / "t")
    assert config.model_overrides["hidden_size"] == 32 and config.model == base.model
    assert config.betas == (0.9, 0.999)


def test_bad_grid_or_out_fails_before_any_trial_in_one_line(data_dir, tmp_path, capsys):
    base = base_config(data_dir, tmp_path)
    config_file = base.to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "trials"
    cases = [(["--grid", "model.hidden_size=64,abc"], "model.hidden_size must be a number, got 'abc'"),
             # the data's sequence length was checked only when its trial started
             (["--grid", "lr=1e-3,2e-3", "--grid", "max_seq_length=64,128"],
              "holds sequences of 64 tokens but max_seq_length=128")]
    for grid, message in cases:
        assert main(["--config", str(config_file), *grid, "--out", str(out)]) == 2
        err = capsys.readouterr()
        assert message in err.err and err.err.count("\n") == 1 and "[search] trial" not in err.out
        assert not out.exists()
    out.write_text("a file")  # was "[Errno 17] File exists" after the first trial had started
    assert main(["--config", str(config_file), "--grid", "lr=1e-3", "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert f"--out {out} is a file, not a folder" in err.err and "[search] trial" not in err.out


def test_command_sets_model_fields_as_pretrain_does(data_dir, tmp_path, capsys):
    # `bbert search --set model.hidden_size=64` failed with "model must be a string" (its config
    # skipped the model.X -> model_overrides.X rule that `bbert pretrain --set` follows)
    config_file = base_config(data_dir, tmp_path).to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "trials"
    args = ["--config", str(config_file), "--set", "model.hidden_size=32", "--set", "max_steps=2",
            "--grid", "lr=1e-3", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "lr=0.001" / "config.yaml").read_text())
    assert saved["model"] == "tiny" and saved["max_steps"] == 2
    assert saved["model_overrides"] == {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}
    assert main([*args[:3], "model.hidden_size=abc", *args[4:]]) == 2
    assert "model.hidden_size must be a number, got 'abc'" in capsys.readouterr().err
