"""Mixed precision in one place: a run's ``precision`` ("fp32", "bf16", "fp16") as torch needs it.

    amp_dtype(precision)             torch.bfloat16, torch.float16, or None for fp32
    autocast(device, precision)      the autocast context (a no-op for fp32)
    grad_scaler(device, precision)   a GradScaler for fp16 (its small range needs loss scaling), else None

Which precision a device runs by default is another question: :func:`native_amp_dtype`.
Chapter: ``notebooks/03_model.ipynb`` (mixed precision).
"""
from __future__ import annotations

import torch

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
