"""The training loop in one process: schedule, budget stop, checkpoints, NaN and early stop, signals."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import pytest
import torch

import bbert.run_dir as rd
from bbert.model import BertForMaskedLM
from bbert.optim import Schedule
from bbert.run_dir import latest_checkpoint, list_checkpoints, read_metrics
from bbert.train import main, pretrain
from bbert.train_config import TrainConfig

from helpers_train import PYTHON, REPO, make_data_dir, records, subprocess_env, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("train") / "data")


@pytest.mark.slow
def test_time_schedule_for_a_budget_of_minutes_and_stop_at_the_budget(data_dir, tmp_path):
    # 3-minute budget, each step counts 18 s: 10 steps; warm-up 20% = 36 s = 2 steps
    config = tiny_config(data_dir, tmp_path / "run", warmup_proportion=0.2, debug={"step_time_seconds": 18.0})
    run_dir = pretrain(config)
    train = records(run_dir, "train")
    start = records(run_dir, "start")[0]
    assert (start["device"], start["precision"], start["engine"]) == ("cpu", "fp32", "torch")
    assert "loss_scale" not in train[0]  # fp16 only
    schedule = Schedule("time", 180.0, 1e-3, 0.2)
    assert [r["step"] for r in train] == list(range(1, 11))
    assert [r["elapsed_seconds"] for r in train] == [18.0 * k for k in range(1, 11)]
    # the lr of step k is the schedule at the clock when the step starts: 18 (k - 1) seconds
    for r in train:
        assert r["lr"] == pytest.approx(schedule.lr_at(r["elapsed_seconds"] - 18.0, r["step"] - 1), abs=1e-12)
        assert r["lr_elapsed_seconds"] == r["elapsed_seconds"] - 18.0  # and the log says when
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["seq_per_s"] * 64) and r["mfu"] is None  # peak_flops=0
    lrs = [r["lr"] for r in train]
    assert lrs[:3] == pytest.approx([0.0, 0.5e-3, 1e-3])  # linear warm-up over 36 s
    # then a straight line to zero at 180 s, as the paper's schedule for 24 h
    for r in train[2:]:
        t = r["elapsed_seconds"] - 18.0
        assert r["lr"] == pytest.approx(1e-3 * (180.0 - t) / (180.0 - 36.0), rel=1e-9)
    assert train[-1]["budget_fraction"] == pytest.approx(1.0)
    assert train[-1]["loss"] < train[0]["loss"]
    end = records(run_dir, "end")
    assert end == [{"type": "end", "reason": "budget", "step": 10, "elapsed_seconds": 180.0}]
    # checkpoints: each minute (72 s, 126 s, 180 s), the 0.5 marker (90 s); keep the last 2 periodic
    names = [r["name"] for r in records(run_dir, "checkpoint")]
    assert names == ["step-0000004", "marker-0.5", "step-0000007", "step-0000010"]
    assert sorted(p.name for _, p in list_checkpoints(run_dir)) == ["marker-0.5", "step-0000007", "step-0000010"]
    assert [r["step"] for r in records(run_dir, "val")] == [4, 7, 10]
    final = BertForMaskedLM.from_pretrained(rd.model_dir(rd.final_dir(run_dir)))
    last = BertForMaskedLM.from_pretrained(rd.model_dir(rd.step_checkpoint(run_dir, 10)))
    for a, b in zip(final.state_dict().values(), last.state_dict().values()):
        assert torch.equal(a, b)
    assert (rd.model_dir(rd.final_dir(run_dir)) / "tokenizer.json").is_file()
    assert TrainConfig.from_yaml(run_dir / "config.yaml") == config
    # running it again finds the run complete and changes nothing
    before = (run_dir / "metrics.jsonl").read_text()
    pretrain(config)
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_real_clock_stops_at_the_budget(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", time_budget_hours=6 / 3600, debug={},
                         validation_every_minutes=None, checkpoint_every_minutes=None, checkpoint_fractions=[])
    start = time.monotonic()
    run_dir = pretrain(config)
    wall = time.monotonic() - start
    train, end = records(run_dir, "train"), records(run_dir, "end")[0]
    steps = [train[0]["elapsed_seconds"]] + [b["elapsed_seconds"] - a["elapsed_seconds"]
                                             for a, b in zip(train, train[1:])]
    assert end["reason"] == "budget" and end["step"] == len(train) >= 2
    # it stops at the first step that ends past the budget, not one step later
    assert 6.0 <= end["elapsed_seconds"] <= 6.0 + max(steps)
    assert train[-2]["elapsed_seconds"] < 6.0
    assert wall >= 6.0
    # each step's lr is the schedule at the real clock when the step started
    schedule = Schedule.from_config(config)
    assert (schedule.clock, schedule.length) == ("time", pytest.approx(6.0))
    for before, r in zip(train, train[1:]):
        assert r["lr"] == pytest.approx(schedule.lr_at(before["elapsed_seconds"], before["step"]), rel=1e-9)
    assert (rd.model_dir(rd.final_dir(run_dir)) / "model.safetensors").is_file()


@pytest.mark.slow
def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", checkpoint_fractions=[],
                         debug={"step_time_seconds": 30.0, "nan_at_step": 4})
    config.to_yaml(tmp_path / "run.yaml")
    assert main(["--config", str(tmp_path / "run.yaml")]) == 1  # exit code 1 on NaN
    run_dir = tmp_path / "run"
    assert records(run_dir, "end") == [{"type": "end", "reason": "nan", "step": 3, "elapsed_seconds": 90.0}]
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3]
    assert latest_checkpoint(run_dir).name == "step-0000002"
    assert not (run_dir / "final").exists()
    good = BertForMaskedLM.from_pretrained(rd.model_dir(latest_checkpoint(run_dir)))
    assert all(torch.isfinite(p).all() for p in good.parameters())


@pytest.mark.slow
def test_early_stop_after_t_minutes_when_validation_loss_is_too_high(data_dir, tmp_path):
    # validation every 24 s; the threshold (loss 1.0, never reached) only counts after 1 minute
    config = tiny_config(data_dir, tmp_path / "run", validation_every_minutes=0.4, checkpoint_fractions=[],
                         early_stop={"enabled": True, "after_minutes": 1.0, "max_val_loss": 1.0},
                         debug={"step_time_seconds": 12.0}, tensorboard=True)
    run_dir = pretrain(config)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert [r["step"] for r in records(run_dir, "val")] == [2, 4, 6]
    end = records(run_dir, "end")[0]
    assert (end["reason"], end["step"]) == ("early_stop", 6)
    assert rd.model_dir(rd.final_dir(run_dir)).is_dir()


@pytest.mark.slow
def test_a_failed_save_leaves_the_last_good_checkpoint_and_resume_goes_on(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir, tmp_path / "run", checkpoint_fractions=[], validation_every_minutes=None,
                         debug={"step_time_seconds": 30.0})
    real = rd.atomic_write_json
    calls = {"n": 0}

    def dies_on_second_checkpoint(path, obj):
        if path.name == "budget.json":
            calls["n"] += 1
            if calls["n"] == 2:  # inside the second checkpoint's atomic folder, after the weights
                assert any(p.name.startswith(".tmp-step-0000004") for p in path.parents)
                raise OSError("disk full (simulated)")
        return real(path, obj)

    monkeypatch.setattr(rd, "atomic_write_json", dies_on_second_checkpoint)
    with pytest.raises(OSError, match=r"could not write \S*step-0000004: disk full \(simulated\)\. Nothing of it "
                                      r"was kept and the last good checkpoint \(\S*step-0000002\) is intact"):
        pretrain(config)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]  # no half-written step-4
    # a SIGKILL leaves its temporary folder behind: resume must not take it for a checkpoint
    (ckpts / ".tmp-step-0000004-x" / "step-0000004").mkdir(parents=True)
    assert latest_checkpoint(run_dir).name == "step-0000002"
    BertForMaskedLM.from_pretrained(rd.model_dir(ckpts / "step-0000002"))

    monkeypatch.setattr(rd, "atomic_write_json", real)
    pretrain(config)  # same config: resumes from step 2 by itself
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the killed write's leftovers are gone
    history = read_metrics(run_dir)
    starts = [r for r in history if r["type"] == "start"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (2, True)]
    assert [r["step"] for r in history if r["type"] == "train"] == list(range(1, 7))
    assert records(run_dir, "end")[0]["reason"] == "budget"


def test_resume_refuses_a_changed_config_unless_asked(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", max_steps=3, checkpoint_fractions=[],
                         validation_every_minutes=None, debug={"step_time_seconds": 12.0})
    pretrain(config)
    changed = config.with_overrides(["lr=5e-4", "max_steps=5"])
    changed.to_yaml(tmp_path / "run" / "config.yaml")  # as bbert.launch does: the checkpoint's copy counts
    with pytest.raises(ValueError, match=r"different config \(changed: lr, max_steps\).*--resume"):
        pretrain(changed)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(config, resume=False)
    pretrain(changed, resume=True)
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert records(tmp_path / "run", "end")[-1]["reason"] == "max_steps"


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_0(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run", time_budget_hours=1.0, checkpoint_every_minutes=None,
                         validation_every_minutes=None, checkpoint_fractions=[],
                         debug={"step_time_seconds": 1.0, "sleep_seconds_per_step": 0.2})
    config.to_yaml(tmp_path / "run.yaml")
    proc = subprocess.Popen([PYTHON, "-m", "bbert.train", "--config", str(tmp_path / "run.yaml")], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and '"train"' in metrics.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "[bbert]" in out and "% of budget" in out  # progress lines when stdout is not a TTY
    end = records(tmp_path / "run", "end")[0]
    assert end["reason"] == "interrupted"
    assert latest_checkpoint(tmp_path / "run").name == f"step-{end['step']:07d}"
    assert json.loads((latest_checkpoint(tmp_path / "run") / "budget.json").read_text())["step"] == end["step"]


def test_fp16_grad_scaler_counts_the_steps_it_skips(data_dir, tmp_path):
    # check_engine() keeps fp16 to GPUs; the engine itself runs it on CPU, which lets this test
    # see an overflow: the step is skipped, the weights stay, the scale halves, the count goes up.
    from bbert.data import build_pretraining_loader
    from bbert.engines import DistEnv, TorchEngine

    config = tiny_config(data_dir, tmp_path / "run", precision="fp16")
    torch.manual_seed(0)
    engine = TorchEngine(BertForMaskedLM(config.model_config(vocab_size=2048)), config, DistEnv())
    batch = next(iter(build_pretraining_loader(config.data_dir, "train", 4, seed=0)))
    before = {k: v.clone() for k, v in engine.raw_model.state_dict().items()}
    scale = engine.loss_scale()
    assert scale == 2.0 ** 16 and engine.skipped_steps == 0
    engine.micro_step(batch, last=True, poison=True)  # a NaN loss: every gradient is NaN
    engine.optimizer_step(lr=1e-3)
    assert engine.skipped_steps == 1 and engine.loss_scale() == scale / 2
    assert all(torch.equal(v, before[k]) for k, v in engine.raw_model.state_dict().items())
    engine.micro_step(batch, last=True)
    engine.optimizer_step(lr=1e-3)
    assert engine.skipped_steps == 1  # a finite step goes through
    assert not torch.equal(engine.raw_model.bert.layers[0].ffn.fc1.weight, before["bert.layers.0.ffn.fc1.weight"])


def test_the_precision_helpers_cast_and_scale_as_the_engines_need():
    from bbert.precision import amp_dtype, autocast, grad_scaler

    x = torch.randn(4, 4)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(torch.device("cpu"), precision):
            assert (x @ x).dtype == dtype
    assert amp_dtype("fp16") == torch.float16 and amp_dtype("fp32") is None
    scaler = grad_scaler("cpu", "fp16")
    assert scaler.get_scale() == 2.0 ** 16 and grad_scaler("cpu", "bf16") is None
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        autocast("cpu", "fp8")


def test_one_run_per_run_dir_and_a_dead_holder_does_not_block(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, time; from bbert.locks import DirLock; l = DirLock(sys.argv[1], 'trained into'); "
         "l.__enter__(); print('held', flush=True); time.sleep(120)", str(run)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["--preset", "tiny-cpu", "--data-dir", str(data_dir), "--run-dir", str(run), "--set", "max_steps=1",
                "--set", "max_seq_length=64"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{run} is being trained into by PID {holder.pid}" in err[0]
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: the next run goes ahead
    config = tiny_config(data_dir, run, max_steps=1, checkpoint_fractions=[], validation_every_minutes=None)
    pretrain(config)
    assert records(run, "end")[0]["reason"] == "max_steps"


@pytest.mark.slow
def test_resume_refuses_other_data_unless_asked(data_dir, tmp_path):
    from bbert.data import PrepareConfig, prepare, sample_corpus_path

    other = tmp_path / "other-data"  # the same shapes, another slice of text: another tokenizer and shards
    prepare(PrepareConfig(inputs=[str(sample_corpus_path())], out=str(other), vocab_size=2048,
                          max_seq_length=64, max_documents=200, val_fraction=0.05, seed=1))
    config = tiny_config(data_dir, tmp_path / "run", max_steps=2, checkpoint_fractions=[],
                         validation_every_minutes=None, debug={"step_time_seconds": 12.0})
    pretrain(config)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    moved = config.with_overrides(["max_steps=4"])
    moved = TrainConfig.from_dict({**moved.to_dict(), "data_dir": str(other)})
    with pytest.raises(ValueError, match=r"was trained on other data than \S*other-data \(tokenizer_fingerprint "
                                         r".*--allow-data-change"):
        pretrain(moved, resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics  # nothing written
    pretrain(moved, resume=True, allow_data_change=True)
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_data_dir_replaced_during_the_run_stops_it_at_the_next_validation(tmp_path, monkeypatch):
    import bbert.train as train_module
    from bbert.data import DataDirError, PrepareConfig, prepare, sample_corpus_path

    data = make_data_dir(tmp_path / "data")
    real, calls = train_module.build_pretraining_loader, {"val": 0}

    def replaced_before_the_second_validation(data_dir, split, *args, **kwargs):
        if split == "val":
            calls["val"] += 1
            if calls["val"] == 2:  # another corpus, same shapes: as `bbert prepare --overwrite` would leave it
                prepare(PrepareConfig(inputs=[str(sample_corpus_path())], out=str(data), vocab_size=2048,
                                      max_seq_length=64, max_documents=200, val_fraction=0.05, seed=1,
                                      overwrite=True, progress=False))
        return real(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_pretraining_loader", replaced_before_the_second_validation)
    config = tiny_config(data, tmp_path / "run", max_steps=6, checkpoint_fractions=[],
                         debug={"step_time_seconds": 30.0})  # a validation every 2 steps
    with pytest.raises(DataDirError, match="changed during this run"):
        pretrain(config)
    assert [r["step"] for r in records(tmp_path / "run", "val")] == [2]  # only the first, on the old data


# ---- the warmup-stable-decay schedule and the batch ramp in a run ------------------------------


def ramped_config(data_dir, run_dir, **overrides):
    # 3 minutes of 18 simulated seconds a step: 10 steps. The global batch grows from one
    # micro-batch (4) to 16 over the first half; the lr holds its peak until the last 20%.
    base = dict(batch_size=16, micro_batch_size=4, warmup_proportion=0.1, lr_schedule="wsd", decay_proportion=0.2,
                batch_ramp_proportion=0.5, checkpoint_fractions=[], validation_every_minutes=None,
                debug={"step_time_seconds": 18.0})
    return tiny_config(data_dir, run_dir, **{**base, **overrides})


def ramp_from_definition(t, budget=180.0, start=4, batch=16, share=0.5, unit=4):
    """The batch of a step that starts at ``t`` seconds, computed exactly (fractions, not floats)."""
    from fractions import Fraction

    progress = Fraction(t) / Fraction(budget)
    if progress >= Fraction(share).limit_denominator():
        return batch
    ramped = start + (batch - start) * progress / Fraction(share).limit_denominator()
    return unit * math.floor(ramped / unit)


@pytest.fixture(scope="module")
def ramped_run(data_dir, tmp_path_factory):
    return pretrain(ramped_config(data_dir, tmp_path_factory.mktemp("ramped") / "run"))


@pytest.mark.slow
def test_a_ramped_wsd_run_logs_the_batch_and_lr_of_the_definition(ramped_run):
    run_dir = ramped_run
    train = records(run_dir, "train")
    starts = [18.0 * k for k in range(10)]  # the clock at each step's start
    assert [r["lr_elapsed_seconds"] for r in train] == starts
    assert [r["batch_size"] for r in train] == [ramp_from_definition(t) for t in starts]
    assert [r["batch_size"] for r in train][:6] == [4, 4, 8, 8, 12, 16]  # the definition, by hand
    assert train[-1]["batch_size"] == 16
    # WSD: warm-up over 18 s, the peak to 144 s, then down to zero at 180 s (half-way at 162 s)
    assert [r["lr"] for r in train] == pytest.approx([0.0] + [1e-3] * 8 + [0.5e-3], abs=1e-12)
    budget = json.loads((run_dir / "final" / "budget.json").read_text())
    assert budget["samples_consumed"] == sum(r["batch_size"] for r in train) == 4 + 4 + 8 + 8 + 12 + 16 * 5
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.slow
def test_a_killed_and_resumed_ramped_run_matches_the_uninterrupted_one(data_dir, tmp_path, monkeypatch, ramped_run):
    reference = ramped_run
    config = ramped_config(data_dir, tmp_path / "run")  # a checkpoint each minute: steps 4 and 7
    real = rd.atomic_write_json
    calls = {"n": 0}

    def dies_at_the_second_checkpoint(path, obj):
        if path.name == "budget.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("killed (simulated)")
        return real(path, obj)

    monkeypatch.setattr(rd, "atomic_write_json", dies_at_the_second_checkpoint)
    with pytest.raises(OSError, match="killed"):
        pretrain(config)
    # it died in the middle of the ramp, after step 7; the run resumes from step 4
    assert latest_checkpoint(tmp_path / "run").name == "step-0000004"
    assert json.loads((latest_checkpoint(tmp_path / "run") / "budget.json").read_text())["samples_consumed"] == 24
    monkeypatch.setattr(rd, "atomic_write_json", real)
    pretrain(config)
    resumed, ref = records(tmp_path / "run", "train"), records(reference, "train")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(resumed, ref):  # same batches, same data, same lr: the same losses
        assert (a["batch_size"], a["lr"], a["elapsed_seconds"]) == (b["batch_size"], b["lr"], b["elapsed_seconds"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    final = BertForMaskedLM.from_pretrained(tmp_path / "run" / "final" / "model").state_dict()
    for k, v in BertForMaskedLM.from_pretrained(reference / "final" / "model").state_dict().items():
        assert torch.allclose(final[k], v, rtol=1e-5, atol=1e-6), k


def test_the_step_loss_is_the_mean_over_its_micro_batches_whatever_the_batch(data_dir, tmp_path):
    # the same micro-batch twice in a batch of 8 gives the gradient of it once in a batch of 4
    from bbert.data import build_pretraining_loader
    from bbert.engines import DistEnv, TorchEngine

    config = tiny_config(data_dir, tmp_path / "run", batch_size=16, micro_batch_size=4)
    torch.manual_seed(0)
    engine = TorchEngine(BertForMaskedLM(config.model_config(vocab_size=2048)), config, DistEnv())
    engine.train(False)  # no dropout: both passes see the same network
    batch = next(iter(build_pretraining_loader(config.data_dir, "train", 4, seed=0)))

    def gradients(batch_size, passes):
        engine.set_batch_size(batch_size)
        for i in range(passes):
            engine.micro_step(batch, last=i == passes - 1)
        grads = [p.grad.clone() for p in engine.raw_model.parameters() if p.grad is not None]
        engine.optimizer.zero_grad(set_to_none=True)
        return grads

    once, twice = gradients(4, 1), gradients(8, 2)
    assert len(once) == len(twice) > 0
    for a, b in zip(once, twice):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    quadruple = gradients(16, 4)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(once, quadruple))


def test_schedule_options_reach_set_print_config_and_the_search_grid(capsys, tmp_path):
    import yaml

    from bbert.trials import trial_config

    assert main(["--preset", "tiny-cpu", "--set", "lr_schedule=wsd", "--set", "batch_ramp_proportion=0.3",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lr_schedule"], printed["decay_proportion"]) == ("wsd", 0.2)
    assert (printed["batch_ramp_proportion"], printed["batch_ramp_start"]) == (0.3, None)
    assert TrainConfig.from_preset("tiny-cpu").lr_schedule == "linear"  # off by default
    trial = trial_config(TrainConfig.from_preset("tiny-cpu"), {"lr_schedule": "wsd", "decay_proportion": 0.3,
                                                               "batch_ramp_start": 16}, tmp_path / "t")
    assert (trial.lr_schedule, trial.decay_proportion, trial.batch_ramp_start) == ("wsd", 0.3, 16)
