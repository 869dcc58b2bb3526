"""Optimizers and the learning-rate schedule of the recipe.

AdamW (lr 1e-3, betas 0.9/0.98, eps 1e-6, weight decay 0.01) with biases and LayerNorm
weights exempt from decay, an optional LAMB, and the :class:`Schedule` that makes 24hBERT a
*time*-budgeted run: warm-up for ``warmup_proportion`` of the budget, then linear decay to
zero at its end, with elapsed wall-clock seconds as the clock.

Two later options share that clock, both off by default: the warmup-stable-decay
("trapezoidal") shape, which holds the peak and decays only over the last ``decay_proportion``
of the budget (Zhai et al. 2022; Hu et al. 2024, MiniCPM; Hägele et al. 2024 find a 20% linear
cool-down as good as cosine; ModernBERT trains with it), and a batch-size ramp, where the global
batch grows linearly to ``batch_size`` over the first ``batch_ramp_proportion`` of the budget
(Cramming, Geiping & Goldstein 2023; GPT-3's batch warm-up).

The schedule's length and the stop are two numbers, as in the paper's code
(``--total_training_time`` and ``--early_exit_time_marker``): ``TrainConfig.schedule_hours``
plans the warm-up, decay and ramp for that long, while the run still stops at the budget.

Chapters: ``notebooks/03_model.ipynb`` (optimizers), ``notebooks/04_pretraining.ipynb`` (the schedule),
``notebooks/06_findings.ipynb`` (a schedule planned for the budget against longer ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decayed weights, and biases plus LayerNorm weights (no decay).

    As in BERT, weight decay applies to matmul weights only; a bias or a LayerNorm gain
    pulled towards zero only hurts. Embeddings are decayed (as in BERT and the paper's code),
    LayerNorm and bias parameters are not.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue  # tied weights appear twice
            seen.add(id(param))
            if isinstance(module, nn.LayerNorm) or name.endswith("bias") or param.ndim < 2:
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_supported(params: Iterable[torch.Tensor]) -> bool:
    # torch >= 2.4 has fused AdamW kernels for CUDA, CPU and MPS; elsewhere use foreach.
    devices = {p.device.type for p in params}
    return bool(devices) and devices <= {"cuda", "cpu", "mps"}


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                    weight_decay: float = 0.01, fused: bool | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer: ``"adamw"`` (fused where the device has it) or ``"lamb"``.

    Defaults are the paper's AdamW settings.
    """
    groups = param_groups(model, weight_decay)
    betas = tuple(float(b) for b in betas)
    name = name.lower()
    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        if fused is None:
            fused = _fused_supported(params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=bool(fused))
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}: use 'adamw' (the paper's) or 'lamb'")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020): Adam's update rescaled per tensor by ||w|| / ||update||.

    The trust ratio lets very large batches train with a high learning rate. Weight decay is
    decoupled and part of the update, as in the paper.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_trust_ratio: float = 10.0):
        if lr <= 0:
            raise ValueError(f"LAMB needs lr > 0, got {lr}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                w_norm, u_norm = p.float().norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                trust = trust.clamp(max=group["max_trust_ratio"])
                p.add_((update * trust).to(p.dtype), alpha=-group["lr"])
        return loss


# ---- the schedule ----------------------------------------------------------------------

CLOCKS = ("time", "steps")
SHAPES = ("linear", "wsd")


def _check_warmup(warmup_proportion: float) -> None:
    if not 0.0 <= warmup_proportion < 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1), got {warmup_proportion}")


def linear_warmup_decay(progress: float, warmup_proportion: float) -> float:
    """The lr multiplier at ``progress`` in [0, 1] of the schedule: linear warm-up,
    then linear decay to 0.

    ``progress`` is a fraction of the *planned schedule* (time or steps; by default the
    budget), so the shape is the same for a 3-minute CPU run and a 24-hour run.
    """
    _check_warmup(warmup_proportion)
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_proportion:
        return progress / warmup_proportion
    return max(0.0, (1.0 - progress) / (1.0 - warmup_proportion))


def warmup_stable_decay(progress: float, warmup_proportion: float, decay_proportion: float = 0.2) -> float:
    """The warmup-stable-decay (trapezoidal) multiplier at ``progress`` in [0, 1] of the run.

    Linear warm-up over ``warmup_proportion``, the peak held, then linear decay to 0 over the
    last ``decay_proportion`` of the budget. With ``warmup + decay = 1`` it is the linear shape.
    """
    _check_warmup(warmup_proportion)
    if not 0.0 < decay_proportion <= 1.0:
        raise ValueError(f"decay_proportion must be in (0, 1], got {decay_proportion} "
                         "(0.2: decay over the last 20% of the budget)")
    if warmup_proportion + decay_proportion > 1.0:
        raise ValueError(f"warmup_proportion + decay_proportion must be <= 1, got {warmup_proportion} + "
                         f"{decay_proportion}: warm-up and decay would overlap; shorten one of them")
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_proportion:
        return progress / warmup_proportion
    return min(1.0, (1.0 - progress) / decay_proportion)


@dataclass
class Schedule:
    """The run's budget, learning rate and batch size, measured on one clock: elapsed seconds or steps.

    ``clock="time"`` is the paper's: warm-up over ``warmup_proportion`` of ``length`` seconds,
    then linear decay to zero at the end of the budget, where the run stops. Computed directly
    from elapsed seconds, so it is exact for budgets of minutes as well as days.
    ``clock="steps"`` is the classic schedule over ``length`` optimizer steps (finetuning uses it).
    ``stop`` is where the run ends on the same clock (the budget); None: at the end of the
    schedule. A ``length`` past the ``stop`` is a schedule planned for longer than the run.
    ``max_steps`` optionally caps a run at that many steps whatever the clock.
    ``shape="wsd"`` holds the peak after warm-up and decays over the last ``decay_proportion``
    of the schedule instead (``"linear"``, the paper's, decays from the end of warm-up).
    ``batch_size`` is the global batch, made of micro-batches of ``batch_unit`` samples over all
    ranks (micro_batch_size x world_size); with ``batch_ramp_proportion > 0`` it grows linearly
    from ``batch_ramp_start`` (None: one micro-batch per rank) to ``batch_size`` over that share
    of the schedule, rounded down to whole micro-batches.
    The trainer asks this object, never the config: the lr, the batch size, the fraction of the
    budget used, and whether (and why) the run is over.
    """

    clock: str
    length: float
    peak_lr: float
    warmup_proportion: float = 0.06
    max_steps: int | None = None
    shape: str = "linear"
    decay_proportion: float = 0.2
    batch_size: int | None = None
    batch_unit: int = 1
    batch_ramp_proportion: float = 0.0
    batch_ramp_start: int | None = None
    stop: float | None = None

    def __post_init__(self):
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if not self.length > 0:
            unit = "seconds" if self.clock == "time" else "steps"
            raise ValueError(f"the schedule's length must be > 0 {unit}, got {self.length}")
        if self.stop is not None and not 0 < self.stop < math.inf:
            raise ValueError(f"the schedule's stop must be > 0 and finite, got {self.stop}")
        if self.shape not in SHAPES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SHAPES)}, got {self.shape!r} "
                             "(linear: the paper's decay after warm-up; wsd: warmup-stable-decay)")
        self.multiplier(0.0)  # validates warmup_proportion (and decay_proportion for wsd)
        self._check_batch_ramp()

    def _check_batch_ramp(self) -> None:
        if not 0.0 <= self.batch_ramp_proportion < 1.0:
            raise ValueError(f"batch_ramp_proportion must be in [0, 1) (0 = no ramp), got {self.batch_ramp_proportion}")
        if self.batch_ramp_start is None:
            return
        if self.batch_size is None:
            raise ValueError("batch_ramp_start needs the schedule's batch_size")
        start, unit = self.batch_ramp_start, self.batch_unit
        if not 0 < start <= self.batch_size or start % unit:
            raise ValueError(f"batch_ramp_start={start} must be a multiple of micro_batch_size x world_size = "
                             f"{unit} and at most batch_size={self.batch_size}; e.g. batch_ramp_start={unit} "
                             "(or null: one micro-batch per rank)")

    @classmethod
    def from_config(cls, config, world_size: int = 1) -> "Schedule":
        """The schedule of a :class:`bbert.train_config.TrainConfig` run on ``world_size``
        ranks (its budget in seconds or steps, its lr shape and batch ramp, planned for
        ``schedule_hours`` when set, stopped at the budget)."""
        options = dict(shape=config.lr_schedule, decay_proportion=config.decay_proportion,
                       batch_size=config.batch_size,
                       batch_unit=config.micro_batch_size * world_size,
                       batch_ramp_proportion=config.batch_ramp_proportion,
                       batch_ramp_start=config.batch_ramp_start)
        planned = config.schedule_hours
        if planned is not None and not 0 < planned < math.inf:  # also refuses nan
            raise ValueError(f"schedule_hours must be > 0 and finite, or null for the "
                             f"budget (time_budget_hours={config.time_budget_hours}); "
                             f"got {planned}")
        # the schedule's length as a multiple of the budget (1: planned to end at the stop)
        stretch = 1.0 if planned is None else planned / config.time_budget_hours
        if config.schedule == "step":
            if not config.max_steps:
                raise ValueError("schedule='step' decays over max_steps: set max_steps=N, "
                                 "or use schedule='time'")
            return cls("steps", config.max_steps * stretch, config.lr,
                       config.warmup_proportion, config.max_steps, stop=config.max_steps,
                       **options)
        budget = config.time_budget_seconds
        return cls("time", budget * stretch, config.lr, config.warmup_proportion,
                   config.max_steps, stop=budget, **options)

    def _clock(self, elapsed_seconds: float, step: int) -> float:
        return elapsed_seconds if self.clock == "time" else step

    def _used(self, elapsed_seconds: float, step: int) -> float:
        """The fraction of the *planned* schedule used: seconds (or steps) / its length."""
        return self._clock(elapsed_seconds, step) / self.length

    def progress(self, elapsed_seconds: float = 0.0, step: int = 0) -> float:
        """The fraction of the budget (up to the stop) used, in [0, 1]."""
        stop = self.length if self.stop is None else self.stop
        return min(max(self._clock(elapsed_seconds, step) / stop, 0.0), 1.0)

    def planned(self, elapsed_seconds: float = 0.0, step: int = 0) -> float:
        """The fraction of the planned schedule used, in [0, 1] (= progress by default)."""
        return min(max(self._used(elapsed_seconds, step), 0.0), 1.0)

    def multiplier(self, progress: float) -> float:
        """The lr as a fraction of the peak at ``progress`` in [0, 1] of the planned schedule."""
        if self.shape == "wsd":
            return warmup_stable_decay(progress, self.warmup_proportion, self.decay_proportion)
        return linear_warmup_decay(progress, self.warmup_proportion)

    def lr_at(self, elapsed_seconds: float = 0.0, step: int = 0) -> float:
        return self.peak_lr * self.multiplier(self.planned(elapsed_seconds, step))

    def batch_size_at(self, elapsed_seconds: float = 0.0, step: int = 0) -> int:
        """The global batch of the step that starts at this point (``batch_size`` once the ramp is over)."""
        progress = self.planned(elapsed_seconds, step)
        if progress >= self.batch_ramp_proportion:
            return self.batch_size
        start = self.batch_ramp_start or self.batch_unit
        ramped = start + (self.batch_size - start) * progress / self.batch_ramp_proportion
        # whole micro-batches, rounded down; 1e-9: a boundary computed in floats lands where it means
        return self.batch_unit * math.floor(ramped / self.batch_unit + 1e-9)

    def accumulation_at(self, elapsed_seconds: float = 0.0, step: int = 0) -> int:
        """Micro-batches per rank in the step that starts at this point."""
        return self.batch_size_at(elapsed_seconds, step) // self.batch_unit

    def end_reason(self, elapsed_seconds: float = 0.0, step: int = 0) -> str | None:
        """``"max_steps"`` or ``"budget"`` once the run is over, else None."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        stop = self.length if self.stop is None else self.stop
        if self._clock(elapsed_seconds, step) >= stop:
            return "budget" if self.clock == "time" else "max_steps"
        return None

    def done(self, elapsed_seconds: float = 0.0, step: int = 0) -> bool:
        return self.end_reason(elapsed_seconds, step) is not None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (the schedule is a stateless function)."""
    if math.isnan(lr):
        raise ValueError("learning rate is NaN")
    for group in optimizer.param_groups:
        group["lr"] = lr
