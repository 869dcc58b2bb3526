"""Budgeted hyperparameter search: a grid of ordinary pretraining runs, bad ones stopped early.

24hBERT chose its recipe with a grid over peak learning rate, batch size and warm-up
proportion, and stopped every trial whose validation loss was still high after a few hours
(Izsak et al. 2021). Here each trial is an ordinary budgeted run dir, made by
``bbert.pretrain`` from the base config with the trial's values laid over it, so a trial can be
inspected (``bbert.read_metrics``), resumed, exported and finetuned like any other run::

    results = search(base, {"lr": [5e-4, 1e-3], "batch_size": [32, 64]}, "runs/search")
    print(search_table(results))
    best = best_trial(results)

Switch the early stop on in the base config (``early_stop.enabled=true`` with a
``max_val_loss`` and ``after_minutes``); what the stopped trials did not spend is
:func:`budget_saved`. A second call skips the trials that finished (their metrics end with an
``end`` record other than ``interrupted``) and resumes interrupted ones from their checkpoints,
but only when everything that made a trial is the same (its config and the data's fingerprint,
:func:`bbert.trials.check_reusable`): a call with another base config or other data is refused
in one line, naming what changed, before anything runs; give that search a new ``--out`` (the
old trials are never overwritten). Ctrl-C (or SIGTERM) stops the whole search once the running
trial has saved its checkpoint, with exit code 130; the same command resumes it.

The command line runs the same search::

    bbert search --preset tiny-cpu --set data_dir=data/sample --grid lr=5e-4,1e-3 \
        --grid batch_size=32,64 --out runs/search
    bbert search ... --trial 3      # only the fourth trial of the grid, e.g. one job of an array
    bbert search ... --sampler tpe --range lr=1e-4:3e-3:log --range warmup_proportion=0:0.1 \
        --n-trials 12 --out runs/tpe   # sampled by Optuna's TPE instead of a grid

The grid is the paper's method and the default (``--sampler grid``). ``--sampler tpe|random``
draws ``--n-trials`` trials from ranges (``FIELD=LO:HI``: ints when both ends are ints,
``:log`` for a log scale) and ``--grid`` fields (then categorical choices), through the Optuna
study below, with the same run dirs, storage, pruners and resume.

This loop runs trials one after the other, which is what a single machine (and the book) wants.
Across GPUs or machines, keep the trial as the unit. ``--pruner asha`` (or ``hyperband``) runs
the same grid as an Optuna study (:mod:`bbert.study`): successive halving stops the trials
that are behind at each rung of the time budget instead of at one fixed threshold, and every
process that runs the same command (on any machine that sees ``--out`` and the ``--storage``
database) asks the study for its next trial::

    bbert search ... --grid lr=5e-4,1e-3,2e-3 --out runs/search --pruner asha   # in each process

A job array works too (Slurm ``--array=0-N`` with ``--trial $SLURM_ARRAY_TASK_ID``, all jobs
writing to one shared ``--out``), because a trial is a folder that any process can finish or read.

Chapter: ``notebooks/06_findings.ipynb``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bbert import configs
from bbert.study import SAMPLERS, STUDY_PRUNERS, Range, search_study
from bbert.train import pretrain
from bbert.train_config import TrainConfig
from bbert.trials import (RAN_TO_THE_END, STOPPED_EARLY, SearchInterrupted, is_finished, prepare_trials, trial_name,
                          trial_result)

PRUNERS = ("none", *STUDY_PRUNERS)  # none: every trial runs (early stop aside); else bbert.study


def search(base: TrainConfig, grid: dict[str, list], out_dir, trials: list[int] | None = None,
           verbose: bool = True, pruner: str = "none", sampler: str = "grid", ranges: dict[str, Range] | None = None,
           **study_options) -> list[dict]:
    """Run every trial of ``grid`` over ``base`` as a run dir under ``out_dir``; return the table rows.

    Each row holds the trial's values, its ``run_dir``, ``end_reason``, ``steps``,
    ``elapsed_seconds`` (budget spent), final ``val_loss`` and ``skipped`` (True when it had
    already finished and was not run again). ``trials`` picks grid indices to run (the others are
    only read), e.g. one index per job of a job array.

    ``pruner="asha"`` or ``"hyperband"``, or ``sampler="tpe"`` or ``"random"`` (which also take
    ``ranges``, e.g. ``{"lr": Range(1e-4, 3e-3, log=True)}``), runs the search as an Optuna study
    instead (:func:`bbert.study.search_study`, which takes the ``study_options``: ``storage``,
    ``study_name``, ``n_trials``, ``min_resource_s`` (the first rung), ``reduction_factor``,
    ``sampler_seed``); its rows also hold the trial's Optuna ``state`` and ``number``.

    A trial that was interrupted (Ctrl-C, SIGTERM; it saved a checkpoint) stops the whole search
    with :class:`bbert.trials.SearchInterrupted`, a ``KeyboardInterrupt``; call again to resume.
    """
    if pruner not in PRUNERS:
        raise configs.UsageError(f"--pruner {pruner!r} is not one of {', '.join(PRUNERS)}; "
                                 "asha = successive halving, hyperband, none = the plain grid")
    if sampler not in SAMPLERS:
        raise configs.UsageError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}; grid = every "
                                 "point (the paper's method), tpe or random = Optuna's samplers")
    if pruner != "none" or sampler != "grid" or ranges:
        if trials is not None:
            raise configs.UsageError("--trial picks grid indices of the plain grid (--pruner none); with a "
                                     "pruner or sampler every process asks the study for its next trial: drop --trial")
        return search_study(base, grid, out_dir, pruner=pruner, sampler=sampler, ranges=ranges, verbose=verbose,
                            **study_options)
    given = sorted(k for k, v in study_options.items() if v is not None)
    if given:
        raise configs.UsageError(f"{', '.join('--' + k.replace('_', '-') for k in given)} set(s) up an Optuna "
                                 "study: add --pruner asha (or hyperband) or --sampler tpe, or drop it")
    prepared = prepare_trials(base, grid, out_dir)
    chosen = set(range(len(prepared))) if trials is None else set(trials)
    bad = sorted(i for i in chosen if not 0 <= i < len(prepared))
    if bad:
        raise ValueError(f"trial index {bad[0]} is outside the grid's {len(prepared)} trials (0..{len(prepared) - 1})")
    rows = []
    for index, (params, config) in enumerate(prepared):
        run_dir = Path(config.run_dir)
        skipped = is_finished(run_dir)
        if index in chosen and not skipped:
            if verbose:
                print(f"[search] trial {index + 1}/{len(prepared)}: {run_dir.name}", flush=True)
            pretrain(config)  # resume="auto": an interrupted trial continues from its checkpoint
            if trial_result(run_dir)["end_reason"] == "interrupted":
                raise SearchInterrupted(f"trial {run_dir.name} was interrupted; its checkpoint is kept: run the "
                                        "same command again to resume it and go on")
        elif verbose and index in chosen:
            print(f"[search] trial {index + 1}/{len(prepared)}: {run_dir.name} finished before, skipped", flush=True)
        rows.append({**trial_result(run_dir, params), "skipped": skipped,
                     "budget_seconds": config.time_budget_seconds})
    return rows


def best_trial(results: list[dict]) -> dict | None:
    """The trial with the lowest final validation loss among those that ran to their end."""
    done = [r for r in results if r["end_reason"] in RAN_TO_THE_END and math.isfinite(r["val_loss"])]
    return min(done, key=lambda r: r["val_loss"]) if done else None


def budget_saved(results: list[dict]) -> tuple[float, float]:
    """``(seconds saved, seconds the whole grid would take)``: what the stopped trials did not spend."""
    total = sum(r["budget_seconds"] for r in results)
    saved = sum(max(r["budget_seconds"] - r["elapsed_seconds"], 0.0) for r in results
                if r["end_reason"] in STOPPED_EARLY)
    return saved, total


def _cell(value) -> str:
    if isinstance(value, dict):
        return trial_name(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def search_table(results: list[dict]) -> str:
    """The search as a Markdown table, best trial marked, sorted by final validation loss.

    A grid value that sets several fields shows the field named like its key (``batch_size``).
    """
    best = best_trial(results)
    keys = [k for k in results[0] if k not in ("trial", "run_dir", "end_reason", "steps", "elapsed_seconds",
                                               "val_loss", "skipped", "budget_seconds", "state",
                                               "number")] if results else []
    lines = ["| " + " | ".join(keys + ["end", "steps", "budget used", "final val loss", ""]) + " |",
             "|" + " --- |" * (len(keys) + 5)]
    for r in sorted(results, key=lambda r: (not math.isfinite(r["val_loss"]), r["val_loss"])):
        used = r["elapsed_seconds"] / r["budget_seconds"] if r["budget_seconds"] else math.nan
        cells = [_cell(r[k][k] if isinstance(r[k], dict) and k in r[k] else r[k]) for k in keys]
        cells += [str(r["end_reason"]), str(r["steps"]), f"{used:.0%}", f"{r['val_loss']:.3f}",
                  "**best**" if best is not None and r["run_dir"] == best["run_dir"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    saved, total = budget_saved(results)
    if total:
        lines.append(f"\nEarly stopping saved {saved:.0f} s of the grid's {total:.0f} s ({saved / total:.0%}; "
                     "threshold, pruner and NaN stops together).")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["lr=5e-4,1e-3", "batch_size=32,64"]`` -> ``{"lr": ["5e-4", "1e-3"], "batch_size": ["32", "64"]}``.

    Values stay strings; each trial's config parses them against the field's type.
    """
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = _split_values(raw)
        if not sep or not key.strip() or not values:
            raise configs.UsageError(f"--grid {item!r} must look like FIELD=V1,V2 (e.g. --grid lr=5e-4,1e-3)")
        if key.strip() in grid:
            raise configs.UsageError(f"--grid {key.strip()} is given twice; give all its values in one "
                                     f"--grid {key.strip()}=V1,V2")
        grid[key.strip()] = values
    return grid


def parse_ranges(items: list[str], grid: dict | None = None) -> dict[str, Range]:
    """``["lr=1e-4:3e-3:log", "warmup_steps=0:100"]`` -> ``{"lr": Range(1e-4, 3e-3, True), ...}``.

    Both ends ints (no ``.`` or exponent): an int range; else floats. ``:log``: a log scale.
    """
    ranges: dict[str, Range] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, parts = key.strip(), raw.split(":")
        log = len(parts) == 3 and parts[2].strip() == "log"
        try:
            if not sep or not key or len(parts) not in (2, 2 + log):
                raise ValueError
            ends = [int(p) if p.strip().lstrip("+-").isdigit() else float(p) for p in parts[:2]]
            if not all(math.isfinite(e) for e in ends):
                raise ValueError
        except ValueError:
            raise configs.UsageError(f"--range {item!r} must look like FIELD=LO:HI or FIELD=LO:HI:log "
                                     "(e.g. --range lr=1e-4:3e-3:log)") from None
        if key in ranges or key in (grid or {}):
            raise configs.UsageError(f"--range {key} is given twice (or also as --grid {key}); give each field once")
        if not all(isinstance(e, int) for e in ends):
            ends = [float(e) for e in ends]
        ranges[key] = Range(*ends, log)
    return ranges


def _split_values(raw: str) -> list[str]:
    # commas inside brackets belong to one value: betas=[0.9,0.98],[0.9,0.999]
    values, depth, start = [], 0, 0
    for i, char in enumerate(raw):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    return [v.strip() for v in values if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bbert search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-cpu", help="training preset to start from (default tiny-cpu)")
    configs.add_config_arguments(parser, "TrainConfig")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                        help="a searched field and its values (repeatable), e.g. --grid lr=5e-4,1e-3")
    parser.add_argument("--range", action="append", default=[], metavar="FIELD=LO:HI[:log]",
                        help="a sampled field's interval (repeatable; needs --sampler tpe or random), "
                             "e.g. --range lr=1e-4:3e-3:log")
    parser.add_argument("--out", required=True, help="folder of the trials' run dirs")
    parser.add_argument("--trial", type=int, action="append", metavar="INDEX",
                        help="run only this grid index (0-based, repeatable); the others are only read")
    study = parser.add_argument_group("sampling and pruning (an Optuna study that every process of the same "
                                      "command joins)")
    study.add_argument("--sampler", default="grid", metavar="|".join(SAMPLERS),
                       help="grid: every --grid point (default, the paper's method); tpe, random: Optuna's "
                            "samplers over --range and --grid fields")
    study.add_argument("--sampler-seed", type=int, metavar="S",
                       help="seed of the tpe or random sampler (default: the config's seed)")
    study.add_argument("--pruner", default="none", metavar="|".join(PRUNERS),
                       help="asha: successive halving, hyperband, none: the plain grid (default)")
    study.add_argument("--storage", metavar="URL", help="the study's database (default sqlite:///OUT/study.db)")
    study.add_argument("--study-name", help="the study's name in the storage (default: the --out folder's name)")
    study.add_argument("--n-trials", type=int, metavar="N",
                       help="trials of the whole study (default: the grid's size; tpe and random need it)")
    study.add_argument("--min-resource-s", type=int, metavar="S",
                       help="budget seconds of the first rung (default: the first validation); put it after "
                            "the loss leaves its early plateau")
    study.add_argument("--reduction-factor", type=int, metavar="ETA",
                       help="a rung keeps the best 1/ETA of the trials (default 3)")
    return parser


@configs.command("bbert search")
def main(argv: list[str] | None = None) -> int:
    """``bbert search`` / ``python -m bbert.search``: exit 0 when done, 2 on bad input, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    base = configs.build_config(TrainConfig, TrainConfig.from_preset(args.preset), args.config, args.assignments)
    grid = parse_grid(args.grid)
    ranges = parse_ranges(args.range, grid)
    if not grid and not ranges:
        raise configs.UsageError("nothing to search: give a field and its values, e.g. --grid lr=5e-4,1e-3 "
                                 "(or a range, e.g. --sampler tpe --range lr=1e-4:3e-3:log --n-trials 8)")
    options = {k: getattr(args, k) for k in ("storage", "study_name", "n_trials", "min_resource_s", "reduction_factor",
                                             "sampler_seed")}
    try:
        results = search(base, grid, args.out, trials=args.trial, pruner=args.pruner, sampler=args.sampler,
                         ranges=ranges, **options)
    except KeyboardInterrupt as e:  # a trial saved its checkpoint (or none had started): stop the search
        print(f"bbert search: {str(e) or 'interrupted; run the same command again to go on'}", file=sys.stderr)
        return 130
    print(search_table(results))
    best = best_trial(results)
    print(f"best: {best['run_dir']} (final validation loss {best['val_loss']:.4f})" if best
          else "best: none yet (no trial has reached its budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
