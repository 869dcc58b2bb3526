"""Mixed precision in one place: a run's ``precision`` ("fp32", "bf16", "fp16") as torch needs it.

    amp_dtype(precision)             torch.bfloat16, torch.float16, or None for fp32
    autocast(device, precision)      the autocast context (a no-op for fp32)
    grad_scaler(device, precision)   a GradScaler for fp16 (its small range needs loss scaling), else None
    fast_bf16(device)                whether the device runs bf16 matmuls natively (else bf16 is emulated, slow)
    native_amp_dtype(device)         bf16 where it is native, else None: the default of the measuring helpers
Chapter: ``notebooks/03_model.ipynb`` (mixed precision).
"""
from __future__ import annotations

import torch

from bbert.env import env_flag

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``: None for fp32 (no autocast)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _DTYPES[precision]


def autocast(device: torch.device | str, precision: str):
    """``torch.autocast`` on ``device``'s type at ``precision``; disabled for fp32."""
    dtype = amp_dtype(precision)
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaler on ``device``; None for bf16 and fp32, which need none."""
    amp_dtype(precision)  # checks the name
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def fast_bf16(device: str = "cpu") -> bool:
    """True where bf16 matmuls run natively on ``device``, so that bf16 autocast is a speed-up.

    A CUDA GPU with bf16; an x86 CPU with AVX-512 BF16 or AMX. Elsewhere (an AVX2-only CPU, most
    laptops) torch emulates bf16 matmuls, about 100x slower than fp32 on a 2-core AVX2 EPYC, so
    bbert's CPU defaults fall back to fp32 there. ``BBERT_CPU_BF16=1`` or ``0`` overrides the
    CPU check.
    """
    kind = str(device).split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    forced = env_flag("BBERT_CPU_BF16", default=None)
    if forced is not None:
        return forced
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def native_amp_dtype(device: str = "cpu"):
    """bf16 where :func:`fast_bf16` holds, else None (train in fp32): the default mixed precision
    of bbert's measuring helpers.
    """
    return torch.bfloat16 if fast_bf16(device) else None
