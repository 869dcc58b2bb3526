"""Benchmark: end-to-end tokens/s of `bbert prepare` against the pipeline a user would otherwise
pick and against the tokenizer's own ceiling, all measured in this run, alternating.

    .venv/bin/python benchmarks/data_pipeline.py            # the embedded corpus, 3 rounds
    .venv/bin/python benchmarks/data_pipeline.py --quick    # a 3 MB slice, 1 round
    .venv/bin/python benchmarks/data_pipeline.py my.txt     # any text/JSONL file or folder

Measured, with one tokenizer (trained once on the input, untimed):
- bbert:    bbert.data.prepare (read, clean, split, encode_batch, pack, write uint16 shards, sha256)
- hf:       datasets `map(tokenize)` + `group_texts` from transformers' examples/pytorch/run_mlm.py,
            on texts already in memory (not timed: reading them), nothing written to disk
- ceiling:  the raw `tokenizers` `encode_batch` of the same texts (in memory), the ids read out;
            also `encode_batch_fast` (no character offsets), which bbert itself uses

Targets on a 2-core machine: bbert >= 2x hf, >= 70% of the ceiling, <= 2.1 bytes per stored token.
Chapter: notebooks/02_data.ipynb.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_pipeline(texts, tokenizer, max_seq_length):
    """What transformers' run_mlm.py does with --line_by_line off: tokenize, then group_texts."""
    import datasets

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // max_seq_length) * max_seq_length
        return {k: [t[i: i + max_seq_length] for i in range(0, total_length, max_seq_length)]
                for k, t in concatenated.items()}

    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(tokenize_function, batched=True, remove_columns=["text"], load_from_cache_file=False)
    return ds.map(group_texts, batched=True, load_from_cache_file=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="text/JSONL files or folders (default: embedded corpus)")
    parser.add_argument("--quick", action="store_true", help="a 3 MB slice and one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--max-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.max_bytes = 1, args.max_bytes or 3_000_000

    import datasets
    import numpy as np

    from bbert.data import PrepareConfig, prepare, read_documents, sample_corpus_path
    from bbert.data.readers import iter_clean_documents
    from bbert.data.tokenizer import encoder, load_tokenizer, train_tokenizer

    datasets.disable_progress_bars()
    inputs = args.inputs or [str(sample_corpus_path())]
    # The same documents for everyone: the raw texts of the slice bbert will read.
    texts = [t for t in read_documents(inputs)]
    if args.max_bytes:
        kept, size = [], 0
        for t in texts:
            if size >= args.max_bytes:
                break
            kept.append(t)
            size += len(t)
        texts = kept
    n_docs = len(texts)
    print(f"input: {', '.join(map(str, inputs))}: {n_docs:,} documents, "
          f"{sum(map(len, texts)) / 1e6:.1f} M characters; {os.cpu_count()} CPUs")

    work = Path(tempfile.mkdtemp(prefix="bbert-bench-"))
    t0 = time.perf_counter()
    tok = train_tokenizer((t for _, t in iter_clean_documents(texts, val_fraction=0)), args.vocab_size)
    tok.save_pretrained(work / "tokenizer")
    tok = load_tokenizer(work / "tokenizer")
    print(f"tokenizer: WordPiece, {len(tok):,} tokens, trained in {time.perf_counter() - t0:.1f} s (untimed)")
    backend = encoder(tok)

    def run_bbert(r):
        out = work / f"bbert-{r}"
        start = time.perf_counter()
        m = prepare(PrepareConfig(inputs=inputs, out=str(out), tokenizer=str(work / "tokenizer"),
                                  max_documents=n_docs, progress=False))
        seconds = time.perf_counter() - start
        return seconds, m

    def run_hf(r):
        start = time.perf_counter()
        grouped = hf_pipeline(texts, tok, 128)
        return time.perf_counter() - start, grouped

    def run_ceiling(r):
        start = time.perf_counter()
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        n = sum(len(e.ids) for e in encodings)
        return time.perf_counter() - start, n

    def run_ceiling_fast(r):
        start = time.perf_counter()
        encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
        n = sum(len(e.ids) for e in encodings)
        return time.perf_counter() - start, n

    times = {"bbert": [], "hf": [], "ceiling": [], "ceiling_fast": []}
    runners = {"bbert": run_bbert, "hf": run_hf, "ceiling": run_ceiling, "ceiling_fast": run_ceiling_fast}
    order = list(runners)
    for r in range(args.rounds):
        for name in order[r % 4:] + order[:r % 4]:  # rotate, so no method always runs first
            seconds, result = runners[name](r)
            times[name].append(seconds)
            if name == "bbert":
                manifest = result
            elif name == "hf":
                grouped = result
            elif name == "ceiling":
                tokens = result
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: tokens / v for k, v in med.items()}  # one token count for all: the ceiling's
    hf_bytes = grouped.data.nbytes / max(sum(len(x) for x in grouped["input_ids"]), 1)
    print()
    print(f"tokens (encode_batch, no special tokens): {tokens:,}")
    print(f"{'pipeline':<44}{'median s':>10}{'M tokens/s':>12}")
    print(f"{'bbert prepare (end to end, shards on disk)':<44}{med['bbert']:>10.2f}{rate['bbert'] / 1e6:>12.3f}")
    print(f"{'HF datasets map(tokenize) + group_texts':<44}{med['hf']:>10.2f}{rate['hf'] / 1e6:>12.3f}")
    print(f"{'raw encode_batch (ceiling)':<44}{med['ceiling']:>10.2f}{rate['ceiling'] / 1e6:>12.3f}")
    print(f"{'raw encode_batch_fast (no offsets)':<44}{med['ceiling_fast']:>10.2f}{rate['ceiling_fast'] / 1e6:>12.3f}")
    print()
    speedup, of_ceiling = med["hf"] / med["bbert"], med["ceiling"] / med["bbert"]
    print(f"bbert / HF pipeline:       {speedup:.2f}x   (target >= 2x)        {'MET' if speedup >= 2 else 'NOT MET'}")
    print(f"bbert / encode_batch:      {of_ceiling:.0%}    (target >= 70%)       {'MET' if of_ceiling >= 0.7 else 'NOT MET'}")
    # bbert itself calls encode_batch_fast, so this is the stricter ceiling.
    print(f"bbert / encode_batch_fast: {med['ceiling_fast'] / med['bbert']:.0%}")
    bpt = manifest["bytes_per_token"]
    print(f"bytes per stored token:    {bpt:.3f}  (target <= 2.1)        {'MET' if bpt <= 2.1 else 'NOT MET'}"
          f"   [HF in-memory Arrow: {hf_bytes:.2f}]")
    print(f"packing efficiency:        {manifest['packing_efficiency']:.2%} (target >= 98%)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
