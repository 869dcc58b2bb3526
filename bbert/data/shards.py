"""Packing token streams into fixed-length samples, and the shard files and manifest that hold them.

Chapter: notebooks/02_data.ipynb.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from bbert.utils import atomic_path

FORMAT_VERSION = 1


class DataDirError(ValueError):
    """Raised when a data dir is incomplete, corrupt, or was made with other settings.

    Chapter: notebooks/02_data.ipynb.
    """


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """``uint16`` when every id fits (vocab <= 65,536), else ``uint32``; a named dtype is checked.

    Chapter: notebooks/02_data.ipynb.
    """
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"a vocabulary of {vocab_size:,} tokens does not fit in {dtype} "
                         f"(at most {np.iinfo(dtype).max + 1:,}); use --dtype uint32 or auto")
    return np.dtype(dtype)


class Packer:
    """Concatenate documents (each followed by [SEP]) into one stream and cut it into samples
    ``[CLS] + (max_seq_length - 2) tokens + [SEP]``: RoBERTa's full-sentence packing, one
    segment, no next-sentence prediction, padding only in the very last sample.
    Chapter: notebooks/02_data.ipynb.
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
    """SHA-256 of a file, read in 4 MB chunks. Chapter: notebooks/02_data.ipynb."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, array: np.ndarray) -> tuple[str, bool]:
    """Write ``array`` to ``path`` atomically unless an identical file is already there.

    Returns ``(sha256, written)``. A shard exists only after the rename, so an interrupted
    write never leaves a partial file under the final name. Chapter: notebooks/02_data.ipynb.
    """
    data = np.ascontiguousarray(array).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    if path.exists() and path.stat().st_size == len(data) and sha256_file(path) == digest:
        return digest, False  # verified by checksum: skip
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return digest, True


def manifest_path(data_dir: str | Path) -> Path:
    """Where a data dir keeps its manifest. Chapter: notebooks/02_data.ipynb."""
    return Path(data_dir) / "manifest.json"


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check ``data_dir/manifest.json``. Chapter: notebooks/02_data.ipynb."""
    path = manifest_path(data_dir)
    if not path.exists():
        raise DataDirError(f"{data_dir} has no manifest.json; create it with "
                           f"`bbert prepare --out {data_dir}` (or bbert.data.prepare)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataDirError(f"{path} has format_version {manifest.get('format_version')}, this bbert "
                           f"reads {FORMAT_VERSION}; re-run bbert prepare into a new folder")
    if not manifest.get("complete"):
        raise DataDirError(f"{data_dir} is unfinished (prepare was interrupted); re-run the same "
                           "`bbert prepare` command to finish it: finished shards are kept")
    return manifest


def shard_array(data_dir: str | Path, manifest: dict, shard: dict, key: str = "file") -> np.memmap:
    """Memory-map one shard as ``[num_samples, max_seq_length]``. Chapter: notebooks/02_data.ipynb."""
    path = Path(data_dir) / shard[key]
    rows = shard["num_samples"]
    length = manifest["max_seq_length"]
    expected = rows * length * np.dtype(manifest["dtype"]).itemsize
    if not path.exists() or path.stat().st_size != expected:
        raise DataDirError(f"shard {path} is missing or has the wrong size (expected {expected} bytes); "
                           "re-run bbert prepare with the same arguments to repair it")
    return np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(rows, length))


def verify_shards(data_dir: str | Path, manifest: dict) -> list[str]:
    """Names of shard files that are missing or whose SHA-256 differs from the manifest.

    Chapter: notebooks/02_data.ipynb.
    """
    bad = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for key in ("file", "labels_file"):
                if key not in shard:
                    continue
                path = Path(data_dir) / shard[key]
                want = shard["sha256" if key == "file" else "labels_sha256"]
                if not path.exists() or sha256_file(path) != want:
                    bad.append(shard[key])
    return bad
