"""The budgeted hyperparameter search: trials are run dirs, bad ones stop early, re-runs skip."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from bbert.search import best_trial, budget_saved, main, parse_grid, search, search_table
from bbert.trials import expand_grid, is_finished, trial_name
from bbert.run_dir import EndReason, final_dir, latest_checkpoint, model_dir, read_metrics
from bbert.train_config import TrainConfig
from helpers_train import interrupt_after_first_validation, make_data_dir, tiny_config


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





def assert_refused_in_one_line(base, cases, out, capsys):
    """Each ``(args, message)``: the command exits 2 with ``message`` in one stderr line, before any trial."""
    for args, message in cases:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr()
        assert message in err.err and err.err.count("\n") == 1, (args, err.err)
        assert "[search] trial" not in err.out and not out.exists()

def test_expand_grid_and_names():
    points = expand_grid({"lr": [5e-4, 1e-3], "batch_size": [32, 64]})
    assert points == [{"lr": 5e-4, "batch_size": 32}, {"lr": 5e-4, "batch_size": 64},
                      {"lr": 1e-3, "batch_size": 32}, {"lr": 1e-3, "batch_size": 64}]
    assert trial_name(points[1]) == "lr=0.0005,batch_size=64"
    with pytest.raises(ValueError, match="non-empty list"):
        expand_grid({"lr": []})
    assert parse_grid(["lr=5e-4,1e-3", "warmup_proportion=0.02"]) == {"lr": ["5e-4", "1e-3"],
                                                                        "warmup_proportion": ["0.02"]}


@pytest.mark.slow
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
        assert latest_checkpoint(run_dir).name == f"step-{row['steps']:07d}"
    for row in results[:2]:  # the healthy trials spend their whole budget and end with a validation
        assert row["end_reason"] == "budget" and row["steps"] == 10
        assert row["elapsed_seconds"] == pytest.approx(180.0)
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < 20.0
        assert model_dir(final_dir(out / row["trial"])).is_dir()


@pytest.mark.slow
def test_early_stop_ends_a_diverging_trial(finished_search):
    _, _, out, results = finished_search
    bad = results[2]
    assert bad["end_reason"] in ("early_stop", "nan")
    assert bad["steps"] < 10 and bad["elapsed_seconds"] < 180.0
    assert read_metrics(out / bad["trial"])[-1]["reason"] == bad["end_reason"]
    saved, total = budget_saved(results)
    assert total == pytest.approx(3 * 180.0)
    assert saved == pytest.approx(180.0 - bad["elapsed_seconds"])
    table = search_table(results)
    bad_line = next(line for line in table.splitlines() if line.startswith("| 1000 |"))
    assert f"| {bad['end_reason']} |" in bad_line and "**best**" not in bad_line


@pytest.mark.slow
def test_best_trial_has_the_lowest_final_loss(finished_search):
    _, _, _, results = finished_search
    best = best_trial(results)
    healthy = [r for r in results if r["end_reason"] == "budget"]
    assert best["val_loss"] == min(r["val_loss"] for r in healthy)
    best_line = next(line for line in search_table(results).splitlines() if "**best**" in line)
    assert best_line.startswith(f"| {best['lr']:g} |") and f"{best['val_loss']:.3f}" in best_line
    assert best_trial([{**results[2]}]) is None


@pytest.mark.slow
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


@pytest.mark.slow
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
    from bbert.trials import trial_config

    base = base_config(data_dir, tmp_path)
    params = {"batch": {"batch_size": 16, "debug.step_time_seconds": 36.0}, "lr": 2e-3}
    assert trial_name(params) == "batch_size=16,debug.step_time_seconds=36,lr=0.002"
    config = trial_config(base, params, tmp_path / "t")
    assert (config.batch_size, config.debug.step_time_seconds, config.lr) == (16, 36.0, 2e-3)
    assert config.early_stop == base.early_stop and config.run_dir == str(tmp_path / "t")


def test_grid_values_may_be_lists_and_model_fields(data_dir, tmp_path):
    from bbert.trials import trial_config

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


# ---- the search as an Optuna study (bbert.study): ASHA, a shared storage, re-runs --------------------


def asha_base(data_dir, tmp_path, **debug) -> TrainConfig:
    # 10 simulated steps of 18 s in 3 minutes, validation every minute (at 72, 126 and 180 s): the
    # first rung is the first validation (60 s), the next one (180 s) the budget's end
    return tiny_config(data_dir, tmp_path / "unused", debug={"step_time_seconds": 18.0, **debug},
                       checkpoint_fractions=[], checkpoint_every_minutes=None, log_every_steps=2)


@pytest.fixture(scope="module")
def asha_search(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("asha") / "trials"
    base = asha_base(data_dir, out.parent)
    # GridSampler's fixed shuffle runs the second point first: the healthy lr sets the rung's bar
    grid = {"lr": [1e-8, 1e-3]}
    return base, grid, out, search(base, grid, out, pruner="asha", verbose=False)


def load_study(out):
    import optuna

    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow
def test_asha_prunes_the_trial_that_is_worse_at_a_rung(asha_search):
    _, _, out, (weak, good) = asha_search
    assert (good["lr"], good["end_reason"], good["state"], good["steps"]) == (1e-3, "budget", "COMPLETE", 10)
    assert (weak["lr"], weak["end_reason"], weak["state"]) == (1e-8, "pruned", "PRUNED")
    assert weak["steps"] == 4 and weak["elapsed_seconds"] == pytest.approx(72.0)  # stopped at the first rung
    assert weak["val_loss"] > read_metrics(out / good["trial"], "val")[0]["val_loss"]
    assert read_metrics(out / weak["trial"])[-1]["reason"] == "pruned"
    assert latest_checkpoint(out / weak["trial"]).name == "step-0000004"  # kept, as at an early stop
    assert (out / weak["trial"] / "final" / "model").is_dir()
    study = {t.number: t for t in load_study(out).trials}
    assert [study[r["number"]].state.name for r in (weak, good)] == ["PRUNED", "COMPLETE"]
    assert study[weak["number"]].intermediate_values == {72: pytest.approx(weak["val_loss"])}
    assert study[good["number"]].value == pytest.approx(good["val_loss"])
    assert best_trial([weak, good])["run_dir"] == good["run_dir"]
    assert budget_saved([weak, good]) == (pytest.approx(180.0 - 72.0), pytest.approx(360.0))
    assert "| 1e-08 | pruned | 4 | 40% |" in search_table([weak, good])


@pytest.mark.slow
def test_study_rerun_skips_finished_trials(asha_search):
    base, grid, out, results = asha_search
    before = {r["trial"]: (out / r["trial"] / "metrics.jsonl").read_text() for r in results}
    again = search(base, grid, out, pruner="asha", verbose=False)
    assert all(r["skipped"] for r in again)
    assert [(r["state"], r["number"], r["val_loss"]) for r in again] == \
        [(r["state"], r["number"], r["val_loss"]) for r in results]
    assert {r["trial"]: (out / r["trial"] / "metrics.jsonl").read_text() for r in again} == before
    assert len(load_study(out).trials) == 2  # no new trial was asked for
    from bbert.trials import trial_config
    from bbert.train import pretrain

    pretrain(trial_config(base, {"lr": 1e-8}, out / "lr=1e-08"))  # a pruned run is over, like an early stop
    assert (out / "lr=1e-08" / "metrics.jsonl").read_text() == before["lr=1e-08"]


@pytest.mark.slow
def test_two_processes_share_one_study(data_dir, tmp_path):
    import subprocess

    from helpers_train import PYTHON, REPO, subprocess_env

    # 5 steps of 36 s, each sleeping 0.6 s, so the first process can't take the whole grid alone;
    # the first rung at the budget's end means nothing is pruned: every trial runs to its budget
    base = asha_base(data_dir, tmp_path, step_time_seconds=36.0, sleep_seconds_per_step=0.6)
    config_file = base.to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "trials"
    command = [PYTHON, "-m", "bbert.search", "--config", str(config_file), "--grid", "lr=1e-3,2e-3,3e-3,4e-3",
               "--out", str(out), "--pruner", "asha", "--min-resource-s", "180",
               "--storage", f"sqlite:///{tmp_path / 'shared.db'}", "--study-name", "shared"]
    processes = [subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    import optuna

    trials = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'shared.db'}").trials
    ran = [t for t in trials if not t.user_attrs.get("held")]
    assert sorted(t.params["lr"] for t in ran) == [1e-3, 2e-3, 3e-3, 4e-3]  # each grid point once
    assert all(t.state.name == "COMPLETE" for t in ran)
    assert sorted(t.user_attrs["run_dir"] for t in ran) == sorted(str(out / f"lr={lr:g}") for lr in
                                                                   (1e-3, 2e-3, 3e-3, 4e-3))
    for t in ran:
        assert read_metrics(t.user_attrs["run_dir"])[-1]["reason"] == "budget"
        assert read_metrics(t.user_attrs["run_dir"], "start")[0]["resumed"] is False  # run once, by one process
    names = [{line.split(": ")[-1] for line in o.splitlines() if line.startswith("[search] trial")} for o in outputs]
    assert all(names) and not names[0] & names[1], outputs  # both processes ran trials, none twice
    assert names[0] | names[1] == {f"lr={lr:g}" for lr in (1e-3, 2e-3, 3e-3, 4e-3)}


def test_bad_pruner_or_storage_fails_in_one_line(data_dir, tmp_path, capsys):
    config_file = asha_base(data_dir, tmp_path).to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "trials"
    base = ["--config", str(config_file), "--grid", "lr=1e-3,2e-3", "--out", str(out)]
    cases = [(["--pruner", "sha"], "--pruner 'sha' is not one of none, asha, hyperband"),
             (["--pruner", "asha", "--storage", "study.db"], "--storage 'study.db' is not a database URL"),
             (["--pruner", "asha", "--storage", f"sqlite:///{tmp_path}/no/such/folder/study.db"],
              "could not be opened"),
             (["--pruner", "asha", "--storage", "postgresql+nosuchdriver://host/db"], "could not be opened"),
             (["--storage", f"sqlite:///{tmp_path}/s.db"], "--storage set(s) up an Optuna study: add --pruner asha"),
             (["--pruner", "asha", "--trial", "1"], "drop --trial"),
             (["--pruner", "hyperband", "--n-trials", "3"], "--n-trials 3 must be between 1 and the grid's 2"),
             (["--pruner", "asha", "--reduction-factor", "1"], "--reduction-factor >= 2 (got 1)")]
    assert_refused_in_one_line(base, cases, out, capsys)


@pytest.mark.slow
def test_interrupted_study_trial_is_queued_again_and_resumed(data_dir, tmp_path):
    from helpers_train import PYTHON

    base = asha_base(data_dir, tmp_path, sleep_seconds_per_step=0.5)
    out = tmp_path / "trials"
    command = [PYTHON, "-m", "bbert.search", "--config", str(base.to_yaml(tmp_path / "base.yaml")),
               "--grid", "lr=1e-3", "--out", str(out), "--pruner", "asha"]
    returncode, stdout, stderr = interrupt_after_first_validation(command)
    assert returncode == 130 and "queued again" in stdout + stderr, (stdout, stderr)
    assert read_metrics(out / "lr=0.001")[-1]["reason"] == "interrupted"

    rows = search(base, {"lr": [1e-3]}, out, pruner="asha", verbose=False)
    assert (rows[0]["end_reason"], rows[0]["state"], rows[0]["number"], rows[0]["steps"]) == ("budget", "COMPLETE", 1, 10)
    assert [r["resumed"] for r in read_metrics(out / "lr=0.001", "start")] == [False, True]
    first, retry = load_study(out).trials
    assert (first.state.name, first.user_attrs["end_reason"]) == ("FAIL", "interrupted")
    assert retry.system_attrs["failed_trial"] == 0 and 72 in retry.intermediate_values  # its report carried over


def test_a_pruned_trial_is_finished_and_stopped_early_but_never_the_best(tmp_path):
    rows = [{"trial": "a", "end_reason": "budget", "val_loss": 3.0, "budget_seconds": 100.0, "elapsed_seconds": 100.0},
            {"trial": "b", "end_reason": "pruned", "val_loss": 2.0, "budget_seconds": 100.0, "elapsed_seconds": 25.0},
            {"trial": "c", "end_reason": "interrupted", "val_loss": 1.0, "budget_seconds": 100.0,
             "elapsed_seconds": 50.0}]
    assert best_trial(rows)["trial"] == "a"
    assert budget_saved(rows) == (75.0, 300.0)  # the interrupted trial will be resumed: nothing saved
    for reason, finished in ((EndReason.PRUNED, True), (EndReason.INTERRUPTED, False)):
        run = tmp_path / reason
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"type": "end", "reason": reason, "step": 3}) + "\n")
        assert is_finished(run) is finished


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


# ---- sampled searches: --sampler tpe|random over --range and --grid fields -------------------------


def sampled_trials(out, study_name=None):
    import optuna

    study = optuna.load_study(study_name=study_name or out.name, storage=f"sqlite:///{out / 'study.db'}")
    return [t for t in study.trials if not t.user_attrs.get("held")]


@pytest.mark.slow
def test_tpe_samples_every_trial_inside_its_ranges(data_dir, tmp_path, capsys):
    config_file = asha_base(data_dir, tmp_path).to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "tpe"
    assert main(["--config", str(config_file), "--sampler", "tpe", "--range", "lr=1e-4:3e-3:log",
                 "--range", "warmup_proportion=0:0.1", "--grid", "batch_size=4,8", "--n-trials", "3",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    trials = sampled_trials(out)
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 3 and "best: " in printed
    for run_dir in run_dirs:
        saved = yaml.safe_load((tmp_path / "tpe" / run_dir.split("/")[-1] / "config.yaml").read_text())
        assert 1e-4 <= saved["lr"] <= 3e-3 and 0.0 <= saved["warmup_proportion"] <= 0.1
        assert saved["batch_size"] in (4, 8)
        assert run_dir.endswith(f"batch_size={saved['batch_size']},lr={saved['lr']:g},"  # grid fields, then ranges
                                f"warmup_proportion={saved['warmup_proportion']:g}")  # the name is the exact config
        assert read_metrics(run_dir)[-1]["reason"] == "budget"


@pytest.mark.slow
def test_random_sampler_with_a_seed_is_reproducible(data_dir, tmp_path):
    from bbert.study import Range

    base = asha_base(data_dir, tmp_path)
    ranges = {"lr": Range(1e-4, 3e-3, log=True), "max_steps": Range(2, 5)}
    runs = [search(base, {}, tmp_path / name, sampler="random", ranges=ranges, n_trials=3, sampler_seed=7,
                   verbose=False) for name in ("a", "b")]
    points = [[(r["lr"], r["max_steps"]) for r in rows] for rows in runs]
    assert points[0] == points[1] and len(set(points[0])) == 3
    for lr, max_steps in points[0]:
        assert 1e-4 <= lr <= 3e-3 and isinstance(max_steps, int) and 2 <= max_steps <= 5
    assert [r["end_reason"] for r in runs[0]] == ["max_steps"] * 3
    assert [r["steps"] for r in runs[0]] == [p[1] for p in points[0]]
    again = search(base, {}, tmp_path / "a", sampler="random", ranges=ranges, n_trials=3, sampler_seed=7,
                   verbose=False)
    assert all(r["skipped"] for r in again) and len(sampled_trials(tmp_path / "a")) == 3  # a re-run adds none


@pytest.mark.slow
def test_two_processes_share_one_sampled_study(data_dir, tmp_path):
    import subprocess

    from helpers_train import PYTHON, REPO, subprocess_env

    base = asha_base(data_dir, tmp_path, step_time_seconds=36.0, sleep_seconds_per_step=0.6)
    out = tmp_path / "trials"
    command = [PYTHON, "-m", "bbert.search", "--config", str(base.to_yaml(tmp_path / "base.yaml")),
               "--sampler", "random", "--range", "lr=1e-4:3e-3:log", "--n-trials", "4", "--out", str(out)]
    processes = [subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    trials = sampled_trials(out)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)  # 4 in total, not 4 each
    run_dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        assert [r["resumed"] for r in read_metrics(run_dir, "start")] == [False]  # run once, by one process
    names = [{line.split(": ")[-1] for line in o.splitlines() if line.startswith("[search] trial")} for o in outputs]
    assert all(names) and not names[0] & names[1], outputs  # both processes ran trials, none twice
    assert names[0] | names[1] == {r.split("/")[-1] for r in run_dirs}


def test_parse_ranges_keeps_ints_and_reads_log():
    from bbert.search import parse_ranges
    from bbert.study import Range

    ranges = parse_ranges(["lr=1e-4:3e-3:log", "warmup_proportion=0:0.1", "max_steps=10:40"])
    assert ranges == {"lr": Range(1e-4, 3e-3, True), "warmup_proportion": Range(0.0, 0.1, False),
                      "max_steps": Range(10, 40, False)}
    assert isinstance(ranges["warmup_proportion"].lo, float) and isinstance(ranges["max_steps"].hi, int)


def test_bad_ranges_fail_in_one_line(data_dir, tmp_path, capsys):
    config_file = asha_base(data_dir, tmp_path).to_yaml(tmp_path / "base.yaml")
    out = tmp_path / "trials"
    base = ["--config", str(config_file), "--out", str(out)]
    tpe = ["--sampler", "tpe", "--n-trials", "2"]
    cases = [([*tpe, "--range", "lr=3e-3:1e-4"], "--range lr=0.003:0.0001 is empty"),
             ([*tpe, "--range", "lr=0:1e-3:log"], "is on a log scale, which needs a low end above 0"),
             ([*tpe, "--range", "lrr=1e-4:1e-3"], "unknown config field 'lrr'"),
             ([*tpe, "--range", "lr=a:1"], "--range 'lr=a:1' must look like FIELD=LO:HI"),
             ([*tpe, "--range", "warmup_proportion=0:1.5"], "warmup_proportion"),
             ([*tpe, "--range", "lr=1e-4:1e-3", "--grid", "lr=1e-3"], "--range lr is given twice"),
             (["--range", "lr=1e-4:1e-3"], "--range needs --sampler tpe or random"),
             (["--sampler", "tpe", "--range", "lr=1e-4:1e-3"], "--sampler tpe needs --n-trials N"),
             (["--sampler", "bayes", "--range", "lr=1e-4:1e-3"], "--sampler 'bayes' is not one of grid, tpe, random"),
             ([*tpe, "--range", "lr=1e-4:1e-3", "--trial", "0"], "drop --trial"),
             ([*tpe, "--range", "lr=1e-4:1e-3", "--min-resource-s", "60"], "add --pruner asha")]
    assert_refused_in_one_line(base, cases, out, capsys)


@pytest.mark.slow
def test_an_interrupted_sampled_trial_resumes_with_its_values(data_dir, tmp_path):
    from bbert.study import Range
    from helpers_train import PYTHON

    base = asha_base(data_dir, tmp_path, sleep_seconds_per_step=0.5)
    out = tmp_path / "trials"
    command = [PYTHON, "-m", "bbert.search", "--config", str(base.to_yaml(tmp_path / "base.yaml")),
               "--sampler", "random", "--range", "lr=1e-3:2e-3", "--n-trials", "1", "--out", str(out)]
    returncode, _, _ = interrupt_after_first_validation(command)
    assert returncode == 130
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("lr=")]
    assert read_metrics(run_dir)[-1]["reason"] == "interrupted"

    rows = search(base, {}, out, sampler="random", ranges={"lr": Range(1e-3, 2e-3)}, n_trials=1, verbose=False)
    assert [(r["run_dir"], r["end_reason"], r["state"], r["number"], r["steps"]) for r in rows] == \
        [(str(run_dir), "budget", "COMPLETE", 1, 10)]  # the same values, continued from the checkpoint
    assert [r["resumed"] for r in read_metrics(run_dir, "start")] == [False, True]
