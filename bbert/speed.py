"""Speed: the peak FLOP/s a device offers, against which a run's model FLOPs utilization (MFU) is read.

Chapter: ``notebooks/01_budget.ipynb`` (MFU).
"""
from __future__ import annotations

import torch

from bbert import budget


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: the known-GPU table on a GPU, else a short measurement."""
    if device.type == "cuda":
        gpu = budget.gpu_from_device_name(torch.cuda.get_device_name(device))
        if gpu is not None:
            return gpu.peak_tflops * 1e12
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192 if device.type == "cuda" else 1024  # a GPU needs big matrices to reach its peak
    return budget.matmul_peak_flops(dtype, n=n, device=device.type, min_seconds=0.3)
