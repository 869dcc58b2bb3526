"""Small helpers shared by every stage: scale selection, atomic writes, seeding, hub access.

See the introduction chapter (``book/intro.md``) for how scale and offline use work.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

SCALES = ("tiny", "full")


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) that import each public name from
    its module (``exports``: name -> module) on first use, so that importing the package is quick."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def resolve_scale(scale: str | None = None) -> str:
    """Return ``"tiny"`` or ``"full"``.

    ``scale`` (or the ``BBERT_SCALE`` environment variable when ``scale`` is None)
    may be ``auto``, ``tiny`` or ``full``; ``auto`` picks ``full`` only where a CUDA
    GPU is present. Chapter: introduction, "How to run things".
    """
    value = (scale or os.environ.get("BBERT_SCALE") or "auto").strip().lower()
    if value == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "tiny"
    if value not in SCALES:
        raise ValueError(f"scale must be one of auto, tiny, full; got {value!r}. "
                         "Set BBERT_SCALE=auto|tiny|full or pass scale=...")
    return value


def env_flag(name: str, default: bool | None = False) -> bool | None:
    """The environment variable ``name`` as a switch: 1/true/yes/on or 0/false/no/off.

    Unset, empty or anything else gives ``default`` (None lets a caller tell "unset" apart).
    """
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for ``MASTER_PORT`` / ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and folders. A crash leaves the old ``path`` untouched and at most
    a ``.tmp-*`` sibling, which is never mistaken for the finished thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
            try:
                os.replace(target, path)
            except OSError:
                os.replace(old, path)  # put the old one back rather than leave nothing at path
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def hub_offline() -> bool:
    """True when the Hugging Face hub can't be reached (HF_HUB_OFFLINE set, or no route).

    Checked in about a second so that hub loaders fail at once instead of retrying.
    """
    if env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE"):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=1.5):
            return False
    except OSError:
        return True


class HubUnavailableError(ConnectionError):
    """Raised at once when something must come from the hub and the hub can't be reached."""


def require_hub(what: str, offline_alternative: str) -> None:
    """Raise :class:`HubUnavailableError` naming ``offline_alternative`` if the hub is unreachable."""
    if hub_offline():
        raise HubUnavailableError(
            f"{what} needs the Hugging Face hub, which can't be reached from here "
            f"(offline, or HF_HUB_OFFLINE=1). Offline alternative: {offline_alternative}"
        )


def fast_bf16(device: str = "cpu") -> bool:
    """True where bf16 matmuls run natively on ``device``, so that bf16 autocast is a speed-up.

    A CUDA GPU with bf16; an x86 CPU with AVX-512 BF16 or AMX. Elsewhere (an AVX2-only CPU, most
    laptops) torch emulates bf16 matmuls, about 100x slower than fp32 on a 2-core AVX2 EPYC, so
    bbert's CPU defaults fall back to fp32 there. ``BBERT_CPU_BF16=1`` or ``0`` overrides the
    CPU check. Chapter: ``notebooks/03_model.ipynb`` (mixed precision).
    """
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    forced = env_flag("BBERT_CPU_BF16", default=None)
    if forced is not None:
        return forced
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: str = "cpu"):
    """bf16 where :func:`fast_bf16` holds, else None (train in fp32): the default mixed precision
    of bbert's measuring helpers. Chapter: ``notebooks/03_model.ipynb``.
    """
    import torch

    return torch.bfloat16 if fast_bf16(device) else None


class Progress:
    """A tqdm bar on a terminal; in a file or a pipe, one plain line every ``every`` of the work
    (when ``total`` is known) or every ``seconds``, whichever comes first: a bar's ``\r``
    updates would flood a log. ``info`` given to :meth:`update` is shown beside the count."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "steps",
                 every: float = 0.1, seconds: float = 30.0, stream=None):
        from tqdm.auto import tqdm  # deferred: utils is imported by everything, tqdm.auto pulls in IPython

        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.every, self.seconds = every, seconds
        self.stream = stream or sys.stderr
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=total is None, file=self.stream,
                        disable=not (enabled and self.stream.isatty()))
        self.done, self.last_fraction, self.last_time = 0, 0.0, time.monotonic()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        self.bar.update(n)
        if info:
            self.bar.set_postfix(info, refresh=False)
        if not self.enabled or not self.bar.disable:
            return
        now = time.monotonic()
        fraction = self.done / max(self.total, 1) if self.total else 0.0
        if (self.total and (fraction - self.last_fraction >= self.every or self.done == self.total)) \
                or now - self.last_time >= self.seconds:
            count = f"{self.done}/{self.total} {self.unit} ({fraction:.0%})" if self.total else f"{self.done:,} {self.unit}"
            extra = "".join(f", {k} {v}" for k, v in info.items())
            print(f"{self.desc}: {count}{extra}", file=self.stream, flush=True)
            self.last_fraction, self.last_time = fraction, now

    def close(self) -> None:
        self.bar.close()
