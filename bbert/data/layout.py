"""The data dir's layout, in one place: every reader and writer of a data dir names its files here.

::

    data_dir/
      manifest.json        what the data dir holds (written last: a data dir is complete once it exists)
      tokenizer/           the tokenizer, as ``save_pretrained`` writes it
      train-00000.bin ...  the shards, memory-mapped [num_samples, max_seq_length]
      val-00000.bin ...
      .verified.json       size, mtime and SHA-256 of each shard at its last full check

Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

from pathlib import Path

MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SHARD_SUFFIX = ".bin"
VERIFIED_FILE = ".verified.json"  # the sidecar of shards already hashed


def manifest_path(data_dir: str | Path) -> Path:
    """Where a data dir keeps its manifest."""
    return Path(data_dir) / MANIFEST_FILE


def tokenizer_dir(data_dir: str | Path) -> Path:
    """Where a data dir keeps its tokenizer (also beside a model folder's parent, see bbert.hf)."""
    return Path(data_dir) / TOKENIZER_DIR


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train-00000.bin``."""
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


def verified_path(data_dir: str | Path) -> Path:
    """The sidecar of the shards' last full check."""
    return Path(data_dir) / VERIFIED_FILE
