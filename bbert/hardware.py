"""What this machine runs fast: native bf16 matmuls, and the autocast dtype that follows from them.

Chapter: ``notebooks/03_model.ipynb`` (mixed precision).
"""
from __future__ import annotations

from bbert.env import env_flag


def fast_bf16(device: str = "cpu") -> bool:
    """True where bf16 matmuls run natively on ``device``, so that bf16 autocast is a speed-up.

    A CUDA GPU with bf16; an x86 CPU with AVX-512 BF16 or AMX. Elsewhere (an AVX2-only CPU, most
    laptops) torch emulates bf16 matmuls, about 100x slower than fp32 on a 2-core AVX2 EPYC, so
    bbert's CPU defaults fall back to fp32 there. ``BBERT_CPU_BF16=1`` or ``0`` overrides the
    CPU check.
    """
    import torch

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


def autocast_dtype(device: str = "cpu"):
    """bf16 where :func:`fast_bf16` holds, else None (train in fp32): the default mixed precision
    of bbert's measuring helpers.
    """
    import torch

    return torch.bfloat16 if fast_bf16(device) else None
