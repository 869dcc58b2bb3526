"""The run folder's layout, in one place: every stage that reads or writes a run dir goes through here.

::

    run_dir/
      config.yaml                  the full TrainConfig
      metrics.jsonl                one JSON record a line: start, train, val, checkpoint, end
      checkpoints/step-0000123/    periodic and end checkpoints (the last k are kept)
      checkpoints/marker-0.25/     at fractions of the budget (never deleted)
          model/  config.yaml  rng/rank-00000.pt  optimizer.pt or deepspeed/
          budget.json              written last: a checkpoint is complete once it exists
      final/model/, final/budget.json

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import enum
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from bbert.atomic import atomic_write_json
from bbert.identity import changes, safetensors_header, torch_file_problem

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
BUDGET_FILE = "budget.json"
MODEL_DIR = "model"


class EndReason(str, enum.Enum):
    """Why a run ended: the ``reason`` of its ``end`` record and ``end_reason`` in ``budget.json``.

    A ``str``: it compares equal to, and is written as, the plain string (``"budget"``, ...).
    """

    BUDGET = "budget"            # the time budget is spent
    MAX_STEPS = "max_steps"      # the step limit (or a step-based schedule's end) is reached
    EARLY_STOP = "early_stop"    # the validation loss was too high (config.early_stop)
    NAN = "nan"                  # a non-finite loss; the last good checkpoint is kept
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: a checkpoint was saved, a re-run resumes
    PRUNED = "pruned"            # a search's pruner stopped the trial

    def __str__(self) -> str:  # the plain string in messages and f-strings too
        return self.value

    __format__ = str.__format__


def config_path(run_dir) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_path(source) -> Path:
    """``run_dir/metrics.jsonl``; ``source`` may be the run dir or the file itself."""
    source = Path(source)
    return source if source.name == METRICS_FILE else source / METRICS_FILE


# ---- the metrics log -------------------------------------------------------------------


def read_metrics(source, record_type: str | None = None) -> list[dict]:
    """The records of a run (its run dir or its ``metrics.jsonl``) as one clean history.

    A resumed run appends a ``start`` record; the records the killed run wrote after its last
    checkpoint (steps after the resume point) are dropped here, not in the file. A line cut
    short by a kill is skipped. ``record_type`` keeps one type (``"train"``, ``"val"``, ...).
    No file: no records.
    """
    path = metrics_path(source)
    records: list[dict] = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "start":
            if rec.get("resumed"):
                records = [r for r in records if r.get("step", 0) <= rec["step"] and r.get("type") != "end"]
            else:
                records = []
        records.append(rec)
    return [r for r in records if record_type is None or r.get("type") == record_type]


class MetricsTail:
    """Reads the records appended to a run's ``metrics.jsonl`` since the last call (for live views)."""

    def __init__(self, run_dir):
        self.path, self.offset, self.partial = metrics_path(run_dir), 0, ""

    def new_records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next read
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` (flushed per line), TensorBoard, and the console.

    On rank 0 only (``enabled``): a tqdm bar of the budget when stdout is a terminal, else one
    compact ``[bbert] ...% of budget | step ...`` line per log step (what ``bbert.launch`` streams).
    """

    def __init__(self, run_dir, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.file = None
        if enabled:
            path = metrics_path(run_dir)
            cut = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            self.file = open(path, "a", encoding="utf-8")
            if cut:  # a killed run's last line: start ours on a line of its own
                self.file.write("\n")
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # deferred: slow, and optional

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=100.0, unit="%", desc="budget", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("type") in ("train", "val"):
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def progress(self, fraction: float, text: str) -> None:
        """Show ``fraction`` (of the budget, in [0, 1]) used and a line of ``text``."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = round(100.0 * fraction, 1)
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"[bbert] {100 * fraction:5.1f}% of budget | {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(f"[bbert] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


# ---- checkpoints -------------------------------------------------------------------------


def check_run_dir(run_dir, data_dir) -> None:
    """Refuse a ``run_dir`` that can't be one: a file, the data dir or a folder inside it, or a
    folder of other files (a run would mix its checkpoints into them). New, empty and earlier
    run dirs pass."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if run_dir.is_file():
        raise ValueError(f"run dir {run_dir} is a file; choose a folder for --run-dir")
    if run_dir.resolve().is_relative_to(data_dir.resolve()):
        raise ValueError(f"run dir {run_dir} lies inside the data dir {data_dir}, which bbert prepare "
                         "replaces as a whole; choose a --run-dir outside it")
    ours = {CONFIG_FILE, METRICS_FILE, "checkpoints", "final", "launch.log", "tensorboard"}
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) if run_dir.is_dir() else []
    if names and not ours & set(names):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"run dir {run_dir} holds other files ({shown}) and is not a run dir; "
                         "choose a new or empty --run-dir")


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoint(run_dir, step: int) -> Path:
    """The folder of the periodic (or end) checkpoint at ``step``."""
    return checkpoints_dir(run_dir) / f"step-{step:07d}"


def marker_checkpoint(run_dir, fraction: float) -> Path:
    """The folder of the checkpoint kept at ``fraction`` of the budget."""
    return checkpoints_dir(run_dir) / f"marker-{fraction:g}"


def final_dir(run_dir) -> Path:
    return Path(run_dir) / "final"


def model_dir(folder) -> Path:
    """The bbert model folder (weights, config, tokenizer) inside a checkpoint or ``final/``."""
    return Path(folder) / MODEL_DIR


def write_budget(folder, record: dict) -> None:
    """Write ``budget.json``: last, since it marks the checkpoint complete."""
    atomic_write_json(Path(folder) / BUDGET_FILE, record)


def read_budget(folder) -> dict:
    return json.loads((Path(folder) / BUDGET_FILE).read_text())


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run as ``(step, folder)``, oldest first (``.tmp-*`` folders skipped).

    A checkpoint counts once its ``budget.json`` exists (it is written last, inside the atomic folder).
    """
    found = []
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for ckpt in folder.iterdir():
            if ckpt.name.startswith(".") or not (ckpt / BUDGET_FILE).is_file():
                continue
            try:
                found.append((int(read_budget(ckpt)["step"]), ckpt))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
    return sorted(found, key=lambda item: (item[0], item[1].name))


def latest_checkpoint(run_dir) -> Path | None:
    """The finished checkpoint of ``run_dir`` with the highest step (None if there is none)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_leftovers(run_dir) -> list[Path]:
    """Delete what a killed write left behind: ``.tmp-*`` and ``.old-*`` folders of
    :func:`bbert.atomic.atomic_path` in the run dir and its ``checkpoints/``. Returns them.

    Call it only while holding the run dir's lock: a live run's temporary folder looks the same.
    """
    removed = []
    for folder in (Path(run_dir), checkpoints_dir(run_dir)):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the last ``keep`` periodic checkpoints; markers are never deleted."""
    periodic = [path for _, path in list_checkpoints(run_dir) if path.name.startswith("step-")]
    for path in periodic[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ---- random number generators ----------------------------------------------------------


def rng_file(folder, rank: int) -> Path:
    return Path(folder) / "rng" / f"rank-{rank:05d}.pt"


def save_rng(folder, rank: int, device: torch.device) -> None:
    """Save this rank's Python, NumPy, torch (and CUDA) generator states into checkpoint ``folder``."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    path = rng_file(folder, rank)
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)


def load_rng(folder, rank: int) -> dict | None:
    """This rank's generator states in checkpoint ``folder`` (None if it has none)."""
    path = rng_file(folder, rank)
    return torch.load(path, weights_only=False) if path.is_file() else None


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _short(value) -> str:
    return value[:12] if isinstance(value, str) else str(value)


# Model fields that steer training only: a resumed run may change them (the weights mean the same).
TRAINING_ONLY = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "unpad",
                 "sparse_mlm_head")


def checkpoint_problem(folder) -> str | None:
    """Why a finished checkpoint cannot be loaded (a file cut short, say by a full disk or a
    copy that died), or None. Cheap: a header or a zip directory per file, no weights read."""
    weights = model_dir(folder) / "model.safetensors"
    try:
        safetensors_header(weights)
    except FileNotFoundError:
        return f"{MODEL_DIR}/{weights.name} is missing"
    except ValueError:
        return f"{MODEL_DIR}/{weights.name} is truncated or damaged"
    for path in sorted(Path(folder).rglob("*.pt")):  # optimizer.pt, rng/, deepspeed/
        if problem := torch_file_problem(path):
            return problem
    return None


def _sound_checkpoint(run_dir: Path) -> Path | None:
    """The latest checkpoint that can be loaded; says so in one line when it skips damaged ones."""
    found = [path for _, path in list_checkpoints(run_dir)]
    damaged = []
    for ckpt in reversed(found):
        if (problem := checkpoint_problem(ckpt)) is None:
            break
        damaged.append(f"{ckpt.name} ({problem})")
    else:
        ckpt = None
    if damaged and ckpt is None:
        raise ValueError(f"no checkpoint of {run_dir} can be loaded: {'; '.join(damaged)}; "
                         "choose a new --run-dir (or copy the run's checkpoints again)")
    if damaged and os.environ.get("RANK", "0") == "0":
        print(f"[bbert] skipping damaged checkpoint(s) {'; '.join(damaged)}: resuming from {ckpt}, "
              "the latest complete one", file=sys.stderr, flush=True)
    return ckpt


def resume_point(run_dir, config: dict, data: dict, resume: bool | str = "auto", allow_data_change: bool = False,
                 data_dir: str = "the data dir", model: dict | None = None) -> Path | None:
    """The checkpoint a run continues from (None: a new run), or a ``ValueError`` saying why not.

    ``resume="auto"`` continues only a run of the same ``config`` (a dict; run_dir and data_dir may
    differ), ``True`` requires a checkpoint and accepts a changed config, ``False`` refuses a run
    dir that holds checkpoints. Either way the run must continue on the ``data`` it started on (the
    data fingerprint saved in the checkpoint), unless ``allow_data_change``, and with the same
    ``model`` (the architecture, a ``BertConfig`` dict: every field but :data:`TRAINING_ONLY`).
    A damaged latest checkpoint (a file cut short) is skipped for the one before it, saying so.
    """
    run_dir = Path(run_dir)
    if resume is False:
        if latest_checkpoint(run_dir) is not None:
            raise ValueError(f"run dir {run_dir} already holds checkpoints; resume it (--resume) "
                             "or choose a new --run-dir (nothing is overwritten)")
        return None
    ckpt = _sound_checkpoint(run_dir)
    if ckpt is None:
        if resume is True:
            raise ValueError(f"--resume given but {run_dir} has no finished checkpoint; "
                             "drop --resume to start a new run")
        return None
    # compare with the config the checkpoint was written under (run_dir/config.yaml may
    # already hold the new one, e.g. written by bbert.launch)
    saved_cfg = config_path(ckpt)
    if resume == "auto" and saved_cfg.is_file():
        ignore = {"run_dir", "data_dir"}
        old = {k: v for k, v in yaml.safe_load(saved_cfg.read_text()).items() if k not in ignore}
        new = {k: v for k, v in config.items() if k not in ignore}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise ValueError(f"run dir {run_dir} holds a run with a different config "
                             f"(changed: {', '.join(changed)}). Pass --resume to continue it with the new "
                             "config, or choose a new --run-dir")
    old = read_budget(ckpt).get("data")
    if old is not None and old != data and not allow_data_change:
        changed = ", ".join(f"{k} {_short(old.get(k))} -> {_short(v)}" for k, v in data.items() if old.get(k) != v)
        raise ValueError(f"run dir {run_dir} was trained on other data than {data_dir} "
                         f"({changed}); choose a new --run-dir, or pass --allow-data-change to continue "
                         "this run on the new data")
    saved_model = model_dir(ckpt) / "config.json"
    if model is not None and saved_model.is_file():
        old = json.loads(saved_model.read_text())
        shared = [k for k in model if k in old]  # an older bbert's config lacks the newer fields
        changed = changes({k: old[k] for k in shared}, {k: model[k] for k in shared}, ignore=TRAINING_ONLY)
        if changed:
            why = " (vocab_size is the data dir's tokenizer's)" if any(c.startswith("vocab_size ") for c in changed) else ""
            raise ValueError(f"run dir {run_dir} holds a model of another architecture than this config "
                             f"builds ({'; '.join(changed)}){why}; a resumed run continues the same model: "
                             "set those fields back, or choose a new --run-dir")
    return ckpt
