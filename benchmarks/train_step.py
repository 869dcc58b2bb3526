"""Training-step throughput of bbert against transformers.BertForMaskedLM of the same shape, or, in
the ModernBERT layout, against transformers.ModernBertForMaskedLM of the same shape and options.

    .venv/bin/python benchmarks/train_step.py            # mini and base, packed 8 x 128 batches
    .venv/bin/python benchmarks/train_step.py --quick    # fewer rounds
    .venv/bin/python benchmarks/train_step.py --layout modernbert --presets mini   # vs ModernBERT
    .venv/bin/python benchmarks/train_step.py --layout modernbert --presets mini --hf-sparse --ragged
        # + ModernBERT with its own sparse head, on a padded batch (where unpadding pays)
    .venv/bin/python benchmarks/train_step.py --padded   # + unpadding on vs off on a padded batch
    .venv/bin/python benchmarks/train_step.py --clock thread   # one thread's CPU time (busy machine)
    python benchmarks/train_step.py --device cuda --presets base large --batch-size 64   # on a GPU

A step is forward + backward + optimizer step on the same batch of packed 128-token sequences with
15% of positions masked. Each model runs at the best settings it offers on this device:
- transformers: attn_implementation="sdpa", bf16 autocast, fused AdamW; its ModernBERT as
  published (sparse_prediction off, the sliding window as an SDPA mask);
- bbert: its defaults (sparse MLM head, fused QKV + SDPA, unpadding), bf16 autocast, fused AdamW.
On a CPU without native bf16 (no AVX-512 BF16 / AMX; bbert.precision.fast_bf16) torch emulates bf16
matmuls ~100x slower than fp32, so there both run in fp32 and MFU is against the fp32 peak.
The two alternate (ABBA...) within one run after a warm-up, so that the machine's load, which
others share, hits both alike. MFU counts only the FLOPs each model really computes (bbert's
head runs at the masked positions only) against the torch.mm peaks measured in
this same run. Method explained in notebooks/03_model.ipynb.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bbert.hf import transformers_baseline
from bbert.hf_modernbert import modernbert_baseline, modernbert_misfits
from bbert.model import LAYOUTS, BertConfig, BertForMaskedLM
from bbert.optim import build_optimizer
from bbert.speed import (compare_throughput, matmul_peak_flops, mfu, random_mlm_batch,
                         training_flops_per_sequence)
from bbert.precision import native_amp_dtype

VOCAB = 30522  # bert-base-uncased's vocabulary


def build_bbert(preset: str, device: str = "cpu", **overrides):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset(preset, vocab_size=VOCAB, **overrides)).to(device)
    return model, build_optimizer(model)


def build_transformers(preset: str, device: str = "cpu", layout: str | None = None, sparse: bool = False):
    """transformers' model of the same shape: its ModernBERT where the options are ModernBERT's
    (``sparse``: with its own ``sparse_prediction``, the head at the masked positions only)."""
    torch.manual_seed(0)
    config = BertConfig.from_preset(preset, vocab_size=VOCAB, layout=layout)
    baseline = transformers_baseline if modernbert_misfits(config) else modernbert_baseline
    model = baseline(config, attn_implementation="sdpa").to(device)
    if sparse:
        model.sparse_prediction = model.config.sparse_prediction = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=0.01, fused=True)
    return model, optimizer


def ratio_summary(result: dict, a: str, b: str) -> str:
    # Total throughput ratio, plus the median of per-round ratios (robust to one noisy round).
    per_round = [tb / ta for ta, tb in zip(result["seconds"][a], result["seconds"][b])]
    return (f"{result['seq_s'][a] / result['seq_s'][b]:.2f}x "
            f"(median of rounds {statistics.median(per_round):.2f}x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mini", "base"])
    parser.add_argument("--layout", choices=list(LAYOUTS), default=None,
                        help="bbert's options for an architecture; modernbert: timed against ModernBertForMaskedLM")
    parser.add_argument("--mlm-probability", type=float, default=0.15, help="share of positions masked")
    parser.add_argument("--ragged", action="store_true",
                        help="the compared batch is padded (lengths from a quarter to all of seq_len), not packed")
    parser.add_argument("--hf-sparse", action="store_true",
                        help="with --layout modernbert: also time ModernBERT with its sparse_prediction on")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--padded", action="store_true", help="also measure unpadding on a padded batch")
    parser.add_argument("--compile", action="store_true", help="also time bbert under torch.compile")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall clock (default), or one thread's CPU time: steadier on a shared machine")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu (default; the issue's targets) or cuda")
    args = parser.parse_args(argv)
    device = args.device
    on_gpu = device.startswith("cuda")
    if on_gpu and args.clock == "thread":
        parser.error("--clock thread times CPU work; use the wall clock on a GPU")
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch_size} x {args.seq_len}"
          + (" (padded: lengths from a quarter to all)" if args.ragged else ""))
    peak_seconds = 0.3 if args.quick else 1.0
    amp_dtype = native_amp_dtype(device)
    amp = "bf16" if amp_dtype is torch.bfloat16 else "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if amp == "bf16" else {"fp32": torch.float32}
    if on_gpu:  # bf16 tensor-core work against the fp32 (no TF32) peak would read as MFU > 100%
        dtypes = {amp: dtypes[amp]}
    print(f"precision: {amp}" + ("" if amp == "bf16" else " (this device has no native bf16)"))
    if args.clock == "thread":  # everything on one thread, in its CPU time
        print("clock: one thread's CPU time (seq/s = sequences per CPU-second of one core)")
        peaks = {k: matmul_peak_flops(d, n=2048, min_seconds=peak_seconds, clock="thread")
                 for k, d in dtypes.items()}
    else:
        # a GPU needs bigger matrices to reach its peak; fp32 there is without TF32 (torch's default)
        peaks = {k: matmul_peak_flops(d, n=8192 if on_gpu else 4096, device=device, min_seconds=peak_seconds)
                 for k, d in dtypes.items()}
    # Finetuning-like lengths, spread between a quarter and all of seq_len (--ragged and --padded)
    lengths = torch.linspace(args.seq_len // 4, args.seq_len, args.batch_size).long()
    batch = {k: v.to(device) for k, v in random_mlm_batch(args.batch_size, args.seq_len, VOCAB, args.mlm_probability,
                                                          lengths=lengths if args.ragged else None, seed=0).items()}
    masked = float((batch["labels"] != -100).float().mean())
    results = []
    for preset in args.presets:
        runners = {"bbert": build_bbert(preset, device, layout=args.layout),
                   "transformers": build_transformers(preset, device, args.layout)}
        if args.hf_sparse:
            if args.layout != "modernbert":
                parser.error("--hf-sparse is ModernBERT's option: add --layout modernbert")
            runners["transformers+sparse"] = build_transformers(preset, device, args.layout, sparse=True)
        if args.compile:
            model, optimizer = build_bbert(preset, device, layout=args.layout)
            runners["bbert+compile"] = (torch.compile(model), optimizer)
        r = compare_throughput(runners, batch, args.rounds, args.steps, args.warmup, amp_dtype=amp_dtype,
                               clock=args.clock)
        config = runners["bbert"][0].config  # the same shape for all: count FLOPs from bbert's config
        sparse = {"bbert": True, "transformers": False, "transformers+sparse": True, "bbert+compile": True}
        print(f"\n[{preset}] {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
              f"{type(runners['transformers'][0]).__name__} as transformers")
        for name in runners:
            flops = training_flops_per_sequence(config, args.seq_len, masked, sparse[name])
            seq_s = r["seq_s"][name]
            print(f"  {name:<19} {seq_s:7.2f} seq/s  {flops * seq_s / 1e9:6.1f} GFLOP/s  "
                  + ", ".join(f"MFU {mfu(flops, seq_s, p):5.1%} of {k} peak"
                              for k, p in peaks.items()))
        print(f"  ratio bbert / transformers: {ratio_summary(r, 'bbert', 'transformers')}")
        if args.hf_sparse:
            print(f"  ratio bbert / transformers+sparse: {ratio_summary(r, 'bbert', 'transformers+sparse')}")
        if args.compile:
            print(f"  ratio bbert+compile / transformers: {ratio_summary(r, 'bbert+compile', 'transformers')}")
        results.append((preset, r["seq_s"]["bbert"] / r["seq_s"]["transformers"]))
        del runners
    if args.padded:
        padded = {k: v.to(device) for k, v in
                  random_mlm_batch(args.batch_size, args.seq_len, VOCAB, lengths=lengths, seed=1).items()}
        preset = args.presets[-1]
        runners = {"unpad": build_bbert(preset, device, layout=args.layout, unpad=True),
                   "padded": build_bbert(preset, device, layout=args.layout, unpad=False)}
        r = compare_throughput(runners, padded, args.rounds, args.steps, args.warmup, amp_dtype=amp_dtype,
                               clock=args.clock)
        fill = padded["attention_mask"].float().mean().item()
        print(f"\n[{preset}, padded batch, {fill:.0%} real tokens] unpad {r['seq_s']['unpad']:.2f} seq/s, "
              f"padded {r['seq_s']['padded']:.2f} seq/s: unpadding {ratio_summary(r, 'unpad', 'padded')}")
    print("\nmatmul peaks measured in this run: " + ", ".join(f"{k} {p / 1e9:.0f} GFLOP/s" for k, p in peaks.items()))
    if amp == "fp32" and not on_gpu:  # why bf16 is not used: a small product is enough to show the emulation
        emulated = matmul_peak_flops(torch.bfloat16, n=256, min_seconds=0.2)
        print(f"bf16 torch.mm (256 x 256, emulated): {emulated / 1e9:.1f} GFLOP/s, "
              f"{peaks['fp32'] / emulated:.0f}x below fp32; bf16 MFU targets can't be measured here")
    print("summary: " + ", ".join(f"{p} {ratio:.2f}x" for p, ratio in results) + " (bbert / transformers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
