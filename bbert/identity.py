"""One notion of identity: a result is reused only when everything that made it is the same.

What made a result is compared field by field (:func:`changes`): the config, the data's
fingerprint (``bbert.data.data_fingerprint``), and the model's weights (:func:`weights_fingerprint`).
A change means the work is redone, or refused in one line that names what changed and the flag
that overrides it. The same reads catch a damaged file early: a ``.safetensors`` file whose size
is not what its header says (:func:`check_safetensors`), or a torch file cut short
(:func:`torch_file_problem`).

Chapter: ``notebooks/04_pretraining.ipynb`` (resuming a run).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def changed_fields(old: dict, new: dict, ignore=()) -> list[str]:
    """The keys whose values differ (a missing key is None), sorted."""
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def changes(old: dict, new: dict, ignore=()) -> list[str]:
    """``["key old -> new", ...]`` for each key whose value differs (:func:`changed_fields`)."""
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed_fields(old, new, ignore)]


def safetensors_header(path: str | os.PathLike) -> bytes:
    """The JSON header of a ``.safetensors`` file, after checking that the file holds all the
    bytes the header promises; a ``ValueError`` naming the file and the fix if not."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(n) if n < size else b""
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        end, header = None, b""
    if end is None or size != 8 + len(header) + end:
        expected = "" if end is None else f", its header promises {8 + len(header) + end:,}"
        raise ValueError(f"{path} is truncated or damaged ({size:,} bytes{expected}): a write was cut "
                         "short (a full disk, a killed copy?); copy it again, or use another checkpoint")
    return header


def check_safetensors(folder: str | os.PathLike) -> None:
    """Check every ``.safetensors`` file in a model folder (see :func:`safetensors_header`)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        safetensors_header(path)


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """A short fingerprint of the weights in a model folder: each weights file's name, size and
    modification time, and a ``.safetensors`` file's header (names, shapes, dtypes).

    Training further, or saving other weights, rewrites the files and changes it; reading them
    does not. It costs one ``stat`` and a small read per file, whatever the model's size.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES):
        st = path.stat()
        header = safetensors_header(path) if path.suffix == ".safetensors" else b""
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:".encode() + header)
    return h.hexdigest()[:16]


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why a ``torch.save`` file cannot be loaded (cut short: its zip directory is missing), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{Path(path).name} is truncated or damaged ({e})"
    return None
