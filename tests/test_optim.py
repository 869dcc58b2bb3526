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
