"""The PyTorch side: a distributed-aware, deterministic, resumable dataset over the shards.

Sample order: epoch ``e`` shuffles all samples with a seed-derived permutation; rank ``r`` of
``W`` takes positions ``r, r + W, r + 2W, ...`` of it, and every rank stops after the same
number of full micro-batches (the uneven tail of the epoch is dropped, the same on all ranks).
``start_sample`` counts the global samples already consumed, so resuming needs no re-reading.

Opening a dataset checks the shards' checksums (:func:`bbert.data.shards.check_data_dir`, fast
after the first time), each shard is hashed again in the background when first read (a change
that kept the file's size and time stops the run within seconds), and the dataset refuses to go
on if its data dir's manifest is replaced while it reads (a ``bbert prepare --overwrite``).
Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bbert.data.layout import manifest_path, tokenizer_dir
from bbert.data.masking import MaskingConfig, Masker
from bbert.data.shards import (DataDirError, check_data_dir, hash_check_in_background, load_manifest,
                               shard_array)
from bbert.data.tokenizer import load_tokenizer

_SHUFFLE_STREAM = 1  # domain tag of the epoch permutation's random numbers


class PretrainingDataset(torch.utils.data.IterableDataset):
    """Masked-LM samples from a data dir: dicts of int64 tensors ``input_ids``,
    ``attention_mask`` and ``labels`` (each ``[max_seq_length]``, labels -100 where not predicted).

    Masks are drawn at load time as a pure function of (seed, epoch, sample index), dynamic or
    static as ``masking.mode`` says. ``micro_batch_size`` only sets how the epoch's tail is
    dropped. ``verify`` checks the shards against the manifest's checksums first.
    """

    def __init__(self, data_dir, split: str = "train", rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_sample: int = 0, masking: MaskingConfig | None = None,
                 micro_batch_size: int = 1, infinite: bool = True, shuffle: bool | None = None,
                 verify: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if start_sample < 0 or start_sample % (world_size * micro_batch_size):
            raise ValueError(f"start_sample={start_sample} must be a non-negative multiple of "
                             f"world_size * micro_batch_size = {world_size * micro_batch_size} "
                             "(it counts global samples already consumed)")
        self.data_dir = Path(data_dir)
        self._manifest_stamp = self._stamp()
        self.manifest = check_data_dir(data_dir) if verify else load_manifest(data_dir)
        self.verify = verify
        self._hash_checks: list = []  # shards being hashed in the background
        if split not in self.manifest["splits"]:
            raise DataDirError(f"{data_dir} has no split {split!r}; it has {list(self.manifest['splits'])}")
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, seed
        self.start_sample, self.micro_batch_size, self.infinite = start_sample, micro_batch_size, infinite
        self.shuffle = (split == "train") if shuffle is None else shuffle
        if self.manifest.get("masking", "dynamic") != "dynamic":
            raise DataDirError(f"{data_dir} stores statically masked copies (an older bbert); prepare it "
                               "again and set masking.mode=static for the run instead")
        shards = self.manifest["splits"][split]["shards"]
        self.num_samples = sum(s["num_samples"] for s in shards)
        global_batch = world_size * micro_batch_size
        self.batches_per_epoch = self.num_samples // global_batch
        if self.batches_per_epoch == 0:
            raise DataDirError(f"split {split!r} of {data_dir} has {self.num_samples} samples, fewer than "
                               f"one global batch ({world_size} ranks x {micro_batch_size}); prepare "
                               "more text, raise --val-fraction, or use a smaller micro-batch")
        self.samples_per_epoch = self.batches_per_epoch * global_batch  # global, all ranks together
        self._shards = shards
        self._offsets = np.cumsum([0] + [s["num_samples"] for s in shards])
        self._arrays: dict[int, np.memmap] = {}
        self.masker = Masker.from_tokenizer(load_tokenizer(tokenizer_dir(self.data_dir)),
                                            masking or MaskingConfig())
        self.pad_id = self.manifest["special_ids"]["pad"]

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        return self.samples_per_epoch // self.world_size

    def _stamp(self) -> tuple:
        try:
            st = manifest_path(self.data_dir).stat()
        except OSError:
            return ()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _check_unchanged(self) -> None:
        # Cheap (one stat per shard opened): a data dir swapped under a run would mix two corpora.
        if self._stamp() != self._manifest_stamp:
            raise DataDirError(f"{self.data_dir} changed while this run was reading it (its manifest was "
                               "replaced, e.g. by bbert prepare --overwrite); the samples would mix two "
                               "data dirs. Restart the run on the new data (or restore the old folder)")

    def __getstate__(self) -> dict:  # a spawned DataLoader worker starts its own checks
        return {**self.__dict__, "_hash_checks": []}

    def _raise_if_corrupt(self) -> None:
        done = [check for check in self._hash_checks if check.done()]
        for check in done:
            if check.result() is not None:
                raise DataDirError(check.result())
            self._hash_checks.remove(check)

    def permutation(self, epoch: int) -> np.ndarray:
        """The global sample order of ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([_SHUFFLE_STREAM, self.seed, epoch]).permutation(self.num_samples)

    def sample(self, index: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        """Global sample ``index`` as the model sees it in ``epoch``."""
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - self._offsets[shard]
        if shard not in self._arrays:
            self._check_unchanged()
            self._arrays[shard] = shard_array(self.data_dir, self.manifest, self._shards[shard])
            if self.verify:
                self._hash_checks.append(hash_check_in_background(self.data_dir, self._shards[shard]))
        if self._hash_checks:
            self._raise_if_corrupt()
        ids = np.asarray(self._arrays[shard][row])
        input_ids, labels = self.masker(ids, self.seed, epoch, index)
        return {"input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy((ids != self.pad_id).astype(np.int64)),
                "labels": torch.from_numpy(labels)}

    def indices(self) -> Iterator[tuple[int, int]]:
        """``(epoch, global sample index)`` pairs this rank yields, from ``start_sample`` on."""
        epoch, offset = divmod(self.start_sample, self.samples_per_epoch)
        while True:
            order = self.permutation(epoch)
            for position in range(offset + self.rank, self.samples_per_epoch, self.world_size):
                yield epoch, int(order[position])
            if not self.infinite:
                return
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        # With DataLoader workers, worker w builds micro-batches w, w + n, w + 2n, ... and the
        # DataLoader takes them round-robin, so the batches arrive in the same order as with none.
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for position, (epoch, index) in enumerate(self.indices()):
            if (position // self.micro_batch_size) % workers == worker:
                yield self.sample(index, epoch)


def build_pretraining_loader(data_dir, split: str, micro_batch_size: int, rank: int = 0,
                             world_size: int = 1, seed: int = 0, start_sample: int = 0,
                             masking: MaskingConfig | None = None, infinite: bool = True,
                             shuffle: bool | None = None, num_workers: int = 0,
                             pin_memory: bool = False, verify: bool = True) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of micro-batches (``[B, L]`` int64 tensors) over :class:`PretrainingDataset`.

    Every rank gets the same number of batches per epoch; with ``infinite=False`` it stops
    after one epoch (the rest of the epoch when resuming). ``num_workers`` > 0 masks in
    background processes (for fast GPUs) and yields exactly the same batches. ``verify`` checks
    the shards' checksums first (see :func:`bbert.data.shards.check_data_dir`).
    """
    dataset = PretrainingDataset(data_dir, split, rank, world_size, seed, start_sample, masking,
                                 micro_batch_size, infinite, shuffle, verify)
    # The DataLoader draws a base seed when iterated; its own generator keeps the global torch
    # RNG (dropout, which a resumed run restores exactly) untouched.
    return torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(seed))
