"""One writer per folder: an exclusive lock that says who holds it.

``DirLock(folder, what)`` is a context manager over the ``filelock`` package. The lock file
sits beside the folder (``.NAME.lock``), so the folder itself can be built elsewhere and
renamed into place while the lock is held. The holder (PID, host, start time) is recorded in
``.NAME.lock.json``; a second writer gets a :class:`LockedError` that names the holder::

    with DirLock("data/wikibooks", "written"):
        ...  # build and swap in the data dir

The operating system releases the lock when its process dies, so a crashed writer never
blocks the next one (its stale ``.lock.json`` is simply overwritten). A writer that created the
lock file removes it when it is done, so a command leaves beside the folder only what it found.
Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

import filelock

from bbert.atomic import atomic_write_json


class LockedError(OSError):
    """Another process holds the folder's lock; the message names it and the fix."""


class DirLock:
    """Exclusive, non-blocking lock on ``folder`` for one writer.

    ``what`` completes the sentence "FOLDER is being WHAT by PID ...", e.g. ``"written"``
    or ``"trained into"``. Entering raises :class:`LockedError` at once when another process
    (on this host or, on a shared file system, another) holds the lock.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "written"):
        self.folder = Path(folder)
        self.what = what
        self.lock_path = self.folder.parent / f".{self.folder.name}.lock"
        self.holder_path = self.folder.parent / f".{self.folder.name}.lock.json"
        self._lock = filelock.FileLock(self.lock_path, timeout=0)

    def __enter__(self) -> "DirLock":
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.lock_path.exists()
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise LockedError(self._locked_message()) from None
        atomic_write_json(self.holder_path, {
            "pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return self

    def __exit__(self, *exc) -> None:
        self.holder_path.unlink(missing_ok=True)
        if self._created:  # removed while still held: the next writer makes a new one
            self.lock_path.unlink(missing_ok=True)
        self._lock.release()

    def holder(self) -> dict | None:
        """The recorded holder ``{"pid", "host", "what", "since"}``, or None."""
        try:
            return json.loads(self.holder_path.read_text())
        except (OSError, ValueError):
            return None  # not written yet, or removed: the holder is starting or finishing

    def _locked_message(self) -> str:
        h = self.holder()
        if not h:
            return (f"{self.folder} is being {self.what} by another process; wait for it or stop "
                    f"it (lock file {self.lock_path})")
        since = h.get("since", "?")
        with_time = since[11:16] + " UTC" if len(since) >= 16 else since
        where = "" if h.get("host") == socket.gethostname() else f" on host {h.get('host')}"
        return (f"{self.folder} is being {self.what} by PID {h.get('pid')} on host {h.get('host')} "
                f"since {since[:10]} {with_time}; wait for it or stop it "
                f"(kill {h.get('pid')}{where})")
