"""The compute budget: FLOPs, MFU, the planner and the known-GPU table.

Chapter: ``notebooks/01_budget.ipynb``.
"""
from __future__ import annotations

import time


def training_flops_per_sequence(config, seq_len: int = 128, masked_fraction: float = 0.15,
                                sparse_mlm_head: bool = True) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward) for one sequence.

    Counts only what is computed: with ``sparse_mlm_head`` the head transform and the decoder
    run on ``masked_fraction`` of the positions. Chapter: model (MFU) and budget.
    """
    h, L, i = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    v = getattr(config, "padded_vocab_size", config.vocab_size)
    per_token_layer = 2 * (4 * h * h + 2 * h * i)      # QKV + out proj, FFN in + out
    attention = 2 * 2 * seq_len * h                       # QK^T and AV, per token per layer
    encoder = L * seq_len * (per_token_layer + attention)
    head_tokens = seq_len * (masked_fraction if sparse_mlm_head else 1.0)
    head = head_tokens * 2 * (h * h + h * v)              # transform + decoder
    return 3.0 * (encoder + head)


def matmul_peak_flops(dtype=None, n: int = 4096, device: str = "cpu", min_seconds: float = 1.0) -> float:
    """Measured FLOP/s of a large square ``torch.mm``: the peak that MFU is measured against."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and reps >= 2:
            return 2.0 * n**3 * reps / elapsed
