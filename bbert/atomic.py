"""Atomic writes: a file or folder appears whole at its path or not at all.

Every write of a data dir, run dir, model folder or results dir goes through here, so that a
crash, a full disk or Ctrl-C leaves the last good version in place (``CONTRIBUTING.md``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class WriteError(OSError):
    """A write that failed (a full disk, a read-only folder), naming the path the user asked for,
    never the temporary one; whatever was at that path before is kept."""

    def __str__(self) -> str:
        if self.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on that disk, then run the same command again"
        else:
            fix = "check the path, or choose another one that you can write to"
        return f"could not write {self.filename}: {self.strerror}; what was there before is kept: {fix}"


def write_error(e: BaseException, path: str | os.PathLike) -> WriteError | None:
    """``e``, raised while writing ``path``, as a :class:`WriteError`; None if it is not a failed write.

    torch.save and safetensors hide the operating system's error in their own: torch's
    ``RuntimeError`` says only "unexpected pos ..." (so a disk with no space left is taken to be
    the cause), safetensors' ``SafetensorError`` says "I/O error: ... (os error 28)".
    """
    if isinstance(e, OSError) and e.errno is not None:
        code = e.errno
    elif type(e).__name__ == "SafetensorError" and "os error " in str(e):
        code = int(str(e).rsplit("os error ", 1)[1].rstrip(")").strip() or errno.EIO)
    elif isinstance(e, RuntimeError) and ("PytorchStreamWriter" in str(e) or "unexpected pos" in str(e)):
        code = errno.ENOSPC if _free_bytes(Path(path).parent) < 1 << 20 else errno.EIO
    else:
        return None
    return WriteError(code, os.strerror(code), str(path))


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and folders. A crash leaves the old ``path`` untouched and at most
    a ``.tmp-*`` sibling, which is never mistaken for the finished thing. A failed write (a full
    disk, an unwritable folder) is a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    except OSError as e:
        raise (write_error(e, path) or e) from e
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
    except Exception as e:
        if isinstance(e, OSError) and e.filename is not None and not _inside(e, tmp):
            raise  # about another file (a source that could not be read): its own message
        failure = write_error(e, path)
        if failure is None:
            raise
        raise failure from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _inside(e: OSError, folder: Path) -> bool:
    return Path(os.fsdecode(e.filename)).is_relative_to(folder)


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
