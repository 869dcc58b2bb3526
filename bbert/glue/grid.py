"""The paper's protocol over a grid: many runs per task, the median of the best configuration.

    grid_search    every (config, seed) run of a GridConfig on one task; re-running skips the
                   finished runs (those with a result.json of this version), so a killed search
                   resumes, and refuses finished runs of another model, weights, data or
                   hyperparameters (redoes them with redo=True); with several GPUs, one process per GPU
    select_best    median over seeds per configuration, the best median reported
    results        a Markdown/CSV table beside the paper's numbers; the leaderboard submission
    run_glue       all of it for a list of tasks
    cost           what a grid costs in GPU-hours, scaled from a measured tiny run

Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import statistics
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bbert.budget import DEFAULT_MFU, model_config
from bbert.speed import get_gpu, seq_per_s_at_mfu, training_flops_per_sequence
from bbert.glue.config import FinetuneConfig, GridConfig
from bbert.glue.finetuning import RESULT_VERSION, finetune, model_weights
from bbert.glue.tasks import (BERT_BASE_TEST, GLUE_TRAIN_SIZES, PAPER_24HBERT_TEST, TaskData,
                              TaskSpec, get_task)
from bbert.atomic import atomic_path, atomic_write_json, atomic_write_text
from bbert.identity import changes

# ---- grid search ----------------------------------------------------------------------------


def run_dir(out_dir: str | os.PathLike, task: str, config: FinetuneConfig) -> Path:
    """``out_dir/runs/<task>/<config>/<seed>/``: where one run's results live."""
    return Path(out_dir) / "runs" / task / config.name / str(config.seed)


def load_result(path: str | os.PathLike) -> dict | None:
    """A finished run's ``result.json``, or None if the run has not finished.

    A missing or truncated file, or a record of another :data:`RESULT_VERSION` (an older
    bbert's), counts as not finished: the run is done again.
    """
    path = Path(path)
    path = path / "result.json" if path.is_dir() or not path.suffix else path
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(result, dict) or result.get("result_version") != RESULT_VERSION:
        return None
    return result


# Fields of FinetuneConfig that don't change a run's scores: a re-run may change them freely.
_SCORE_NEUTRAL = ("device", "progress", "save_best_model", "eval_batch_size")


def _changed_settings(result: dict, model: str, weights: str | None, fingerprint: str,
                      config: FinetuneConfig) -> list[str]:
    """How a finished run differs from the run ``config`` would make: model, weights, data, hyperparameters."""
    found = []
    if result.get("model_path") != model:
        found.append(f"model {result.get('model_path')} -> {model}")
    if result.get("weights_fingerprint") != weights:
        found.append(f"the model's weights (trained further or replaced since; fingerprint "
                     f"{result.get('weights_fingerprint')} -> {weights})")
    if result.get("data_fingerprint") != fingerprint:
        found.append("other examples or labels in the task's files")
    new = json.loads(json.dumps(asdict(config)))  # as result.json holds it: tuples are lists
    return found + changes(result.get("hyperparameters") or {}, new, ignore=_SCORE_NEUTRAL)


def _run_one(args) -> dict:
    model_path, data, config, out = args
    return finetune(model_path, data, config, out)


def _pin_gpu(queue) -> None:
    # One worker per GPU: each worker takes a GPU id once, before torch touches CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def grid_search(model_path: str | os.PathLike, data: TaskData, grid: GridConfig,
                out_dir: str | os.PathLike, num_gpus: int | None = None, redo: bool = False) -> list[dict]:
    """Run the grid on one task; finished runs (with a ``result.json``) are skipped.

    A finished run made with another model, other weights (the model was trained further),
    other examples or other hyperparameters (those that change scores) is a ``ValueError``: its
    scores would be mixed with the new ones. With ``redo`` such runs are done again instead.

    With several GPUs, runs go in parallel, one process per GPU pinned by
    ``CUDA_VISIBLE_DEVICES``; otherwise in sequence. Returns every run's result.
    """
    runs = grid.runs()
    model, fingerprint = str(Path(model_path).resolve()), data.fingerprint()
    weights = model_weights(model_path)
    todo = []
    for c in runs:
        result = load_result(run_dir(out_dir, data.spec.name, c))
        if result is None:
            todo.append(c)
        elif changed := _changed_settings(result, model, weights, fingerprint, c):
            if redo:
                todo.append(c)
                continue
            raise ValueError(
                f"{run_dir(out_dir, data.spec.name, c)} holds a finished run with other settings "
                f"({'; '.join(changed)}): pass --redo to finetune those runs again, or give a new --out")
    if len(todo) < len(runs):
        print(f"{data.spec.display}: {len(runs) - len(todo)} of {len(runs)} runs already "
              f"finished in {out_dir}, skipping them")
    jobs = [(str(model_path), data, c, run_dir(out_dir, data.spec.name, c)) for c in todo]
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    if num_gpus > 1 and len(jobs) > 1:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for gpu in range(num_gpus):
            queue.put(gpu)
        with ProcessPoolExecutor(num_gpus, mp_context=ctx, initializer=_pin_gpu,
                                 initargs=(queue,)) as pool:
            list(pool.map(_run_one, [(m, d, replace(c, device="cuda:0", progress=False), o)
                                     for m, d, c, o in jobs]))
    else:
        for job in jobs:
            _run_one(job)
    return [load_result(run_dir(out_dir, data.spec.name, c)) for c in runs]


def select_best(results: list[dict], spec: TaskSpec) -> dict:
    """The paper's protocol: median over seeds per configuration; report the best median.

    Returns ``{"config", "score", "dev" (median of every metric of that config),
    "seeds", "median_run" (the seed whose score is the median, for test predictions),
    "per_config" {config: median score}}``.
    """
    results = [r for r in results if r is not None]
    if not results:
        raise ValueError(f"{spec.display}: no finished runs to select from")
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    per_config = {c: statistics.median(r["score"] for r in rs) for c, rs in by_config.items()}
    best = max(per_config, key=lambda c: per_config[c])  # ties: the first config in the grid
    runs = sorted(by_config[best], key=lambda r: (r["score"], r["seed"]))
    dev = {split: {m: statistics.median(r["dev"][split][m] for r in runs) for m in spec.metrics}
           for split in spec.dev_splits}
    return {
        "task": spec.name, "config": best, "score": per_config[best], "dev": dev,
        "seeds": [r["seed"] for r in runs],
        "median_run": runs[(len(runs) - 1) // 2]["seed"],  # lower median when even
        "per_config": per_config,
    }


# ---- results ----------------------------------------------------------------------------

_METRIC_NAMES = {"matthews_corr": "Matthews corr.", "accuracy": "accuracy", "f1": "F1",
                 "pearson": "Pearson", "spearman": "Spearman"}


def results_rows(selections: dict[str, dict], specs: dict[str, TaskSpec] | None = None) -> list[dict]:
    """One row per table column (MNLI gives two) with our dev median and the papers' test scores."""
    rows = []
    for task, sel in selections.items():
        spec = (specs or {}).get(task) or get_task(task)
        for split in spec.dev_splits:
            column = spec.columns[split]
            scores = sel["dev"][split]
            rows.append({
                "task": column,
                "metric": _METRIC_NAMES[spec.main_metric],
                "dev_median": round(100 * scores[spec.main_metric], 1),
                "all_dev_metrics": " / ".join(f"{_METRIC_NAMES[m]} {100 * v:.1f}"
                                              for m, v in scores.items()),
                "best_config": sel["config"],
                "seeds": len(sel["seeds"]),
                "paper_24hbert_test": PAPER_24HBERT_TEST.get(column),
                "bert_base_test": BERT_BASE_TEST.get(column),
            })
    return rows


def write_results_table(rows: list[dict], out_dir: str | os.PathLike, model_name: str) -> dict[str, Path]:
    """Write ``results-<model>.md`` and ``results-<model>.csv``; return their paths.

    Our numbers are dev-set medians of the best configuration; the paper columns are GLUE
    test-set scores, so they compare the shape, not the decimals.
    """
    out_dir = Path(out_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    header = ["task", "metric", "dev_median", "all_dev_metrics", "best_config", "seeds",
              "paper_24hbert_test", "bert_base_test"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    titles = ["Task", "Metric", f"{model_name} (dev, median)", "All dev metrics", "Best config",
              "Seeds", "24hBERT (paper, test)", "BERT-base (paper, test)"]
    md = [f"Finetuning results for {model_name}: dev-set median over seeds of the best configuration; "
          "the paper columns are GLUE test-set scores.", "",
          "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        md.append("| " + " | ".join("–" if r[h] is None else str(r[h]) for h in header) + " |")
    paths = {"md": out_dir / f"results-{safe}.md", "csv": out_dir / f"results-{safe}.csv"}
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    atomic_write_text(paths["csv"], buf.getvalue())
    return paths


def write_submission(run_dirs: dict[str, str | os.PathLike], out_dir: str | os.PathLike,
                     specs: dict[str, TaskSpec] | None = None) -> Path:
    """Collect each task's chosen run's test predictions into the GLUE leaderboard's format.

    ``run_dirs`` maps a task to the run whose predictions to submit (the median seed of the
    best configuration). Writes ``out_dir/submission/<CoLA.tsv, MNLI-m.tsv, ...>`` (columns
    ``index``, ``prediction``) and ``out_dir/submission.zip``.
    """
    out_dir = Path(out_dir)
    files = {}
    for task, rdir in run_dirs.items():
        spec = (specs or {}).get(task) or get_task(task)
        for split, name in spec.submission_files.items():
            src = Path(rdir) / f"predictions-{split}.tsv"
            if src.exists():
                files[name] = src.read_text()
    if not files:
        raise FileNotFoundError("no test predictions found in the chosen runs: load the tasks' "
                                "test.tsv files too (the GLUE download has them)")
    with atomic_path(out_dir / "submission") as tmp:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
    with atomic_path(out_dir / "submission.zip") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in sorted(files.items()):
                zf.writestr(name, text)
    return out_dir / "submission.zip"


def run_glue(model_path: str | os.PathLike, tasks: list[TaskData], grid: GridConfig,
             out_dir: str | os.PathLike, model_name: str | None = None, redo: bool = False) -> dict:
    """Grid-search every task, pick the median of the best config, write table and submission.

    ``redo`` finetunes again the finished runs whose settings changed (see :func:`grid_search`).

    Returns ``{"selections", "rows", "table" (paths), "submission" (path or None)}``.
    """
    out_dir = Path(out_dir)
    model_name = model_name or Path(model_path).resolve().name  # "." names the folder too
    selections, chosen, specs = {}, {}, {}
    for data in tasks:
        results = grid_search(model_path, data, grid, out_dir, redo=redo)
        sel = select_best(results, data.spec)
        selections[data.spec.name] = sel
        specs[data.spec.name] = data.spec
        chosen[data.spec.name] = out_dir / "runs" / data.spec.name / sel["config"] / str(sel["median_run"])
    atomic_write_json(out_dir / f"selections-{model_name}.json", selections)
    rows = results_rows(selections, specs)
    table = write_results_table(rows, out_dir, model_name)
    try:
        submission = write_submission(chosen, out_dir, specs)
    except FileNotFoundError:
        submission = None  # no test files were given
    return {"selections": selections, "rows": rows, "table": table, "submission": submission}




# ---- cost -----------------------------------------------------------------------------------


def gpu_seconds_per_example(gpu: str = "titan-v", model: str = "large", seq_len: int = 128) -> float:
    """Seconds one training example of ``model`` takes on ``gpu``, by bbert's budget arithmetic.

    The training FLOPs of one sequence (``bbert.speed.training_flops_per_sequence``, no MLM
    head: the classification head is negligible) over the GPU's table peak
    (``bbert.speed.KNOWN_GPUS``) times the planner's MFU (``bbert.budget.DEFAULT_MFU``). ``seq_len=128`` is the padded maximum: dynamic padding
    makes most GLUE batches shorter, so this errs on the long side.
    """
    card = get_gpu(gpu)
    flops = training_flops_per_sequence(model_config(model), seq_len, masked_fraction=0.0)
    return 1.0 / seq_per_s_at_mfu(flops, DEFAULT_MFU, card.peak_tflops * 1e12)


def grid_cost(grid: GridConfig, seconds_per_example: float, speed_factor: float = 1.0,
              train_sizes: dict[str, int] | None = None) -> list[dict]:
    """What ``grid`` costs per task: example-epochs and hours.

    ``seconds_per_example`` is the time of one training example for one epoch where it was
    measured; the device that will run the grid is ``speed_factor`` times faster. A task's
    example-epochs are its training-set size x the sum of epochs over the grid's configurations
    x seeds (the batch size changes the number of steps, not the work per example). Sizes
    default to :data:`bbert.glue.tasks.GLUE_TRAIN_SIZES`. The last row is the total.
    """
    sizes = GLUE_TRAIN_SIZES if train_sizes is None else train_sizes
    epochs_per_example = sum(c.num_epochs for c in grid.runs())
    rows = []
    for task, size in sizes.items():
        example_epochs = size * epochs_per_example
        rows.append({"task": task, "train_examples": size, "runs": len(grid.runs()),
                     "example_epochs": example_epochs,
                     "hours": example_epochs * seconds_per_example / speed_factor / 3600})
    rows.append({"task": "total", "train_examples": sum(sizes.values()), "runs": len(grid.runs()) * len(sizes),
                 "example_epochs": sum(r["example_epochs"] for r in rows),
                 "hours": sum(r["hours"] for r in rows)})
    return rows
