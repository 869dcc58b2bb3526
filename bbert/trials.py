"""A search trial is an ordinary run dir: its grid point, its config, its row, whether it is done.

The plain grid (:mod:`bbert.search`) and the Optuna study (:mod:`bbert.study`) share these, so
both name a trial's folder the same way (``lr=0.001,batch_size=32``), build its config the same
way (the grid's values laid over the base config through ``bbert.configs.build_config``) and
read the same row back from its metrics.

A trial is reused (skipped when finished, resumed when interrupted) only when everything that
made it is the same: its full config (the run dir's path aside) and the data's fingerprint
(``bbert.data.data_fingerprint``, so a copy of the same data dir elsewhere is the same data).
A run dir made by anything else is refused in one line before any trial runs
(:func:`check_reusable`): a search with another base config goes into a new ``--out``, and
the old trials stay as they are.

Chapter: ``notebooks/06_findings.ipynb``.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import yaml

from bbert import configs
from bbert.data import data_fingerprint, load_manifest
from bbert.engines import check_engine
from bbert.identity import changed_fields
from bbert.run_dir import EndReason, config_path, latest_checkpoint, read_budget, read_metrics
from bbert.train_config import TrainConfig

# Trials that ended for one of these reasons are done; interrupted ones are resumed.
RAN_TO_THE_END = (EndReason.BUDGET, EndReason.MAX_STEPS)  # a final validation loss that ranks the trial
STOPPED_EARLY = (EndReason.EARLY_STOP, EndReason.NAN, EndReason.PRUNED)  # budget left unspent
FINISHED_REASONS = RAN_TO_THE_END + STOPPED_EARLY


class SearchInterrupted(KeyboardInterrupt):
    """A trial was interrupted (Ctrl-C, SIGTERM) and saved: the whole search stops; a re-run resumes it."""


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in a fixed order (the last key varies fastest).

    A value may be a dict of fields that change together: ``{"batch": [{"batch_size": 16,
    "debug.step_time_seconds": 1.5}, {"batch_size": 32, "debug.step_time_seconds": 3.0}]}``.
    """
    if not grid:
        raise ValueError("the search grid is empty: give at least one field and its values, "
                         "e.g. {'lr': [5e-4, 1e-3]}")
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


def identity(config: TrainConfig | dict, data: dict | None = None) -> dict:
    """What made a run: its config (a ``TrainConfig`` or its dict) without the paths, and the
    fingerprint of its data (default: read from the config's data dir), as plain JSON values."""
    fields = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    if data is None:
        data = data_fingerprint(load_manifest(fields["data_dir"]))
    fields = {k: v for k, v in fields.items() if k not in ("run_dir", "data_dir")}
    return json.loads(json.dumps({**fields, "data": data}))


def check_reusable(config: TrainConfig, data: dict | None = None) -> None:
    """Refuse, in one line, a trial run dir that holds a run made by anything but ``config``.

    The run's latest checkpoint holds the config and the data fingerprint it was made with; a
    run dir without a checkpoint holds nothing to reuse (the trial starts it again).
    """
    run_dir = Path(config.run_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None or not config_path(ckpt).is_file():
        return
    new = identity(config, data)
    old_data = read_budget(ckpt).get("data", new["data"])  # an old checkpoint without it: not compared
    changed = changed_fields(identity(yaml.safe_load(config_path(ckpt).read_text()), old_data), new)
    if changed:
        raise configs.UsageError(
            f"--out {run_dir.parent} holds trial {run_dir.name} made with another base config or data "
            f"(changed: {', '.join(changed)}); a trial is reused only when everything that made it is "
            "the same: choose a new --out for this search (the old trials are kept as they are)")


def prepare_trials(base: TrainConfig, grid: dict[str, list], out_dir) -> list[tuple[dict, TrainConfig]]:
    """The grid's ``(values, config)`` pairs, values parsed and every config checked before any trial runs.

    Refused in one line: a value given twice (``lr=1e-3,0.001``), and an existing trial run dir
    made with another config or data (:func:`check_reusable`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise configs.UsageError(f"--out {out_dir} is a file, not a folder; choose a folder for the trials' run dirs")
    expand_grid(grid)  # the grid's own shape first
    parse_values(base, grid, out_dir)  # a value given twice would run once and be listed twice
    points = [parse_point(base, params, out_dir) for params in expand_grid(grid)]
    configs_ = [trial_config(base, params, out_dir / trial_name(params)) for params in points]
    data = {}
    for config in configs_:
        config.validate()  # a bad grid value (or one the data can't take) fails before any trial runs
        check_engine(config)
        if config.data_dir not in data:
            data[config.data_dir] = data_fingerprint(load_manifest(config.data_dir))
        check_reusable(config, data[config.data_dir])
    return list(zip(points, configs_))


def parse_values(base: TrainConfig, grid: dict[str, list], out_dir) -> dict[str, list]:
    """Each field's values as its config holds them, each checked alone (``TrainConfig.validate``,
    ``check_engine``); a value given twice (``1e-3,0.001``) is refused."""
    parsed = {}
    for key, values in grid.items():
        parsed[key] = [parse_point(base, {key: v}, out_dir)[key] for v in values]
        for value in parsed[key]:
            config = trial_config(base, {key: value}, Path(out_dir) / "check")
            config.validate()
            check_engine(config)
        names = [trial_name({key: v}) for v in parsed[key]]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            given = [str(v) for v, n in zip(values, names) if n == twice]
            raise configs.UsageError(f"--grid {key} gives {twice.partition('=')[2]} twice "
                                     f"({' and '.join(given)}); give each value once")
    return parsed


def parse_point(base: TrainConfig, params: dict, out_dir) -> dict:
    """The trial's values as its config holds them (values from the command line are strings)."""
    config = trial_config(base, params, out_dir)
    return {key: ({k: _field(config, k) for k in value} if isinstance(value, dict) else _field(config, key))
            for key, value in params.items()}
