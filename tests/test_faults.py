"""Nothing silent (issue 25): every failure a user can cause or meet is one line and exit 2,
leaves the earlier files as they were, and nothing is reused whose identity changed.

One test per case of the issue (the search cases live in tests/test_search.py). The full-disk
cases mount a small tmpfs where the test may (root), else a writer raising ENOSPC.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bbert.run_dir import model_dir

from helpers_train import PYTHON, make_data_dir, run_cli, tiny_config


# ---- helpers ---------------------------------------------------------------------------------


def tree(*folders: Path) -> dict:
    """Every file (dotfiles too) and folder under ``folders``, with its bytes' SHA-256."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            key = str(p)
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def bbert(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli([PYTHON, "-m", "bbert.cli", *map(str, args)], timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The one stderr line of a command that failed with exit 2 (and no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"bbert {command}: error: "), result.stderr[-3000:]
    return lines[0]


# Where no tmpfs can be mounted: the command runs with torch's and safetensors' writers patched
# to raise ENOSPC once the folder would hold more than the disk's size.
SMALL_DISK_SHIM = """
import errno, io, os, sys
from pathlib import Path
disk, size = Path(sys.argv[1]).resolve(), int(sys.argv[2])

def check(path, nbytes):
    used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
    if Path(path).resolve().is_relative_to(disk) and used + nbytes > size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

import torch, safetensors.torch as st, transformers.modeling_utils as mu, bbert.model
torch_save, st_save_file = torch.save, st.save_file

def save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        buffer = io.BytesIO()
        torch_save(obj, buffer, *args, **kwargs)
        check(f, buffer.tell())
    return torch_save(obj, f, *args, **kwargs)

def save_file(tensors, filename, metadata=None):
    check(filename, len(st.save(tensors, metadata)))
    return st_save_file(tensors, filename, metadata)

torch.save, st.save_file, mu.safe_save_file, bbert.model.save_file = save, save_file, save_file, save_file
from bbert.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def small_disk(tmp_path):
    """``make(megabytes) -> (folder, run)``: a disk that fills up, and ``run(*args)`` runs a
    ``bbert`` command with it. A real tmpfs where the test may mount one (root), else the shim."""
    mounted: list[Path] = []

    def make(megabytes: int):
        folder = tmp_path / "disk"
        folder.mkdir()
        if not os.environ.get("BBERT_TEST_NO_TMPFS") and not subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(folder)],
                capture_output=True).returncode:
            mounted.append(folder)
            return folder, bbert
        return folder, lambda *args: run_cli([PYTHON, "-c", SMALL_DISK_SHIM, str(folder),
                                              str(megabytes * 2**20), *map(str, args)], timeout=300)

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished 10-step run (checkpoint at step 10, final/): copy it before changing it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = tiny_config(data_dir, run, time_budget_hours=1 / 60, checkpoint_fractions=[])
    path = run.parent / "run.yaml"
    config.to_yaml(path)
    result = bbert("pretrain", "--config", path)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The small data dir of ``helpers_train`` (2,048-token vocabulary, 64-token samples)."""
    return make_data_dir(tmp_path_factory.mktemp("faults") / "data")


def copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to, symlinks=True)
    return to


# ---- 6: a full disk at checkpoint time -------------------------------------------------------


@pytest.mark.slow
def test_06_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(data_dir, small_disk, tmp_path):
    disk, bbert = small_disk(6)
    config = tiny_config(data_dir, disk / "run", time_budget_hours=1 / 60, checkpoint_fractions=[])
    config.to_yaml(tmp_path / "run.yaml")
    assert bbert("pretrain", "--config", tmp_path / "run.yaml").returncode == 0  # 4.5 of 6 MB
    kept = tree(disk / "run" / "checkpoints", disk / "run" / "final")
    # 10 more steps: the checkpoint at step 20 does not fit
    result = bbert("pretrain", "--config", tmp_path / "run.yaml", "--resume",
                   "--set", f"time_budget_hours={2 / 60}")
    line = one_line_error(result, "pretrain")
    assert re.search(rf"could not write {disk / 'run' / 'checkpoints'}/step-\d+: No space left on device", line)
    assert "step-0000010" in line  # the last good checkpoint, named
    assert tree(disk / "run" / "checkpoints", disk / "run" / "final") == kept
    assert not [p for p in disk.rglob(".tmp-*")]


# ---- 8: a full disk at export ----------------------------------------------------------------


@pytest.mark.slow
def test_08_full_disk_at_export_is_one_line_and_keeps_the_earlier_export(trained, small_disk):
    disk, bbert = small_disk(2)  # one export (1.2 MB) fits, a second one beside it does not
    assert bbert("export", trained, "--out", disk / "hf").returncode == 0
    before = tree(disk)
    line = one_line_error(bbert("export", trained, "--out", disk / "hf"), "export")
    assert f"could not write {disk / 'hf'}: No space left on device" in line
    assert tree(disk) == before


# ---- 11: budget --measure with a micro-batch of 0 -------------------------------------------


def test_11_budget_measure_with_no_micro_batch_is_refused():
    line = one_line_error(bbert("budget", "--measure", "--model", "tiny", "--micro-batch-size", "0"),
                          "budget")
    assert "--micro-batch-size" in line


# ---- 16: --print-config of an invalid config --------------------------------------------------


def test_16_print_config_of_an_invalid_config_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path / "run")
    config.to_yaml(tmp_path / "run.yaml")
    before = tree(tmp_path)
    line = one_line_error(bbert("pretrain", "--config", tmp_path / "run.yaml", "--set", "lr=-1",
                                "--print-config"), "pretrain")
    assert "lr" in line
    assert tree(tmp_path) == before


# ---- 17: export into a folder that cannot be made ---------------------------------------------


@pytest.mark.slow
def test_17_export_names_the_users_path_not_a_temporary_one(trained):
    line = one_line_error(bbert("export", trained, "--out", "/proc/x"), "export")
    assert "could not write /proc/x:" in line and ".tmp-" not in line


# ---- 20: a failed prepare leaves no lock file --------------------------------------------------


def test_20_failed_prepare_leaves_no_lock_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    before = tree(tmp_path)
    one_line_error(bbert("prepare", tmp_path / "empty.txt", "--out", tmp_path / "d", "--vocab-size", 500),
                   "prepare")
    assert tree(tmp_path) == before  # no .d.lock, no .d.lock.json, no d


# ---- 2: finetune's results are not reused once the model was trained further -----------------

FINETUNE = ["--glue-dir", Path(__file__).parent / "fixtures" / "glue" / "glue_data", "--tasks", "rte",
            "--grid", "tiny", "--lrs", "1e-3", "--seeds", "0", "--epochs", "1",
            "--max-train-examples", "16", "--no-save-models"]


@pytest.mark.slow
def test_02_finetune_refuses_results_of_weights_trained_further(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    out = tmp_path / "results"
    assert bbert("finetune", run, "--out", out, *FINETUNE).returncode == 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((run / "config.yaml").read_text()),
                                      "run_dir": str(run), "time_budget_hours": 1.5 / 60}))
    assert bbert("pretrain", "--config", config, "--resume").returncode == 0  # 5 steps more
    before = tree(out)
    line = one_line_error(bbert("finetune", run, "--out", out, *FINETUNE), "finetune")
    assert "the model's weights (trained further or replaced since" in line and "--redo" in line
    assert tree(out) == before
    redone = bbert("finetune", run, "--out", out, *FINETUNE, "--redo")
    assert redone.returncode == 0 and "already finished" not in redone.stdout


# ---- 9: a truncated model.safetensors given to export or finetune ---------------------------


@pytest.mark.slow
def test_09_truncated_weights_are_one_line_for_export_and_finetune(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    weights = model_dir(run / "final") / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    before = tree(tmp_path)
    for command, args in (("export", ["--out", tmp_path / "hf"]),
                          ("finetune", ["--out", tmp_path / "results", *FINETUNE])):
        line = one_line_error(bbert(command, run, *args), command)
        assert f"{weights} is truncated or damaged" in line
        assert tree(tmp_path) == before


# ---- 3 and 7: --resume with another architecture, or onto another vocabulary -----------------


def resume_args(run: Path, *sets: str) -> list:
    return ["pretrain", "--config", run / "config.yaml", "--resume", "--run-dir", run,
            "--set", f"time_budget_hours={1.5 / 60}", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    ("model.ffn_type=swiglu", "ffn_type 'geglu' -> 'swiglu'"),   # 3: the same shapes
    ("model.rope_theta=500", "rope_theta 10000.0 -> 500.0"),       # 3: the same shapes
    ("model.ffn_type=mlp", "ffn_type 'geglu' -> 'mlp'")])          # 7: other shapes
def test_03_07_resume_with_another_architecture_is_refused(data_dir, tmp_path, change, named):
    run = tmp_path / "run"
    config = tiny_config(data_dir, run, time_budget_hours=1 / 60, checkpoint_fractions=[],
                         model_overrides={"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                                          "ffn_type": "geglu", "position_embedding_type": "rope"})
    config.to_yaml(tmp_path / "run.yaml")
    assert bbert("pretrain", "--config", tmp_path / "run.yaml").returncode == 0
    before = tree(tmp_path)
    line = one_line_error(bbert(*resume_args(run, change)), "pretrain")
    assert f"run dir {run} holds a model of another architecture" in line and named in line
    assert "choose a new --run-dir" in line
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_07_allow_data_change_onto_another_vocabulary_is_refused(trained, tmp_path):
    from bbert.data import PrepareConfig, prepare, sample_corpus_path

    other = tmp_path / "other-data"
    prepare(PrepareConfig(inputs=[str(sample_corpus_path())], out=str(other), vocab_size=1024,
                          max_seq_length=64, max_documents=300, val_fraction=0.05, seed=0))
    run = copy_run(trained, tmp_path / "run")
    before = tree(tmp_path)
    line = one_line_error(bbert(*resume_args(run, f"data_dir={other}"), "--allow-data-change"), "pretrain")
    assert "vocab_size 2048 -> " in line and "the data dir's tokenizer" in line
    assert tree(tmp_path) == before


# ---- 10: a truncated optimizer.pt in the latest checkpoint -------------------------------------


@pytest.mark.slow
def test_10_truncated_optimizer_state_falls_back_to_the_previous_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(data_dir, run, time_budget_hours=1 / 60, checkpoint_fractions=[0.5])
    config.to_yaml(tmp_path / "run.yaml")
    assert bbert("pretrain", "--config", tmp_path / "run.yaml").returncode == 0
    latest = run / "checkpoints" / "step-0000010"
    with open(latest / "optimizer.pt", "r+b") as f:
        f.truncate(1000)
    result = bbert(*resume_args(run))
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert notes == [f"[bbert] skipping damaged checkpoint(s) step-0000010 (optimizer.pt is truncated or "
                     f"damaged (File is not a zip file)): resuming from {run / 'checkpoints' / 'marker-0.5'}, "
                     "the latest complete one"]
    assert "resuming from" in result.stdout and "(step 5," in result.stdout
    # every checkpoint damaged: one line, nothing changed
    for ckpt in (run / "checkpoints").iterdir():
        with open(ckpt / "optimizer.pt", "r+b") as f:
            f.truncate(1000)
    before = tree(tmp_path)
    line = one_line_error(bbert(*resume_args(run, f"time_budget_hours={2 / 60}")), "pretrain")
    assert f"no checkpoint of {run} can be loaded" in line
    assert tree(tmp_path) == before


# ---- 4: bit rot that keeps the size and the time ----------------------------------------------


def flip_a_byte_keeping_the_time(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow
def test_04_a_shard_changed_under_the_same_size_and_time_stops_the_run(data_dir, trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)  # keeps the times, and so the sidecar's quick check passes
    shard = data / "train-00000.bin"
    flip_a_byte_keeping_the_time(shard)
    run = copy_run(trained, tmp_path / "run")
    before = tree(data, run / "checkpoints", run / "final")
    line = one_line_error(bbert(*resume_args(run, f"data_dir={data}")), "pretrain")
    assert f"shard {shard} does not match its SHA-256 in the manifest" in line
    assert tree(data, run / "checkpoints", run / "final") == before  # no checkpoint of the bad data
    # prepare's "already prepared with these arguments; shards verified" hashes every byte
    from bbert.data import PrepareConfig, prepare, sample_corpus_path

    prepare(PrepareConfig(inputs=[str(sample_corpus_path())], out=str(data), vocab_size=2048,
                          max_seq_length=64, max_documents=300, val_fraction=0.05, seed=0))
    out = capsys.readouterr()
    assert "shards verified" not in out.out and "does not match its SHA-256" in out.out + out.err
