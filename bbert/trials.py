"""A search trial is an ordinary run dir: its grid point, its config, its row, whether it is done.

The plain grid (:mod:`bbert.search`) and the Optuna study (:mod:`bbert.study`) share these, so
both name a trial's folder the same way (``lr=0.001,batch_size=32``), build its config the same
way (the grid's values laid over the base config through ``bbert.configs.build_config``) and
read the same row back from its metrics.

Chapter: ``notebooks/06_findings.ipynb``.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

from bbert import configs
from bbert.engines import check_engine
from bbert.run_dir import EndReason, read_metrics
from bbert.train_config import TrainConfig

# Trials that ended for one of these reasons are done; interrupted ones are resumed.
RAN_TO_THE_END = (EndReason.BUDGET, EndReason.MAX_STEPS)  # a final validation loss that ranks the trial
STOPPED_EARLY = (EndReason.EARLY_STOP, EndReason.NAN, EndReason.PRUNED)  # budget left unspent
FINISHED_REASONS = RAN_TO_THE_END + STOPPED_EARLY


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in a fixed order (the last key varies fastest).

    A value may be a dict of fields that change together: ``{"batch": [{"batch_size": 16,
    "debug.step_time_seconds": 1.5}, {"batch_size": 32, "debug.step_time_seconds": 3.0}]}``.
    """
    if not grid:
        raise ValueError("the search grid is empty: give at least one field with values, e.g. lr=[5e-4, 1e-3]")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid field {key!r} needs a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def trial_name(params: dict) -> str:
    """The trial's folder name: ``lr=0.001,batch_size=32`` (readable, and the same on every run)."""
    return ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in _flat(params).items())


def trial_config(base: TrainConfig, params: dict, run_dir) -> TrainConfig:
    """``base`` with the trial's values (dotted keys reach nested fields, e.g. ``early_stop.max_val_loss``;
    ``model.X`` a model override, as with ``--set``)."""
    return configs.build_config(TrainConfig, base, updates={**_flat(params), "run_dir": str(run_dir)})


def _flat(params: dict) -> dict:
    # a grid value that is a dict sets several fields together, e.g. a batch size and its step time
    flat = {}
    for key, value in params.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def _field(config, key: str):
    value = config
    for part in TrainConfig.dotted_key(key, None)[0].split("."):  # where trial_config put it
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


def trial_result(run_dir, params: dict | None = None) -> dict:
    """One row of the search table, read from a trial's run dir.

    ``val_loss`` is the last validation loss (the run's final one when it reached its budget),
    ``end_reason`` the reason in its ``end`` record (None while it has not ended).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    vals = [r["val_loss"] for r in records if r.get("type") == "val"]
    end = next((r for r in reversed(records) if r.get("type") == "end"), None)
    last = records[-1] if records else {}
    return {"trial": run_dir.name, **(params or {}), "run_dir": str(run_dir),
            "end_reason": end["reason"] if end else None,
            "steps": last.get("step", 0), "elapsed_seconds": last.get("elapsed_seconds", 0.0),
            "val_loss": vals[-1] if vals else math.nan}


def is_finished(run_dir) -> bool:
    """True when the trial's metrics end with an ``end`` record that is not an interruption."""
    return trial_result(run_dir)["end_reason"] in FINISHED_REASONS


def prepare_trials(base: TrainConfig, grid: dict[str, list], out_dir) -> list[tuple[dict, TrainConfig]]:
    """The grid's ``(values, config)`` pairs, values parsed and every config checked before any trial runs."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise configs.UsageError(f"--out {out_dir} is a file, not a folder; choose a folder for the trials' run dirs")
    # values from the command line are strings: name each trial by its parsed values
    points = [{key: ({k: _field(config, k) for k in value} if isinstance(value, dict) else _field(config, key))
               for key, value in params.items()}
              for params, config in ((p, trial_config(base, p, out_dir)) for p in expand_grid(grid))]
    configs_ = [trial_config(base, params, out_dir / trial_name(params)) for params in points]
    for config in configs_:
        config.validate()  # a bad grid value (or one the data can't take) fails before any trial runs
        check_engine(config)
    return list(zip(points, configs_))
