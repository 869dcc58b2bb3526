"""Shared pieces of the training tests: a tiny data dir and tiny run configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bbert.run_dir import read_metrics
from bbert.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def make_data_dir(path: Path) -> Path:
    """A small data dir from the embedded corpus (a few hundred 64-token samples, 2k vocab)."""
    from bbert.data import PrepareConfig, prepare, sample_corpus_path

    prepare(PrepareConfig(inputs=[str(sample_corpus_path())], out=str(path), vocab_size=2048,
                          max_seq_length=64, max_documents=300, val_fraction=0.05, seed=0))
    return path


def tiny_config(data_dir: Path, run_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, 64-hidden model, batch 8 = 4 x 2 accumulation, fp32, simulated clock."""
    base = dict(
        data_dir=str(data_dir), run_dir=str(run_dir), model="tiny",
        model_overrides={"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2},
        max_seq_length=64, seed=0, time_budget_hours=0.05, batch_size=8, micro_batch_size=4,
        precision="fp32", engine="torch", lr=1e-3, validation_every_minutes=1.0, max_val_batches=2,
        checkpoint_every_minutes=1.0, checkpoint_fractions=[0.5], keep_last_checkpoints=2,
        log_every_steps=1, peak_flops=0.0, debug={"step_time_seconds": 6.0},
    )
    base.update(overrides)
    return TrainConfig.from_dict(base)


def records(run_dir, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["type"] == kind]


def raw_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)  # a launcher (or an earlier in-process DeepSpeed run) must not leak in
    return env


def run_cli(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)



def interrupt_after_first_validation(command: list[str]) -> tuple[int, str, str]:
    """Run ``command`` and Ctrl-C it once its trial has validated (and reported) once; return its
    exit code, stdout and stderr."""
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "validation loss" in line:
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, "".join(lines) + stdout, stderr

PYTHON = sys.executable
BIN = Path(sys.executable).parent
