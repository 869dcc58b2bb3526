"""Benchmark: how `bbert prepare` scales with tokenizer threads, and what that projects for
Wikipedia + BookCorpus on an N-core server.

    .venv/bin/python benchmarks/prepare_scaling.py            # a 6 MB slice of the embedded corpus, 3 rounds
    .venv/bin/python benchmarks/prepare_scaling.py --quick    # a 2 MB slice, 1 round

Each measurement is a fresh subprocess running `prepare` end to end (read, clean, split,
encode_batch, pack, write shards) with the tokenizer's Rust thread pool set to 1 or 2 threads
(RAYON_NUM_THREADS; TOKENIZERS_PARALLELISM=false for 1), alternating, medians reported. The
tokenizer (a 30,522-token WordPiece trained once on the slice, untimed) is the same for all.

Projection (extrapolated, not measured): the 2-thread / 1-thread ratio gives the share ``s`` of
the time that does not scale (Amdahl: t2/t1 = s + (1 - s) / 2), and N cores then run at
rate1 / (s + (1 - s) / N). The corpus is BERT's: 2,500 M words of English Wikipedia + 800 M of
BookCorpus (Devlin et al. 2019, section 3.1), times the tokens per word measured on the slice.
Chapter: notebooks/02_data.ipynb.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BERT_WORDS = {"English Wikipedia": 2_500e6, "BookCorpus": 800e6}  # BERT paper, section 3.1
CHILD = """
import json, sys, time
from bbert.data import PrepareConfig, prepare
corpus, tokenizer, out = sys.argv[1:4]
started = time.perf_counter()
m = prepare(PrepareConfig(inputs=[corpus], out=out, tokenizer=tokenizer, progress=False, overwrite=True))
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": m["corpus_tokens"]}))
"""


def run_prepare(threads: int, corpus: Path, tokenizer: Path, out: Path) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "RAYON_RS_NUM_CPUS": str(threads),
           "TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(tokenizer), str(out)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def project(rate1: float, ratio: float, cores: int) -> float:
    """Tokens/s on ``cores`` threads from the 1-thread rate and the measured 2/1 time ratio."""
    serial = min(max(2 * ratio - 1, 0.0), 1.0)
    return rate1 / (serial + (1 - serial) / cores)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2 MB slice and one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=6_000_000)
    parser.add_argument("--cores", type=int, nargs="*", default=[8, 16, 32, 64])
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.max_bytes = 1, 2_000_000

    from bbert.data import read_sample_corpus
    from bbert.data.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bbert-scaling-"))
    texts, size = [], 0
    for doc in read_sample_corpus():
        if size >= args.max_bytes:
            break
        texts.append(doc["text"])
        size += len(doc["text"])
    corpus = work / "slice.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    train_tokenizer(texts, vocab_size=30522).save_pretrained(work / "tokenizer")
    words = sum(len(t.split()) for t in texts)
    print(f"slice: {len(texts):,} documents, {size / 1e6:.1f} M characters, {words / 1e6:.2f} M words; "
          f"{os.cpu_count()} CPUs here")

    times = {1: [], 2: []}
    for r in range(args.rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate which runs first
            result = run_prepare(threads, corpus, work / "tokenizer", work / f"out-{threads}")
            times[threads].append(result["seconds"])
            tokens = result["tokens"]
        print(f"round {r + 1}: 1 thread {times[1][-1]:.2f} s, 2 threads {times[2][-1]:.2f} s")
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    rate1, ratio = tokens / t1, t2 / t1
    tokens_per_word = tokens / words
    print(f"\nmeasured here: {tokens:,} tokens, {tokens_per_word:.3f} tokens per word")
    print(f"  1 thread:  {t1:.2f} s  {rate1 / 1e6:.3f} M tokens/s")
    print(f"  2 threads: {t2:.2f} s  {tokens / t2 / 1e6:.3f} M tokens/s")
    print(f"  time ratio 2 threads / 1 thread: {ratio:.2f} (speed-up {1 / ratio:.2f}x; "
          f"non-scaling share s = {min(max(2 * ratio - 1, 0), 1):.2f})")

    total_words = sum(BERT_WORDS.values())
    total_tokens = total_words * tokens_per_word
    print(f"\nextrapolated: Wikipedia + BookCorpus = {total_words / 1e6:,.0f} M words (BERT paper) x "
          f"{tokens_per_word:.3f} tokens/word = {total_tokens / 1e9:.2f} G tokens")
    print(f"{'cores':>6}{'M tokens/s':>12}{'hours':>8}")
    for cores in [1, 2, *args.cores]:
        rate = project(rate1, ratio, cores)
        print(f"{cores:>6}{rate / 1e6:>12.2f}{total_tokens / rate / 3600:>8.2f}")
    print("(assumes the scaling seen from 1 to 2 threads holds further, the same CPU speed per core, "
          "and local disk fast enough; hub streaming and download time are not included)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
