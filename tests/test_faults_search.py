"""Issue 25's search cases: nothing silent, every failure one line, stale trials never reused.

Each test names its case's number in the issue. A failing command must leave the files it
found as they were (``snapshot`` before and after).
"""
from __future__ import annotations

import hashlib
import shutil

import pytest

from bbert.data import PrepareConfig, prepare, sample_corpus_path
from bbert.run_dir import read_metrics
from bbert.search import main
from helpers_train import PYTHON, interrupt_after_first_validation, make_data_dir, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("faults-search") / "data")


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory):
    # the same corpus and settings, fewer documents: other shards, the same sequence length
    path = tmp_path_factory.mktemp("faults-search-b") / "data"
    prepare(PrepareConfig(inputs=[str(sample_corpus_path())], out=str(path), vocab_size=2048,
                          max_seq_length=64, max_documents=200, val_fraction=0.05, seed=0))
    return path


def config_file(data_dir, tmp_path, **debug):
    # 10 simulated steps of 18 s in a 3-minute budget, validation every minute
    config = tiny_config(data_dir, tmp_path / "unused", debug={"step_time_seconds": 18.0, **debug},
                         checkpoint_fractions=[], checkpoint_every_minutes=None, log_every_steps=2)
    return str(config.to_yaml(tmp_path / "base.yaml"))


def snapshot(folder) -> dict:
    """Every file under ``folder``: its content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *expected) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("bbert search: error: "), err
    for text in expected:
        assert text in err, err
    assert "[search] trial" not in captured.out
    return err


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["none", "asha"])
def test_1_a_rerun_with_another_base_config_reuses_no_trial(pruner, data_dir, other_data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--config", config_file(data_dir, tmp_path), "--grid", "lr=1e-3,2e-3", "--out", str(out),
            "--pruner", pruner]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(out)
    for change, named in ((f"data_dir={other_data_dir}", "changed: data"),
                          ("time_budget_hours=0.06", "changed: time_budget_hours")):
        # was: exit 0, the old trials "finished before, skipped" and listed as this search's
        assert main([*args, "--set", change]) == 2
        one_line_error(capsys, named, "choose a new --out")
        assert snapshot(out) == before
    # the same data under another path is the same data: the finished trials are reused
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    assert main([*args, "--set", f"data_dir={copy}"]) == 0
    printed = capsys.readouterr().out
    assert all("finished before, skipped" in line for line in printed.splitlines() if "[search] trial" in line)
    assert f"best: {out}" in printed
    assert {k: v for k, v in snapshot(out).items() if k != "study.db"} == \
        {k: v for k, v in before.items() if k != "study.db"}


def test_5_a_value_given_twice_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["--config", config_file(data_dir, tmp_path), "--set", "max_steps=1", "--out", str(out)]
    # was: one run, listed twice with its time counted twice
    assert main([*base, "--grid", "lr=1e-3,0.001"]) == 2
    one_line_error(capsys, "--grid lr gives 0.001 twice (1e-3 and 0.001)")
    # was: the last --grid lr won silently
    assert main([*base, "--grid", "lr=1e-3", "--grid", "lr=2e-3"]) == 2
    one_line_error(capsys, "--grid lr is given twice", "--grid lr=V1,V2")
    assert not out.exists()


def test_12_an_in_memory_storage_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--config", config_file(data_dir, tmp_path), "--set", "max_steps=1", "--grid", "lr=1e-3",
            "--out", str(out), "--pruner", "asha", "--storage", "sqlite:///"]
    assert main(args) == 2  # was: heartbeat-thread tracebacks, then exit 0
    one_line_error(capsys, "--storage 'sqlite:///' is a database in memory", "sqlite:///")
    assert not out.exists()


@pytest.fixture(scope="module")
def interrupted(data_dir, tmp_path_factory):
    """Ctrl-C a search (``pruner``) once its first trial has validated: (exit code, stdout, stderr, out)."""
    done = {}

    def run(pruner):
        if pruner not in done:
            done[pruner] = interrupt(pruner)
        return done[pruner]

    def interrupt(pruner):
        tmp = tmp_path_factory.mktemp(f"interrupted-{pruner}")
        out = tmp / "s"
        command = [PYTHON, "-m", "bbert.search", "--config",
                   config_file(data_dir, tmp, sleep_seconds_per_step=0.5),
                   "--grid", "lr=1e-3,2e-3", "--out", str(out), "--pruner", pruner]
        return (*interrupt_after_first_validation(command), out)

    return run


@pytest.mark.slow
def test_13_ctrl_c_stops_a_plain_search_with_exit_130(interrupted):
    returncode, stdout, stderr, out = interrupted("none")
    # was: the grid went on to the next trial and exited 0
    assert returncode == 130, (stdout, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("bbert search: "), stderr
    assert "lr=0.001" in stderr and "run the same command again" in stderr
    assert read_metrics(out / "lr=0.001")[-1]["reason"] == "interrupted"
    assert not (out / "lr=0.002").exists()


@pytest.mark.slow
def test_14_ctrl_c_on_an_asha_search_is_one_line(interrupted):
    returncode, stdout, stderr, out = interrupted("asha")
    # was: Optuna's "Trial 0 failed ... Traceback ... _Interrupted", exit 0
    assert returncode == 130, (stdout, stderr)
    assert "Traceback" not in stdout + stderr and "failed" not in stdout + stderr
    assert stderr.count("\n") == 1 and stderr.startswith("bbert search: "), stderr
    name = stderr.split("trial ")[1].split()[0]  # the grid sampler's shuffle picks the first
    assert read_metrics(out / name)[-1]["reason"] == "interrupted"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("lr=")) == [name]


@pytest.mark.slow
def test_15_a_rerun_after_an_interrupt_gives_advice_that_search_takes(interrupted, data_dir, tmp_path, capsys):
    returncode, _, _, out = interrupted("none")
    assert returncode == 130
    before = snapshot(out)
    args = ["--config", config_file(data_dir, tmp_path, sleep_seconds_per_step=0.5), "--grid", "lr=1e-3,2e-3",
            "--out", str(out), "--set", "time_budget_hours=0.06"]
    assert main(args) == 2
    err = one_line_error(capsys, "changed: time_budget_hours", "choose a new --out")
    assert "--resume" not in err  # was: "Pass --resume", a flag that bbert search does not have
    assert snapshot(out) == before


def test_18_no_grid_shows_the_command_line_syntax(data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["--config", config_file(data_dir, tmp_path), "--out", str(out)]) == 2
    err = one_line_error(capsys, "--grid lr=5e-4,1e-3")
    assert "[" not in err  # was: lr=[5e-4, 1e-3], Python's syntax
    assert not out.exists()


def test_19_a_first_rung_after_the_budget_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--config", config_file(data_dir, tmp_path), "--set", "max_steps=1", "--grid", "lr=1e-3",
            "--out", str(out), "--pruner", "asha", "--min-resource-s", "1000"]
    assert main(args) == 2  # was: accepted, and no trial could ever be pruned
    one_line_error(capsys, "--min-resource-s 1000", "180 s")
    assert not out.exists()
