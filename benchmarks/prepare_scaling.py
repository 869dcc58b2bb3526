"""Benchmark: how `bbert prepare` scales with tokenizer threads, and what that projects for
Wikipedia + BookCorpus on an N-core server.

    .venv/bin/python benchmarks/prepare_scaling.py            # a 6 MB slice of the embedded corpus, 3 rounds
    .venv/bin/python benchmarks/prepare_scaling.py --quick    # a 2 MB slice, 1 round

Each measurement is a fresh subprocess with the tokenizer's Rust thread pool set to 1 or 2
threads (RAYON_NUM_THREADS; TOKENIZERS_PARALLELISM=false for 1), alternating, medians reported.
It times `prepare` end to end (read, clean, split, encode_batch, pack, write shards), records the
process's CPU time (a CPU time near the wall time with 2 threads means the second core was busy
with other work), then times the stages alone on the same documents: reading and cleaning,
tokenizing (`encode_batch_fast`) and packing. The
tokenizer (a 30,522-token WordPiece trained once on the slice, untimed) is the same for all.

Two projections (extrapolated, not measured), for BERT's corpus: 2,500 M words of English
Wikipedia + 800 M of BookCorpus (Devlin et al. 2019, section 3.1), times the tokens per word
measured on the slice:
- "2-thread scaling": Amdahl's law with the measured time ratio t2/t1 = s + (1 - s) / 2, so N
  cores take t1 * (s + (1 - s) / N). On a busy machine this is pessimistic.
- "tokenizer scaling": prepare tokenizes in Rust threads while one Python thread reads, cleans
  and packs, so N cores take P + E / N, where E is the tokenizing time alone and P = t1 - E the
  rest of prepare's time. This assumes tokenizing scales with the cores: optimistic.
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
import numpy as np
from bbert.data import Packer, PrepareConfig, load_tokenizer, prepare, read_documents
from bbert.data.readers import iter_clean_documents
from bbert.data.tokenizer import encoder
corpus, tokenizer, out = sys.argv[1:4]
cpu, started = time.process_time(), time.perf_counter()
m = prepare(PrepareConfig(inputs=[corpus], out=out, tokenizer=tokenizer, progress=False, overwrite=True))
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
tok = load_tokenizer(tokenizer)
started = time.perf_counter()
texts = [t for _, t in iter_clean_documents(read_documents([corpus]), val_fraction=0)]
read = time.perf_counter() - started
started = time.perf_counter()
encodings = encoder(tok).encode_batch_fast(texts, add_special_tokens=False)
encode = time.perf_counter() - started
started = time.perf_counter()
Packer(128, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, np.uint16).add([e.ids for e in encodings])
pack = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "cpu": cpu, "read": read, "encode": encode, "pack": pack,
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
            f"{n} thread{'s' * (n > 1)} {runs[n][-1]['seconds']:.2f} s (CPU {runs[n][-1]['cpu']:.2f} s)"
            for n in (1, 2)))
    keys = ("seconds", "cpu", "read", "encode", "pack")
    med = {n: {k: statistics.median(x[k] for x in v) for k in keys} for n, v in runs.items()}
    tokens = runs[1][-1]["tokens"]
    t1, t2 = med[1]["seconds"], med[2]["seconds"]
    ratio, serial = t2 / t1, min(max(2 * t2 / t1 - 1, 0.0), 1.0)
    encode = med[1]["encode"]
    python = max(t1 - encode, 0.0)  # prepare's time beyond tokenizing: what more cores don't shorten
    tokens_per_word = tokens / words
    print(f"\nmeasured here: {tokens:,} tokens, {tokens_per_word:.3f} tokens per word")
    print(f"  prepare, 1 tokenizer thread:  {t1:.2f} s  {tokens / t1 / 1e6:.3f} M tokens/s")
    print(f"  prepare, 2 tokenizer threads: {t2:.2f} s  {tokens / t2 / 1e6:.3f} M tokens/s  (CPU/wall "
          f"{med[2]['cpu'] / t2:.2f}: {'the second core was mostly busy elsewhere' if med[2]['cpu'] / t2 < 1.3 else 'both cores used'})")
    print(f"  time ratio 2 threads / 1 thread: {ratio:.2f} (speed-up {1 / ratio:.2f}x; Amdahl share s = {serial:.2f})")
    print(f"  stages alone, 1 thread: read + clean {med[1]['read']:.2f} s, tokenize {encode:.2f} s, "
          f"pack {med[1]['pack']:.2f} s; prepare beyond tokenizing: {python:.2f} s")

    total_words = sum(BERT_WORDS.values())
    total_tokens = total_words * tokens_per_word
    scale = total_tokens / tokens  # the slice's seconds -> the full corpus's
    print(f"\nextrapolated: Wikipedia + BookCorpus = {total_words / 1e6:,.0f} M words (BERT paper) x "
          f"{tokens_per_word:.3f} tokens/word = {total_tokens / 1e9:.2f} G tokens")
    print(f"{'cores':>6}{'hours, 2-thread scaling':>26}{'hours, tokenizer scaling':>27}")
    for cores in [1, 2, *args.cores]:
        amdahl = t1 * (serial + (1 - serial) / cores)
        tokenizer = python + encode / cores
        print(f"{cores:>6}{amdahl * scale / 3600:>26.2f}{tokenizer * scale / 3600:>27.2f}")
    print("(both assume this CPU's speed per core and the corpus on a local disk; downloading or "
          "streaming it from the hub is not included)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
