"""bbert.launcher: the commands it builds, a tiny run to completion, interruption, failure."""
import json
import math
import os
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest

from bbert import run_dir as rd
from bbert.data import load_manifest
from bbert.engines import deepspeed_config
from bbert.launcher import (LaunchError, build_launch_command, format_command, hostfile_slots, launch,
                            world_size_of)
from bbert.run_dir import read_metrics
from bbert.train_config import TrainConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from bbert.data import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "small"
    prepare(PrepareConfig(out=str(out), vocab_size=2048, max_bytes=400_000, val_fraction=0.1, progress=False))
    return out


def tiny_config(data_dir, run_dir, **overrides):
    settings = dict(data_dir=str(data_dir), run_dir=str(run_dir), time_budget_hours=0.004,
                    validation_every_minutes=0.1, max_val_batches=2, checkpoint_every_minutes=None,
                    checkpoint_fractions=[0.5], log_every_steps=1, peak_flops=0)
    settings.update(overrides)
    return TrainConfig.from_preset("tiny-cpu", **settings)


def records(run_dir, kind):
    return read_metrics(run_dir, kind)


# ---- commands -------------------------------------------------------------------------


def test_24hbert_command_is_the_papers_8_gpu_deepspeed_run(tmp_path):
    config = TrainConfig.from_preset("24hbert", run_dir=str(tmp_path / "run"))
    cmd = build_launch_command(config, num_gpus=8, master_port=29512)
    assert Path(cmd[0]).name == "deepspeed"
    text = shlex.join(cmd)
    assert "--num_gpus 8" in text and "--master_port 29512" in text
    assert "--module bbert.train" in text
    assert cmd[-2:] == ["--config", str(tmp_path / "run" / "config.yaml")]
    assert "--hostfile" not in cmd
    assert format_command(cmd).startswith("deepspeed --num_gpus 8 ")
    # 8 GPUs x micro-batch 32 x 16 accumulation steps = the paper's batch of 4096
    assert config.gradient_accumulation_steps(8) == 16
    ds = deepspeed_config(config, 8)
    assert ds["train_batch_size"] == 4096 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.0


def test_torchrun_and_python_commands(tmp_path):
    config = TrainConfig.from_preset("tiny-cpu", run_dir=str(tmp_path / "r"))
    cmd = build_launch_command(config, num_gpus=2, master_port=29600)
    assert Path(cmd[0]).name == "torchrun"
    text = shlex.join(cmd)
    # a static rendezvous: --standalone sometimes aborts at exit on these machines
    assert "--standalone" not in text
    assert "--nproc_per_node 2" in text and "--master_addr 127.0.0.1" in text and "--master_port 29600" in text
    assert "-m bbert.train --config" in text
    single = build_launch_command(config, num_gpus=1)
    assert single[1:4] == ["-m", "bbert.train", "--config"]
    assert build_launch_command(config, num_gpus=1, resume=True)[-1] == "--resume"
    assert build_launch_command(config, num_gpus=1, resume=False)[-1] == "--no-resume"
    with pytest.raises(ValueError, match="torchrun"):
        build_launch_command(config, num_gpus=2, launcher="python")
    with pytest.raises(ValueError, match="launcher must be one of"):
        build_launch_command(config, num_gpus=1, launcher="mpirun")
    # the deepspeed engine picks the deepspeed launcher even for one process
    ds = build_launch_command(TrainConfig.from_preset("tiny-cpu", engine="deepspeed"), num_gpus=1)
    assert Path(ds[0]).name == "deepspeed" and "--num_gpus" in ds


def test_multi_node_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two servers of 8 GPUs\nnode-a slots=8\nnode-b slots=8\n")
    assert hostfile_slots(hostfile) == {"node-a": 8, "node-b": 8}
    assert world_size_of(8, hostfile) == 16
    config = TrainConfig.from_preset("24hbert", run_dir=str(tmp_path / "run"))
    cmd = build_launch_command(config, num_gpus=8, hostfile=hostfile, master_addr="10.0.0.1", master_port=29500)
    text = shlex.join(cmd)
    assert f"--hostfile {hostfile}" in text and "--master_addr 10.0.0.1" in text
    with pytest.raises(ValueError, match="master_addr"):
        build_launch_command(config, num_gpus=8, hostfile=hostfile)
    with pytest.raises(ValueError, match="deepspeed"):
        build_launch_command(TrainConfig.from_preset("tiny-cpu"), num_gpus=2, hostfile=hostfile, master_addr="x")
    hostfile.write_text("node-a 8\n")
    with pytest.raises(ValueError, match="slots"):
        hostfile_slots(hostfile)
    with pytest.raises(FileNotFoundError, match="slots"):
        hostfile_slots(tmp_path / "missing")


def test_plots_take_seconds_and_pick_their_axis_unit():
    from bbert import plot

    assert plot.time_unit(45) == ("seconds", 1.0) and plot.time_unit(180) == ("minutes", 60.0)
    assert plot.time_unit(24 * 3600) == ("hours", 3600.0)
    ax = plot.plot_schedule(0.06, 24 * 3600.0).axes[0]
    assert ax.get_xlabel() == "elapsed wall-clock time (hours)" and max(ax.lines[0].get_xdata()) == 24.0
    ax = plot.plot_schedule(0.5, 300.0).axes[0]
    assert ax.get_title() == "Time-based schedule, budget 5 minutes" and ax.lines[1].get_xdata()[0] == 2.5


def test_invalid_config_fails_before_starting(tmp_path, data_dir):
    config = tiny_config(data_dir, tmp_path / "run", batch_size=30)  # not a multiple of 16
    with pytest.raises(ValueError, match="divisible"):
        launch(config, num_gpus=1)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- running --------------------------------------------------------------------------


@pytest.mark.slow
def test_launch_runs_a_tiny_run_to_completion(tmp_path, data_dir, capsys):
    run_dir = launch(tiny_config(data_dir, tmp_path / "run"), num_gpus=1)
    assert run_dir == tmp_path / "run"
    out = capsys.readouterr().out
    assert out.startswith("$ python -m bbert.train --config ")
    end = records(run_dir, "end")
    assert end and end[-1]["reason"] == "budget"
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # log_every_steps=1
    # the child trained this data's model: a fresh one guesses about uniformly over the vocabulary
    assert train[0]["loss"] == pytest.approx(math.log(load_manifest(data_dir)["vocab_size"]), abs=1.0)
    assert (rd.model_dir(rd.final_dir(run_dir)) / "model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert TrainConfig.from_yaml(run_dir / "config.yaml").time_budget_hours == pytest.approx(0.004)
    assert "run ended (budget)" in (run_dir / "launch.log").read_text()
    # the pretraining chapter's figures read this run
    from bbert import plot

    fig = plot.plot_loss_curves(run_dir)
    assert list(fig.axes[0].lines[0].get_xdata()) == [r["elapsed_seconds"] for r in train]  # 14 s: in seconds
    assert fig.axes[0].get_xlabel() == "elapsed time (seconds)"
    fig = plot.plot_schedule(0.06, 0.004 * 3600, lr=1e-3, run=run_dir)
    logged = fig.axes[0].lines[1]
    assert list(logged.get_ydata()) == [r["lr"] for r in train]
    # each lr sits where the step set it (its start), where the schedule line gives that lr
    assert list(logged.get_xdata()) == pytest.approx([r["lr_elapsed_seconds"] for r in train])
    assert all(r["lr_elapsed_seconds"] < r["elapsed_seconds"] for r in train)
    assert fig.axes[0].get_xlabel().endswith("(seconds)")


def interrupt_after(run_dir, train_records=2):
    """From a thread: SIGINT this process (what the notebook's stop button does to the kernel)
    once the run has logged ``train_records`` steps."""
    main_thread = threading.main_thread()

    def wait_and_interrupt():
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = Path(run_dir) / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count('"type": "train"') >= train_records:
                break
            time.sleep(0.2)
        assert main_thread.is_alive()
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=wait_and_interrupt, daemon=True)
    thread.start()
    return thread


def assert_interrupted_with_checkpoint(run_dir, min_step=2):
    end = records(run_dir, "end")
    assert end and end[-1]["reason"] == "interrupted"
    checkpoints = records(run_dir, "checkpoint")
    assert checkpoints and checkpoints[-1]["step"] == end[-1]["step"] >= min_step
    saved = run_dir / "checkpoints" / checkpoints[-1]["name"]
    assert (rd.model_dir(saved) / "model.safetensors").is_file() and (saved / "budget.json").is_file()
    return json.loads((saved / "budget.json").read_text())


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_and_returns(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # an hour of budget: only the interruption can end this run
    config = tiny_config(data_dir, run_dir, time_budget_hours=1.0, validation_every_minutes=None,
                         checkpoint_fractions=[])
    thread = interrupt_after(run_dir)
    start = time.time()
    assert launch(config, num_gpus=1) == run_dir
    thread.join()
    assert time.time() - start < 150
    assert_interrupted_with_checkpoint(run_dir)


def test_failure_raises_with_the_log_tail(tmp_path, data_dir, monkeypatch):
    config = tiny_config(data_dir, tmp_path / "run")
    # the child sees a data dir whose shards vanished after the parent validated the config
    monkeypatch.setattr(TrainConfig, "validate", lambda self, world_size=1, check_data=True: self)
    config.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(LaunchError) as err:
        launch(config, num_gpus=1)
    message = str(err.value)
    assert "exited with code" in message and "nowhere" in message
    assert str(tmp_path / "run" / "launch.log") in message


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_ranks_interrupted_cleanly(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    config = tiny_config(data_dir, run_dir, engine="deepspeed", time_budget_hours=1.0,
                         validation_every_minutes=None, checkpoint_fractions=[])
    thread = interrupt_after(run_dir)
    assert launch(config, num_gpus=2) == run_dir
    thread.join()
    assert assert_interrupted_with_checkpoint(run_dir)["world_size"] == 2
    log = (run_dir / "launch.log").read_text()
    assert "dist_world_size=2" in log  # DeepSpeed's launcher started two ranks
    # the ranks got the SIGINT, saved and exited; the launcher did not have to kill them
    assert log.count("exits successfully") == 2 and "Killing subprocess" not in log
