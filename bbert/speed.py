"""Measuring speed: FLOPs, matmul peaks, MFU, timed training steps and the known-GPU table.

    training_flops_per_sequence   matmul FLOPs of one training step, per sequence (ffn_flops_per_token: the FFN's,
                                  attended_keys: the keys a query sees, fewer in a local-attention layer)
    matmul_peak_flops             measured FLOP/s of a large torch.mm (wall clock, or one thread's CPU time)
    mfu, seq_per_s_at_mfu         achieved FLOP/s as a share of a peak (MFU), and the speed a given MFU means
    GPU, KNOWN_GPUS, get_gpu      datasheet peaks of common GPUs; gpu_from_device_name for this one
    device_peak_flops             the peak a run's MFU is read against: the GPU table, else a measurement
    random_mlm_batch, train_step  the synthetic batch and the training step that every timing uses
    measure_throughput            a few timed steps of a model preset (``bbert budget --measure``)
    compare_throughput            several models alternating on one batch: ratios on a shared machine

Chapters: ``notebooks/01_budget.ipynb`` for FLOPs, peaks, MFU, the GPU table and
``measure_throughput``; ``notebooks/03_model.ipynb`` for ``compare_throughput``, its
one-thread clock and the training step it times.
"""
from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn
from tqdm.auto import tqdm

from bbert.model import BertConfig, BertForMaskedLM
from bbert.precision import PRECISIONS, amp_dtype, fast_bf16, native_amp_dtype

CLOCKS = ("wall", "thread")

# ---- FLOPs, peaks, MFU ---------------------------------------------------------------------


def ffn_flops_per_token(config) -> float:
    """Forward matmul FLOPs of one token through one feed-forward block: 2 per multiply-add, over
    two H x I matrices for the MLP, three for a gated GLU (gate, value, out). Biases add no matmul.
    """
    matrices = 2 if getattr(config, "ffn_type", "mlp") == "mlp" else 3
    return 2 * matrices * config.hidden_size * config.intermediate_size


def attended_keys(config, layer: int, seq_len: int) -> float:
    """How many keys a query of layer ``layer`` attends to, on average over a sequence: all of them
    in a global layer, those within ``local_attention // 2`` on either side in a local one.
    """
    if getattr(config, "local_attention", 0) == 0 or config.is_global(layer):
        return float(seq_len)
    half = config.local_attention // 2
    return sum(min(seq_len - 1, i + half) - max(0, i - half) + 1 for i in range(seq_len)) / seq_len


def training_flops_per_sequence(config, seq_len: int = 128, masked_fraction: float = 0.15,
                                sparse_mlm_head: bool = True) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward) for one sequence.

    Counts only what is computed: with ``sparse_mlm_head`` the head transform and the decoder
    run on ``masked_fraction`` of the positions; a local layer's attention on its window
    (:func:`attended_keys`: the useful work; SDPA with a band mask also computes the masked-out
    products).
    """
    h, L = config.hidden_size, config.num_hidden_layers
    v = getattr(config, "padded_vocab_size", config.vocab_size)
    per_token_layer = 2 * 4 * h * h + ffn_flops_per_token(config)  # QKV + out proj, FFN
    attention = sum(2 * 2 * attended_keys(config, layer, seq_len) * h  # QK^T and AV, per token
                    for layer in range(L))
    encoder = seq_len * (L * per_token_layer + attention)
    head_tokens = seq_len * (masked_fraction if sparse_mlm_head else 1.0)
    head = head_tokens * 2 * (h * h + h * v)              # transform + decoder
    return 3.0 * (encoder + head)


def matmul_peak_flops(dtype: torch.dtype | None = None, n: int = 4096, device: str = "cpu",
                      min_seconds: float = 1.0, clock: str = "wall") -> float:
    """Measured FLOP/s of a large square ``torch.mm``: the peak that MFU is measured against.

    ``dtype=None`` is bf16 where the device runs it natively (``bbert.precision.fast_bf16``), else fp32.
    ``clock="wall"`` times torch's usual threads by the wall clock: the peak for
    ``measure_throughput`` and ``compare_throughput(clock="wall")``. ``clock="thread"`` (CPU only)
    runs torch on one thread and times that thread's CPU time: the peak for
    ``compare_throughput(clock="thread")``.
    """
    kind = str(device).split(":")[0]
    if clock not in CLOCKS:
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if clock == "thread" and kind != "cpu":
        raise ValueError(f"clock='thread' times CPU work; use clock='wall' on {device}")
    dtype = dtype or native_amp_dtype(device) or torch.float32
    threads = torch.get_num_threads()
    if clock == "thread":
        torch.set_num_threads(1)  # all the work then runs on this thread, which thread_time sees
    now = time.thread_time if clock == "thread" else time.perf_counter
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        reps, start = 0, now()
        while True:
            torch.mm(a, b)
            reps += 1
            if kind == "cuda":
                torch.cuda.synchronize()
            elapsed = now() - start
            if elapsed >= min_seconds and reps >= 2:
                return 2.0 * n**3 * reps / elapsed
    finally:
        torch.set_num_threads(threads)


def mfu(flops_per_sequence: float, seq_per_s: float, peak_flops: float, n_devices: int = 1) -> float:
    """MFU: the FLOP/s a training run achieves (``flops_per_sequence x seq_per_s``) over the peak
    of its ``n_devices`` devices. ``peak_flops`` is one device's, measured or from the table."""
    return flops_per_sequence * seq_per_s / (peak_flops * n_devices)


def seq_per_s_at_mfu(flops_per_sequence: float, mfu: float, peak_flops: float, n_devices: int = 1) -> float:
    """The inverse of :func:`mfu`: the sequences per second that ``n_devices`` devices of peak
    ``peak_flops`` train at a utilization of ``mfu``."""
    return mfu * peak_flops * n_devices / flops_per_sequence


# ---- the known-GPU table -------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """A GPU's dense fp16/bf16 tensor-core peak, from its datasheet, and where the figure comes from."""
    name: str
    memory_gb: int
    peak_tflops: float          # dense (no sparsity), fp16/bf16 inputs, fp32 accumulate
    source: str


def _read_gpu_table() -> dict[str, GPU]:
    # a datasheet table is data: bbert/gpus.csv, one GPU a row, with where its figure comes from
    with resources.files("bbert").joinpath("gpus.csv").open(encoding="utf-8") as f:
        return {row["name"]: GPU(row["name"], int(row["memory_gb"]), float(row["peak_tflops"]), row["source"])
                for row in csv.DictReader(f)}


KNOWN_GPUS: dict[str, GPU] = _read_gpu_table()


def get_gpu(name: str) -> GPU:
    """Look a GPU up in :data:`KNOWN_GPUS` by its short name (case and ``_``/``-``/space
    insensitive) or by the name the driver reports (``nvidia-smi``, "NVIDIA H100 80GB HBM3")."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in KNOWN_GPUS:
        gpu = gpu_from_device_name(name)
        if gpu is not None:
            return gpu
        raise ValueError(f"unknown GPU {name!r}. Known GPUs: {', '.join(KNOWN_GPUS)}. "
                         "For another GPU, measure it (--measure / measure_throughput) "
                         "or pass its throughput in sequences per second.")
    return KNOWN_GPUS[key]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The table's entry for a CUDA device name (``torch.cuda.get_device_name()``), or None.

    Matches whole words: "NVIDIA H100 80GB HBM3" is the h100, "NVIDIA GeForce RTX 4090" the
    rtx-4090, and "NVIDIA L40S" is not the l4.
    """
    words = device_name.strip().lower().replace("_", " ").replace("-", " ").split()
    for key, gpu in KNOWN_GPUS.items():
        want = key.split("-")
        if any(words[i:i + len(want)] == want for i in range(len(words))):
            return gpu
    return None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: the known-GPU table on a GPU, else a short measurement."""
    if device.type == "cuda":
        gpu = gpu_from_device_name(torch.cuda.get_device_name(device))
        if gpu is not None:
            return gpu.peak_tflops * 1e12
    dtype = amp_dtype(precision) or torch.float32
    n = 8192 if device.type == "cuda" else 1024  # a GPU needs big matrices to reach its peak
    return matmul_peak_flops(dtype, n=n, device=device.type, min_seconds=0.3)


# ---- the batch and the step that every timing uses -----------------------------------------


def random_mlm_batch(batch_size: int, seq_len: int, vocab_size: int, mlm_probability: float = 0.15,
                     lengths=None, seed: int = 0) -> dict:
    """A synthetic masked-LM batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 = not predicted).

    Random tokens stand in for text: the speed of a step does not depend on what they say.
    Packed (every position real) unless ``lengths`` gives each row's number of real tokens.
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if lengths is not None:
        attention_mask = (torch.arange(seq_len)[None, :] < torch.as_tensor(lengths)[:, None]).long()
        input_ids = input_ids * attention_mask  # pad id 0
    selected = (torch.rand(batch_size, seq_len, generator=g) < mlm_probability) & attention_mask.bool()
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               amp_dtype: torch.dtype | str | None = "auto", scaler=None) -> float:
    """One optimization step: forward under autocast, backward, optimizer step. Returns the loss.

    ``amp_dtype="auto"`` is bf16 where the device runs it natively (``bbert.precision.fast_bf16``),
    else fp32; None is fp32. bf16 needs no loss scaling; for fp16 on a GPU pass
    ``scaler=torch.amp.GradScaler("cuda")``.
    Works for bbert and for transformers models (both take input_ids/attention_mask/labels).
    """
    device = next(model.parameters()).device.type
    if isinstance(amp_dtype, str):
        if amp_dtype != "auto":
            raise ValueError(f"amp_dtype must be a torch dtype, None or 'auto', got {amp_dtype!r}")
        amp_dtype = native_amp_dtype(device)
    with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = model(**batch).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # .item() waits for the device, so a timed step is a finished step


# ---- timing training steps -----------------------------------------------------------------

@dataclass
class Throughput:
    """A short real benchmark of training steps on this device."""
    model: str
    device: str
    precision: str
    micro_batch_size: int
    seq_len: int
    seq_per_s: float
    flops_per_s: float

    def __str__(self) -> str:
        return (f"{self.model} on {self.device} ({self.precision}, micro-batch {self.micro_batch_size} x "
                f"{self.seq_len}): {self.seq_per_s:.2f} seq/s, {self.flops_per_s / 1e9:.1f} GFLOP/s")


def measure_throughput(model: str = "tiny", seq_len: int = 128, micro_batch_size: int = 8,
                       steps: int = 3, precision: str = "auto", device: str | None = None,
                       masked_fraction: float = 0.15, vocab_size: int = 30522,
                       seed: int = 0) -> Throughput:
    """Time a few real training steps (sparse MLM head, AdamW) of a model preset on this device.

    The model and the batch come from ``seed`` (:func:`random_mlm_batch`), each step is
    :func:`train_step`, and one untimed warm-up step comes first. ``precision="auto"`` is bf16
    where the device runs it natively (``bbert.precision.fast_bf16``), else fp32.
    """
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        precision = "bf16" if fast_bf16(device) else "fp32"
    if precision == "fp16" and str(device).split(":")[0] == "cpu":
        raise ValueError("fp16 autocast is for GPUs; use precision='bf16' or 'fp32' on CPU")
    torch.manual_seed(seed)
    config = BertConfig.from_preset(model, vocab_size=vocab_size)
    net = BertForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in
             random_mlm_batch(micro_batch_size, seq_len, vocab_size, masked_fraction, seed=seed).items()}
    # fp16 without a GradScaler: a step it skips after an overflow would be timed as a fast step.
    train_step(net, optimizer, batch, amp_dtype(precision))  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    for _ in range(steps):
        train_step(net, optimizer, batch, amp_dtype(precision))
    seq_per_s = steps * micro_batch_size / (time.perf_counter() - start)
    flops = training_flops_per_sequence(config, seq_len, masked_fraction, sparse_mlm_head=True)
    return Throughput(model, str(device), precision, micro_batch_size, seq_len, seq_per_s, seq_per_s * flops)


def compare_throughput(runners: dict, batch: dict, rounds: int = 3, steps: int = 1, warmup: int = 1,
                       amp_dtype: torch.dtype | str | None = "auto", progress: bool = True,
                       clock: str = "wall") -> dict:
    """Training throughput (sequences/s) of several ``name -> (model, optimizer)`` on one batch.

    A runner may carry its own autocast dtype as a third item, ``(model, optimizer, amp_dtype)``.
    The runners alternate, in reversed order every other round, after ``warmup`` steps each, so
    that a machine whose load changes (others' jobs, turbo, heat) slows them alike; only
    ratios measured this way mean much on a shared machine. Throughput is from each runner's
    median round. ``clock="thread"`` (CPU only) runs torch on one thread and times that thread's
    CPU time: on a machine shared with other jobs, wall-clock time measures the neighbours as much
    as the model, CPU time barely. Returns ``{"seq_s": {name: ...},
    "seconds": {name: [per-step seconds of each round]}}``.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    threads = torch.get_num_threads()
    if clock == "thread":
        torch.set_num_threads(1)  # all the work then runs on this thread, which thread_time sees
    now = time.thread_time if clock == "thread" else time.perf_counter
    names = list(runners)
    batch_size = batch["input_ids"].shape[0]
    bar = tqdm(total=len(names) * (warmup + rounds * steps), desc="train steps", disable=not progress,
               leave=False)
    runners = {name: (tuple(r) + (amp_dtype,))[:3] for name, r in runners.items()}
    try:
        for model, optimizer, dtype in runners.values():
            model.train()
            for _ in range(warmup):
                train_step(model, optimizer, batch, dtype)
                bar.update()
        seconds = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                model, optimizer, dtype = runners[name]
                start = now()
                for _ in range(steps):
                    train_step(model, optimizer, batch, dtype)
                    bar.update()
                seconds[name].append((now() - start) / steps)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    # The median step: one round disturbed by another job does not move it.
    seq_s = {name: batch_size / statistics.median(s) for name, s in seconds.items()}
    return {"seq_s": seq_s, "seconds": seconds}
