"""The compute budget: FLOPs, MFU, the planner and the known-GPU table.

What does a budget of N GPUs x H hours buy? The planner turns a throughput (sequences
per second, from the known-GPU table or measured on this device) into optimizer steps,
sequences, tokens, FLOPs, GPU-hours and cost, and puts it beside the paper's run.

    bbert budget --gpus 8 --gpu titan-v --hours 24 --price 0.9
    bbert budget --measure --model tiny --hours 0.05      # throughput measured here

Chapter: ``notebooks/01_budget.ipynb``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

# ---- FLOPs and peak ----------------------------------------------------------------


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
    """Measured FLOP/s of a large square ``torch.mm``: the peak that MFU is measured against.

    ``dtype=None`` is bf16 where the device runs it natively (``bbert.utils.fast_bf16``), else fp32.
    """
    import torch

    from bbert.utils import autocast_dtype

    dtype = dtype or autocast_dtype(device) or torch.float32
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


# ---- the known-GPU table -----------------------------------------------------------

# The paper's run (izsak2021): one server with 8 low-end 12 GB GPUs (Titan V) for 24 hours,
# batch 4096 of 128-token sequences, BERT-large shape; about 23k optimizer steps in all.
PAPER_RUN = dict(num_gpus=8, gpu="titan-v", hours=24.0, batch_size=4096, seq_len=128,
                 model="large", optimizer_steps=23_000)

# Model FLOPs utilisation assumed for every GPU in the table. Calibrated on the paper's run:
# 23k steps x 4096 sequences x 2.40e11 FLOPs / (8 GPUs x 24 h x 110 TFLOP/s) = 0.30.
# It already includes everything that is not a matmul (data loading, validation,
# optimizer, communication). Newer GPUs may do better or worse: pass your own with mfu=.
DEFAULT_MFU = 0.30


@dataclass(frozen=True)
class GPU:
    """A GPU in the planner's table: dense fp16/bf16 tensor-core peak and where it comes from.

    Chapter: ``notebooks/01_budget.ipynb``.
    """
    name: str
    memory_gb: int
    peak_tflops: float          # dense (no sparsity), fp16/bf16 inputs, fp32 accumulate
    source: str
    assumed_mfu: float = DEFAULT_MFU


KNOWN_GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("titan-v", 12, 110.0, "NVIDIA TITAN V product page: 110 TFLOPS tensor performance"),
    GPU("rtx-2080-ti", 11, 53.8, "NVIDIA Turing whitepaper: FP16 tensor, FP32 accumulate (reference clocks)"),
    GPU("titan-rtx", 24, 130.5, "NVIDIA Turing whitepaper: FP16 tensor, FP32 accumulate"),
    GPU("t4", 16, 65.0, "NVIDIA T4 datasheet: mixed-precision FP16/FP32"),
    GPU("v100", 32, 125.0, "NVIDIA V100 datasheet (SXM2): tensor performance"),
    GPU("rtx-3090", 24, 71.0, "NVIDIA Ampere GA102 whitepaper: FP16 tensor, FP32 accumulate, dense"),
    GPU("a10", 24, 125.0, "NVIDIA A10 datasheet: BF16 tensor, dense (250 with sparsity)"),
    GPU("a100", 80, 312.0, "NVIDIA A100 datasheet: BF16 tensor, dense (624 with sparsity)"),
    GPU("rtx-4090", 24, 165.2, "NVIDIA Ada Lovelace whitepaper: FP16 tensor, FP32 accumulate, dense"),
    GPU("l4", 24, 121.0, "NVIDIA L4 datasheet: BF16 tensor, dense (242 with sparsity)"),
    GPU("h100", 80, 989.0, "NVIDIA H100 datasheet (SXM): BF16 tensor, dense (1979 with sparsity)"),
    GPU("h200", 141, 989.0, "NVIDIA H200 datasheet (SXM): BF16 tensor, dense (1979 with sparsity)"),
]}


def get_gpu(name: str) -> GPU:
    """Look a GPU up in :data:`KNOWN_GPUS` (case and ``_``/``-``/space insensitive).

    Chapter: ``notebooks/01_budget.ipynb``.
    """
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in KNOWN_GPUS:
        raise ValueError(f"unknown GPU {name!r}. Known GPUs: {', '.join(KNOWN_GPUS)}. "
                         "For another GPU, measure it (--measure / measure_throughput) "
                         "or pass its throughput in sequences per second.")
    return KNOWN_GPUS[key]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The table's entry for a CUDA device name (``torch.cuda.get_device_name()``), or None.

    Matches whole words: "NVIDIA H100 80GB HBM3" is the h100, "NVIDIA GeForce RTX 4090" the
    rtx-4090, and "NVIDIA L40S" is not the l4. Chapter: ``notebooks/01_budget.ipynb``.
    """
    words = device_name.strip().lower().replace("_", " ").replace("-", " ").split()
    for key, gpu in KNOWN_GPUS.items():
        want = key.split("-")
        if any(words[i:i + len(want)] == want for i in range(len(words))):
            return gpu
    return None


def model_config(model: str = "large", vocab_size: int = 30522):
    """The :class:`bbert.model.BertConfig` of a preset, with the paper's BERT vocabulary size.

    Chapter: ``notebooks/01_budget.ipynb``.
    """
    from bbert.model import BertConfig

    return BertConfig.from_preset(model, vocab_size=vocab_size)


# ---- the planner -------------------------------------------------------------------


@dataclass
class BudgetPlan:
    """What a budget buys: the inputs, the throughput used and the totals it gives.

    ``str(plan)`` is a readable table with a comparison line against the paper's run.
    Chapter: ``notebooks/01_budget.ipynb``.
    """
    num_gpus: int
    gpu: str
    hours: float
    price_per_gpu_hour: float
    model: str
    seq_len: int
    batch_size: int
    seq_per_s_per_gpu: float
    throughput_source: str
    flops_per_sequence: float
    sequences: float
    tokens: float
    optimizer_steps: float
    total_flops: float
    gpu_hours: float
    cost: float

    @property
    def seq_per_s(self) -> float:
        return self.seq_per_s_per_gpu * self.num_gpus

    def paper_comparison(self) -> str:
        """One line that puts this plan beside the paper's run."""
        p = PAPER_RUN
        ratio = self.optimizer_steps / p["optimizer_steps"]
        same = (self.model == p["model"] and self.batch_size == p["batch_size"]
                and self.seq_len == p["seq_len"])
        caveat = "" if same else f" (note: {self.model}/batch {self.batch_size}/seq {self.seq_len}, " \
                                 f"not the paper's {p['model']}/{p['batch_size']}/{p['seq_len']})"
        return (f"Paper (Izsak et al., 2021): ~{p['optimizer_steps']:,} steps at batch {p['batch_size']} "
                f"in {p['hours']:g} h on {p['num_gpus']} GPUs. This plan: {self.optimizer_steps:,.0f} steps "
                f"= {ratio:.2f}x the paper's{caveat}.")

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("setup", f"{self.num_gpus} x {self.gpu}, {self.hours:g} h, model {self.model}, "
                      f"seq {self.seq_len}, batch {self.batch_size}"),
            ("throughput", f"{self.seq_per_s_per_gpu:,.1f} seq/s per device ({self.throughput_source})"),
            ("FLOPs / sequence", f"{self.flops_per_sequence:.3g}"),
            ("optimizer steps", f"{self.optimizer_steps:,.0f}"),
            ("sequences", f"{self.sequences:,.0f}"),
            ("tokens", f"{self.tokens:,.0f} ({self.tokens / 1e9:.2f} B)"),
            ("total FLOPs", f"{self.total_flops:.3g}"),
            ("GPU-hours", f"{self.gpu_hours:,.1f}"),
            ("cost", f"${self.cost:,.2f} at ${self.price_per_gpu_hour:g} per GPU-hour"),
        ]

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        lines = [f"{k:<{width}}  {v}" for k, v in self.rows()]
        return "\n".join(lines + [self.paper_comparison()])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_budget(num_gpus: int = 8, gpu: str | None = "titan-v", hours: float = 24.0,
                price_per_gpu_hour: float = 1.0, model: str = "large", seq_len: int = 128,
                batch_size: int = 4096, masked_fraction: float = 0.15, sparse_mlm_head: bool = True,
                mfu: float | None = None, seq_per_s_per_gpu: float | None = None,
                throughput_source: str | None = None, vocab_size: int = 30522) -> BudgetPlan:
    """Plan a budget: optimizer steps, sequences, tokens, FLOPs, GPU-hours and cost.

    Throughput comes from ``seq_per_s_per_gpu`` when given (e.g. measured with
    :func:`measure_throughput`), else from the GPU table: peak x MFU / FLOPs per sequence.
    Chapter: ``notebooks/01_budget.ipynb``.
    """
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if hours <= 0:
        raise ValueError(f"hours must be > 0, got {hours}")
    if price_per_gpu_hour < 0:
        raise ValueError(f"price_per_gpu_hour must be >= 0, got {price_per_gpu_hour}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    flops_per_seq = training_flops_per_sequence(model_config(model, vocab_size), seq_len,
                                                masked_fraction, sparse_mlm_head)
    if seq_per_s_per_gpu is None:
        if gpu is None:
            raise ValueError("give a GPU name from the table or seq_per_s_per_gpu (measured)")
        spec = get_gpu(gpu)
        mfu = spec.assumed_mfu if mfu is None else mfu
        if not 0 < mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {mfu}")
        seq_per_s_per_gpu = spec.peak_tflops * 1e12 * mfu / flops_per_seq
        gpu = spec.name
        throughput_source = throughput_source or f"table: {spec.peak_tflops:g} TFLOP/s peak x MFU {mfu:.2f}"
    elif seq_per_s_per_gpu <= 0:
        raise ValueError(f"seq_per_s_per_gpu must be > 0, got {seq_per_s_per_gpu}")
    sequences = seq_per_s_per_gpu * num_gpus * hours * 3600.0
    return BudgetPlan(
        num_gpus=num_gpus, gpu=gpu or "this device", hours=hours, price_per_gpu_hour=price_per_gpu_hour,
        model=model, seq_len=seq_len, batch_size=batch_size, seq_per_s_per_gpu=seq_per_s_per_gpu,
        throughput_source=throughput_source or "given", flops_per_sequence=flops_per_seq,
        sequences=sequences, tokens=sequences * seq_len, optimizer_steps=sequences / batch_size,
        total_flops=sequences * flops_per_seq, gpu_hours=num_gpus * hours,
        cost=num_gpus * hours * price_per_gpu_hour,
    )


def paper_plan(price_per_gpu_hour: float = 1.0) -> BudgetPlan:
    """The planner's estimate of the paper's own run (8 Titan V, 24 h, batch 4096, large).

    Chapter: ``notebooks/01_budget.ipynb``.
    """
    p = PAPER_RUN
    return plan_budget(p["num_gpus"], p["gpu"], p["hours"], price_per_gpu_hour, p["model"],
                       p["seq_len"], p["batch_size"])


# ---- measuring this device ---------------------------------------------------------


@dataclass
class Throughput:
    """A short real benchmark of training steps on this device.

    Chapter: ``notebooks/01_budget.ipynb``.
    """
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

    Random tokens stand in for text: the speed of a step does not depend on what the tokens say.
    One untimed warm-up step comes first. ``precision="auto"`` is bf16 where the device runs it
    natively (``bbert.utils.fast_bf16``), else fp32. Chapter: ``notebooks/01_budget.ipynb``.
    """
    import torch

    from bbert.model import BertForMaskedLM
    from bbert.utils import fast_bf16

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":  # bf16 where the device runs it natively
        precision = "bf16" if fast_bf16(device) else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ValueError("fp16 autocast is for GPUs; use precision='bf16' or 'fp32' on CPU")
    torch.manual_seed(seed)
    config = model_config(model, vocab_size)
    net = BertForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    input_ids = torch.randint(5, vocab_size, (micro_batch_size, seq_len), device=device)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    chosen = torch.rand(input_ids.shape, device=device) < masked_fraction
    labels[chosen] = input_ids[chosen]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=precision != "fp32"):
            loss = net(input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up: allocations, kernel selection
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seq_per_s = steps * micro_batch_size / (time.perf_counter() - start)
    flops = training_flops_per_sequence(config, seq_len, masked_fraction, sparse_mlm_head=True)
    return Throughput(model, device, precision, micro_batch_size, seq_len, seq_per_s, seq_per_s * flops)


# ---- the command -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``bbert budget``: print what a budget buys. Chapter: ``notebooks/01_budget.ipynb``."""
    parser = argparse.ArgumentParser(prog="bbert budget", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpus", type=int, default=PAPER_RUN["num_gpus"], help="number of GPUs")
    parser.add_argument("--gpu", default=PAPER_RUN["gpu"], help="GPU type from the table (--list-gpus)")
    parser.add_argument("--hours", type=float, default=PAPER_RUN["hours"], help="wall-clock budget")
    parser.add_argument("--price", type=float, default=1.0, help="price per GPU-hour, in dollars")
    parser.add_argument("--model", default=PAPER_RUN["model"], help="model preset (tiny ... large)")
    parser.add_argument("--seq-len", type=int, default=PAPER_RUN["seq_len"])
    parser.add_argument("--batch-size", type=int, default=PAPER_RUN["batch_size"], help="global batch")
    parser.add_argument("--mfu", type=float, default=None, help=f"override the assumed MFU ({DEFAULT_MFU})")
    parser.add_argument("--throughput", type=float, default=None, help="sequences/s per GPU, if known")
    parser.add_argument("--measure", action="store_true",
                        help="measure the throughput with a few real training steps on this device")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="for --measure")
    parser.add_argument("--precision", default=None, help="for --measure: fp16 (GPU default), bf16, fp32, or auto "
                        "(CPU default: bf16 where native, else fp32)")
    parser.add_argument("--list-gpus", action="store_true", help="print the known-GPU table and exit")
    args = parser.parse_args(argv)

    if args.list_gpus:
        print(f"{'gpu':<12} {'memory':>6} {'peak TFLOP/s':>12} {'MFU':>5}  source")
        for g in KNOWN_GPUS.values():
            print(f"{g.name:<12} {g.memory_gb:>4} GB {g.peak_tflops:>12g} {g.assumed_mfu:>5.2f}  {g.source}")
        return 0
    try:
        throughput, source, gpu = args.throughput, None, args.gpu
        if args.measure:
            import torch

            on_gpu = torch.cuda.is_available()
            precision = args.precision or ("fp16" if on_gpu else "auto")  # the paper's fp16 on a GPU
            result = measure_throughput(args.model, args.seq_len, args.micro_batch_size, precision=precision)
            print(f"measured: {result}")
            throughput, source = result.seq_per_s, f"measured on {result.device}"
            gpu = torch.cuda.get_device_name() if on_gpu else "this CPU"
        plan = plan_budget(args.gpus, gpu, args.hours, args.price, args.model, args.seq_len,
                           args.batch_size, mfu=args.mfu, seq_per_s_per_gpu=throughput,
                           throughput_source=source)
    except ValueError as err:
        parser.error(str(err))
    print(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
