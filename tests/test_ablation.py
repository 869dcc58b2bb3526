"""The ablation of post-2021 options: overrides that build valid runs, the ratio and time-to-loss
arithmetic, the tables and the figure, and (slow) real runs on a simulated clock."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bbert import ablation
from bbert.ablation import (OPTIONS, ablation_table, budget_config, combinations_table, compare, loss_curve,
                            options_on, options_table, run_ablation, run_result, search_combinations, search_grid,
                            time_to_reach, write_sample_sources)
from bbert.run_dir import MetricsLog
from helpers_train import make_data_dir, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("ablation-data") / "data")


def write_run(run_dir, curve, steps=40, speeds=(30.0, 10.0, 31.0)):
    """A run dir holding only metrics: training speeds, validation records at ``curve`` and an end record."""
    run_dir.mkdir(parents=True)
    log = MetricsLog(run_dir, tensorboard=False, enabled=True)
    log.write({"type": "start", "step": 0, "elapsed_seconds": 0.0})
    for i, speed in enumerate(speeds, 1):
        log.write({"type": "train", "step": i, "elapsed_seconds": float(i), "loss": 9.0, "seq_per_s": speed})
    for i, (seconds, loss) in enumerate(curve, 1):
        log.write({"type": "val", "step": i * steps // len(curve), "elapsed_seconds": seconds, "val_loss": loss})
    log.write({"type": "end", "reason": "budget", "step": steps, "elapsed_seconds": curve[-1][0]})
    log.close()
    return run_dir


# ---- the options build real configs -----------------------------------------------------------

@pytest.mark.parametrize("opt", OPTIONS, ids=[o.name for o in OPTIONS])
def test_each_option_builds_a_valid_run_with_its_settings(opt, data_dir, tmp_path):
    base = tiny_config(data_dir, tmp_path / "unused")
    on = budget_config(base, tmp_path / opt.name, 90.0, [opt.name])
    off = ablation.trial_config(base, {**opt.off, "time_budget_hours": 90 / 3600}, tmp_path / "off")
    for config, values in ((on, opt.on), (off, opt.off)):
        config.validate()
        assert config.time_budget_seconds == pytest.approx(90.0)
        model = config.model_config(vocab_size=2048)
        for key, value in values.items():
            group, _, leaf = key.rpartition(".")
            holder = model if group == "model" else getattr(config, group) if group else config
            assert getattr(holder, leaf) == value, f"{opt.name}: {key} is {getattr(holder, leaf)!r}, want {value!r}"
    assert on.run_dir == str(tmp_path / opt.name)


def test_options_are_documented_and_unknown_names_are_refused():
    names = [o.name for o in OPTIONS]
    assert len(set(names)) == len(names)
    for o in OPTIONS:
        assert o.source and o.anchor and set(o.off) <= set(o.on)
    assert ablation.overrides(["mask30", "wsd"]) == {"masking.mlm_probability": 0.3, "lr_schedule": "wsd",
                                                      "decay_proportion": 0.2}
    assert ablation.overrides([]) == {}
    with pytest.raises(ValueError, match="unknown option 'flash'"):
        ablation.option("flash")
    with pytest.raises(ValueError, match="budget_s must be > 0"):
        budget_config(None, "x", 0.0)
    table = options_table()
    assert table.count("\n") == len(OPTIONS) + 1 and "`masking.mlm_probability=0.3`" in table


def test_search_grid_is_off_then_on_and_decodes_back():
    grid = search_grid(["mask30", "no_bias"])
    assert grid == {"mask30": [{"masking.mlm_probability": 0.15}, {"masking.mlm_probability": 0.3}],
                    "no_bias": [{"model.bias": True}, {"model.bias": False}]}
    row = {"mask30": {"masking.mlm_probability": 0.3}, "no_bias": {"model.bias": True}}
    assert options_on(row, ["mask30", "no_bias"]) == ["mask30"]


def test_combinations_table_ranks_trials_and_names_their_options():
    rows = [{"options_on": [], "run_dir": "a", "end_reason": "budget", "steps": 20, "elapsed_seconds": 60.0,
             "budget_seconds": 60.0, "val_loss": 5.0},
            {"options_on": ["mask30", "wsd"], "run_dir": "b", "end_reason": "budget", "steps": 20,
             "elapsed_seconds": 60.0, "budget_seconds": 60.0, "val_loss": 4.5},
            {"options_on": ["rope"], "run_dir": "c", "end_reason": "pruned", "steps": 4, "elapsed_seconds": 15.0,
             "budget_seconds": 60.0, "val_loss": 7.0}]
    lines = combinations_table(rows).splitlines()
    assert lines[2] == "| **mask30 + wsd** | budget | 20 | 100% | 4.5000 |"  # best first, in bold
    assert lines[3] == "| none (the plain recipe) | budget | 20 | 100% | 5.0000 |"
    assert lines[4] == "| rope | pruned | 4 | 25% | 7.0000 |"


# ---- ratio and time to loss -----------------------------------------------------------------

def test_time_to_reach_interpolates_between_validations():
    curve = [(10.0, 8.0), (20.0, 6.0), (30.0, 5.0), (40.0, 4.0)]
    assert time_to_reach(curve, 7.0, 40.0) == pytest.approx(15.0 / 40)   # half-way from 8 to 6
    assert time_to_reach(curve, 4.0, 40.0) == pytest.approx(1.0)
    assert time_to_reach(curve, 9.0, 40.0) == pytest.approx(10.0 / 40)   # met at the first point
    assert time_to_reach(curve, 3.9, 40.0) is None
    assert time_to_reach([(5.0, 7.0), (10.0, 7.5), (15.0, 6.0)], 6.5, 20.0) == pytest.approx(
        (10 + 5 * (7.5 - 6.5) / 1.5) / 20)  # from the last point above the target, not the first


def test_compare_reads_run_dirs_and_gives_ratio_and_time(tmp_path):
    base = write_run(tmp_path / "baseline", [(15.0, 7.0), (30.0, 6.0), (45.0, 5.5), (60.0, 5.0)])
    fast = write_run(tmp_path / "fast", [(15.0, 6.0), (30.0, 5.0), (45.0, 4.6), (60.0, 4.5)])
    slow = write_run(tmp_path / "slow", [(15.0, 7.5), (30.0, 6.5), (45.0, 6.0), (60.0, 5.5)])
    rows = compare([run_result("baseline", base, 60.0), run_result("fast", fast, 60.0, ["wsd"]),
                    run_result("slow", slow, 60.0, ["rope"])])
    by = {r["name"]: r for r in rows}
    assert loss_curve(fast)[-1] == (60.0, 4.5)
    assert by["baseline"]["ratio"] == 1.0 and by["baseline"]["time_to_baseline"] == pytest.approx(1.0)
    assert by["fast"]["ratio"] == pytest.approx(4.5 / 5.0) and by["fast"]["time_to_baseline"] == pytest.approx(0.5)
    assert by["slow"]["ratio"] == pytest.approx(1.1) and by["slow"]["time_to_baseline"] is None
    assert by["fast"]["steps"] == 40 and by["fast"]["end_reason"] == "budget" and by["fast"]["options"] == ["wsd"]
    assert by["fast"]["seq_per_s"] == 30.0  # the median: one slow logging interval does not move it
    table = ablation_table(rows)
    assert "| fast | 40 | 30.0 | 4.5000 | 0.900 | 0.50 |" in table
    assert "| slow | 40 | 30.0 | 5.5000 | 1.100 | never |" in table
    assert ablation.best_combination(rows) == ["wsd"]
    searched = {"best": {"val_loss": 4.4}, "best_options": ["mask30", "rope"]}
    assert ablation.best_combination(rows, searched) == ["mask30", "rope"]
    assert ablation.best_combination(rows[:1], {"best": None, "best_options": None}) is None  # the plain recipe
    with pytest.raises(ValueError, match="no row named 'baseline'"):
        compare(rows[1:])


def test_write_sample_sources_keeps_only_those_sources(tmp_path):
    from bbert.data import read_sample_corpus

    path = write_sample_sources(tmp_path / "wordnet.jsonl", ["wordnet"])
    lines = path.read_text().splitlines()
    assert len(lines) == len(read_sample_corpus(source="wordnet")) > 0
    assert set(json.loads(lines[0])) == {"text"}
    mixed = write_sample_sources(tmp_path / "mixed.jsonl", ["kjv", "wordnet"]).read_text().splitlines()
    kjv, wordnet = read_sample_corpus(source="kjv"), read_sample_corpus(source="wordnet")
    assert len(mixed) == len(kjv) + len(wordnet)  # alternating, so a max_bytes cut keeps both
    assert [json.loads(x)["text"] for x in mixed[:4]] == [kjv[0]["text"], wordnet[0]["text"],
                                                         kjv[1]["text"], wordnet[1]["text"]]
    with pytest.raises(ValueError, match="no documents"):
        write_sample_sources(tmp_path / "none.jsonl", ["wikipedia"])


def test_loss_vs_wall_clock_figure(tmp_path):
    from bbert.plot import plot_loss_vs_wall_clock

    curves = {"baseline": [(30.0, 6.0), (60.0, 5.0)], "wsd": [(30.0, 6.2), (60.0, 4.8)]}
    ax = plot_loss_vs_wall_clock(curves).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["baseline"].get_linewidth() > lines["wsd"].get_linewidth()
    assert list(lines["wsd"].get_xdata()) == [30.0, 60.0] and "seconds" in ax.get_xlabel()
    hours = plot_loss_vs_wall_clock({"baseline": [(3600.0, 3.0), (6 * 3600.0, 2.0)]}).axes[0]
    assert "hours" in hours.get_xlabel() and list(hours.get_lines()[0].get_xdata()) == [1.0, 6.0]


# ---- real runs (simulated clock) --------------------------------------------------------------

@pytest.mark.slow
def test_run_ablation_trains_each_option_at_the_same_budget_and_skips_finished_runs(data_dir, tmp_path):
    base = tiny_config(data_dir, tmp_path / "unused", checkpoint_fractions=[], checkpoint_every_minutes=None,
                       debug={"step_time_seconds": 6.0}, validation_every_minutes=0.5)
    out = tmp_path / "ablation"
    rows = run_ablation(base, out, budget_s=90.0, options=["mask30", "wsd"], combinations=[["mask30", "wsd"]],
                        verbose=False)
    assert [r["name"] for r in rows] == ["baseline", "mask30", "wsd", "mask30+wsd"]
    for row in rows:
        assert row["end_reason"] == "budget" and row["steps"] == 15  # 90 s of 6-second steps, each run
        assert row["curve"][-1][0] == pytest.approx(90.0) and math.isfinite(row["final_val_loss"])
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[1]["final_val_loss"] / rows[0]["final_val_loss"])
    wsd = ablation.TrainConfig.from_yaml(out / "mask30+wsd" / "config.yaml")
    assert wsd.lr_schedule == "wsd" and wsd.masking.mlm_probability == 0.3
    before = (out / "wsd" / "metrics.jsonl").stat().st_mtime_ns
    again = run_ablation(base, out, budget_s=90.0, options=["mask30", "wsd"], combinations=[["mask30", "wsd"]],
                         verbose=False)
    assert (out / "wsd" / "metrics.jsonl").stat().st_mtime_ns == before  # read, not run again
    assert [r["final_val_loss"] for r in again] == [r["final_val_loss"] for r in rows]


@pytest.mark.slow
def test_search_combinations_runs_an_asha_study_over_the_on_off_grid(data_dir, tmp_path, capfd):
    base = tiny_config(data_dir, tmp_path / "unused", checkpoint_fractions=[], checkpoint_every_minutes=None,
                       debug={"step_time_seconds": 6.0}, validation_every_minutes=0.5)
    found = search_combinations(base, tmp_path / "search", 90.0, n_trials=3, options=["mask30", "wsd"],
                                verbose=False)
    out, err = capfd.readouterr()
    assert "[bbert]" not in out and "Trial" not in err  # quiet: no progress lines, no Optuna log lines
    rows = found["rows"]
    assert len(rows) == 3 and len({r["run_dir"] for r in rows}) == 3  # 3 of the 4 combinations, each once
    assert (tmp_path / "search" / "study.db").is_file()
    for row in rows:
        assert row["end_reason"] in ("budget", "pruned") and row["budget_seconds"] == pytest.approx(90.0)
        assert set(row["options_on"]) <= {"mask30", "wsd"}
    best = found["best"]
    assert best["val_loss"] == min(r["val_loss"] for r in rows if r["end_reason"] == "budget")
    assert found["best_options"] == best["options_on"]


# ---- the fair head-to-head: interval, plateau rung, tuned baseline, seeds -------------------------

def test_paired_ratio_interval_matches_scipys_one_sample_t_interval_on_log_ratios():
    from scipy import stats

    baseline, other = [5.0, 5.2, 4.9, 5.1], [4.6, 4.9, 4.7, 4.5]
    got = ablation.paired_ratio_interval(baseline, other)
    logs = [math.log(o / b) for b, o in zip(baseline, other)]
    want = stats.ttest_1samp(logs, 0.0).confidence_interval(0.95)
    assert got["ratios"] == pytest.approx([o / b for b, o in zip(baseline, other)])
    assert got["ratio"] == pytest.approx(math.exp(sum(logs) / 4))
    assert (got["low"], got["high"]) == pytest.approx((math.exp(want.low), math.exp(want.high)))
    assert got["low"] < got["ratio"] < got["high"] < 1 and got["n"] == 4
    wider = ablation.paired_ratio_interval(baseline, other, confidence=0.99)
    assert wider["low"] < got["low"] and wider["high"] > got["high"]
    one = ablation.paired_ratio_interval([5.0], [4.0])
    assert one["ratio"] == pytest.approx(0.8) and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError, match="one baseline loss per seed"):
        ablation.paired_ratio_interval([5.0, 5.1], [4.0])


def test_first_rung_is_the_first_validation_below_the_plateau():
    # falls fast from ln(vocab), flattens at 7.0 (18 s), then leaves the plateau
    curve = [(6.0, 8.5), (12.0, 7.1), (18.0, 7.0), (24.0, 6.9), (30.0, 6.6), (36.0, 6.0), (42.0, 5.5)]
    assert ablation.plateau(curve) == (18.0, 7.0)           # 7.0 > 0.98 * 7.1: the first flat step
    assert ablation.plateau(curve, flat=0.2) == (12.0, 7.1)  # 7.1 > 0.8 * 8.5
    assert ablation.first_rung(curve) == 30.0               # 6.6 <= 0.95 * 7.0 = 6.65
    assert ablation.first_rung(curve, drop=0.1) == 36.0     # 6.0 <= 6.3
    assert ablation.first_rung(curve, drop=0.01) == 24.0    # 6.9 <= 6.93
    never = [(6.0, 8.5), (12.0, 7.0), (18.0, 6.95), (24.0, 6.8)]
    assert ablation.first_rung(never) is None                # 6.8 > 0.95 * 6.95
    steep = [(6.0, 8.0), (12.0, 7.0), (18.0, 6.0)]            # never flat: the first validation
    assert ablation.plateau(steep) == (6.0, 8.0) and ablation.first_rung(steep) == 12.0
    rows = [{"name": "baseline", "curve": never}, {"name": "wsd", "curve": never},
            {"name": "rope", "curve": curve}, {"name": "mask30", "curve": steep}]
    assert ablation.pilot_rung(rows, 60.0)[0] == 12.0  # the plain recipe stays: mask30 leaves first
    assert "mask30" in ablation.pilot_rung(rows, 60.0)[1]
    assert ablation.pilot_rung([{"name": "baseline", "curve": curve}] + rows[1:], 60.0)[0] == 30.0
    assert ablation.pilot_rung(rows[:2], 60.0) == (20.0, "no run left its plateau by 5%: a third of the budget")
    with pytest.raises(ValueError, match="no validation"):
        ablation.first_rung([])
    with pytest.raises(ValueError, match="fractions"):
        ablation.first_rung(curve, drop=5)


def test_summarize_pairs_seeds_and_ranks_against_each_baseline():
    def row(name, seed, loss):
        return {"name": name, "seed": seed, "final_val_loss": loss}

    rows = [row("baseline", 0, 5.0), row("tuned", 0, 4.8), row("best", 0, 4.5),
            row("baseline", 1, 5.4), row("tuned", 1, 5.0), row("best", 1, 4.6),
            row("baseline", 2, 5.2), row("tuned", 2, 5.1), row("best", 2, 4.9)]
    summary = {s["name"]: s for s in ablation.summarize(rows, baselines=("baseline", "tuned"))}
    best = summary["best"]
    assert best["mean"] == pytest.approx(14.0 / 3) and best["std"] == pytest.approx(0.2082, abs=1e-4)
    assert best["vs"]["tuned"]["ratios"] == pytest.approx([4.5 / 4.8, 4.6 / 5.0, 4.9 / 5.1])
    assert best["vs"]["baseline"]["ratio"] < best["vs"]["tuned"]["ratio"] < 1
    assert set(summary["baseline"]["vs"]) == {"tuned"}
    assert set(summary["tuned"]["vs"]) == {"baseline"}
    table = ablation.head_to_head_table(list(summary.values())).splitlines()
    assert table[0] == ("| run | seeds | final val loss, mean ± sd | ratio to baseline [95% interval] "
                        "| ratio to tuned [95% interval] |")
    v = best["vs"]["tuned"]
    u = best["vs"]["baseline"]
    assert table[-1] == (f"| best | 3 | 4.6667 ± 0.2082 | {u['ratio']:.3f} [{u['low']:.3f}, {u['high']:.3f}] "
                         f"| {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}] |")
    assert table[2].endswith("| 1 | " + "{:.3f}".format(summary["baseline"]["vs"]["tuned"]["ratio"])
                             + f" [{summary['baseline']['vs']['tuned']['low']:.3f}, "
                             + f"{summary['baseline']['vs']['tuned']['high']:.3f}] |")
    assert ablation.median_seed_run(rows, "best")["seed"] == 1  # 4.6 of 4.5, 4.6, 4.9
    assert ablation.median_seed_run(rows[:6], "tuned")["seed"] == 0  # even count: the lower middle
    with pytest.raises(ValueError, match="no run named 'nope'"):
        ablation.median_seed_run(rows, "nope")


def test_baseline_grid_scales_lr_and_batch_and_keeps_micro_batches_dividing(data_dir, tmp_path):
    base = tiny_config(data_dir, tmp_path / "unused", batch_size=8, micro_batch_size=4, lr=1e-3)
    grid = ablation.baseline_grid(base)
    assert grid["lr"] == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3])
    assert grid["batch_size"] == [{"batch_size": 4, "micro_batch_size": 4}, {"batch_size": 8, "micro_batch_size": 4},
                                  {"batch_size": 16, "micro_batch_size": 4}]


@pytest.mark.slow
def test_tune_baseline_and_head_to_head_on_a_tiny_run(data_dir, tmp_path):
    base = tiny_config(data_dir, tmp_path / "unused", checkpoint_fractions=[], checkpoint_every_minutes=None,
                       debug={"step_time_seconds": 6.0}, validation_every_minutes=0.5)
    grid = {"lr": [1e-3, 4e-3], "batch_size": [{"batch_size": 8, "micro_batch_size": 4}]}
    tuned = ablation.tune_baseline(base, tmp_path / "tune", 60.0, n_trials=2, grid=grid, verbose=False,
                                   min_resource_s=30)
    rows = tuned["rows"]
    assert len(rows) == 2 and {r["options_on"][0] for r in rows} == {"lr=0.001", "lr=0.004"}
    best = tuned["best"]
    assert best["val_loss"] == min(r["val_loss"] for r in rows if r["end_reason"] == "budget")
    assert tuned["overrides"] == {"lr": best["lr"], "batch_size": 8, "micro_batch_size": 4}
    never = ablation.tune_baseline(base, tmp_path / "tune", 60.0, n_trials=2, grid=grid, verbose=False,
                                   min_resource_s=30, plain_loss=0.0)  # the untuned run was better
    assert never["overrides"] == {} and never["best"]["run_dir"] == best["run_dir"]

    arms = {"baseline": {}, "tuned baseline": tuned["overrides"], "best combination": ablation.overrides(["wsd"])}
    final = ablation.head_to_head(base, tmp_path / "final", 60.0, arms, seeds=[0, 1], verbose=False)
    assert [(r["name"], r["seed"]) for r in final] == [(n, s) for s in (0, 1) for n in arms]
    for r in final:
        saved = ablation.TrainConfig.from_yaml(f"{r['run_dir']}/config.yaml")
        assert saved.seed == r["seed"] and r["end_reason"] == "budget" and r["steps"] == 10
    tuned_cfg = ablation.TrainConfig.from_yaml(f"{final[1]['run_dir']}/config.yaml")
    assert tuned_cfg.lr == best["lr"] and tuned_cfg.lr_schedule == "linear"
    assert ablation.TrainConfig.from_yaml(f"{final[2]['run_dir']}/config.yaml").lr_schedule == "wsd"
    seed0 = {r["name"]: r["final_val_loss"] for r in final if r["seed"] == 0}
    seed1 = {r["name"]: r["final_val_loss"] for r in final if r["seed"] == 1}
    assert seed0["baseline"] != seed1["baseline"]  # the seed reached the run
    summary = {s["name"]: s for s in ablation.summarize(final, baselines=("baseline", "tuned baseline"))}
    assert summary["best combination"]["vs"]["tuned baseline"]["ratios"] == pytest.approx(
        [seed0["best combination"] / seed0["tuned baseline"], seed1["best combination"] / seed1["tuned baseline"]])
    from bbert import glue

    task = glue.make_corpus_source_task(tmp_path / "task", train_per_source=20, eval_per_source=10)
    tune = glue.FinetuneConfig(lr=2e-3, batch_size=16, num_epochs=1, progress=False, save_best_model=False)
    downstream = ablation.finetune_arms(final, ["best combination"], task, tmp_path / "finetune", tune,
                                        seeds=(0, 1, 2))
    median = ablation.median_seed_run(final, "best combination")
    assert list(downstream) == ["best combination"]
    got = downstream["best combination"]
    assert got["seed"] == median["seed"] and got["run_dir"] == median["run_dir"] and got["metric"] == "accuracy"
    results = [json.loads((tmp_path / "finetune" / "best_combination" / f"seed{s}" / "result.json").read_text())
               for s in (0, 1, 2)]
    assert [r["seed"] for r in results] == [0, 1, 2]  # one finetuning run per seed
    assert got["scores"] == [r["score"] for r in results] and got["score"] == sorted(got["scores"])[1]
    assert all(0 <= score <= 1 for score in got["scores"])
    assert results[0]["model_path"] == str(Path(median["run_dir"]).resolve())
