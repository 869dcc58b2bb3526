"""``bbert prepare``: raw text to a data dir of packed, memory-mapped training shards.

    read -> clean -> split train/val -> (train a) tokenizer -> encode_batch -> pack -> shards

The new data dir is built beside its final place (``.NAME.building``) under an exclusive lock
(:class:`bbert.locks.DirLock`), its manifest written last, and renamed into place only when
complete: a failed or interrupted run leaves the previous data dir as it was, and never a
folder that looks finished. Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from bbert.atomic import atomic_write_json
from bbert.configs import add_config_arguments, build_config, command
from bbert.data.layout import MANIFEST_FILE, SHARD_SUFFIX, shard_name, tokenizer_dir
from bbert.data.readers import (CorpusError, ReadStats, iter_clean_documents, missing_input_message, read_documents,
                                sample_corpus_path)
from bbert.data.shards import (FORMAT_VERSION, DataDirError, Packer, check_data_dir, choose_dtype,
                               manifest_path, record_verified, write_shard)
from bbert.data.tokenizer import encoder, load_tokenizer, special_ids, tokenizer_fingerprint, train_tokenizer
from bbert.locks import DirLock
from bbert.progress import Progress

SPLITS = ("train", "val")
EMBEDDED = "embedded:sample"  # how the manifest names the shipped corpus (its path varies by install)
UINT16_VOCAB = 2**16  # token ids 0..65,535 fit in two bytes
MIN_VOCAB_SIZE = 16  # the special tokens and a few more: what check_tokenizer accepts


@dataclass
class PrepareConfig:
    """Everything ``prepare`` needs (``bbert prepare --set FIELD=VALUE`` sets any of them).

    ``inputs`` empty means the embedded sample corpus. ``tokenizer`` None trains a WordPiece
    tokenizer of ``vocab_size`` tokens; otherwise it is a tokenizer folder, a model folder or
    run dir (its model's tokenizer: data for ``bbert pretrain --init-from``) or a hub name.
    ``encoding`` decodes text files (undecodable input is refused, not mangled).
    ``document_field``/``rows_per_document`` join rows of JSONL or hub datasets stored one
    sentence per row (BookCorpus) into documents: by a document-id column (one of
    ``readers.DOCUMENT_ID_FIELDS`` is found by itself), else by blocks of rows.
    """

    inputs: list[str] = field(default_factory=list)
    out: str = "data/sample"
    format: str = "auto"
    text_field: str = "text"
    text_unit: str = "paragraph"
    encoding: str = "utf-8"
    document_field: str | None = None
    rows_per_document: int = 1
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

    def check(self) -> None:
        """Refuse bad values before anything is read or written."""
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction} "
                             "(a share of the documents, e.g. 0.01; 0 for no validation split)")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {self.vocab_size} "
                             "(BERT's is 30,522; 1,000-8,000 suit a small corpus)")
        if self.max_seq_length < 8:
            raise ValueError(f"--max-seq-length must be at least 8, got {self.max_seq_length} (the paper's is 128)")
        for name in ("max_documents", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{'--max-documents' if name == 'max_documents' else name} must be at least 1, "
                                 f"or null for all of the input; got {value}")
        if self.max_document_chars < 1:
            raise ValueError(f"max_document_chars must be at least 1, got {self.max_document_chars}")
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {self.samples_per_shard}")
        if self.rows_per_document < 1:
            raise ValueError(f"rows_per_document must be at least 1, got {self.rows_per_document}")
        if self.dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"dtype must be auto, uint16 or uint32, got {self.dtype!r}")
        if not self.tokenizer and self.dtype == "uint16" and self.vocab_size > UINT16_VOCAB:
            raise ValueError(f"--vocab-size {self.vocab_size:,} needs token ids above 65,535, which "
                             "uint16 shards can't hold: use --set dtype=auto (uint32 shards, twice the "
                             "size) or a vocabulary of at most 65,536")


def _note(message: str) -> None:
    """What the user must know even with --quiet: to stderr, one line."""
    print(f"bbert prepare: {message}", file=sys.stderr)


def _raw_documents(config: PrepareConfig, stats: ReadStats):
    inputs = config.inputs or [sample_corpus_path()]
    raw = read_documents(inputs, config.format, config.text_field, config.text_unit,
                         config.hf_split, stats, config.encoding, config.document_field,
                         config.rows_per_document)
    return iter_clean_documents(raw, min_chars=config.min_document_chars,
                                max_chars=config.max_document_chars,
                                val_fraction=config.val_fraction, seed=config.seed,
                                max_documents=config.max_documents, max_bytes=config.max_bytes,
                                stats=stats)


def _get_tokenizer(config: PrepareConfig, reuse_from: Path | None):
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    if reuse_from is not None and (tokenizer_dir(reuse_from) / "tokenizer.json").exists():
        return load_tokenizer(tokenizer_dir(reuse_from))  # same arguments: the tokenizer trained last time
    if config.vocab_size > UINT16_VOCAB:
        _note(f"--vocab-size {config.vocab_size:,}: if the trained vocabulary has more than 65,536 "
              "tokens, the shards are stored as uint32, 4 bytes per token instead of 2")
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
    if len(tok) > config.vocab_size:
        _note(f"the corpus has more distinct characters than --vocab-size {config.vocab_size:,} allows: "
              f"WordPiece keeps them all, so the vocabulary has {len(tok):,} tokens")
    if len(tok) < config.vocab_size:
        _note(f"the corpus yields only {len(tok):,} WordPiece tokens of the {config.vocab_size:,} asked "
              "(--vocab-size): too little text for that vocabulary. The data dir uses "
              f"{len(tok):,}; give more text for a larger one")
    with tempfile.TemporaryDirectory() as tmp:  # fingerprint it exactly as it will load later
        tok.save_pretrained(tmp)
        return load_tokenizer(tmp)


def _empty_message(config: PrepareConfig, stats: ReadStats) -> str:
    where = ", ".join(map(str, config.inputs)) or "the embedded corpus"
    return (f"no usable documents in {where}: {stats.documents_read} read, {stats.empty} empty, "
            f"{stats.too_short} shorter than min_document_chars={config.min_document_chars}. "
            "Check the path and --format/--text-field, or lower --set min_document_chars=N")


class _SplitWriter:
    """Collect one split's samples and write them as shards of ``samples_per_shard``."""

    def __init__(self, split: str, out: Path, samples_per_shard: int):
        self.split, self.out, self.samples_per_shard = split, out, samples_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[dict] = []

    def add(self, samples: np.ndarray, final: bool = False):
        if len(samples):
            self.pending.append(samples)
            self.pending_rows += len(samples)
        while self.pending_rows >= self.samples_per_shard or (final and self.pending_rows):
            block = np.concatenate(self.pending)
            n = min(len(block), self.samples_per_shard)
            name = shard_name(self.split, len(self.shards))
            sha256 = write_shard(self.out / name, block[:n])
            self.shards.append({"file": name, "sha256": sha256, "num_samples": n})
            self.pending = [block[n:]]
            self.pending_rows = len(block) - n


def _refuse_overlap(out: Path, inputs: list[str]) -> None:
    """Refuse an --out inside an input folder (the next prepare of that folder would read the data
    dir as text) and an input inside --out (replacing --out would delete it)."""
    for item in inputs:
        if str(item).startswith("hf:") or not Path(item).exists():
            continue
        source, target = Path(item).resolve(), out.resolve()
        if source.is_dir() and target.is_relative_to(source):
            raise DataDirError(f"--out {out} lies inside the input folder {item}, so a later prepare of "
                               f"{item} would read the data dir's files as text; choose an --out outside {item}")
        if source.is_relative_to(target):
            raise DataDirError(f"input {item} lies inside --out {out}, which prepare replaces as a whole; "
                               "choose another --out, or move the input elsewhere")


def _existing_state(out: Path, config: PrepareConfig) -> dict | None:
    """The finished manifest in ``out`` (None if there is none), after refusing what must not be
    replaced silently and announcing what will be redone."""
    if out.exists() and not out.is_dir():
        raise DataDirError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    path = manifest_path(out)
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        manifest = None  # damaged: redone below, as an unfinished one is
    if manifest is not None and manifest.get("complete"):
        return manifest
    looks_ours = path.is_file() or tokenizer_dir(out).is_dir() or any(out.glob(f"*{SHARD_SUFFIX}"))
    if not looks_ours and not config.overwrite:
        raise DataDirError(f"--out {out} exists and is not a data dir (no {MANIFEST_FILE}); choose "
                           "another --out, or pass --overwrite to replace it")
    if looks_ours:
        _note(f"{out} is an unfinished data dir (shards without a finished manifest: an interrupted "
              "prepare); redoing it")
    return None


def prepare(config: PrepareConfig) -> dict:
    """Run the whole pipeline into ``config.out`` and return the manifest.

    Safe to re-run: a finished data dir with the same arguments is checked against its
    checksums and returned as it is; a damaged or unfinished one is redone. A data dir made
    with other arguments is refused unless ``overwrite``. Another ``prepare`` writing the same
    folder makes this one fail at once with :class:`bbert.locks.LockedError`.
    """
    config.check()
    out = Path(config.out)
    missing = [p for p in config.inputs if not str(p).startswith("hf:") and config.format != "hf"
               and not Path(p).exists()]
    if missing:  # before hours of reading the others
        raise CorpusError(missing_input_message(Path(missing[0])))
    _refuse_overlap(out, config.inputs)
    with DirLock(out, "written"):
        existing = _existing_state(out, config)
        if existing and not config.overwrite:
            _refuse_other_arguments(out, existing, config)
        reuse = out if existing and not config.overwrite else None
        tok = _get_tokenizer(config, reuse)
        fingerprint = tokenizer_fingerprint(tok)
        if reuse is not None:
            if existing["tokenizer_fingerprint"] != fingerprint:
                raise DataDirError(
                    f"{out} was prepared with another tokenizer (fingerprint "
                    f"{existing['tokenizer_fingerprint'][:12]}); {config.tokenizer or 'the trained one'} "
                    f"now has fingerprint {fingerprint[:12]}. Mixing them would corrupt the data: use a "
                    "new --out folder, or pass --overwrite to replace it")
            try:
                check_data_dir(out, existing, full=True)  # "verified" means every byte hashed
                if config.progress:
                    print(f"{out}: already prepared with these arguments; shards verified, skipping")
                return existing
            except DataDirError as e:
                _note(f"{e.args[0].split(';')[0]}; redoing the data dir")
        return _build_and_swap(config, out, tok, fingerprint)


# Fields older data dirs recorded, at the values that wrote what this bbert writes.
_RETIRED_ARGS = {"masking": "dynamic", "duplication_factor": 10, "mlm_probability": 0.15,
                 "whole_word_masking": False}


def _refuse_other_arguments(out: Path, existing: dict, config: PrepareConfig) -> None:
    args, old_args = config.output_args(), existing.get("args", {})
    # A field an older manifest lacks had its default then; a retired one must hold its old default.
    defaults = {**PrepareConfig().output_args(), **_RETIRED_ARGS}
    differ = sorted(k for k in set(args) | set(old_args)
                    if args.get(k, defaults.get(k)) != old_args.get(k, defaults.get(k)))
    if differ:
        what = ("another tokenizer" if {"tokenizer", "vocab_size", "lowercase"} & set(differ)
                else "other arguments")
        raise DataDirError(f"{out} was prepared with {what} (differing: {', '.join(differ)}). "
                           "Mixing them would corrupt the data: use a new --out folder, or pass "
                           "--overwrite to replace it")


def _build_and_swap(config: PrepareConfig, out: Path, tok, fingerprint: str) -> dict:
    build = out.parent / f".{out.name}.building"
    if build.exists():
        _note(f"found {build}, an unfinished build of {out} (an interrupted prepare); redoing it")
        shutil.rmtree(build)
    stats = ReadStats()
    docs = _raw_documents(config, stats)
    first = next(docs, None)  # fail on empty input before anything is written
    if first is None:
        raise CorpusError(_empty_message(config, stats))
    docs = itertools.chain([first], docs)
    dtype = choose_dtype(len(tok), config.dtype)
    try:
        build.mkdir(parents=True)
        manifest = _write_data_dir(config, build, tok, fingerprint, dtype, docs, stats)
    except BaseException as e:
        shutil.rmtree(build, ignore_errors=True)  # frees the space a full disk needs back
        if isinstance(e, OSError) and not isinstance(e, ConnectionError):  # the hub's says enough
            where = f": {e.filename}" if e.filename else ""
            kept = f"{out} is left as it was" if out.exists() else "nothing was kept"
            raise DataDirError(f"preparing the data dir failed ({e.strerror or e}{where}); {kept}. "
                               "Fix the cause (free disk space?) and re-run") from e
        raise
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(build, out)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _write_data_dir(config: PrepareConfig, build: Path, tok, fingerprint: str, dtype, docs,
                    stats: ReadStats) -> dict:
    ids = special_ids(tok)
    tok.save_pretrained(str(tokenizer_dir(build)))
    backend = encoder(tok)
    packers = {s: Packer(config.max_seq_length, ids["cls"], ids["sep"], ids["pad"], dtype) for s in SPLITS}
    writers = {s: _SplitWriter(s, build, config.samples_per_shard) for s in SPLITS}
    corpus_tokens = 0
    started = time.perf_counter()
    bar = Progress(None, "prepare", config.progress, unit="tokens")

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
        before = corpus_tokens
        for split in SPLITS:
            token_lists = [e.ids for e, s in zip(encodings, splits) if s == split]
            writers[split].add(packers[split].add(token_lists))
            corpus_tokens += sum(map(len, token_lists))
        bar.update(corpus_tokens - before, docs=stats.documents_kept)

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

    total_positions = sum(p.samples for p in packers.values()) * config.max_seq_length
    real = sum(p.real_tokens for p in packers.values())
    shard_bytes = sum((build / sh["file"]).stat().st_size for w in writers.values() for sh in w.shards)
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "tokenizer": {"fingerprint": fingerprint, "source": config.tokenizer or "trained",
                      "vocab_size": len(tok), "requested_vocab_size": config.vocab_size},
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": len(tok),
        "max_seq_length": config.max_seq_length,
        "special_ids": ids,
        "dtype": dtype.name,
        "masking": "dynamic",  # the shards hold token ids only; the loader masks (dynamic or static)
        "args": config.output_args(),
        "splits": {s: {"num_samples": sum(sh["num_samples"] for sh in writers[s].shards),
                       "num_tokens": packers[s].real_tokens,
                       "shards": writers[s].shards} for s in SPLITS},
        "packing_efficiency": real / max(total_positions, 1),
        "corpus_tokens": corpus_tokens,
        "bytes_per_token": shard_bytes / max(corpus_tokens, 1),
        "stats": asdict(stats),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if config.val_fraction > 0 and manifest["splits"]["val"]["num_samples"] == 0:
        _note(f"warning: no document fell into the validation split (val_fraction={config.val_fraction}, "
              f"{stats.documents_kept} documents); raise --val-fraction")
    record_verified(build, manifest)  # the hashes were just computed: a run's first check is free
    atomic_write_json(manifest_path(build), manifest)  # last: the data dir is complete from here on
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """The options of ``bbert prepare``: the common ones as flags, every field with ``--set``."""
    p = argparse.ArgumentParser(prog="bbert prepare", description=__doc__.split("\n\n")[0],
                                epilog="Any PrepareConfig field: --set FIELD=VALUE, e.g. "
                                       "--set max_documents=1000 --set dtype=uint32. Flags win over "
                                       "--set, which wins over --config.")
    p.add_argument("inputs", nargs="*", help="text/JSONL files, folders, or hf:NAME[:CONFIG]; "
                   "default: the embedded sample corpus")
    p.add_argument("--input", dest="more_inputs", action="append", default=[], metavar="PATH",
                   help="one more input (repeatable), the same as a positional one")
    p.add_argument("--out", help="data dir to write (default: data/sample)")
    p.add_argument("--format", choices=["auto", "text", "jsonl", "books", "wikiextractor", "hf"])
    p.add_argument("--text-field", help="JSONL/hub field holding the text (default: text)")
    p.add_argument("--text-unit", choices=["paragraph", "line", "file"],
                   help="plain text: one document per blank-line block, per line, or per file")
    p.add_argument("--encoding", help="encoding of text files (default: utf-8), e.g. latin-1")
    p.add_argument("--rows-per-document", type=int,
                   help="join this many consecutive JSONL/hub rows into one document "
                        "(sentence-per-row corpora such as BookCorpus); a document-id column wins")
    p.add_argument("--tokenizer", help="tokenizer folder, a model's (model folder or run dir, for "
                   "pretrain --init-from) or hub name; default: train a WordPiece on the corpus")
    p.add_argument("--vocab-size", type=int, help="size of the trained WordPiece vocabulary (default: 30522)")
    p.add_argument("--cased", dest="lowercase", action="store_false", default=None,
                   help="keep case (default: lowercase)")
    p.add_argument("--max-seq-length", type=int, help="tokens per sample (default: 128)")
    p.add_argument("--val-fraction", type=float, help="share of documents held out (default: 0.01)")
    p.add_argument("--max-documents", type=int, help="use only the first N documents")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a data dir made with other settings")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None)
    add_config_arguments(p, "PrepareConfig")
    return p


@command("bbert prepare")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bbert prepare``."""
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items()
             if k not in ("config", "assignments", "inputs", "more_inputs") and v is not None}
    inputs = list(args.inputs) + list(args.more_inputs)
    if inputs:
        flags["inputs"] = inputs
    config = build_config(PrepareConfig, None, args.config, args.assignments, updates=flags)
    manifest = prepare(config)
    t, s = manifest["splits"], manifest["stats"]
    print(f"{config.out}: {t['train']['num_samples']:,} train + {t['val']['num_samples']:,} val samples "
          f"of {manifest['max_seq_length']} tokens, vocab {manifest['vocab_size']:,} ({manifest['dtype']}), "
          f"packing efficiency {manifest['packing_efficiency']:.2%}, "
          f"{manifest['bytes_per_token']:.3f} bytes/token")
    print(f"documents: {s['documents_read']:,} read, {s['documents_kept']:,} kept; dropped "
          f"{s['empty']:,} empty and {s['too_short']:,} shorter than min_document_chars; "
          f"{s['long_documents_split']:,} long ones cut; {s.get('rows_grouped', 0):,} rows joined into documents")
    if s.get("files_skipped"):
        n = s["files_skipped"]
        print(f"{n:,} file{'s' if n > 1 else ''} in the input folders skipped (not .txt, .jsonl, ...), e.g. "
              f"{', '.join(s['files_skipped_examples'][:3])}: pass such files by name to read them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
