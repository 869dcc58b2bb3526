"""The process's setting: the scale (``BBERT_SCALE``), switches from environment variables, a free
port for a distributed run, and the random seeds.

See the introduction chapter (``book/intro.md``) for how the scale works.
"""
from __future__ import annotations

import os
import random
import signal
import socket

SCALES = ("tiny", "full")


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


class StopSignals:
    """``requested`` turns True on SIGINT/SIGTERM, so a loop can finish its step and save first
    (the pretraining loop then ends with reason "interrupted"). Outside the main thread it does nothing."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
