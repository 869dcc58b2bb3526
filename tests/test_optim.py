import math

import pytest
import torch
from torch import nn

from bbert.optim import Lamb, Schedule, build_optimizer, linear_warmup_decay, param_groups, set_lr
from bbert.train_config import TrainConfig


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, x):
        return self.out(self.norm(self.lin(self.emb(x))))


def test_param_groups_exempt_bias_and_layernorm_and_dedupe_tied():
    model = Toy()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == {id(model.emb.weight), id(model.lin.weight)}
    assert ids(no_decay["params"]) == {id(model.lin.bias), id(model.norm.weight), id(model.norm.bias)}


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_optimizers_reduce_loss(name):
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model, name, lr=1e-2)
    x = torch.randint(0, 10, (32,))
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_adamw_defaults_are_the_papers():
    opt = build_optimizer(Toy())
    g = opt.param_groups[0]
    assert g["lr"] == 1e-3 and g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True  # CPU has fused AdamW in torch >= 2.4


def test_unknown_optimizer_error_names_the_choices():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(Toy(), "sgd")


def test_lamb_trust_ratio_scales_update_to_weight_norm():
    p = nn.Parameter(torch.full((4, 4), 2.0))
    opt = Lamb([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.full((4, 4), 1e-3)
    opt.step()
    # First Adam step has |update| == 1 per element, so trust = ||w|| / ||u|| = 2: each weight moves by lr * 2.
    assert torch.allclose(p.detach(), torch.full((4, 4), 2.0 - 0.2), atol=1e-4)


def test_linear_warmup_decay_shape():
    assert linear_warmup_decay(0.0, 0.06) == 0.0
    assert linear_warmup_decay(0.03, 0.06) == pytest.approx(0.5)
    assert linear_warmup_decay(0.06, 0.06) == pytest.approx(1.0)
    assert linear_warmup_decay(0.53, 0.06) == pytest.approx(0.5)
    assert linear_warmup_decay(1.0, 0.06) == 0.0
    assert linear_warmup_decay(1.5, 0.06) == 0.0
    with pytest.raises(ValueError, match="warmup_proportion"):
        linear_warmup_decay(0.1, 1.0)


@pytest.mark.parametrize("hours", [3 / 60, 0.5, 24.0])
def test_time_schedule_same_shape_for_minutes_and_days(hours):
    s = Schedule.from_config(TrainConfig(time_budget_hours=hours, lr=1e-3, warmup_proportion=0.06))
    T = hours * 3600
    assert (s.clock, s.length, s.peak_lr) == ("time", pytest.approx(T), 1e-3)
    assert s.lr_at(0, 0) == 0.0
    assert s.lr_at(0.06 * T, 0) == pytest.approx(1e-3)  # the end of warm-up is the peak
    assert s.lr_at(0.53 * T, 0) == pytest.approx(5e-4)
    assert s.lr_at(T, 0) == 0.0
    assert s.lr_at(0.5 * T, step=10**9) == pytest.approx(s.lr_at(0.5 * T))  # the time clock ignores steps
    lrs = [s.lr_at(T * k / 1000) for k in range(60, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


@pytest.mark.parametrize("clock, length, at", [("time", 180.0, lambda x: (x, 0)),
                                                ("steps", 100, lambda x: (0.0, x))])
def test_schedule_progress_lr_and_done_on_either_clock(clock, length, at):
    s = Schedule(clock, length, peak_lr=2e-3, warmup_proportion=0.1)
    assert s.lr_at(*at(0.1 * length)) == pytest.approx(2e-3)
    assert s.lr_at(*at(0.05 * length)) == pytest.approx(1e-3)
    assert s.lr_at(*at(length)) == 0.0
    progress = [s.progress(*at(length * k / 50)) for k in range(0, 61)]
    assert progress[0] == 0.0 and progress[50] == 1.0 and progress[-1] == 1.0  # clamped past the end
    assert all(a < b for a, b in zip(progress[:50], progress[1:51]))  # strictly increasing until the end
    # done flips exactly at the length, with the reason the trainer logs
    before = length - 1 if clock == "steps" else length - 1e-9
    assert not s.done(*at(before)) and s.end_reason(*at(before)) is None
    assert s.done(*at(length))
    assert s.end_reason(*at(length)) == ("budget" if clock == "time" else "max_steps")


def test_max_steps_caps_a_time_budget_and_step_schedule_needs_it():
    capped = Schedule.from_config(TrainConfig(time_budget_hours=1.0, max_steps=5))
    assert capped.clock == "time" and capped.progress(1800.0, 5) == pytest.approx(0.5)
    assert capped.end_reason(1800.0, 4) is None and capped.end_reason(1800.0, 5) == "max_steps"
    steps = Schedule.from_config(TrainConfig(schedule="step", max_steps=40))
    assert (steps.clock, steps.length) == ("steps", 40) and steps.progress(10**6, 10) == 0.25
    with pytest.raises(ValueError, match="set max_steps"):
        Schedule.from_config(TrainConfig(schedule="step"))
    with pytest.raises(ValueError, match="clock must be one of"):
        Schedule("epochs", 3, 1e-3)
    with pytest.raises(ValueError, match="length must be > 0"):
        Schedule("steps", 0, 1e-3)


def test_set_lr_sets_every_group():
    s = Schedule("steps", 100, peak_lr=2e-3, warmup_proportion=0.1)
    opt = build_optimizer(Toy())
    set_lr(opt, s.lr_at(step=55))
    assert all(math.isclose(g["lr"], 1e-3) for g in opt.param_groups)
    with pytest.raises(ValueError, match="NaN"):
        set_lr(opt, float("nan"))


# ---- warmup-stable-decay and the batch ramp ---------------------------------------------------


@pytest.mark.parametrize("clock, length, at", [("time", 3600.0, lambda x: (x, 0)),
                                                ("steps", 1000, lambda x: (0.0, round(x)))])
def test_wsd_warms_up_holds_the_peak_then_decays_over_the_last_share(clock, length, at):
    s = Schedule(clock, length, peak_lr=2e-3, warmup_proportion=0.1, shape="wsd", decay_proportion=0.2)
    lr = lambda fraction: s.lr_at(*at(fraction * length))
    assert lr(0.0) == 0.0
    assert lr(0.05) == pytest.approx(1e-3)  # half-way through the warm-up
    assert lr(0.1) == pytest.approx(2e-3)
    assert lr(0.5) == pytest.approx(2e-3) and lr(0.8) == pytest.approx(2e-3)  # the stable phase
    assert lr(0.9) == pytest.approx(1e-3)  # half-way through the last 20%
    assert lr(0.95) == pytest.approx(0.5e-3)
    assert lr(1.0) == 0.0 and lr(1.5) == 0.0
    linear = Schedule(clock, length, peak_lr=2e-3, warmup_proportion=0.1)  # the default shape
    assert linear.shape == "linear"
    assert linear.lr_at(*at(0.5 * length)) == pytest.approx(2e-3 * 0.5 / 0.9)  # already decaying


def test_wsd_is_continuous_at_its_corners_and_linear_is_unchanged():
    s = Schedule("time", 1000.0, peak_lr=1.0, warmup_proportion=0.06, shape="wsd", decay_proportion=0.25)
    for corner in (0.06, 0.75, 1.0):
        t = corner * 1000.0
        assert s.lr_at(t - 1e-9) == pytest.approx(s.lr_at(t), abs=1e-9)
        assert s.lr_at(t + 1e-9) == pytest.approx(s.lr_at(t), abs=1e-9)
    lrs = [s.lr_at(t) for t in range(60, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after the warm-up
    # the linear shape is the paper's function, point for point, and a WSD whose decay starts
    # where the warm-up ends is the linear shape
    linear = Schedule("time", 1000.0, peak_lr=1.0, warmup_proportion=0.06)
    whole = Schedule("time", 1000.0, peak_lr=1.0, warmup_proportion=0.06, shape="wsd", decay_proportion=0.94)
    for t in range(0, 1001, 7):
        assert linear.lr_at(t) == linear_warmup_decay(t / 1000.0, 0.06)
        assert whole.lr_at(t) == pytest.approx(linear.lr_at(t), abs=1e-12)


def test_wsd_settings_are_checked_with_a_clear_message():
    with pytest.raises(ValueError, match=r"decay_proportion must be in \(0, 1\], got 0"):
        Schedule("time", 60.0, 1e-3, shape="wsd", decay_proportion=0.0)
    with pytest.raises(ValueError, match=r"decay_proportion must be in \(0, 1\], got 1.5"):
        Schedule("time", 60.0, 1e-3, shape="wsd", decay_proportion=1.5)
    with pytest.raises(ValueError, match=r"warmup_proportion \+ decay_proportion must be <= 1, got 0.3 \+ 0.8"):
        Schedule("time", 60.0, 1e-3, warmup_proportion=0.3, shape="wsd", decay_proportion=0.8)
    with pytest.raises(ValueError, match="lr_schedule must be one of linear, wsd, got 'cosine'"):
        Schedule("time", 60.0, 1e-3, shape="cosine")
    Schedule("time", 60.0, 1e-3, warmup_proportion=0.3, decay_proportion=0.8)  # linear ignores decay
    # the config reaches the same checks through validate()
    with pytest.raises(ValueError, match=r"warmup_proportion \+ decay_proportion"):
        TrainConfig(lr_schedule="wsd", warmup_proportion=0.5, decay_proportion=0.6).validate(check_data=False)


def test_from_config_reads_the_shape_and_the_ramp():
    config = TrainConfig(time_budget_hours=1.0, lr_schedule="wsd", decay_proportion=0.3, batch_size=4096,
                         micro_batch_size=32, batch_ramp_proportion=0.25, batch_ramp_start=512)
    s = Schedule.from_config(config, world_size=8)
    assert (s.shape, s.decay_proportion, s.batch_size, s.batch_unit) == ("wsd", 0.3, 4096, 256)
    assert (s.batch_ramp_proportion, s.batch_ramp_start) == (0.25, 512)
    assert s.lr_at(0.7 * 3600) == pytest.approx(1e-3) and s.lr_at(0.85 * 3600) == pytest.approx(0.5e-3)
    finetune = Schedule("steps", 100, 2e-5, 0.1)  # as bbert.glue builds it: linear, no batch
    assert finetune.lr_at(step=55) == pytest.approx(1e-5)


@pytest.mark.parametrize("clock, length, at", [("time", 1000.0, lambda x: (x, 0)),
                                                ("steps", 1000, lambda x: (0.0, round(x)))])
def test_batch_ramp_grows_in_whole_micro_batches_to_the_batch_size(clock, length, at):
    # batch 64 of micro-batches of 8 samples (4 per rank x 2 ranks), ramped over the first half
    s = Schedule(clock, length, 1e-3, batch_size=64, batch_unit=8, batch_ramp_proportion=0.5)
    batch = lambda fraction: s.batch_size_at(*at(fraction * length))
    assert batch(0.0) == 8  # one micro-batch per rank
    # 8 + 56 x (0.1 / 0.5) = 19.2 -> 16; 8 + 56 x 0.5 = 36 -> 32; 8 + 56 x 0.8 = 52.8 -> 48
    assert [batch(0.1), batch(0.25), batch(0.4)] == [16, 32, 48]
    assert batch(0.5) == batch(0.9) == batch(1.0) == 64
    assert s.accumulation_at(*at(0.25 * length)) == 4 and s.accumulation_at(*at(0.6 * length)) == 8
    sizes = [batch(k / 100) for k in range(101)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])) and all(b % 8 == 0 for b in sizes)
    started = Schedule(clock, length, 1e-3, batch_size=64, batch_unit=8, batch_ramp_proportion=0.5,
                       batch_ramp_start=32)
    # 32 + 32 x (0.2 / 0.5) = 44.8 -> 40
    assert started.batch_size_at(*at(0.0)) == 32 and started.batch_size_at(*at(0.2 * length)) == 40
    off = Schedule(clock, length, 1e-3, batch_size=64, batch_unit=8)
    assert off.batch_size_at(*at(0.0)) == 64 and off.accumulation_at(*at(0.0)) == 8


def test_batch_ramp_settings_are_checked_with_a_clear_message():
    ok = dict(batch_size=64, micro_batch_size=4, time_budget_hours=1.0, engine="torch", precision="fp32")
    TrainConfig(**ok, batch_ramp_proportion=0.3, batch_ramp_start=16).validate(world_size=2, check_data=False)
    with pytest.raises(ValueError, match=r"batch_ramp_proportion must be in \[0, 1\) \(0 = no ramp\), got 1.0"):
        TrainConfig(**ok, batch_ramp_proportion=1.0).validate(check_data=False)
    with pytest.raises(ValueError, match=r"batch_ramp_start=12 must be a multiple of micro_batch_size x "
                                         r"world_size = 8 and at most batch_size=64"):
        TrainConfig(**ok, batch_ramp_proportion=0.3, batch_ramp_start=12).validate(world_size=2, check_data=False)
    with pytest.raises(ValueError, match="batch_ramp_start=128 must be"):
        TrainConfig(**ok, batch_ramp_proportion=0.3, batch_ramp_start=128).validate(check_data=False)
    with pytest.raises(ValueError, match="batch_ramp_start=0 must be"):
        TrainConfig(**ok, batch_ramp_proportion=0.3, batch_ramp_start=0).validate(check_data=False)


# ---- schedule_hours: the schedule's length apart from the stop --------------------------

def _planned_for(times_the_budget: float, clock: str) -> Schedule:
    budget_hours = 0.1  # 360 s; on the step clock, 200 steps
    planned = None if times_the_budget is None else times_the_budget * budget_hours
    if clock == "steps":
        config = TrainConfig(time_budget_hours=budget_hours, schedule="step", max_steps=200,
                             schedule_hours=planned, warmup_proportion=0.06)
    else:
        config = TrainConfig(time_budget_hours=budget_hours, schedule_hours=planned, warmup_proportion=0.06)
    return Schedule.from_config(config)


def _at(clock: str, fraction_of_budget: float) -> tuple[float, int]:
    return (360.0 * fraction_of_budget, 0) if clock == "time" else (0.0, round(200 * fraction_of_budget))


@pytest.mark.parametrize("clock", ["time", "steps"])
def test_a_schedule_planned_for_twice_the_budget_stops_at_the_budget_with_lr_left(clock):
    synced, default, longer = (_planned_for(x, clock) for x in (1.0, None, 2.0))
    stop = _at(clock, 1.0)
    # planned for the budget (the default): the lr reaches zero where the run stops
    assert synced.lr_at(*stop) == default.lr_at(*stop) == 0.0
    # planned for 2x: the stop is half-way through the plan, lr = (1 - 0.5) / (1 - 0.06) of the peak
    assert longer.lr_at(*stop) == pytest.approx(1e-3 * 0.5 / 0.94)
    for schedule in (synced, longer):  # both stop at the budget, and not a step before
        before = (stop[0] - 1e-6, 0) if clock == "time" else (0.0, stop[1] - 1)
        assert schedule.end_reason(*before) is None
        assert schedule.end_reason(*stop) == ("budget" if clock == "time" else "max_steps")
        assert schedule.progress(*stop) == 1.0  # the budget fraction, for markers and logs
    assert longer.planned(*stop) == pytest.approx(0.5)


@pytest.mark.parametrize("clock", ["time", "steps"])
@pytest.mark.parametrize("times", [1.0, 1.5, 2.0])
def test_the_warm_up_scales_with_schedule_hours(clock, times):
    schedule = _planned_for(times, clock)
    peak_at = _at(clock, 0.06 * times)  # the warm-up is 6% of the planned length
    assert schedule.lr_at(*peak_at) == pytest.approx(1e-3)
    half_way = _at(clock, 0.03 * times)
    assert schedule.lr_at(*half_way) == pytest.approx(5e-4, rel=0.02)  # steps round the point


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_schedule_hours_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match=r"^schedule_hours must be > 0 and finite") as error:
        TrainConfig(time_budget_hours=1.0, schedule_hours=value).validate(check_data=False)
    assert "\n" not in str(error.value)


def test_schedule_hours_reaches_set_the_cli_error_and_the_search_grid(capsys, tmp_path):
    import yaml

    from bbert.search import parse_grid
    from bbert.train import main
    from bbert.trials import trial_config

    assert main(["--preset", "tiny-cpu", "--set", "schedule_hours=0.08", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["schedule_hours"] == 0.08
    assert TrainConfig.from_preset("tiny-cpu").schedule_hours is None  # the budget by default
    run_dir = tmp_path / "refused"
    assert main(["--preset", "tiny-cpu", "--set", "schedule_hours=0", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "schedule_hours must be > 0" in err and "\n" not in err and not run_dir.exists()
    grid = parse_grid(["schedule_hours=0.04,0.06"])  # bbert search --grid schedule_hours=...
    trial = trial_config(TrainConfig.from_preset("tiny-cpu"), {"schedule_hours": grid["schedule_hours"][1]},
                         tmp_path / "t")
    assert Schedule.from_config(trial).length == pytest.approx(0.06 * 3600)


@pytest.mark.slow
def test_a_real_run_with_set_schedule_hours_logs_the_planned_lrs(tmp_path):
    from helpers_train import make_data_dir, records, tiny_config

    from bbert.train import main

    data_dir = make_data_dir(tmp_path / "data")
    config = tiny_config(data_dir, tmp_path / "run", time_budget_hours=0.01, checkpoint_fractions=[],
                         validation_every_minutes=None, debug={"step_time_seconds": 3.0})
    config.to_yaml(tmp_path / "run.yaml")  # 36 s at 3 s a step: 12 steps, planned for 72 s
    assert main(["--config", str(tmp_path / "run.yaml"), "--set", "schedule_hours=0.02"]) == 0
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:  # each step's lr is the formula's at the second it started, on 72 s
        assert r["lr"] == pytest.approx(1e-3 * linear_warmup_decay(r["lr_elapsed_seconds"] / 72.0, 0.06))
    assert train[-1]["lr"] == pytest.approx(1e-3 * (1 - 33 / 72) / 0.94)  # the last step starts at 33 s
    assert records(tmp_path / "run", "end")[-1]["reason"] == "budget"
