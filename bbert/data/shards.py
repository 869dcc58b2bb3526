"""Packing token streams into fixed-length samples, and the shard files and manifest that hold them.

A data dir is checked before it is used: every shard against the SHA-256 in the manifest. The
full hash is done once per shard and remembered in a small sidecar (``.verified.json``: size,
modification time and hash of each shard), so later runs only compare sizes and times at start.
That quick check misses a change that keeps both (bit rot), so a run also hashes each shard
when it first reads it, in a background thread (:func:`hash_check_in_background`).
Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bbert.atomic import atomic_path, atomic_write_json
from bbert.data.layout import MANIFEST_FILE, manifest_path, verified_path

FORMAT_VERSION = 1


class DataDirError(ValueError):
    """Raised when a data dir is incomplete, corrupt, or was made with other settings.
    """


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """``uint16`` when every id fits (vocab <= 65,536), else ``uint32``; a named dtype is checked.
    """
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"a vocabulary of {vocab_size:,} tokens does not fit in {dtype} "
                         f"(at most {np.iinfo(dtype).max + 1:,}); use --set dtype=uint32 or auto")
    return np.dtype(dtype)


class Packer:
    """Concatenate documents (each followed by [SEP]) into one stream and cut it into samples
    ``[CLS] + (max_seq_length - 2) tokens + [SEP]``: RoBERTa's full-sentence packing, one
    segment, no next-sentence prediction, padding only in the very last sample.
   
    """

    def __init__(self, max_seq_length: int, cls_id: int, sep_id: int, pad_id: int, dtype):
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
        self.max_seq_length, self.cls_id, self.sep_id, self.pad_id = max_seq_length, cls_id, sep_id, pad_id
        self.dtype = np.dtype(dtype)
        self.tail = np.zeros(0, dtype=self.dtype)
        self.real_tokens = 0  # non-pad positions written so far
        self.samples = 0

    def add(self, token_lists: list[list[int]]) -> np.ndarray:
        """Append documents' token ids; return the samples now complete, shape ``[n, L]``."""
        if not token_lists:
            return np.zeros((0, self.max_seq_length), dtype=self.dtype)
        lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
        stream = np.empty(len(self.tail) + int(lengths.sum()), dtype=self.dtype)
        stream[:len(self.tail)] = self.tail
        body = stream[len(self.tail):]
        ends = np.cumsum(lengths)
        for tokens, end, length in zip(token_lists, ends, lengths):
            body[end - length:end - 1] = tokens
        body[ends - 1] = self.sep_id
        return self._cut(stream, final=False)

    def finish(self) -> np.ndarray:
        """The last, padded sample (if any tokens are left)."""
        return self._cut(self.tail, final=True)

    def _cut(self, stream: np.ndarray, final: bool) -> np.ndarray:
        width = self.max_seq_length - 2
        n = len(stream) // width
        if final and len(stream) % width:
            n += 1
            stream = np.concatenate([stream, np.full(n * width - len(stream), self.pad_id, self.dtype)])
        out = np.empty((n, self.max_seq_length), dtype=self.dtype)
        out[:, 0] = self.cls_id
        out[:, 1:-1] = stream[:n * width].reshape(n, width)
        out[:, -1] = self.sep_id
        self.tail = stream[n * width:] if not final else np.zeros(0, self.dtype)
        self.samples += n
        self.real_tokens += int((out != self.pad_id).sum()) if final else n * self.max_seq_length
        return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, array: np.ndarray) -> str:
    """Write ``array`` to ``path`` atomically and return its SHA-256.

    A shard exists only after the rename, so an interrupted write never leaves a partial file
    under the final name.
    """
    data = np.ascontiguousarray(array).tobytes()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return hashlib.sha256(data).hexdigest()


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check the data dir's manifest (``bbert.data.layout.manifest_path``)."""
    path = manifest_path(data_dir)
    if not path.exists():
        raise DataDirError(f"{data_dir} has no {MANIFEST_FILE}; create it with "
                           f"`bbert prepare --out {data_dir}` (or bbert.data.prepare)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataDirError(f"{path} is not valid JSON (damaged?); {rebuild_hint(data_dir)}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataDirError(f"{path} has format_version {manifest.get('format_version')}, this bbert "
                           f"reads {FORMAT_VERSION}; re-run bbert prepare into a new folder")
    if not manifest.get("complete"):
        raise DataDirError(f"{data_dir} is unfinished (prepare was interrupted); re-run the same "
                           f"`bbert prepare --out {data_dir}` command, which redoes it")
    return manifest


def shard_array(data_dir: str | Path, manifest: dict, shard: dict) -> np.memmap:
    """Memory-map one shard as ``[num_samples, max_seq_length]``."""
    path = Path(data_dir) / shard["file"]
    rows = shard["num_samples"]
    length = manifest["max_seq_length"]
    expected = rows * length * np.dtype(manifest["dtype"]).itemsize
    if not path.exists() or path.stat().st_size != expected:
        raise DataDirError(f"shard {path} is missing or has the wrong size (expected {expected} bytes); "
                           f"{rebuild_hint(data_dir)}")
    return np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(rows, length))


def verify_shards(data_dir: str | Path, manifest: dict) -> list[str]:
    """Names of shard files that are missing or whose SHA-256 differs from the manifest
    (a full hash of every shard; :func:`check_data_dir` is the fast check for a run's start)."""
    return [name for name, sha in _shard_files(manifest)
            if not (Path(data_dir) / name).is_file() or sha256_file(Path(data_dir) / name) != sha]


def rebuild_hint(data_dir: str | Path) -> str:
    """How to rebuild a damaged data dir, for error messages."""
    return (f"rebuild it with `bbert prepare ... --out {data_dir} --overwrite` and the arguments "
            f"recorded under \"args\" in {manifest_path(data_dir)}")


def _shard_files(manifest: dict):
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            yield shard["file"], shard["sha256"]


def _stamp(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def record_verified(data_dir: str | Path, manifest: dict) -> None:
    """Write the sidecar for shards whose hashes were just computed (by ``prepare``)."""
    data_dir = Path(data_dir)
    atomic_write_json(verified_path(data_dir),
                      {name: _stamp(data_dir / name, sha) for name, sha in _shard_files(manifest)})


def check_data_dir(data_dir: str | Path, manifest: dict | None = None, full: bool = False) -> dict:
    """Check every shard of ``data_dir`` against the manifest's SHA-256; return the manifest.

    A shard whose size and modification time match the sidecar entry of an earlier full check
    is not read again (unless ``full``), so this costs one ``stat`` per shard after the first
    time (a copy that keeps the times, or a change that keeps them, is not re-hashed: the loader
    hashes each shard again as it first reads it). Raises :class:`DataDirError` naming the first
    bad shard and how to rebuild the data dir.
    """
    data_dir = Path(data_dir)
    manifest = manifest if manifest is not None else load_manifest(data_dir)
    sidecar = verified_path(data_dir)
    try:
        known = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        known = {}
    checked = {}
    for name, sha in _shard_files(manifest):
        path = data_dir / name
        if not path.is_file():
            raise DataDirError(f"shard {path} is missing; {rebuild_hint(data_dir)}")
        stamp = _stamp(path, sha)
        if full or known.get(name) != stamp:
            if sha256_file(path) != sha:
                raise DataDirError(f"shard {path} does not match its SHA-256 in the manifest (changed "
                                   f"or corrupt since it was written); {rebuild_hint(data_dir)}")
        checked[name] = stamp
    if checked != known:
        try:
            atomic_write_json(sidecar, checked)
        except OSError:
            pass  # a read-only data dir: the shards are hashed again next time
    return manifest


_hashed: dict[tuple, Future] = {}  # (path, size, mtime, sha256) -> its check, once per process
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def hash_check_in_background(data_dir: str | Path, shard: dict) -> Future:
    """Hash ``shard`` (a manifest entry) in a background thread, once per process and file
    version; the future's result is None, or the message of the mismatch.

    The loader calls it when it first reads a shard, so a run checks every byte it trains on
    without waiting for it (hashlib and file reads release the GIL): the cost is one core for a
    few seconds per GB, measured in ``benchmarks/checksum_check.py``.
    """
    global _pool
    path = Path(data_dir) / shard["file"]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, shard["sha256"])
    with _pool_lock:
        if key not in _hashed:
            _pool = _pool or ThreadPoolExecutor(1, thread_name_prefix="bbert-shard-hash")
            _hashed[key] = _pool.submit(_hash_check, path, shard["sha256"], Path(data_dir))
        return _hashed[key]


def _hash_check(path: Path, sha256: str, data_dir: Path) -> str | None:
    if sha256_file(path) == sha256:
        return None
    return (f"shard {path} does not match its SHA-256 in the manifest (changed or corrupt since it was "
            f"written, though its size and time are unchanged); {rebuild_hint(data_dir)}")


def forget_hash_checks() -> None:
    """Forget which shards this process has hashed (a forked DataLoader worker starts afresh)."""
    global _pool
    _hashed.clear()
    _pool = None


os.register_at_fork(after_in_child=forget_hash_checks)


def data_fingerprint(manifest: dict) -> dict:
    """What a run depends on in a data dir, to compare a resumed run's data with its first:
    the tokenizer fingerprint, vocabulary size, sequence length, dtype, sample counts and one
    hash over all shard checksums."""
    shards = hashlib.sha256("".join(sha for _, sha in _shard_files(manifest)).encode()).hexdigest()
    return {"tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
            "vocab_size": manifest["vocab_size"],
            "max_seq_length": manifest["max_seq_length"],
            "dtype": manifest["dtype"],
            "num_samples": {s: v["num_samples"] for s, v in manifest["splits"].items()},
            "shards_sha256": shards}
