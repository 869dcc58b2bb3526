"""The engines that run the training step, and the distributed setup they share.

Two engines run the same loop: DeepSpeed (GPU servers, ZeRO, several nodes) and plain PyTorch
(one process, or ``torchrun`` DDP). Both read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the
launcher. An engine does a micro-step (forward and backward), an optimizer step at the lr it is
given, evaluation, and saves and loads its own state inside a checkpoint folder.

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bbert import run_dir as rd
from bbert.objective import MaskedLM, build_objective
from bbert.optim import build_optimizer, set_lr
from bbert.precision import autocast, fast_bf16, grad_scaler
from bbert.train_config import TrainConfig
from bbert.env import env_flag, free_port


def check_engine(config: TrainConfig, device: str | torch.device | None = None) -> None:
    """Raise ``ValueError`` naming what to change if this machine can't run ``config``.

    :meth:`TrainConfig.validate` checks the config itself; this checks what it asks of the
    machine: the precision on ``device`` (default: CUDA where there is one, else the CPU), and
    DeepSpeed (installed, and clear of its known bugs). Called by ``pretrain``, ``launch`` and
    ``search`` before anything is written.
    """
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if config.engine == "deepspeed" and config.precision == "fp16" and config.zero_stage == 0:
        # DeepSpeed's engine.backward scales the loss only for its ZeRO optimizers, yet the
        # stage-0 fp16 optimizer still divides the gradients by the loss scale: every update
        # comes out ~65536x too small. Seen with DeepSpeed 0.19.8 on an H200 (the loss barely
        # moved); upstream: deepspeedai/DeepSpeed#8393.
        raise ValueError("engine='deepspeed' with precision='fp16' needs zero_stage >= 1: at zero_stage=0 "
                         "DeepSpeed leaves the loss unscaled but still unscales the gradients, so training "
                         "stalls (deepspeedai/DeepSpeed#8393). Use zero_stage=1 (the 24hbert preset's; it "
                         "also shards the optimizer state), precision='bf16', or engine='torch'")
    if config.engine == "deepspeed" and config.optimizer == "lamb" and config.zero_stage >= 1:
        # ZeRO hands the optimizer flat slices of many tensors; LAMB's trust ratio is per tensor.
        raise ValueError(f"optimizer='lamb' with zero_stage={config.zero_stage}: ZeRO flattens the parameters, "
                         "so LAMB's per-layer trust ratios would be computed over slices of many layers. "
                         "Use engine='torch' (fp16 with a grad scaler, DDP across GPUs), or zero_stage=0 "
                         "with precision='bf16' or 'fp32'")
    if config.precision == "fp16" and not cuda:
        raise ValueError("precision='fp16' needs a CUDA GPU (no fp16 training on this CPU); "
                         "use precision='bf16' or 'fp32'")
    if config.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16; use precision='fp16' (as the paper) or 'fp32'")
    if config.precision == "bf16" and not cuda and not fast_bf16("cpu"):
        warnings.warn("precision='bf16' on a CPU without native bf16 (no AVX-512 BF16 / AMX): torch "
                      "emulates it, ~100x slower than fp32; use precision='fp32' here", stacklevel=2)
    if config.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ValueError("engine='deepspeed' but DeepSpeed is not installed: pip install 'bbert[deepspeed]', "
                             "or use engine='torch'") from e


def deepspeed_config(config: TrainConfig, world_size: int = 1) -> dict:
    """The DeepSpeed JSON config of a run.

    bbert keeps the optimizer (a ``torch.optim.AdamW`` built by ``bbert.optim``, handed to
    ``deepspeed.initialize``, so DeepSpeed JIT-builds no CPU Adam) and the schedule (it sets the
    lr itself before every step), so neither appears here. ``gradient_clipping: 0`` means no clipping.
    """
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps(world_size),
        "gradient_clipping": float(config.max_grad_norm),
        "zero_optimization": {"stage": int(config.zero_stage)},
        # loss_scale 0 = dynamic loss scaling, as in the paper's code
        "fp16": {"enabled": config.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": config.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # bbert logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def quiet_deepspeed() -> None:
    """DeepSpeed logs at INFO by default; ``BBERT_VERBOSE=1`` keeps it talking."""
    if not env_flag("BBERT_VERBOSE"):
        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)


# ---- distributed setup ----------------------------------------------------------------------


@dataclass
class DistEnv:
    """This process's place in the run, read from the launcher's environment variables."""

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
        import deepspeed  # deferred: optional, and slow to import

        quiet_deepspeed()
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


def build_engine(model: torch.nn.Module, config: TrainConfig, dist: DistEnv,
                 objective: MaskedLM | None = None) -> "TorchEngine | DeepSpeedEngine":
    """The engine ``config.engine`` names, holding ``model`` and its optimizer; ``objective``
    (default: the config's, :func:`bbert.objective.build_objective`) computes the loss."""
    return (DeepSpeedEngine if config.engine == "deepspeed" else TorchEngine)(model, config, dist, objective)


class TorchEngine:
    """Plain PyTorch: autocast for bf16/fp16 (GradScaler for fp16), DDP when world_size > 1."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, dist: DistEnv,
                 objective: MaskedLM | None = None):
        self.config, self.dist = config, dist
        self.objective = objective or build_objective(config)
        self.raw_model = model.to(dist.device)
        self.optimizer = build_optimizer(self.raw_model, config.optimizer, config.lr, config.betas,
                                         config.eps, config.weight_decay)
        self.model = self.raw_model
        if config.compile:
            self.model = torch.compile(self.model)
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.set_batch_size(config.batch_size)
        self.scaler = grad_scaler(dist.device, config.precision)
        self.skipped_steps = 0  # fp16 steps the scaler skipped (inf/NaN gradients)

    def set_batch_size(self, batch_size: int) -> None:
        """The global batch of the next steps (a batch ramp changes it): the loss of each
        micro-batch is divided by their number, so the gradient is the mean over the batch."""
        self.accumulation = batch_size // (self.config.micro_batch_size * self.dist.world_size)
    def micro_step(self, batch: dict, last: bool, poison: bool = False) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients sync only on the last one."""
        sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.model.no_sync()
        with sync:
            with autocast(self.dist.device, self.config.precision):
                loss = self.objective.loss(self.model, batch)
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
        with autocast(self.dist.device, self.config.precision):
            return self.objective.loss(self.raw_model, batch).float()

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
        weights = self.objective.model_class.from_pretrained(rd.model_dir(folder)).state_dict()
        self.raw_model.load_state_dict(weights)
        state = torch.load(folder / "optimizer.pt", map_location=self.dist.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state.get("skipped_steps", 0)


class DeepSpeedEngine:
    """DeepSpeed: ZeRO, fp16/bf16 and gradient accumulation from :func:`deepspeed_config`.

    The optimizer is bbert's ``torch.optim.AdamW`` (or LAMB); bbert sets the lr before each step.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, dist: DistEnv,
                 objective: MaskedLM | None = None):
        import deepspeed  # deferred: optional, and slow to import

        self.config, self.dist = config, dist
        self.objective = objective or build_objective(config)
        model = model.to(dist.device)
        optimizer = build_optimizer(model, config.optimizer, config.lr, config.betas, config.eps,
                                    config.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config, dist.world_size))
        self.raw_model = self.engine.module
        if config.compile:  # compiles the module in place: its parameter names stay as they were
            self.engine.compile()

    def set_batch_size(self, batch_size: int) -> None:
        """The global batch of the next steps: DeepSpeed changes its gradient accumulation (and
        so the loss's divisor) to match, keeping the micro-batch size."""
        if batch_size != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch_size)

    def micro_step(self, batch: dict, last: bool, poison: bool = False) -> torch.Tensor:
        """Forward and backward of one micro-batch. The step on the last micro-batch waits for
        :meth:`optimizer_step`, so that a NaN loss can stop the run before it touches the weights."""
        # the boundary is said, not counted: DeepSpeed's micro-step count goes out of phase once
        # the accumulation changes (a batch ramp)
        self.engine.set_gradient_accumulation_boundary(last)
        loss = self.objective.loss(self.engine, batch)
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
        return self.objective.loss(self.engine, batch).float()

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
