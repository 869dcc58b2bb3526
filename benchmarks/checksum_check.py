"""Benchmark: what checking a data dir's checksums costs at a run's start, hashed in full against
the size-and-time fast path of `bbert.data.check_data_dir`, and the projection for a
Wikipedia + BookCorpus data dir; then what the run pays for hashing each shard again as it first
reads it (`bbert.data.shards.hash_check_in_background`), as a share of its budget.

    .venv/bin/python benchmarks/checksum_check.py            # 512 MB of shards, 3 rounds
    .venv/bin/python benchmarks/checksum_check.py --quick    # 128 MB, 1 round

A data dir of random uint16 shards is written (as `prepare` would, with its sidecar removed),
then, alternating: the first check (every shard hashed, SHA-256) and a later check (one stat
per shard). The files are in the page cache, so the full hash is CPU-bound here; a cold disk
reads at its own speed on top. The projection uses the full data dir's size: 3,300 M words
(BERT paper) x about 1.3 tokens per word x 2 bytes per token, about 8.6 GB.

The first-read hash runs in a background thread while the run trains. Its cost is measured as
the slowdown of a stand-in training loop (torch matmuls on every core: the worst case, a CPU run;
on a GPU the CPU is mostly idle) while every shard is hashed beside it, against the same loop
alone, alternating. The extra seconds per GB hashed, times the full data dir's size, over the
paper's 24-hour budget, is the share of the budget it costs (target: under 1%).
Chapter: notebooks/02_data.ipynb.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_DATA_DIR_BYTES = 3_300e6 * 1.3 * 2
SHARD_BYTES = 256 * 2**20  # 2**20 samples x 128 tokens x 2 bytes: prepare's default shard


def make_data_dir(folder: Path, total_bytes: int, shard_bytes: int) -> None:
    rng = np.random.default_rng(0)
    shards = []
    for i in range(max(1, total_bytes // shard_bytes)):
        array = rng.integers(0, 30522, shard_bytes // 2, dtype=np.uint16)
        name = f"train-{i:05d}.bin"
        array.tofile(folder / name)
        shards.append({"file": name, "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
                       "num_samples": len(array) // 128})
    manifest = {"format_version": 1, "complete": True, "max_seq_length": 128, "dtype": "uint16",
                "splits": {"train": {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MB and one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=512)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.megabytes = 1, 128

    from bbert.data import check_data_dir
    from bbert.data.layout import VERIFIED_FILE

    work = Path(tempfile.mkdtemp(prefix="bbert-checksum-"))
    shard_bytes = min(SHARD_BYTES, args.megabytes * 2**20 // 4)
    make_data_dir(work, args.megabytes * 2**20, shard_bytes)
    size = sum(p.stat().st_size for p in work.glob("*.bin"))
    n_shards = len(list(work.glob("*.bin")))
    full, cached = [], []
    for r in range(args.rounds):
        (work / VERIFIED_FILE).unlink(missing_ok=True)
        started = time.perf_counter()
        check_data_dir(work)
        full.append(time.perf_counter() - started)
        started = time.perf_counter()
        check_data_dir(work)
        cached.append(time.perf_counter() - started)
        print(f"round {r + 1}: first check {full[-1]:.3f} s, later check {cached[-1] * 1e3:.2f} ms")
    f, c = statistics.median(full), statistics.median(cached)
    rate = size / f
    print(f"\nmeasured here: {size / 1e6:,.0f} MB in {n_shards} shards; SHA-256 at {rate / 1e6:,.0f} MB/s "
          f"(page cache, one core)")
    print(f"  first check (full hash): {f:.3f} s;  later check (stat only): {c * 1e3:.2f} ms;  "
          f"ratio later/first: {c / f:.5f}")
    full_shards = FULL_DATA_DIR_BYTES / SHARD_BYTES
    print(f"\nextrapolated to Wikipedia + BookCorpus (about {FULL_DATA_DIR_BYTES / 1e9:.1f} GB, "
          f"{full_shards:.0f} shards of {SHARD_BYTES / 2**20:.0f} MiB):")
    print(f"  full hash at this rate: {FULL_DATA_DIR_BYTES / rate:.0f} s, only where no sidecar entry "
          f"matches (prepare writes one; a copy that changes the files' times does not keep it)")
    print(f"  stat-only check: {c / n_shards * full_shards * 1e3:.1f} ms at every start")
    first_read_cost(work, size, args.rounds, rate)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def train_steps(n: int, size: int = 768) -> float:
    """Seconds of ``n`` stand-in training steps (a matmul chain on all of torch's threads)."""
    import torch

    a = torch.randn(size, size)
    started = time.perf_counter()
    for _ in range(n):
        b = a
        for _ in range(8):
            b = torch.tanh(b @ a)
    return time.perf_counter() - started


def first_read_cost(work: Path, size: int, rounds: int, rate: float) -> None:
    from bbert.data.shards import forget_hash_checks, hash_check_in_background

    manifest = json.loads((work / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    steps = 1
    while train_steps(steps) < 4.0:  # a loop long enough to hide the whole hash in
        steps *= 2
    alone, beside, hashing = [], [], []
    for r in range(rounds):
        alone.append(train_steps(steps))
        forget_hash_checks()
        started, ends = time.perf_counter(), []
        checks = [hash_check_in_background(work, shard) for shard in shards]
        for check in checks:
            check.add_done_callback(lambda _: ends.append(time.perf_counter()))
        beside.append(train_steps(steps))
        assert all(c.result() is None for c in checks)
        hashing.append(max(ends) - started)
        print(f"round {r + 1}: {steps} steps alone {alone[-1]:.2f} s, with the hash beside them "
              f"{beside[-1]:.2f} s (the hash took {hashing[-1]:.2f} s)")
    a, b = statistics.median(alone), statistics.median(beside)
    extra_per_byte = max(b - a, 0.0) / size
    budget = 24 * 3600
    print(f"\nfirst-read hash of {size / 1e6:,.0f} MB beside a training loop: ratio with/without "
          f"{b / a:.3f} ({b - a:+.2f} s)")
    print(f"  extrapolated to the full data dir ({FULL_DATA_DIR_BYTES / 1e9:.1f} GB): "
          f"{extra_per_byte * FULL_DATA_DIR_BYTES:.1f} s, {100 * extra_per_byte * FULL_DATA_DIR_BYTES / budget:.3f}% "
          "of a 24-hour budget (target: < 1%)")
    worst = FULL_DATA_DIR_BYTES / rate
    print(f"  the hash's own time ({worst:.0f} s of one core at the rate above): "
          f"{100 * worst / budget:.3f}% of a 24-hour budget")


if __name__ == "__main__":
    raise SystemExit(main())
