"""Engines and processes: DeepSpeed (1 and 2 ranks), torchrun DDP, and exact resume after SIGKILL.

Every run here has the same seed, global batch (8) and model, so their loss curves can be
compared step by step against one single-process PyTorch reference.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from bbert.speed import training_flops_per_sequence
from bbert import run_dir as rd
from bbert.run_dir import latest_checkpoint
from bbert.train import pretrain
from bbert.env import free_port

from helpers_train import BIN, PYTHON, REPO, make_data_dir, records, run_cli, subprocess_env, tiny_config

pytestmark = pytest.mark.slow  # every test here starts processes or trains several runs

STEPS = 6


def config_for(data_dir, run_dir, **overrides):
    # 30 simulated seconds a step: a checkpoint every 2 steps, validation every 3
    base = dict(max_steps=STEPS, time_budget_hours=0.1, checkpoint_every_minutes=1.0,
                validation_every_minutes=1.5, checkpoint_fractions=[], debug={"step_time_seconds": 30.0})
    base.update(overrides)
    return tiny_config(data_dir, run_dir, **base)


def losses(run_dir):
    return [r["loss"] for r in records(run_dir, "train")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("dist") / "data")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted single-process PyTorch run (with a peak FLOP/s given, so MFU is logged)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    config = config_for(data_dir, run_dir, peak_flops=1e11)
    pretrain(config)
    return run_dir


def test_reference_logs_throughput_and_mfu(reference):
    from bbert.train_config import TrainConfig

    config = TrainConfig.from_yaml(reference / "config.yaml")
    flops = training_flops_per_sequence(config.model_config(2048), 64, 0.15, True)
    for r in records(reference, "train"):
        assert r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * 64)
        assert r["mfu"] == pytest.approx(flops * r["seq_per_s"] / 1e11)
    assert records(reference, "end")[0] == {"type": "end", "reason": "max_steps", "step": STEPS,
                                            "elapsed_seconds": 30.0 * STEPS}


def test_sigkill_then_resume_matches_the_uninterrupted_run(data_dir, tmp_path, reference):
    run_dir = tmp_path / "run"
    config = config_for(data_dir, run_dir, debug={"step_time_seconds": 30.0, "sleep_seconds_per_step": 0.5})
    config.to_yaml(tmp_path / "run.yaml")
    cmd = [PYTHON, "-m", "bbert.train", "--config", str(tmp_path / "run.yaml")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    # kill it once a checkpoint exists and it has gone on past it
    while time.monotonic() < deadline and proc.poll() is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and any(r["step"] > 2 for r in records(run_dir, "train")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not records(run_dir, "end")  # killed: no end record, no final model
    assert not rd.final_dir(run_dir).exists()

    result = run_cli(cmd)  # same config: resumes by itself
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    resumed, ref = records(run_dir, "train"), records(reference, "train")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, ref):  # same schedule, same data, same dropout, same weights
        assert a["lr"] == b["lr"] and a["elapsed_seconds"] == b["elapsed_seconds"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert [r["val_loss"] for r in records(run_dir, "val")] == pytest.approx(
        [r["val_loss"] for r in records(reference, "val")], rel=1e-6)
    end, ref_end = records(run_dir, "end"), records(reference, "end")
    assert end == ref_end


def test_deepspeed_single_process_matches_torch_and_resumes(data_dir, tmp_path, reference):
    # no launcher: bbert fills in RANK/WORLD_SIZE/MASTER_* itself. The first DeepSpeed start on a
    # fresh machine JIT-builds its shm op (about 40 s), hence the generous timeout.
    run_dir = tmp_path / "run"
    config_for(data_dir, run_dir, engine="deepspeed", max_steps=3).to_yaml(tmp_path / "run.yaml")
    first = run_cli([PYTHON, "-m", "bbert.train", "--config", str(tmp_path / "run.yaml")], timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (latest_checkpoint(run_dir) / "deepspeed").is_dir()
    # continue the same run to 6 steps: restores the DeepSpeed optimizer state and the clock
    second = run_cli([PYTHON, "-m", "bbert.train", "--config", str(tmp_path / "run.yaml"), "--resume",
                      "--set", f"max_steps={STEPS}"], timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    assert [r["lr"] for r in records(run_dir, "train")] == [r["lr"] for r in records(reference, "train")]
    assert records(run_dir, "end")[-1]["reason"] == "max_steps"
    assert (rd.model_dir(rd.final_dir(run_dir)) / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def torchrun_two(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    config_for(data_dir, tmp / "run", micro_batch_size=4).to_yaml(tmp / "run.yaml")
    result = run_cli([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                      "--master_port", str(free_port()), "-m", "bbert.train", "--config", str(tmp / "run.yaml")])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_torchrun_ddp_two_processes(torchrun_two):
    assert [r["world_size"] for r in records(torchrun_two, "start")] == [2]
    assert records(torchrun_two, "end")[0]["reason"] == "max_steps"
    train = records(torchrun_two, "train")
    assert len(train) == STEPS and train[-1]["loss"] < train[0]["loss"]
    assert {p.name for p in (latest_checkpoint(torchrun_two) / "rng").iterdir()} == {"rank-00000.pt", "rank-00001.pt"}


def test_deepspeed_two_processes_zero2_matches_torchrun(data_dir, tmp_path, torchrun_two):
    config_for(data_dir, tmp_path / "run", engine="deepspeed", zero_stage=2).to_yaml(tmp_path / "run.yaml")
    result = run_cli([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                      "--module", "bbert.train", "--config", str(tmp_path / "run.yaml")], timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert [r["world_size"] for r in records(tmp_path / "run", "start")] == [2]
    # same ranks, same seeds, same micro-batches: the same curve as DDP
    assert losses(tmp_path / "run") == pytest.approx(losses(torchrun_two), rel=1e-5)
    shards = list((latest_checkpoint(tmp_path / "run") / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2  # ZeRO-2: one optimizer shard per rank


NO_DROPOUT = {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# In a fresh process: the run, then how many graphs dynamo compiled (0 if compile was ignored).
PRETRAIN_AND_COUNT_GRAPHS = """
import sys
from torch._dynamo.utils import counters
from bbert.train import pretrain
from bbert.train_config import TrainConfig
pretrain(TrainConfig.from_yaml(sys.argv[1]))
print("unique_graphs", counters["stats"]["unique_graphs"])
"""


@pytest.fixture(scope="module")
def eager_no_dropout(data_dir, tmp_path_factory):
    # compiled dropout draws other random numbers than eager, so the comparison runs without it
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    pretrain(config_for(data_dir, run_dir, max_steps=3, model_overrides=NO_DROPOUT))
    return run_dir


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_compile_is_used_and_matches_eager(data_dir, tmp_path, eager_no_dropout, engine):
    """``compile=True`` compiles the model under both engines (DeepSpeed once ignored it) and the
    losses, validation included, are eager's within float rounding."""
    run_dir = tmp_path / "run"
    config_for(data_dir, run_dir, engine=engine, max_steps=3, compile=True,
               model_overrides=NO_DROPOUT).to_yaml(tmp_path / "run.yaml")
    result = run_cli([PYTHON, "-c", PRETRAIN_AND_COUNT_GRAPHS, str(tmp_path / "run.yaml")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    graphs = int(result.stdout.split("unique_graphs")[-1])
    assert graphs >= 1, result.stdout[-2000:]
    assert losses(run_dir) == pytest.approx(losses(eager_no_dropout), rel=1e-4)
    val = [r["val_loss"] for r in records(run_dir, "val")]
    assert val and val == pytest.approx([r["val_loss"] for r in records(eager_no_dropout, "val")], rel=1e-4)


@pytest.mark.slow
def test_deepspeed_follows_a_batch_ramp_like_torch_and_resumes_mid_ramp(data_dir, tmp_path):
    # batch 16 of micro-batches of 4, ramped over the first 90 s (3 steps): 4, 8, 12, then 16.
    # DeepSpeed must change its accumulation each step (set_train_batch_size) and step at the
    # right micro-batch although its own micro-step count is out of phase with the new batch.
    ramp = dict(batch_size=16, micro_batch_size=4, batch_ramp_proportion=0.25, validation_every_minutes=None)
    torch_run = pretrain(config_for(data_dir, tmp_path / "torch", **ramp))
    assert [r["batch_size"] for r in records(torch_run, "train")] == [4, 8, 12, 16, 16, 16]
    run_dir = tmp_path / "ds"
    config_for(data_dir, run_dir, engine="deepspeed", max_steps=2, **ramp).to_yaml(tmp_path / "run.yaml")
    first = run_cli([PYTHON, "-m", "bbert.train", "--config", str(tmp_path / "run.yaml")], timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli([PYTHON, "-m", "bbert.train", "--config", str(tmp_path / "run.yaml"), "--resume",
                      "--set", f"max_steps={STEPS}"], timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    train = records(run_dir, "train")
    assert [r["batch_size"] for r in train] == [4, 8, 12, 16, 16, 16]
    assert losses(run_dir) == pytest.approx(losses(torch_run), rel=1e-5)
    assert [r["grad_norm"] for r in train] == pytest.approx([r["grad_norm"] for r in records(torch_run, "train")],
                                                            rel=1e-4)
    assert records(run_dir, "end")[-1]["reason"] == "max_steps"
