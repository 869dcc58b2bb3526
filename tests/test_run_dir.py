"""bbert.run_dir: the metrics history across resumes, the latest checkpoint, pruning, RNG state."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from bbert import run_dir as rd


def write_lines(path, records, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def make_checkpoint(folder, step: int) -> None:
    folder.mkdir(parents=True)
    rd.write_budget(folder, {"step": step})


def test_read_metrics_drops_what_a_killed_run_wrote_after_its_resume_point(tmp_path):
    first = [{"type": "start", "step": 0, "resumed": False}]
    first += [{"type": "train", "step": s, "loss": 10.0 - s} for s in range(1, 6)]
    first.insert(4, {"type": "checkpoint", "name": "step-0000003", "step": 3})
    resumed = [{"type": "start", "step": 3, "resumed": True},
               {"type": "train", "step": 4, "loss": 0.4}, {"type": "train", "step": 5, "loss": 0.5},
               {"type": "end", "reason": "budget", "step": 5}]
    # the kill cut the first run's last line short; the resumed run starts on a new line
    path = tmp_path / "run" / "metrics.jsonl"
    write_lines(path, first, tail='{"type": "tra')
    log = rd.MetricsLog(tmp_path / "run", tensorboard=False, enabled=True)
    for record in resumed:
        log.write(record)
    log.close()
    history = rd.read_metrics(tmp_path / "run")
    train = [(r["step"], r["loss"]) for r in history if r["type"] == "train"]
    assert train == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.4), (5, 0.5)]  # the resumed run's 4 and 5
    assert [r["type"] for r in history].count("start") == 2
    assert rd.read_metrics(tmp_path / "run" / "metrics.jsonl", "end") == [resumed[-1]]
    assert [r["step"] for r in rd.read_metrics(tmp_path / "run", "train")] == [1, 2, 3, 4, 5]
    # a fresh (not resumed) start begins a new history
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "start", "step": 0, "resumed": False}) + "\n")
    assert [r["type"] for r in rd.read_metrics(tmp_path / "run")] == ["start"]
    assert rd.read_metrics(tmp_path / "nothing") == []


def test_metrics_tail_returns_each_record_once_and_waits_for_unfinished_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = rd.MetricsTail(tmp_path)
    assert tail.new_records() == []
    path.write_text('{"step": 1}\n{"st')
    assert tail.new_records() == [{"step": 1}]
    with open(path, "a") as f:
        f.write('ep": 2}\n')
    assert tail.new_records() == [{"step": 2}]
    assert tail.new_records() == []


def test_latest_checkpoint_is_the_highest_step_not_the_newest_folder(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(rd.step_checkpoint(run, 100), 100)
    make_checkpoint(rd.marker_checkpoint(run, 0.5), 50)
    make_checkpoint(rd.step_checkpoint(run, 20), 20)
    os.utime(rd.step_checkpoint(run, 100), (1, 1))  # the most advanced one is the oldest on disk
    (rd.checkpoints_dir(run) / "step-0000999").mkdir()  # no budget.json: never finished
    (rd.checkpoints_dir(run) / ".tmp-step-0000500-x").mkdir()  # a killed save's leftovers
    assert rd.latest_checkpoint(run) == rd.step_checkpoint(run, 100)
    assert [step for step, _ in rd.list_checkpoints(run)] == [20, 50, 100]
    assert rd.step_checkpoint(run, 100).name == "step-0000100"
    assert rd.marker_checkpoint(run, 0.25).name == "marker-0.25"
    assert rd.latest_checkpoint(tmp_path / "empty") is None


def test_prune_keeps_the_last_periodic_checkpoints_and_every_marker(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        make_checkpoint(rd.step_checkpoint(run, step), step)
    make_checkpoint(rd.marker_checkpoint(run, 0.25), 5)
    rd.prune_checkpoints(run, keep=2)
    assert sorted(p.name for _, p in rd.list_checkpoints(run)) == ["marker-0.25", "step-0000020", "step-0000030"]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    rd.save_rng(tmp_path, rank=3, device=torch.device("cpu"))
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert rd.load_rng(tmp_path, rank=0) is None  # another rank's file
    rd.restore_rng(rd.load_rng(tmp_path, rank=3), torch.device("cpu"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


def test_check_run_dir_refuses_a_file_the_data_dir_and_a_folder_of_other_files(tmp_path):
    import pytest

    data = tmp_path / "data"
    data.mkdir()
    rd.check_run_dir(tmp_path / "new", data)  # new or empty: fine
    (tmp_path / "empty").mkdir()
    rd.check_run_dir(tmp_path / "empty", data)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"a.txt is a file; choose a folder for --run-dir"):
        rd.check_run_dir(tmp_path / "a.txt", data)  # was "[Errno 17] File exists"
    for inside in (data, data / "run"):  # checkpoints mixed into the shards
        with pytest.raises(ValueError, match=r"lies inside the data dir .*data.*choose a --run-dir outside it"):
            rd.check_run_dir(inside, data)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "book.txt").write_text("A user's own text.")
    with pytest.raises(ValueError, match=r"texts holds other files \(book.txt\) and is not a run dir"):
        rd.check_run_dir(texts, data)
    run = tmp_path / "run"
    run.mkdir()
    (run / rd.CONFIG_FILE).write_text("lr: 0.001\n")  # bbert.launch writes config.yaml first
    rd.check_run_dir(run, data)


def test_end_reasons_are_the_strings_on_disk(tmp_path):
    reasons = {r.name: r.value for r in rd.EndReason}
    assert reasons == {"BUDGET": "budget", "MAX_STEPS": "max_steps", "EARLY_STOP": "early_stop", "NAN": "nan",
                       "INTERRUPTED": "interrupted", "PRUNED": "pruned"}
    reason = rd.EndReason.PRUNED
    assert reason == "pruned" and rd.EndReason("pruned") is reason
    assert f"run ended ({reason})" == "run ended (pruned)" and str(reason) == "pruned"
    write_lines(rd.metrics_path(tmp_path), [{"type": "end", "reason": reason}])
    assert (tmp_path / "metrics.jsonl").read_text() == '{"type": "end", "reason": "pruned"}\n'
    assert rd.read_metrics(tmp_path, "end")[0]["reason"] == rd.EndReason.PRUNED


def test_the_model_folder_of_a_checkpoint_and_of_final(tmp_path):
    assert rd.model_dir(rd.final_dir(tmp_path)) == tmp_path / "final" / "model"
    assert rd.model_dir(rd.step_checkpoint(tmp_path, 12)) == tmp_path / "checkpoints" / "step-0000012" / "model"
