"""Finetuning with length-grouped batches vs plain random batches (the baseline), same run.

    .venv/bin/python benchmarks/glue_length_grouping.py [--quick]

Both arms finetune the same randomly initialized bbert classifier on the offline corpus-source
task (sentences of very different lengths) with dynamic padding; the only difference is
whether batches are grouped by length (bbert.glue.length_grouped_batches: transformers'
get_length_grouped_indices, then the batches in random order). The arms alternate,
so background load hits both alike. Prints the share of pad tokens of each arm and the
time-per-run ratio baseline / grouped (> 1 means grouping is faster).
Chapter: notebooks/05_finetuning.ipynb
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bbert import glue
from bbert.data.readers import read_sample_corpus
from bbert.data.tokenizer import train_tokenizer
from bbert.model import BertConfig, BertForMaskedLM


def pad_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of the padded batch tensors that is padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat (about a minute)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, repeats = ("tiny", 1) if args.quick else ("mini", 3)
    repeats = args.repeats or repeats

    work = Path(tempfile.mkdtemp(prefix="bbert-bench-glue-"))
    texts = [d["text"] for d in read_sample_corpus()[::3]]
    tok = train_tokenizer(texts, vocab_size=4096, max_seq_length=128)
    model = BertForMaskedLM(BertConfig.from_preset(preset, vocab_size=len(tok), max_position_embeddings=128))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    data = glue.make_corpus_source_task(work / "task", train_per_source=200 if args.quick else 400,
                                        eval_per_source=30)

    lengths = [len(ids) for ids in tok([e["text_a"] for e in data.splits["train"]], truncation=True,
                                       max_length=128)["input_ids"]]
    gen = torch.Generator().manual_seed(0)
    grouped = glue.length_grouped_batches(lengths, 32, gen)
    plain = glue.random_batches(len(lengths), 32, gen)
    print(f"model {preset}, {len(lengths)} training sentences, batch 32, torch threads {torch.get_num_threads()}")
    print(f"pad share: random batches {pad_share(lengths, plain):.1%}, "
          f"length-grouped {pad_share(lengths, grouped):.1%}")

    warm = glue.FinetuneConfig(num_epochs=1, max_train_examples=64, save_best_model=False, progress=False)
    glue.finetune(work / "model", data, warm)  # first-call costs (allocator, kernels) paid by neither arm
    times = {True: [], False: []}
    for r in range(repeats):
        for grouping in (False, True):  # baseline first, then grouped, alternating
            cfg = glue.FinetuneConfig(lr=1e-4, batch_size=32, num_epochs=1, seed=r,
                                      length_grouping=grouping, save_best_model=False, progress=False)
            times[grouping].append(glue.finetune(work / "model", data, cfg)["seconds"])
            print(f"  repeat {r}: {'length-grouped' if grouping else 'random (baseline)':<18} "
                  f"{times[grouping][-1]:.2f} s", flush=True)
    base, grouped_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"median run time: random {base:.2f} s, length-grouped {grouped_s:.2f} s; "
          f"speed-up vs random batches: {base / grouped_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
