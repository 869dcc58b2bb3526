"""Benchmark: how `bbert prepare` scales with tokenizer threads, and what that projects for
Wikipedia + BookCorpus on an N-core server.

    .venv/bin/python benchmarks/prepare_scaling.py            # a 6 MB slice of the embedded corpus, 3 rounds
    .venv/bin/python benchmarks/prepare_scaling.py --quick    # a 2 MB slice, 1 round

Each measurement is a fresh subprocess with the tokenizer's Rust thread pool set to 1 or 2
threads (RAYON_NUM_THREADS; TOKENIZERS_PARALLELISM=false for 1), alternating, medians reported.
It times `prepare` end to end (read, clean, split, encode_batch, pack, write shards) and then
`encode_batch_fast` alone on the same documents, and records the process's CPU time (a CPU time
near the wall time with 2 threads means the second core was busy with other work). The
tokenizer (a 30,522-token WordPiece trained once on the slice, untimed) is the same for all.

Two projections (extrapolated, not measured), for BERT's corpus: 2,500 M words of English
Wikipedia + 800 M of BookCorpus (Devlin et al. 2019, section 3.1), times the tokens per word
measured on the slice:
- "2-thread scaling": Amdahl's law with the measured time ratio t2/t1 = s + (1 - s) / 2, so N
  cores take t1 * (s + (1 - s) / N). On a busy machine this is pessimistic.
- "pipeline bound": prepare tokenizes in Rust threads while one Python thread reads, cleans
  and packs, so N cores take at least max(P, E / N), where E is the 1-thread tokenizing time and
  P = t1 - E the Python thread's. This assumes tokenizing scales with cores: optimistic.
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
from bbert.data import PrepareConfig, load_tokenizer, prepare, read_documents
from bbert.data.tokenizer import encoder
corpus, tokenizer, out = sys.argv[1:4]
cpu, started = time.process_time(), time.perf_counter()
m = prepare(PrepareConfig(inputs=[corpus], out=out, tokenizer=tokenizer, progress=False, overwrite=True))
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
texts, backend = list(read_documents([corpus])), encoder(load_tokenizer(tokenizer))
started = time.perf_counter()
backend.encode_batch_fast(texts, add_special_tokens=False)
print(json.dumps({"seconds": seconds, "cpu": cpu, "encode": time.perf_counter() - started,
                  "tokens": m["corpus_tokens"]}))
"""


def run_prepare(threads: int, corpus: Path, tokenizer: Path, out: Path) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "RAYON_RS_NUM_CPUS": str(threads),
           "TOKENIZERS_PARALLELISM": "false" if threads == 1 else "true",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(tokenizer), str(out)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


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

    runs = {1: [], 2: []}
    for r in range(args.rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate which runs first
            runs[threads].append(run_prepare(threads, corpus, work / "tokenizer", work / f"out-{threads}"))
        print(f"round {r + 1}: " + ", ".join(
            f"{n} thread{'s' * (n > 1)} {runs[n][-1]['seconds']:.2f} s (CPU {runs[n][-1]['cpu']:.2f} s, "
            f"encode alone {runs[n][-1]['encode']:.2f} s)" for n in (1, 2)))
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("seconds", "cpu", "encode")}
           for n, v in runs.items()}
    tokens = runs[1][-1]["tokens"]
    t1, t2 = med[1]["seconds"], med[2]["seconds"]
    ratio, encode, python = t2 / t1, med[1]["encode"], max(t1 - med[1]["encode"], 0.0)
    serial = min(max(2 * ratio - 1, 0.0), 1.0)
    tokens_per_word = tokens / words
    print(f"\nmeasured here: {tokens:,} tokens, {tokens_per_word:.3f} tokens per word")
    print(f"  1 thread:  {t1:.2f} s  {tokens / t1 / 1e6:.3f} M tokens/s  (tokenizing {encode:.2f} s, "
          f"Python thread {python:.2f} s = {python / t1:.0%})")
    print(f"  2 threads: {t2:.2f} s  {tokens / t2 / 1e6:.3f} M tokens/s  (CPU/wall {med[2]['cpu'] / t2:.2f}: "
          f"{'the second core was mostly busy elsewhere' if med[2]['cpu'] / t2 < 1.3 else 'both cores used'})")
    print(f"  time ratio 2 threads / 1 thread: {ratio:.2f} (speed-up {1 / ratio:.2f}x; Amdahl share s = {serial:.2f})")

    total_words = sum(BERT_WORDS.values())
    total_tokens = total_words * tokens_per_word
    scale = total_tokens / tokens  # the slice's seconds -> the full corpus's
    print(f"\nextrapolated: Wikipedia + BookCorpus = {total_words / 1e6:,.0f} M words (BERT paper) x "
          f"{tokens_per_word:.3f} tokens/word = {total_tokens / 1e9:.2f} G tokens")
    print(f"{'cores':>6}{'hours, 2-thread scaling':>26}{'hours, pipeline bound':>24}")
    for cores in [1, 2, *args.cores]:
        amdahl = t1 * (serial + (1 - serial) / cores)
        bound = python + encode if cores == 1 else max(python, encode / cores)
        print(f"{cores:>6}{amdahl * scale / 3600:>26.2f}{bound * scale / 3600:>24.2f}")
    print("(both assume this CPU's speed per core and the corpus on a local disk; downloading or "
          "streaming it from the hub is not included)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
