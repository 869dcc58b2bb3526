"""Tests of bbert.locks.DirLock: one writer per folder, a clear error naming the holder."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbert.locks import DirLock, LockedError

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from bbert.locks import DirLock
with DirLock(sys.argv[1], "written"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_gets_locked_error_naming_the_first(tmp_path):
    folder = tmp_path / "data" / "x"
    proc = _holder(folder)
    try:
        with pytest.raises(LockedError) as caught:
            with DirLock(folder, "written"):
                pass
        message = str(caught.value)
        assert f"{folder} is being written by PID {proc.pid} on host {socket.gethostname()} since " in message
        assert "wait for it or stop it" in message and isinstance(caught.value, OSError)
    finally:
        proc.kill()
        proc.wait()
    # The OS released the dead holder's lock: it never blocks, though its record is still there.
    assert (tmp_path / "data" / ".x.lock.json").exists()
    with DirLock(folder, "written") as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert not (tmp_path / "data" / ".x.lock.json").exists()


def test_prepare_refuses_a_data_dir_another_prepare_is_writing(tmp_path, capsys):
    from bbert.cli import main

    out = tmp_path / "d"
    proc = _holder(out)
    try:
        assert main(["prepare", "--out", str(out), "--quiet", "--set", "max_documents=20"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    err = capsys.readouterr().err.strip()
    assert err == (f"bbert prepare: error: {out} is being written by PID {proc.pid} on host "
                   f"{socket.gethostname()} since {err.split(' since ')[1].split(';')[0]}; wait for it or "
                   f"stop it (kill {proc.pid})")
    assert not out.exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with DirLock(tmp_path / "x"):
        with pytest.raises(LockedError, match=f"by PID {os.getpid()}"):
            with DirLock(tmp_path / "x", "trained into"):
                pass
    started = time.perf_counter()
    with DirLock(tmp_path / "x"):
        pass
    assert time.perf_counter() - started < 1
