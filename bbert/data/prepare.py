"""``bbert prepare``: raw text to a data dir of packed, memory-mapped training shards.

    read -> clean -> split train/val -> (train a) tokenizer -> encode_batch -> pack -> shards

Chapter: notebooks/02_data.ipynb.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from bbert.data.masking import MaskingConfig, Masker
from bbert.data.readers import (CorpusError, ReadStats, iter_clean_documents, read_documents,
                                sample_corpus_path)
from bbert.data.shards import (FORMAT_VERSION, DataDirError, Packer, choose_dtype, manifest_path,
                               verify_shards, write_shard)
from bbert.data.tokenizer import (TokenizerError, encoder, load_tokenizer, special_ids,
                                  tokenizer_fingerprint, train_tokenizer)
from bbert.utils import HubUnavailableError, atomic_path, atomic_write_json

SPLITS = ("train", "val")
EMBEDDED = "embedded:sample"  # how the manifest names the shipped corpus (its path varies by install)


@dataclass
class PrepareConfig:
    """Everything ``prepare`` needs; ``bbert prepare --help`` lists the same options.

    ``inputs`` empty means the embedded sample corpus. ``tokenizer`` None trains a WordPiece
    tokenizer of ``vocab_size`` tokens; otherwise it is a tokenizer folder or a hub name.
    Chapter: notebooks/02_data.ipynb.
    """

    inputs: list[str] = field(default_factory=list)
    out: str = "data/sample"
    format: str = "auto"
    text_field: str = "text"
    text_unit: str = "paragraph"
    hf_split: str = "train"
    tokenizer: str | None = None
    vocab_size: int = 30522
    lowercase: bool = True
    tokenizer_train_bytes: int | None = 1_000_000_000
    max_seq_length: int = 128
    val_fraction: float = 0.01
    min_document_chars: int = 20
    max_document_chars: int = 1_000_000
    max_documents: int | None = None
    max_bytes: int | None = None
    masking: str = "dynamic"
    duplication_factor: int = 10
    mlm_probability: float = 0.15
    whole_word_masking: bool = False
    dtype: str = "auto"
    samples_per_shard: int = 1 << 20
    seed: int = 0
    # Not recorded in the manifest: they don't change what is written.
    encode_batch_chars: int = 2_000_000
    overwrite: bool = False
    progress: bool = True

    def output_args(self) -> dict:
        """The arguments that decide the output; a re-run must match them exactly."""
        args = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("out", "encode_batch_chars", "overwrite", "progress")}
        args["inputs"] = [str(Path(p).resolve()) if not str(p).startswith("hf:") else str(p)
                          for p in self.inputs] or [EMBEDDED]
        return args


def _raw_documents(config: PrepareConfig, stats: ReadStats):
    inputs = config.inputs or [sample_corpus_path()]
    raw = read_documents(inputs, config.format, config.text_field, config.text_unit,
                         config.hf_split, stats)
    return iter_clean_documents(raw, min_chars=config.min_document_chars,
                                max_chars=config.max_document_chars,
                                val_fraction=config.val_fraction, seed=config.seed,
                                max_documents=config.max_documents, max_bytes=config.max_bytes,
                                stats=stats)


def _read_existing_manifest(out: Path) -> dict | None:
    import json

    path = manifest_path(out)
    return json.loads(path.read_text()) if path.exists() else None


def _get_tokenizer(config: PrepareConfig, out: Path, reuse: bool):
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    if reuse and (out / "tokenizer" / "tokenizer.json").exists():
        return load_tokenizer(out / "tokenizer")  # same arguments: the tokenizer trained last time
    stats = ReadStats()
    budget = config.tokenizer_train_bytes

    def train_texts():
        seen = 0
        for split, text in _raw_documents(config, stats):
            if split != "train":
                continue
            yield text
            seen += len(text)
            if budget is not None and seen >= budget:
                return

    texts = train_texts()
    first = next(texts, None)
    if first is None:
        raise CorpusError(_empty_message(config, stats))
    tok = train_tokenizer(itertools.chain([first], texts), vocab_size=config.vocab_size,
                          lowercase=config.lowercase, max_seq_length=config.max_seq_length)
    with tempfile.TemporaryDirectory() as tmp:  # fingerprint it exactly as it will load later
        tok.save_pretrained(tmp)
        return load_tokenizer(tmp)


def _empty_message(config: PrepareConfig, stats: ReadStats) -> str:
    where = ", ".join(map(str, config.inputs)) or "the embedded corpus"
    return (f"no usable documents in {where}: {stats.documents_read} read, {stats.empty} empty, "
            f"{stats.too_short} shorter than min_document_chars={config.min_document_chars}. "
            "Check the path and --format/--text-field, or lower --min-document-chars")


class _SplitWriter:
    """Collect one split's samples and write them as shards of ``samples_per_shard``."""

    def __init__(self, split, out, config, dtype, masker, pad_id):
        self.split, self.out, self.config, self.dtype = split, out, config, dtype
        self.masker, self.pad_id = masker, pad_id
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.samples_written = 0  # unique packed samples, before any static duplication
        self.shards_skipped = 0

    def add(self, samples: np.ndarray, final: bool = False):
        if len(samples):
            self.pending.append(samples)
            self.pending_rows += len(samples)
        while self.pending_rows >= self.config.samples_per_shard or (final and self.pending_rows):
            block = np.concatenate(self.pending)
            n = min(len(block), self.config.samples_per_shard)
            self._write(block[:n])
            self.pending = [block[n:]]
            self.pending_rows = len(block) - n

    def _write(self, samples: np.ndarray):
        name = f"{self.split}-{len(self.shards):05d}.bin"
        record = {"file": name}
        if self.masker is None:
            record["sha256"], written = write_shard(self.out / name, samples)
            record["num_samples"] = len(samples)
        else:
            inputs, labels = self._static_copies(samples)
            record["sha256"], written = write_shard(self.out / name, inputs)
            record["labels_file"] = name.replace(".bin", ".labels.bin")
            record["labels_sha256"], _ = write_shard(self.out / record["labels_file"], labels)
            record["num_samples"] = len(inputs)
        self.shards_skipped += not written
        self.shards.append(record)
        self.samples_written += len(samples)

    def _static_copies(self, samples):
        # The paper's static masking: duplication_factor masked copies of every sample, copy d
        # masked as dynamic masking would in epoch d. Labels store [PAD] where nothing is predicted.
        copies = []
        for d in range(self.config.duplication_factor):
            masked = np.empty_like(samples)
            labels = np.empty_like(samples)
            for row, ids in enumerate(samples):
                m, lab = self.masker(ids, self.config.seed, d, self.samples_written + row)
                masked[row] = m
                labels[row] = np.where(lab < 0, self.pad_id, lab)
            copies.append((masked, labels))
        return np.concatenate([c[0] for c in copies]), np.concatenate([c[1] for c in copies])


def prepare(config: PrepareConfig) -> dict:
    """Run the whole pipeline into ``config.out`` and return the manifest.

    Safe to re-run: a finished data dir with the same arguments is verified and returned;
    after an interruption, shards whose checksum matches are kept and only the rest written.
    Chapter: notebooks/02_data.ipynb.
    """
    from tqdm.auto import tqdm

    if config.masking not in ("dynamic", "static"):
        raise ValueError(f"masking must be dynamic or static, got {config.masking!r}")
    if config.samples_per_shard < 1 or config.duplication_factor < 1:
        raise ValueError("samples_per_shard and duplication_factor must be at least 1")
    out = Path(config.out)
    args = config.output_args()
    existing = None if config.overwrite else _read_existing_manifest(out)
    if existing:
        old_args = existing.get("args", {})
        differ = sorted(k for k in set(args) | set(old_args) if args.get(k) != old_args.get(k))
        if differ:
            what = ("another tokenizer" if {"tokenizer", "vocab_size", "lowercase"} & set(differ)
                    else "other arguments")
            raise DataDirError(f"{out} was prepared with {what} (differing: {', '.join(differ)}). "
                               "Mixing them would corrupt the data: use a new --out folder, or pass "
                               "--overwrite to replace it")

    tok = _get_tokenizer(config, out, reuse=existing is not None)
    fingerprint = tokenizer_fingerprint(tok)
    old_fingerprint = (existing or {}).get("tokenizer", {}).get("fingerprint")
    if existing and old_fingerprint != fingerprint:
        raise DataDirError(
            f"{out} was prepared with another tokenizer (fingerprint {str(old_fingerprint)[:12]}); "
            f"{config.tokenizer or 'the trained one'} now has fingerprint {fingerprint[:12]}. Mixing "
            "them would corrupt the data: use a new --out folder, or pass --overwrite to replace it")

    if existing and existing.get("complete") and not verify_shards(out, existing):
        if config.progress:
            print(f"{out}: already prepared with these arguments; all shards verified, skipping")
        return existing

    vocab_size = len(tok)
    dtype = choose_dtype(vocab_size, config.dtype)
    ids = special_ids(tok)
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "tokenizer": {"fingerprint": fingerprint, "source": config.tokenizer or "trained",
                      "vocab_size": vocab_size},
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": vocab_size,
        "max_seq_length": config.max_seq_length,
        "special_ids": ids,
        "dtype": dtype.name,
        "masking": config.masking,
        "args": args,
    }
    if config.masking == "static":
        manifest["static_masking"] = {"duplication_factor": config.duplication_factor,
                                      "seed": config.seed,
                                      **asdict(MaskingConfig(config.mlm_probability,
                                                             whole_word_masking=config.whole_word_masking))}
    stats = ReadStats()
    docs = _raw_documents(config, stats)
    first = next(docs, None)  # fail on empty input before anything is written
    if first is None:
        raise CorpusError(_empty_message(config, stats))
    docs = itertools.chain([first], docs)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest_path(out), manifest)  # marks the folder as ours, unfinished
    with atomic_path(out / "tokenizer") as tmp:
        tok.save_pretrained(str(tmp))

    masker = None
    if config.masking == "static":
        masker = Masker.from_tokenizer(tok, MaskingConfig(config.mlm_probability,
                                                          whole_word_masking=config.whole_word_masking))

    backend = encoder(tok)
    packers = {s: Packer(config.max_seq_length, ids["cls"], ids["sep"], ids["pad"], dtype) for s in SPLITS}
    writers = {s: _SplitWriter(s, out, config, dtype, masker, ids["pad"]) for s in SPLITS}
    corpus_tokens = 0
    started = time.perf_counter()
    bar = tqdm(desc="prepare", unit="tok", unit_scale=True, disable=not config.progress)

    def batches():
        texts, splits, chars = [], [], 0
        for split, text in docs:
            texts.append(text)
            splits.append(split)
            chars += len(text)
            if chars >= config.encode_batch_chars:
                yield texts, splits
                texts, splits, chars = [], [], 0
        if texts:
            yield texts, splits

    def pack(encodings, splits):
        nonlocal corpus_tokens
        for split in SPLITS:
            token_lists = [e.ids for e, s in zip(encodings, splits) if s == split]
            writers[split].add(packers[split].add(token_lists))
            n = sum(map(len, token_lists))
            corpus_tokens += n
            bar.update(n)
        bar.set_postfix(docs=stats.documents_kept, refresh=False)

    # encode_batch runs in Rust on all cores without the GIL; meanwhile this thread reads the
    # next batch and packs the previous one, so the Python work hides behind the tokenizer.
    # encode_batch_fast skips the character offsets, which packing never needs.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    with ThreadPoolExecutor(max_workers=1) as pool:
        previous = None
        for texts, splits in batches():
            future = pool.submit(encode, texts, add_special_tokens=False)
            if previous is not None:
                pack(previous[0].result(), previous[1])
            previous = (future, splits)
        if previous is not None:
            pack(previous[0].result(), previous[1])
    for split in SPLITS:
        writers[split].add(packers[split].finish(), final=True)
    bar.close()
    seconds = time.perf_counter() - started

    total_positions = sum(p.samples for p in packers.values()) * config.max_seq_length
    real = sum(p.real_tokens for p in packers.values())
    shard_bytes = sum((out / sh[k]).stat().st_size for w in writers.values()
                      for sh in w.shards for k in ("file", "labels_file") if k in sh)
    manifest.update({
        "complete": True,
        "splits": {s: {"num_samples": sum(sh["num_samples"] for sh in writers[s].shards),
                       "unique_samples": writers[s].samples_written,
                       "num_tokens": packers[s].real_tokens,
                       "shards": writers[s].shards} for s in SPLITS},
        "packing_efficiency": real / max(total_positions, 1),
        "corpus_tokens": corpus_tokens,
        "bytes_per_token": shard_bytes / max(corpus_tokens, 1),
        "stats": asdict(stats),
        "seconds": round(seconds, 3),
        "shards_skipped": sum(w.shards_skipped for w in writers.values()),
    })
    if config.val_fraction > 0 and manifest["splits"]["val"]["num_samples"] == 0:
        print(f"warning: no document fell into the validation split (val_fraction={config.val_fraction}, "
              f"{stats.documents_kept} documents); raise --val-fraction", file=sys.stderr)
    _remove_stale_shards(out, manifest)
    atomic_write_json(manifest_path(out), manifest)
    return manifest


def _remove_stale_shards(out: Path, manifest: dict):
    keep = {sh[k] for s in manifest["splits"].values() for sh in s["shards"]
            for k in ("file", "labels_file") if k in sh}
    for path in out.glob("*.bin"):
        if path.name not in keep:
            path.unlink()
    for path in out.glob(".tmp-*"):  # leftovers of a killed run
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def build_parser() -> argparse.ArgumentParser:
    """The options of ``bbert prepare``. Chapter: notebooks/02_data.ipynb."""
    d = PrepareConfig()
    p = argparse.ArgumentParser(prog="bbert prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help="text/JSONL files, folders, or hf:NAME[:CONFIG]; "
                   "default: the embedded sample corpus")
    p.add_argument("--out", default=d.out, help="data dir to write (default: %(default)s)")
    p.add_argument("--format", default=d.format,
                   choices=["auto", "text", "jsonl", "books", "wikiextractor", "hf"])
    p.add_argument("--text-field", default=d.text_field, help="JSONL/hub field holding the text")
    p.add_argument("--text-unit", default=d.text_unit, choices=["paragraph", "line", "file"],
                   help="plain text: one document per blank-line block, per line, or per file")
    p.add_argument("--hf-split", default=d.hf_split)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub name; default: train a WordPiece on the corpus")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--cased", dest="lowercase", action="store_false", help="keep case (default: lowercase)")
    p.add_argument("--tokenizer-train-bytes", type=int, default=d.tokenizer_train_bytes)
    p.add_argument("--max-seq-length", type=int, default=d.max_seq_length)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--min-document-chars", type=int, default=d.min_document_chars)
    p.add_argument("--max-document-chars", type=int, default=d.max_document_chars)
    p.add_argument("--max-documents", type=int, default=None, help="use only the first N documents")
    p.add_argument("--max-bytes", type=int, default=None, help="use only about the first N characters")
    p.add_argument("--masking", default=d.masking, choices=["dynamic", "static"])
    p.add_argument("--duplication-factor", type=int, default=d.duplication_factor,
                   help="static masking: masked copies of each sample")
    p.add_argument("--mlm-probability", type=float, default=d.mlm_probability)
    p.add_argument("--whole-word-masking", action="store_true")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "uint16", "uint32"])
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace a data dir made with other settings")
    p.add_argument("--quiet", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bbert prepare``. Chapter: notebooks/02_data.ipynb."""
    config = PrepareConfig(**vars(build_parser().parse_args(argv)))
    try:
        manifest = prepare(config)
    except (CorpusError, DataDirError, TokenizerError, HubUnavailableError, ValueError, OSError) as e:
        print(f"bbert prepare: error: {e}", file=sys.stderr)
        return 2
    t = manifest["splits"]
    print(f"{config.out}: {t['train']['num_samples']:,} train + {t['val']['num_samples']:,} val samples "
          f"of {manifest['max_seq_length']} tokens, vocab {manifest['vocab_size']:,} ({manifest['dtype']}), "
          f"packing efficiency {manifest['packing_efficiency']:.2%}, "
          f"{manifest['bytes_per_token']:.3f} bytes/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
