import math

import pytest
import torch
from torch import nn

from bbert.optim import (Lamb, StepBasedSchedule, TimeBasedSchedule, build_optimizer,
                         linear_warmup_decay, param_groups, set_lr)


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
    s = TimeBasedSchedule(lr=1e-3, time_budget_hours=hours, warmup_proportion=0.06)
    T = hours * 3600
    assert s.lr_at(0) == 0.0
    assert s.lr_at(0.06 * T) == pytest.approx(1e-3)
    assert s.lr_at(0.53 * T) == pytest.approx(5e-4)
    assert s.lr_at(T) == 0.0
    lrs = [s.lr_at(T * k / 1000) for k in range(60, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_step_schedule_and_set_lr():
    s = StepBasedSchedule(lr=2e-3, total_steps=100, warmup_proportion=0.1)
    assert s.lr_at(5) == pytest.approx(1e-3) and s.lr_at(10) == pytest.approx(2e-3) and s.lr_at(100) == 0
    opt = build_optimizer(Toy())
    set_lr(opt, s.lr_at(55))
    assert all(math.isclose(g["lr"], 1e-3) for g in opt.param_groups)
    with pytest.raises(ValueError):
        StepBasedSchedule(lr=1e-3, total_steps=0)
