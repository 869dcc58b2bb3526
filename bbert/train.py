"""The time-budgeted masked-LM pretraining run of 24hBERT: config, engines, loop, checkpoints.

A run is defined by a wall-clock *budget* (``time_budget_hours``), not a step count:

* the learning rate warms up over ``warmup_proportion`` of the budget and decays linearly to
  zero at its end, with elapsed seconds as the clock (``bbert.optim.TimeBasedSchedule``);
* the budget is checked after every optimizer step; the run stops at the budget and saves
  a final checkpoint and ``final/model``. The clock starts at the first step (building the
  model and starting DeepSpeed are not counted) and includes validation and checkpoints; the
  budget used so far is saved in every checkpoint, so a resumed run continues the same clock;
* the global batch (4096 in the paper) comes from gradient accumulation:
  ``batch_size = micro_batch_size x world_size x gradient_accumulation_steps``.

Two engines run the same loop: DeepSpeed (GPU servers, several nodes) and plain PyTorch
(one process or ``torchrun`` DDP). Both read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the
launcher::

    python -m bbert.train --preset tiny-cpu --data-dir data/sample --run-dir runs/tiny
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 -m bbert.train --config run.yaml
    deepspeed --num_gpus 8 --master_port 29512 --module bbert.train --config run.yaml
    deepspeed --hostfile hostfile --master_port 29512 --module bbert.train --config run.yaml

With a hostfile, every node must see the same data dir and run dir (a shared filesystem):
DeepSpeed checkpoints are written by all ranks into the same folder.

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bbert.data import MaskingConfig, build_pretraining_loader, load_manifest, load_tokenizer
from bbert.model import BertConfig, BertForMaskedLM
from bbert.optim import StepBasedSchedule, TimeBasedSchedule, build_optimizer, set_lr
from bbert.utils import atomic_path, atomic_write_json, atomic_write_text, fast_bf16, set_seed

ENGINES = ("deepspeed", "torch")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("time", "step")
OPTIMIZERS = ("adamw", "lamb")
END_REASONS = ("budget", "max_steps", "early_stop", "nan", "interrupted")


# ---- configuration ------------------------------------------------------------------------


@dataclass
class EarlyStopConfig:
    """Stop a bad run early: validation loss above ``max_val_loss`` once ``after_minutes`` have passed.

    The paper's runs used 180 minutes and a loss of 6. Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    enabled: bool = False
    after_minutes: float = 180.0
    max_val_loss: float = 6.0


@dataclass
class DebugConfig:
    """Knobs for tests and debugging; leave them at their defaults for real runs.

    ``step_time_seconds`` replaces the wall clock by a simulated one where every optimizer step
    takes exactly that long, which makes a time-budgeted run deterministic (same lr and loss at
    every step, same end), e.g. to check that a killed and resumed run matches an uninterrupted
    one. ``nan_at_step`` poisons the loss of that optimizer step (tests the NaN stop).
    ``sleep_seconds_per_step`` slows each step down (gives a test time to kill the process).
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    step_time_seconds: float | None = None
    nan_at_step: int | None = None
    sleep_seconds_per_step: float = 0.0


@dataclass
class TrainConfig:
    """Everything about a pretraining run. Defaults are the paper's 8-GPU 24hBERT run.

    ``model`` names a ``bbert.model.BertConfig`` preset; ``model_overrides`` changes its fields
    (``vocab_size`` always comes from the data dir). ``batch_size`` is global; the engine
    accumulates ``batch_size / (micro_batch_size x world_size)`` micro-batches per step.
    ``max_grad_norm = 0`` means no clipping (the paper's setting). ``checkpoint_fractions`` are
    the time markers (fractions of the budget) where a checkpoint is kept for finetuning.
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    data_dir: str = "data/sample"
    run_dir: str = "runs/24hbert"
    model: str = "large"
    model_overrides: dict = field(default_factory=dict)
    max_seq_length: int = 128
    seed: int = 42
    # budget and schedule
    time_budget_hours: float = 24.0
    max_steps: int | None = None
    schedule: str = "time"
    warmup_proportion: float = 0.06
    # optimizer
    optimizer: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 0.0
    # batch, precision, engine
    batch_size: int = 4096
    micro_batch_size: int = 32
    precision: str = "fp16"
    engine: str = "deepspeed"
    zero_stage: int = 0
    compile: bool = False
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # validation, checkpoints, early stop, logging
    validation_every_minutes: float | None = 30.0
    max_val_batches: int | None = None
    checkpoint_every_minutes: float | None = 60.0
    keep_last_checkpoints: int = 2
    checkpoint_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log_every_steps: int = 10
    tensorboard: bool = False
    peak_flops: float | None = None  # per device, for MFU; None = look up / measure, 0 = skip MFU
    debug: DebugConfig = field(default_factory=DebugConfig)

    # -- presets --------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """``"24hbert"`` (the paper's 8-GPU, 24-hour run) or ``"tiny-cpu"`` (about 3 minutes here).

        Keyword overrides replace fields (nested ones as dataclasses or dicts).
        Chapter: ``notebooks/04_pretraining.ipynb``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose one of {', '.join(PRESETS)}")
        data = PRESETS[name]()
        data.update(overrides)
        return cls.from_dict(data)

    # -- dict / YAML ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A plain dict (lists, not tuples) that YAML and JSON can hold."""
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build a config from a (possibly partial) dict; unknown keys are an error."""
        return _from_dict(cls, dict(data), prefix="")

    def to_yaml(self, path) -> Path:
        """Write the full config to ``path`` atomically."""
        path = Path(path)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        """Read a config written by :meth:`to_yaml` (or a hand-written partial one)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training config at {path}; write one with TrainConfig.to_yaml "
                                    "or start from a preset (--preset 24hbert | tiny-cpu)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(data)

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> "TrainConfig":
        """A copy with ``["key=value", "model.hidden_size=256", "early_stop.enabled=true"]`` applied.

        Values are parsed with ``yaml.safe_load`` (``1e-3``, ``true``, ``[0.9, 0.98]``, ``null``).
        ``model.<field>=...`` sets a model override; ``model=<preset>`` picks the model preset.
        """
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like key=value (e.g. lr=5e-4)")
            value = yaml.safe_load(raw) if raw.strip() else None
            parts = key.split(".")
            if parts[0] == "model" and len(parts) > 1:
                data["model_overrides"] = {**data["model_overrides"], ".".join(parts[1:]): value}
                continue
            target = data
            for depth, part in enumerate(parts[:-1]):
                if part not in target or not isinstance(target[part], dict):
                    raise ValueError(f"unknown config field {'.'.join(parts[:depth + 1])!r} in override {item!r}")
                target = target[part]
            if parts[-1] not in target:
                raise ValueError(_unknown_field_message(key, list(target)))
            target[parts[-1]] = value
        return type(self).from_dict(data)

    # -- derived values ---------------------------------------------------------------------

    @property
    def time_budget_seconds(self) -> float:
        return self.time_budget_hours * 3600.0

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank: batch / (micro-batch x world size)."""
        per_pass = self.micro_batch_size * world_size
        if per_pass <= 0 or self.batch_size % per_pass:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by micro_batch_size x world_size = "
                f"{self.micro_batch_size} x {world_size} = {per_pass}; change batch_size to a multiple of "
                f"{per_pass} or pick a micro_batch_size that divides {self.batch_size // max(world_size, 1)}")
        return self.batch_size // per_pass

    def model_config(self, vocab_size: int) -> BertConfig:
        """The ``BertConfig`` of this run, for a tokenizer of ``vocab_size`` tokens."""
        overrides = {**self.model_overrides, "vocab_size": vocab_size}
        overrides.setdefault("max_position_embeddings", max(512, self.max_seq_length))
        return BertConfig.from_preset(self.model, **overrides)

    def deepspeed_config(self, world_size: int = 1) -> dict:
        """The DeepSpeed JSON config of this run.

        bbert keeps the optimizer (a ``torch.optim.AdamW`` built by ``bbert.optim``, handed to
        ``deepspeed.initialize``, so DeepSpeed JIT-builds no CPU Adam) and the time-based schedule
        (it sets the lr itself before every step), so neither appears here.
        ``gradient_clipping: 0`` means no clipping. Chapter: ``notebooks/04_pretraining.ipynb``.
        """
        return {
            "train_batch_size": self.batch_size,
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps(world_size),
            "gradient_clipping": float(self.max_grad_norm),
            "zero_optimization": {"stage": int(self.zero_stage)},
            # loss_scale 0 = dynamic loss scaling, as in the paper's code
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 2**31 - 1,  # bbert logs; keep DeepSpeed quiet
            "wall_clock_breakdown": False,
        }

    # -- validation -------------------------------------------------------------------------

    def validate(self, world_size: int = 1, check_data: bool = True) -> "TrainConfig":
        """Raise ``ValueError`` naming what to change if this run can't start; return self.

        Checks the choices, the batch arithmetic, the precision against the device, the
        engine's availability and (``check_data``) the data dir. Chapter: ``notebooks/04_pretraining.ipynb``.
        """
        def choice(name, value, options):
            if value not in options:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, options))}")

        choice("engine", self.engine, ENGINES)
        choice("precision", self.precision, PRECISIONS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.zero_stage == 3:
            # ZeRO-3 partitions the weights themselves; bbert's checkpoints and mid-run
            # validation assume whole weights on every rank (tested up to ZeRO-2)
            raise ValueError("zero_stage=3 is not supported by bbert.train: use 0 (the paper's), 1 or 2")
        choice("zero_stage", self.zero_stage, (0, 1, 2))
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.micro_batch_size < 1 or self.batch_size < 1:
            raise ValueError("batch_size and micro_batch_size must be >= 1")
        self.gradient_accumulation_steps(world_size)
        if not self.time_budget_hours or self.time_budget_hours <= 0:
            raise ValueError(f"time_budget_hours must be > 0, got {self.time_budget_hours} "
                             "(e.g. 24 for the paper's run, 0.05 for 3 minutes)")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion} "
                             "(the paper warms up for 0.06 of the budget)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.schedule == "step" and not self.max_steps:
            raise ValueError("schedule='step' decays over max_steps: set max_steps=N, or use schedule='time'")
        if not self.lr > 0 or not self.eps > 0:
            raise ValueError(f"lr and eps must be > 0, got lr={self.lr}, eps={self.eps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm=0: no clipping)")
        if self.keep_last_checkpoints < 1:
            raise ValueError(f"keep_last_checkpoints must be >= 1 (the last good checkpoint is always kept), "
                             f"got {self.keep_last_checkpoints}")
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {self.log_every_steps}")
        bad = [f for f in self.checkpoint_fractions if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"checkpoint_fractions must lie in (0, 1) (the end is always saved), got {bad}")
        for name in ("validation_every_minutes", "checkpoint_every_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, or null to turn it off; got {value}")
        if self.early_stop.enabled and self.validation_every_minutes is None:
            raise ValueError("early_stop needs validation: set validation_every_minutes, or early_stop.enabled=false")
        if self.debug.step_time_seconds is not None and self.debug.step_time_seconds <= 0:
            raise ValueError("debug.step_time_seconds must be > 0 or null (null = the real clock)")
        if self.zero_stage and self.engine != "deepspeed":
            raise ValueError(f"zero_stage={self.zero_stage} needs engine='deepspeed'; "
                             "with engine='torch' set zero_stage=0")
        if self.engine == "deepspeed" and self.precision == "fp16" and self.zero_stage == 0:
            # DeepSpeed's engine.backward scales the loss only for its ZeRO optimizers, yet the
            # stage-0 fp16 optimizer still divides the gradients by the loss scale: every update
            # comes out ~65536x too small. Seen with DeepSpeed 0.19.8 on an H200 (the loss barely
            # moved); upstream: deepspeedai/DeepSpeed#8393.
            raise ValueError("engine='deepspeed' with precision='fp16' needs zero_stage >= 1: at zero_stage=0 "
                             "DeepSpeed leaves the loss unscaled but still unscales the gradients, so training "
                             "stalls (deepspeedai/DeepSpeed#8393). Use zero_stage=1 (the 24hbert preset's; it "
                             "also shards the optimizer state), precision='bf16', or engine='torch'")
        if self.engine == "deepspeed" and self.optimizer == "lamb" and self.zero_stage >= 1:
            # ZeRO hands the optimizer flat slices of many tensors; LAMB's trust ratio is per tensor.
            raise ValueError(f"optimizer='lamb' with zero_stage={self.zero_stage}: ZeRO flattens the parameters, "
                             "so LAMB's per-layer trust ratios would be computed over slices of many layers. "
                             "Use engine='torch' (fp16 with a grad scaler, DDP across GPUs), or zero_stage=0 "
                             "with precision='bf16' or 'fp32'")
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("precision='fp16' needs a CUDA GPU (no fp16 training on this CPU); "
                             "use precision='bf16' or 'fp32'")
        if self.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16; use precision='fp16' (as the paper) or 'fp32'")
        if self.precision == "bf16" and not torch.cuda.is_available() and not fast_bf16("cpu"):
            warnings.warn("precision='bf16' on a CPU without native bf16 (no AVX-512 BF16 / AMX): torch "
                          "emulates it, ~100x slower than fp32; use precision='fp32' here", stacklevel=2)
        if self.engine == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError as e:
                raise ValueError("engine='deepspeed' but DeepSpeed is not installed: pip install 'bbert[deepspeed]', "
                                 "or use engine='torch'") from e
        try:
            self.model_config(vocab_size=self.model_overrides.get("vocab_size", 30522))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model={self.model!r} with model_overrides={self.model_overrides}: {e}") from e
        if check_data:
            self._validate_data(world_size)
        return self

    def _validate_data(self, world_size: int = 1) -> None:
        data_dir = Path(self.data_dir)
        if not (data_dir / "manifest.json").is_file():
            raise ValueError(f"data_dir {str(data_dir)!r} has no manifest.json: prepare it first with "
                             f"`bbert prepare --out {data_dir}` (or bbert.data.prepare), or set data_dir")
        manifest = load_manifest(data_dir)
        if manifest.get("max_seq_length") != self.max_seq_length:
            raise ValueError(f"data_dir {str(data_dir)!r} holds sequences of {manifest.get('max_seq_length')} tokens "
                             f"but max_seq_length={self.max_seq_length}: set max_seq_length="
                             f"{manifest.get('max_seq_length')} or prepare the data with that length")
        splits = manifest.get("splits", {})
        if not splits.get("train", {}).get("num_samples"):
            raise ValueError(f"data_dir {str(data_dir)!r} has no training samples; re-run bbert prepare")
        if self.validation_every_minutes is not None and not splits.get("val", {}).get("num_samples"):
            raise ValueError(f"data_dir {str(data_dir)!r} has no validation split: prepare it with a val "
                             "split, or set validation_every_minutes=null")
        # The loaders give every rank whole micro-batches; catch a too-small split now, not at the end.
        per_step = world_size * self.micro_batch_size
        for split in ("train", "val") if self.validation_every_minutes is not None else ("train",):
            have = splits.get(split, {}).get("num_samples", 0)
            if have < per_step:
                raise ValueError(f"split {split!r} of {str(data_dir)!r} has {have} samples, fewer than one "
                                 f"micro-batch on every rank ({world_size} x {self.micro_batch_size}): prepare "
                                 "more text (or raise --val-fraction), or lower micro_batch_size")


def _preset_24hbert() -> dict:
    # Izsak et al. (2021): BERT-large shape, pre-LN, seq 128, AdamW lr 1e-3 (0.9, 0.98) eps 1e-6
    # wd 0.01, no clipping, 6% warm-up of 24 h then linear decay, batch 4096 = 32 x 8 GPUs x 16,
    # fp16 with DeepSpeed, validation, and early stop (loss > 6 after 180 minutes). ZeRO stage 1:
    # DeepSpeed's fp16 is broken at stage 0 (see validate), and 1 also saves optimizer memory.
    return dict(run_dir="runs/24hbert", model="large",
                model_overrides={"pre_layernorm": True, "sparse_mlm_head": True},
                max_seq_length=128, time_budget_hours=24.0, schedule="time", warmup_proportion=0.06,
                optimizer="adamw", lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, max_grad_norm=0.0,
                batch_size=4096, micro_batch_size=32, precision="fp16", engine="deepspeed", zero_stage=1,
                validation_every_minutes=30.0, checkpoint_every_minutes=60.0,
                checkpoint_fractions=[0.25, 0.5, 0.75],
                early_stop={"enabled": True, "after_minutes": 180.0, "max_val_loss": 6.0},
                log_every_steps=10)


def _preset_tiny_cpu() -> dict:
    # The same recipe, shrunk to about 3 minutes on a 2-core CPU: a 2-layer model, a small batch;
    # bf16 only where the CPU has native bf16 (emulated it is ~100x slower than fp32).
    return dict(run_dir="runs/tiny-cpu", model="tiny", model_overrides={}, max_seq_length=128,
                time_budget_hours=0.04, schedule="time", warmup_proportion=0.06,
                optimizer="adamw", lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, max_grad_norm=0.0,
                batch_size=32, micro_batch_size=16, precision="bf16" if fast_bf16("cpu") else "fp32",
                engine="torch", zero_stage=0, validation_every_minutes=0.5, max_val_batches=8,
                checkpoint_every_minutes=1.0,
                keep_last_checkpoints=2, checkpoint_fractions=[0.25, 0.5, 0.75],
                early_stop={"enabled": False}, log_every_steps=10)


PRESETS = {"24hbert": _preset_24hbert, "tiny-cpu": _preset_tiny_cpu}


def _unknown_field_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config field {key!r}.{hint} Known fields: {', '.join(known)}"


def _from_dict(cls, data: dict, prefix: str):
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ValueError(_unknown_field_message(prefix + unknown[0], list(fields)))
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if cls is not TrainConfig else _DEFAULT_VALUES[name]
        if dataclasses.is_dataclass(default) and not isinstance(value, type(default)):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name} must be a mapping of its fields, got {value!r}")
            value = _from_dict(type(default), value, prefix=f"{prefix}{name}.")
        elif name == "betas" and value is not None:
            value = tuple(_number(f"{prefix}{name}", b, float) for b in value)
        elif value is not None and fields[name].type in ("float", "float | None"):
            value = _number(f"{prefix}{name}", value, float)
        elif value is not None and fields[name].type in ("int", "int | None"):
            value = _number(f"{prefix}{name}", value, int)
        kwargs[name] = value
    return cls(**kwargs)


def _number(name: str, value, kind):
    # YAML 1.1 reads "5e-4" as a string; accept it, and say so when a value is not a number
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


_DEFAULT_VALUES = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                   for f in dataclasses.fields(TrainConfig)}


# ---- distributed setup ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for MASTER_PORT). Chapter: ``notebooks/04_pretraining.ipynb``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistEnv:
    """This process's place in the run, read from the launcher's environment variables.

    Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            backend = torch.distributed.get_backend()
            t = t.to(self.device) if backend == "nccl" else t
            torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.initialized_here and self.distributed:
            torch.distributed.destroy_process_group()


def init_distributed(engine: str) -> DistEnv:
    """Join the process group the launcher set up (torchrun, deepspeed, or none).

    DeepSpeed wants the rendezvous variables even in one process, so they are filled in
    (``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free>``) when missing.
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # ranks on one CPU share its cores; oversubscribing them is much slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    env = DistEnv(rank, world_size, local_rank, device)
    if engine == "deepspeed":
        import deepspeed

        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
            env.initialized_here = True
    elif world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        env.initialized_here = True
    return env


# ---- engines ---------------------------------------------------------------------------------


class TorchEngine:
    """Plain PyTorch: autocast for bf16/fp16 (GradScaler for fp16), DDP when world_size > 1.

    Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    def __init__(self, model: BertForMaskedLM, config: TrainConfig, dist: DistEnv):
        self.config, self.dist = config, dist
        self.raw_model = model.to(dist.device)
        self.optimizer = build_optimizer(self.raw_model, config.optimizer, config.lr, config.betas,
                                         config.eps, config.weight_decay)
        self.model = self.raw_model
        if config.compile:
            self.model = torch.compile(self.model)
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.accumulation = config.gradient_accumulation_steps(dist.world_size)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.scaler = torch.amp.GradScaler(dist.device.type) if config.precision == "fp16" else None
        self.skipped_steps = 0  # fp16 steps the scaler skipped (inf/NaN gradients)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def micro_step(self, batch: dict, last: bool, poison: bool = False) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients sync only on the last one."""
        sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.model.no_sync()
        with sync:
            with self.autocast():
                loss = self.model(**batch).loss
            if poison:
                loss = loss * float("nan")
            scaled = loss / self.accumulation
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach().float()

    def optimizer_step(self, lr: float, want_norm: bool = True) -> float | None:
        set_lr(self.optimizer, lr)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        elif want_norm:  # an extra pass over every gradient: only on steps that log it
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += self.scaler.get_scale() < scale  # the scale backs off only on a skip
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        """fp16's current dynamic loss scale (None without fp16)."""
        return self.scaler.get_scale() if self.scaler else None

    def eval_loss(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            return self.raw_model(**batch).loss.float()

    def train(self, mode: bool = True) -> None:
        self.raw_model.train(mode)

    def full_state_dict(self) -> dict | None:
        """The model's weights on rank 0 (None elsewhere); called on every rank."""
        return {k: v.detach() for k, v in self.raw_model.state_dict().items()} if self.dist.is_main else None

    def save_state(self, folder: Path) -> None:
        if self.dist.is_main:
            state = {"optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None,
                     "skipped_steps": self.skipped_steps}
            torch.save(state, folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        weights = BertForMaskedLM.from_pretrained(folder / "model").state_dict()
        self.raw_model.load_state_dict(weights)
        state = torch.load(folder / "optimizer.pt", map_location=self.dist.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state.get("skipped_steps", 0)


class DeepSpeedEngine:
    """DeepSpeed: ZeRO, fp16/bf16 and gradient accumulation from :meth:`TrainConfig.deepspeed_config`.

    The optimizer is bbert's ``torch.optim.AdamW`` (or LAMB); bbert sets the lr before each step.
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    def __init__(self, model: BertForMaskedLM, config: TrainConfig, dist: DistEnv):
        import deepspeed

        self.config, self.dist = config, dist
        model = model.to(dist.device)
        optimizer = build_optimizer(model, config.optimizer, config.lr, config.betas, config.eps,
                                    config.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config.deepspeed_config(dist.world_size))
        self.raw_model = self.engine.module
        if config.compile:  # compiles the module in place: its parameter names stay as they were
            self.engine.compile()

    def micro_step(self, batch: dict, last: bool, poison: bool = False) -> torch.Tensor:
        """Forward and backward of one micro-batch. The step on the last micro-batch waits for
        :meth:`optimizer_step`, so that a NaN loss can stop the run before it touches the weights."""
        loss = self.engine(**batch).loss
        if poison:
            loss = loss * float("nan")
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # only counts the micro-step: not an accumulation boundary
        return loss.detach().float()

    def optimizer_step(self, lr: float, want_norm: bool = True) -> float | None:
        set_lr(self.optimizer, lr)
        norm = None
        if want_norm and self.config.zero_stage == 0 and self.config.precision == "fp32":
            grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        self.engine.step()
        ds_norm = self.engine.get_global_grad_norm()
        if ds_norm is not None:
            norm = float(ds_norm)
        return norm

    @property
    def skipped_steps(self) -> int:
        """fp16 steps DeepSpeed skipped on overflow (kept in its checkpoints)."""
        return int(self.engine.skipped_steps)

    def loss_scale(self) -> float | None:
        """fp16's current dynamic loss scale (None without fp16)."""
        return float(self.optimizer.loss_scale) if self.config.precision == "fp16" else None

    def eval_loss(self, batch: dict) -> torch.Tensor:
        return self.engine(**batch).loss.float()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def full_state_dict(self) -> dict | None:
        """fp32 weights on rank 0 (None elsewhere); called on every rank.

        bf16/fp16 weights are widened to fp32; the exact fp32 master weights live in the
        DeepSpeed checkpoint beside the model folder.
        """
        if not self.dist.is_main:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in self.raw_model.state_dict().items()}

    def save_state(self, folder: Path) -> None:
        # every rank writes its own ZeRO shards
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state",
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder / 'deepspeed'}")


# ---- metrics, progress -------------------------------------------------------------------------


def read_metrics(run_dir) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` as one clean history.

    A resumed run appends a ``start`` record; the records the killed run wrote after its last
    checkpoint (steps after the resume point) are dropped here, not in the file.
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    records: list[dict] = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("type") == "start":
            if rec.get("resumed"):
                records = [r for r in records if r.get("step", 0) <= rec["step"] and r.get("type") != "end"]
            else:
                records = []
        records.append(rec)
    return records


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` (flushed per line), TensorBoard, and the console.

    On rank 0 only: a tqdm bar of the budget when stdout is a terminal, else one compact
    ``[bbert] ...% of budget | step ...`` line per log step (what ``bbert.launch`` streams).
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    def __init__(self, run_dir: Path, config: TrainConfig, total: float, unit: str, enabled: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.total, self.unit = total, unit
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(total, 1), unit=unit, desc="budget", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("type") in ("train", "val"):
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def progress(self, done: float, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = round(min(done, self.total), 1)
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"[bbert] {100 * min(done / self.total, 1.0):5.1f}% of budget | {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(f"[bbert] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: the known-GPU table on a GPU, else a short measurement.

    Chapters: ``notebooks/01_budget.ipynb`` (MFU), ``notebooks/04_pretraining.ipynb``.
    """
    from bbert import budget

    if device.type == "cuda":
        gpu = budget.gpu_from_device_name(torch.cuda.get_device_name(device))
        if gpu is not None:
            return gpu.peak_tflops * 1e12
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192 if device.type == "cuda" else 1024  # a GPU needs big matrices to reach its peak
    return budget.matmul_peak_flops(dtype, n=n, device=device.type, min_seconds=0.3)


# ---- checkpoints ------------------------------------------------------------------------------


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run as ``(step, folder)``, oldest first (``.tmp-*`` folders skipped).

    A checkpoint counts once its ``budget.json`` exists (it is written last, inside the atomic
    folder). Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for ckpt in folder.iterdir():
            if ckpt.name.startswith(".") or not (ckpt / "budget.json").is_file():
                continue
            try:
                found.append((int(json.loads((ckpt / "budget.json").read_text())["step"]), ckpt))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
    return sorted(found, key=lambda item: (item[0], item[1].name))


def latest_checkpoint(run_dir) -> Path | None:
    """The most advanced finished checkpoint of ``run_dir`` (None if there is none).

    Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---- the loop ------------------------------------------------------------------------------------


class _Stop:
    """Set by SIGINT/SIGTERM; the loop finishes its step, saves and ends with reason 'interrupted'."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One pretraining run: setup, resume, the optimizer-step loop, validation, checkpoints.

    Use :func:`pretrain`. Chapter: ``notebooks/04_pretraining.ipynb``.
    """

    def __init__(self, config: TrainConfig, dist: DistEnv, resume: bool | str = "auto"):
        self.config, self.dist = config, dist
        self.run_dir = Path(config.run_dir)
        self.manifest = load_manifest(config.data_dir)
        self.tokenizer = load_tokenizer(Path(config.data_dir) / "tokenizer")
        self.model_config = config.model_config(self.manifest["vocab_size"])
        self.accumulation = config.gradient_accumulation_steps(dist.world_size)
        self.resume_from = self._resume_point(resume)

        set_seed(config.seed + dist.rank)
        model = BertForMaskedLM(self.model_config)
        self.engine = (DeepSpeedEngine if config.engine == "deepspeed" else TorchEngine)(model, config, dist)
        if config.schedule == "time":
            self.schedule = TimeBasedSchedule(config.lr, config.time_budget_hours, config.warmup_proportion)
        else:
            self.schedule = StepBasedSchedule(config.lr, config.max_steps, config.warmup_proportion)

        # run state: everything a checkpoint must hold to continue exactly
        self.step = 0
        self.samples = 0  # global samples consumed
        self.elapsed = 0.0  # budget seconds consumed (the schedule's clock)
        self.next_validation = self._minutes(config.validation_every_minutes)
        self.next_checkpoint = self._minutes(config.checkpoint_every_minutes)
        self.markers_done: list[float] = []
        self.last_saved_step = -1
        self.end_reason: str | None = None
        self.pending_rng: dict | None = None
        self.last_val_step = -1
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    @staticmethod
    def _minutes(value: float | None) -> float:
        return math.inf if value is None else value * 60.0

    # -- resume policy ----------------------------------------------------------------------

    def _resume_point(self, resume: bool | str) -> Path | None:
        ckpt = latest_checkpoint(self.run_dir)
        if resume is False:
            if ckpt is not None:
                raise ValueError(f"run dir {self.run_dir} already holds checkpoints; resume it (--resume) "
                                 "or choose a new --run-dir (nothing is overwritten)")
            return None
        if ckpt is None:
            if resume is True:
                raise ValueError(f"--resume given but {self.run_dir} has no finished checkpoint; "
                                 "drop --resume to start a new run")
            return None
        # compare with the config the checkpoint was written under (run_dir/config.yaml may
        # already hold the new one, e.g. written by bbert.launch)
        saved_cfg = ckpt / "config.yaml"
        if resume == "auto" and saved_cfg.is_file():
            ignore = {"run_dir", "data_dir"}
            old = {k: v for k, v in yaml.safe_load(saved_cfg.read_text()).items() if k not in ignore}
            new = {k: v for k, v in self.config.to_dict().items() if k not in ignore}
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise ValueError(f"run dir {self.run_dir} holds a run with a different config "
                                 f"(changed: {', '.join(changed)}). Pass --resume to continue it with the new "
                                 "config, or choose a new --run-dir")
        return ckpt

    # -- clock --------------------------------------------------------------------------------

    def _local_clock(self, start_wall: float, start_elapsed: float, steps_done: int) -> float:
        sim = self.config.debug.step_time_seconds
        if sim is not None:
            return start_elapsed + steps_done * sim
        return start_elapsed + (time.monotonic() - start_wall)

    def _lr(self) -> float:
        return self.schedule.lr_at(self.elapsed if self.config.schedule == "time" else self.step)

    def _fraction(self) -> float:
        if self.config.schedule == "step":
            return self.step / self.config.max_steps
        return self.elapsed / self.config.time_budget_seconds

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        cfg, dist = self.config, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.run_dir / "config.yaml")
        total = cfg.max_steps if cfg.schedule == "step" else cfg.time_budget_seconds
        log = MetricsLog(self.run_dir, cfg, total, "step" if cfg.schedule == "step" else "s", dist.is_main)
        try:
            return self._run(log)
        finally:
            log.close()

    def _run(self, log: MetricsLog) -> Path:
        cfg, dist = self.config, self.dist
        if self.resume_from is not None:
            log.message(f"resuming from {self.resume_from} (step {self.step}, "
                        f"{self.elapsed:.1f} s of {cfg.time_budget_seconds:.0f} s used)")
            if self._finished_before():
                log.message("the run had already finished; nothing to do")
                return self.run_dir
        log.write({"type": "start", "step": self.step, "elapsed_seconds": self.elapsed,
                   "resumed": self.resume_from is not None, "world_size": dist.world_size,
                   "engine": cfg.engine, "precision": cfg.precision, "device": str(dist.device)})

        seq_len = self.manifest["max_seq_length"]
        flops_per_seq = self._flops_per_sequence(seq_len)
        peak = cfg.peak_flops if cfg.peak_flops is not None else device_peak_flops(dist.device, cfg.precision)

        loader = build_pretraining_loader(cfg.data_dir, "train", cfg.micro_batch_size, rank=dist.rank,
                                          world_size=dist.world_size, seed=cfg.seed, start_sample=self.samples,
                                          masking=cfg.masking, infinite=True)
        batches = iter(loader)
        if self.pending_rng is not None:
            _set_rng(self.pending_rng, dist.device)
        reason = None
        self.engine.train()
        with _Stop() as stop:
            start_wall, start_elapsed, start_step = time.monotonic(), self.elapsed, self.step
            last_log_wall, last_log_samples = time.monotonic(), self.samples
            while reason is None:
                lr, lr_elapsed = self._lr(), self.elapsed  # the lr is set at the step's start
                losses = []
                poison = cfg.debug.nan_at_step == self.step + 1
                for micro in range(self.accumulation):
                    batch = {k: v.to(dist.device, non_blocking=True) for k, v in next(batches).items()}
                    losses.append(self.engine.micro_step(batch, last=micro == self.accumulation - 1, poison=poison))
                if cfg.debug.sleep_seconds_per_step:
                    time.sleep(cfg.debug.sleep_seconds_per_step)
                local_loss = float(torch.stack(losses).mean())
                local_clock = self._local_clock(start_wall, start_elapsed, self.step + 1 - start_step)
                # one collective per step: mean loss, mean clock (all ranks agree), any NaN, any stop
                loss_sum, clock_sum, bad, stops = dist.all_reduce_sum(
                    [local_loss if math.isfinite(local_loss) else 0.0, local_clock,
                     float(not math.isfinite(local_loss)), float(stop.requested)])
                if bad:
                    reason = "nan"  # the weights never see this step: the last checkpoint stays good
                    log.message(f"non-finite loss at step {self.step + 1}: stopping; the last good checkpoint is kept")
                    break
                grad_norm = self.engine.optimizer_step(lr, want_norm=(self.step + 1) % cfg.log_every_steps == 0)
                self.step += 1
                self.samples += cfg.batch_size
                self.elapsed = clock_sum / dist.world_size
                loss = loss_sum / dist.world_size

                if self.step % cfg.log_every_steps == 0:
                    now = time.monotonic()
                    seq_per_s = (self.samples - last_log_samples) / max(now - last_log_wall, 1e-9)
                    last_log_wall, last_log_samples = now, self.samples
                    mfu = flops_per_seq * seq_per_s / (peak * dist.world_size) if peak else None
                    record = {"type": "train", "step": self.step, "elapsed_seconds": self.elapsed,
                              "budget_fraction": self._fraction(), "loss": loss, "lr": lr,
                              "lr_elapsed_seconds": lr_elapsed,
                              "grad_norm": grad_norm, "seq_per_s": seq_per_s,
                              "tokens_per_s": seq_per_s * seq_len, "mfu": mfu}
                    scale = self.engine.loss_scale()
                    if scale is not None:  # fp16: overflowing steps are skipped; show how many
                        record.update(loss_scale=scale, skipped_steps=self.engine.skipped_steps)
                    log.write(record)
                    log.progress(self.step if cfg.schedule == "step" else self.elapsed,
                                 f"step {self.step} | loss {loss:.4f} | lr {lr:.2e} | {seq_per_s:.1f} seq/s")

                reason = self._after_step(log, stops > 0)
        self._finish(log, reason)
        return self.run_dir

    def _validate(self, log: MetricsLog) -> float:
        val_loss = self.evaluate()
        self.last_val_step = self.step
        log.write({"type": "val", "step": self.step, "elapsed_seconds": self.elapsed, "val_loss": val_loss})
        log.message(f"step {self.step}: validation loss {val_loss:.4f}")
        return val_loss

    def _finished_before(self) -> bool:
        cfg = self.config
        if self.end_reason == "early_stop":
            return True
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return True
        return cfg.schedule == "time" and self.elapsed >= cfg.time_budget_seconds

    def _after_step(self, log: MetricsLog, stop_requested: bool) -> str | None:
        """Validation, early stop, checkpoints and the end test, in a fixed order after each step."""
        cfg = self.config
        reason = None
        if self.elapsed >= self.next_validation:
            interval = cfg.validation_every_minutes * 60.0
            self.next_validation = (math.floor(self.elapsed / interval) + 1) * interval
            val_loss = self._validate(log)
            es = cfg.early_stop
            if es.enabled and self.elapsed >= es.after_minutes * 60.0 and not val_loss <= es.max_val_loss:
                log.message(f"early stop: validation loss {val_loss:.4f} > {es.max_val_loss} "
                            f"after {es.after_minutes:g} minutes")
                reason = "early_stop"
        if reason is None:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                reason = "max_steps"
            elif cfg.schedule == "time" and self.elapsed >= cfg.time_budget_seconds:
                reason = "budget"
            elif stop_requested:
                reason = "interrupted"

        fraction = self._fraction()
        for marker in sorted(cfg.checkpoint_fractions):
            if marker not in self.markers_done and fraction >= marker:
                self.markers_done.append(marker)
                self.save_checkpoint(f"marker-{marker:g}", log)
        if reason is None and self.elapsed >= self.next_checkpoint:
            interval = cfg.checkpoint_every_minutes * 60.0
            self.next_checkpoint = (math.floor(self.elapsed / interval) + 1) * interval
            self.save_checkpoint(f"step-{self.step:07d}", log)
        return reason

    def _finish(self, log: MetricsLog, reason: str) -> None:
        if reason in ("budget", "max_steps") and self.config.validation_every_minutes is not None \
                and self.last_val_step != self.step:
            self._validate(log)  # the run's final validation loss
        if reason != "nan":
            self.end_reason = reason
            if self.last_saved_step != self.step or not (self.run_dir / "checkpoints" / f"step-{self.step:07d}").exists():
                self.save_checkpoint(f"step-{self.step:07d}", log)
            self._save_final()
        log.write({"type": "end", "reason": reason, "step": self.step, "elapsed_seconds": self.elapsed})
        log.message(f"run ended ({reason}) at step {self.step} after {self.elapsed:.1f} s of budget: {self.run_dir}")
        self.end_reason = reason

    def _flops_per_sequence(self, seq_len: int) -> float:
        from bbert.budget import training_flops_per_sequence

        return training_flops_per_sequence(self.model_config, seq_len, self.config.masking.mlm_probability,
                                           self.model_config.sparse_mlm_head)

    # -- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Masked-LM loss over the held-out split (token-weighted, all ranks together)."""
        cfg, dist = self.config, self.dist
        loader = build_pretraining_loader(cfg.data_dir, "val", cfg.micro_batch_size, rank=dist.rank,
                                          world_size=dist.world_size, seed=cfg.seed, masking=cfg.masking,
                                          infinite=False)
        self.engine.train(False)
        total, count = 0.0, 0.0
        for i, batch in enumerate(loader):
            if cfg.max_val_batches is not None and i >= cfg.max_val_batches:
                break
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            n = float((batch["labels"] != -100).sum())
            if n:
                total += float(self.engine.eval_loss(batch)) * n
                count += n
        self.engine.train(True)
        total, count = dist.all_reduce_sum([total, count])
        return total / count if count else float("nan")

    # -- checkpoints ----------------------------------------------------------------------------

    def _budget_record(self) -> dict:
        return {"step": self.step, "samples_consumed": self.samples, "elapsed_seconds": self.elapsed,
                "budget_fraction": self._fraction(), "time_budget_hours": self.config.time_budget_hours,
                "next_validation": self.next_validation, "next_checkpoint": self.next_checkpoint,
                "markers_done": self.markers_done, "world_size": self.dist.world_size,
                "end_reason": self.end_reason}

    def save_checkpoint(self, name: str, log: MetricsLog) -> Path:
        """Write ``checkpoints/<name>/`` atomically from every rank, then drop old periodic ones.

        Rank 0 opens a temporary folder (``bbert.utils.atomic_path``) and tells the others its
        name; everyone writes into it; rank 0 renames it into place. A kill at any moment leaves
        the previous checkpoints intact and at most a ``.tmp-*`` folder, which resume ignores.
        """
        dist = self.dist
        final = self.run_dir / "checkpoints" / name
        if dist.is_main:
            with atomic_path(final) as tmp:
                tmp.mkdir(parents=True)
                dist.broadcast_object(str(tmp))
                self._write_checkpoint(tmp)
                dist.barrier()
        else:
            tmp = Path(dist.broadcast_object(None))
            self._write_checkpoint(tmp)
            dist.barrier()
        dist.barrier()  # the rename is done before anyone goes on
        self.last_saved_step = self.step
        log.write({"type": "checkpoint", "name": name, "step": self.step, "elapsed_seconds": self.elapsed})
        if dist.is_main:
            self._prune_checkpoints()
        return final

    def _write_checkpoint(self, folder: Path) -> None:
        dist = self.dist
        self.engine.save_state(folder)  # collective for DeepSpeed
        rng = {"python": _python_rng_state(), "numpy": _numpy_rng_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None}
        (folder / "rng").mkdir(exist_ok=True)
        torch.save(rng, folder / "rng" / f"rank-{dist.rank:05d}.pt")
        dist.barrier()
        self._save_model(folder / "model")
        if dist.is_main:
            self.config.to_yaml(folder / "config.yaml")
            atomic_write_json(folder / "budget.json", self._budget_record())  # written last: marks it complete

    def _save_model(self, model_dir: Path) -> None:
        """A bbert model folder plus the tokenizer (collective; rank 0 writes)."""
        state = self.engine.full_state_dict()
        if self.dist.is_main:
            with torch.device("meta"):  # no memory, no init: the weights come from ``state``
                model = BertForMaskedLM(self.model_config)
            model.load_state_dict(state, assign=True)
            model.save_pretrained(model_dir)
            self.tokenizer.save_pretrained(str(model_dir))

    def _load_checkpoint(self, folder: Path) -> None:
        record = json.loads((folder / "budget.json").read_text())
        if record.get("world_size", self.dist.world_size) != self.dist.world_size and self.config.engine == "deepspeed":
            raise ValueError(f"{folder} was written by {record['world_size']} ranks; resume DeepSpeed runs with "
                             f"the same number of ranks (got {self.dist.world_size})")
        self.engine.load_state(folder)
        self.step, self.samples = int(record["step"]), int(record["samples_consumed"])
        self.elapsed = float(record["elapsed_seconds"])
        self.next_validation = float(record["next_validation"])
        self.next_checkpoint = float(record["next_checkpoint"])
        self.markers_done = list(record["markers_done"])
        self.last_saved_step = self.step
        self.end_reason = record.get("end_reason")
        rng_file = folder / "rng" / f"rank-{self.dist.rank:05d}.pt"
        if rng_file.is_file():  # restored just before the first step (building loaders draws from it)
            self.pending_rng = torch.load(rng_file, weights_only=False)

    def _prune_checkpoints(self) -> None:
        # keep the last k periodic checkpoints; never the markers; never the newest
        periodic = [(s, p) for s, p in list_checkpoints(self.run_dir) if p.name.startswith("step-")]
        for _, path in periodic[:-self.config.keep_last_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)

    def _save_final(self) -> None:
        if self.dist.is_main:
            with atomic_path(self.run_dir / "final") as tmp:
                self._save_model(tmp / "model")
                atomic_write_json(tmp / "budget.json", self._budget_record())
        self.dist.barrier()


def _python_rng_state():
    import random

    return random.getstate()


def _numpy_rng_state():
    import numpy as np

    return np.random.get_state()


def _set_rng(state: dict, device: torch.device) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- entry points ----------------------------------------------------------------------------------


def pretrain(config: TrainConfig, resume: bool | str = "auto") -> Path:
    """Run (or resume) the pretraining described by ``config``; return the run dir.

    ``resume="auto"`` continues from the latest checkpoint when the run dir holds one with the
    same config; ``True`` requires a checkpoint (and accepts a changed config); ``False``
    refuses a run dir that already has checkpoints. Works in one process and under
    ``torchrun`` / ``deepspeed`` (one call per rank). SIGINT/SIGTERM end the run cleanly with a
    checkpoint (end reason ``"interrupted"``). Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    config.validate(world_size)
    if config.engine == "deepspeed":
        _quiet_deepspeed()
    dist = init_distributed(config.engine)
    try:
        return Trainer(config, dist, resume).run()
    finally:
        dist.close()


def _quiet_deepspeed() -> None:
    import logging

    if not os.environ.get("BBERT_VERBOSE"):
        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    """The ``bbert pretrain`` options. Chapter: ``notebooks/04_pretraining.ipynb``."""
    p = argparse.ArgumentParser(prog="bbert pretrain", description="Time-budgeted masked-LM pretraining (24hBERT).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="a run.yaml written by TrainConfig.to_yaml")
    src.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset (default 24hbert)")
    p.add_argument("--data-dir", help="data dir made by `bbert prepare`")
    p.add_argument("--run-dir", help="where config, metrics and checkpoints go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set lr=5e-4 --set model.num_hidden_layers=4 (repeatable)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const=True, default="auto",
                        help="continue from the latest checkpoint even if the config changed "
                             "(default: continue automatically when the config is the same)")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                        help="refuse to continue an existing run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (and DeepSpeed config) and exit")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we read
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` named by parsed command-line arguments. Chapter: ``notebooks/04_pretraining.ipynb``."""
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig.from_preset(args.preset or "24hbert")
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    # paths are taken literally, not parsed as YAML
    plain = {o.partition("=")[0]: o.partition("=")[2] for o in overrides if o.partition("=")[0] in ("data_dir", "run_dir")}
    config = config.with_overrides([o for o in overrides if o.partition("=")[0] not in plain])
    return dataclasses.replace(config, **plain)


def main(argv: list[str] | None = None) -> int:
    """``bbert pretrain`` / ``python -m bbert.train``.

    Exit code 0 when the run ends (budget, max_steps, early stop, or interrupted by
    SIGINT/SIGTERM after saving), 1 on a NaN loss, 2 on a bad config or data dir.
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False))
            if config.engine == "deepspeed":
                print(json.dumps(config.deepspeed_config(int(os.environ.get("WORLD_SIZE", 1))), indent=2))
            return 0
        run_dir = pretrain(config, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"bbert pretrain: error: {e}", file=sys.stderr)
        return 2
    ends = [r for r in read_metrics(run_dir) if r.get("type") == "end"]
    return 1 if ends and ends[-1]["reason"] == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
