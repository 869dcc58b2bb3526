"""The budgeted search as an Optuna study: sampled trials, and weak ones stopped early.

24hBERT's search stopped a trial whose validation loss was above a fixed threshold after a fixed
time (``early_stop`` in the base config, the grid of :mod:`bbert.search`). Successive halving
needs no threshold: at each *rung* of the budget (``min_resource``, then ``reduction_factor``
times more, ...) a trial goes on only if its validation loss is among the best
``1/reduction_factor`` of the trials that reached that rung. ASHA (Li et al. 2020, "A System for
Massively Parallel Hyperparameter Tuning") decides this asynchronously, as each trial reaches
a rung, so many workers never wait for each other; Hyperband (Li et al. 2018) runs several
halving brackets with different first rungs. The resource is budget seconds: a trial reports
its validation loss at ``int(elapsed_seconds)``, so rungs are seconds of the time budget::

    rows = search(base, {"lr": [5e-4, 1e-3, 2e-3]}, "runs/search", pruner="asha")
    bbert search ... --grid lr=5e-4,1e-3,2e-3 --out runs/search --pruner asha

The first rung (``min_resource_s``, ``--min-resource-s``; default: the first validation) should
come after the loss has left its early plateau: before it, every trial's loss is about the same,
and the ranking at the rung is noise. A caller that knows where the plateau ends (a pilot run's
validations) passes that time.

A search may also *sample* its points instead of running a grid (``sampler="tpe"`` or
``"random"``, ``--sampler``): a field may then take a :class:`Range` (``--range
lr=1e-4:3e-3:log``) as well as a list of values (a categorical choice), and ``n_trials`` says
how many trials the whole study runs. Optuna's ``TPESampler`` / ``RandomSampler`` draw each
trial, seeded with ``seed + trial number``: a re-run of the same command draws the same points,
and processes that share the study never draw the same one. Sampled floats are rounded to 4
significant digits, so a trial's folder name (``lr=0.0004217``) is its exact config.

Trials are the same run dirs as the plain grid's, and the study lives in Optuna's RDB storage
(``--storage``, default ``sqlite:///<out>/study.db``; not one in memory, which no other process
sees). Every process that runs the same command joins the same study and asks it for its next
trial, so one search spreads over many processes and machines (give them one ``--out`` on a
shared filesystem, and for many machines a database server, e.g. ``--storage
postgresql://host/db``). The grid sampler is Optuna's ``GridSampler``: trial number ``i`` takes
grid point ``i`` of one fixed shuffle (the same in every process), so concurrent processes get
different points; a process stops when every point (or ``n_trials`` trials) is finished or held
by another process, and a trial that still lands on a held point, or past ``n_trials`` (a race
at the end), is failed without running. A process records a heartbeat for its trial; a trial
whose process was killed is failed after a grace period (:mod:`bbert.storage`) and queued again, and the next
process that asks resumes its run dir from its checkpoint. An interrupted trial (Ctrl-C,
SIGTERM) is queued again and the search stops (:class:`bbert.trials.SearchInterrupted`); run
the same command again to go on. A study remembers the base config and data it searches: a
command with others is refused in one line (choose another ``--out`` or ``--study-name``).

Chapter: ``notebooks/06_findings.ipynb``.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple

from bbert import configs
from bbert.env import env_flag
from bbert.optim import Schedule
from bbert.storage import check_same_search, open_storage, retry_races
from bbert.train import pretrain
from bbert.train_config import TrainConfig
from bbert.trials import (SearchInterrupted, check_reusable, identity, is_finished, parse_values,
                          prepare_trials, trial_config, trial_name, trial_result)

STUDY_PRUNERS = ("asha", "hyperband")
SAMPLERS = ("grid", "tpe", "random")  # grid: the paper's method; tpe, random: Optuna's, for ranges too


class Range(NamedTuple):
    """A sampled field's interval ``[lo, hi]``: ints when both ends are ints, ``log`` for a log scale."""
    lo: float
    hi: float
    log: bool = False


class _Interrupted(Exception):
    """The trial's run was interrupted (Ctrl-C, SIGTERM): it is queued again, this process stops."""


class _Held(Exception):
    """The point is another trial's, or the study has its trials (a race at the end): this one does not run."""


class _Quiet(logging.Filter):
    """Optuna logs every failed trial with its traceback; these ones are bbert's own way of stopping."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, (_Interrupted, _Held, KeyboardInterrupt, *configs.BAD_INPUT))
                    or record.getMessage().endswith("failed with value None."))


def _optuna():
    try:
        import optuna
    except ImportError:
        raise configs.UsageError("a pruner or sampler needs optuna: pip install 'bbert[search]'") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not env_flag("BBERT_VERBOSE"):  # bbert prints each trial; Optuna's INFO lines would repeat it
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _Quiet) for f in log.filters):
        log.addFilter(_Quiet())
    return optuna


def make_pruner(name: str, min_resource: int, max_resource: int, reduction_factor: int = 3):
    """Optuna's ``SuccessiveHalvingPruner`` (``"asha"``), ``HyperbandPruner`` or ``NopPruner`` (``"none"``);
    resources in seconds."""
    optuna = _optuna()
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=max_resource,
                                              reduction_factor=reduction_factor)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise configs.UsageError(f"--pruner {name!r} has no Optuna pruner; choose asha, hyperband or none")


def make_sampler(name: str, space: dict[str, list] | None = None, seed: int = 0):
    """``"grid"``: Optuna's ``GridSampler`` over ``space``; ``"tpe"`` / ``"random"``: its ``TPESampler`` /
    ``RandomSampler``, seeded anew for each trial with ``seed + trial number``."""
    optuna = _optuna()
    if name == "grid":
        return optuna.samplers.GridSampler(space)
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if name not in kinds:
        raise configs.UsageError(f"--sampler {name!r} is not one of {', '.join(SAMPLERS)}")

    class PerTrialSeed(optuna.samplers.BaseSampler):
        # one seed per trial number: reproducible, and distinct points in concurrent processes
        def __init__(self):
            self.inner = kinds[name](seed=seed)

        def before_trial(self, study, trial):
            self.inner = kinds[name](seed=seed + trial.number)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

    return PerTrialSeed()


def storage_url(storage: str | None, out_dir) -> str:
    """The study's storage (default ``sqlite:///<out>/study.db``; :mod:`bbert.storage` reads the
    rest); a database in memory, which no other process sees, is refused."""
    if storage is None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"
    if storage.startswith("sqlite:") and storage.rstrip("/") in ("sqlite:", "sqlite:///:memory:"):
        raise configs.UsageError(f"--storage {storage!r} is a database in memory, which no other process sees "
                                 "and which is lost at exit; give a file, e.g. sqlite:///runs/search/study.db")
    return storage


def study_attrs(base: TrainConfig, space: dict[str, list], sampler: str = "grid",
                ranges: dict[str, Range] | None = None) -> dict:
    """What a study searches, kept with it: the grid (or categorical choices), the sampler and its
    ranges, and the base config's identity (:func:`bbert.trials.identity`: config and data)."""
    return {"grid": space, "sampler": {"name": sampler, "ranges": {k: list(r) for k, r in (ranges or {}).items()}},
            "base": identity(base)}


def open_study(storage: str, study_name: str, sampler, pruner, attrs: dict | None = None):
    """Create or join the study ``study_name`` in ``storage`` (:mod:`bbert.storage`: SQLite,
    PostgreSQL or a journal file, with a heartbeat per trial).

    ``attrs`` (``{"grid": ..., "sampler": ..., "base": the base config's identity}``) is stored
    with a new study; joining one that holds other ``attrs`` is refused in one line.
    """
    optuna = _optuna()
    backend = open_storage(storage)
    study = retry_races(lambda: optuna.create_study(storage=backend, study_name=study_name, load_if_exists=True,
                                                    direction="minimize", sampler=sampler, pruner=pruner),
                        storage)
    check_same_search(study, storage, **(attrs or {}))
    return study


def _choice(value):
    # Optuna stores str/int/float/bool choices; a list or a dict of fields is stored by its label
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return trial_name(value) if isinstance(value, dict) else str(value)


def _round(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def search_study(base: TrainConfig, grid: dict[str, list], out_dir, pruner: str = "asha",
                 storage: str | None = None, study_name: str | None = None, n_trials: int | None = None,
                 min_resource_s: int | None = None, reduction_factor: int | None = None,
                 sampler: str = "grid", ranges: dict[str, Range] | None = None, sampler_seed: int | None = None,
                 verbose: bool = True) -> list[dict]:
    """Run (this process's share of) the search as an Optuna study; return the rows of the whole study.

    The rows are :func:`bbert.search.search`'s plus the trial's Optuna ``state`` (``"COMPLETE"``,
    ``"PRUNED"``, ``"RUNNING"``, ...; None before it started) and trial ``number``: with the grid
    sampler one per grid point, in grid order, else one per trial that ran, in order.
    ``n_trials`` counts trials of the whole study, over all processes (default: the grid's size;
    a sampler needs it). ``pruner`` is ``"asha"``, ``"hyperband"`` or ``"none"``;
    ``min_resource_s`` (the first rung, default: the first validation) and ``reduction_factor``
    (default 3) set its rungs. ``sampler="tpe"`` or ``"random"`` draws each trial's values from
    ``grid`` (categorical choices) and ``ranges`` (``{"lr": Range(1e-4, 3e-3, log=True)}``),
    seeded with ``sampler_seed`` (default: the base config's ``seed``) + the trial's number.
    """
    optuna = _optuna()
    out_dir = Path(out_dir)
    ranges = {k: Range(*r) for k, r in (ranges or {}).items()}
    sampled = sampler != "grid"
    if pruner not in (*STUDY_PRUNERS, "none"):
        raise configs.UsageError(f"--pruner {pruner!r} is not one of none, {', '.join(STUDY_PRUNERS)}")
    if sampler not in SAMPLERS:
        raise configs.UsageError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if ranges and not sampled:
        raise configs.UsageError("--range needs --sampler tpe or random (the grid sampler runs --grid values "
                                 "only): add --sampler tpe, or give the field's values with --grid")
    if sampled:
        values = parse_values(base, grid, out_dir)
        check_ranges(base, ranges, out_dir)
        if not values and not ranges:
            raise configs.UsageError("give at least one --range FIELD=LO:HI or --grid FIELD=V1,V2 to sample")
        if n_trials is None or n_trials < 1:
            raise configs.UsageError(f"--sampler {sampler} needs --n-trials N >= 1: how many trials the study runs")
        labels = {key: {_choice(v): v for v in vs} for key, vs in values.items()}
        space = {key: list(choices) for key, choices in labels.items()}
        prepared, index_of = [], {}
    else:
        prepared = prepare_trials(base, grid, out_dir)
        n_trials = len(prepared) if n_trials is None else n_trials
        if not 1 <= n_trials <= len(prepared):
            raise configs.UsageError(f"--n-trials {n_trials} must be between 1 and the grid's {len(prepared)} "
                                     "points (each point runs once)")
        space = {key: list(dict.fromkeys(_choice(params[key]) for params, _ in prepared)) for key in grid}
        index_of = {tuple(_choice(params[k]) for k in grid): i for i, (params, _) in enumerate(prepared)}
    if pruner == "none":
        given = [f for f, v in (("--min-resource-s", min_resource_s), ("--reduction-factor", reduction_factor))
                 if v is not None]
        if given:
            raise configs.UsageError(f"{', '.join(given)} set(s) a pruner's rungs: add --pruner asha (or hyperband)")
        min_resource = reduction_factor = 1
    else:
        if base.validation_every_minutes is None:
            raise configs.UsageError("a pruner ranks trials by their validation loss: set validation_every_minutes")
        min_resource = min_resource_s if min_resource_s is not None else max(int(base.validation_interval_seconds), 1)
        reduction_factor = 3 if reduction_factor is None else reduction_factor
        if min_resource < 1 or reduction_factor < 2:
            raise configs.UsageError(f"--min-resource-s must be >= 1 (got {min_resource}) and --reduction-factor "
                                     f">= 2 (got {reduction_factor})")
        if min_resource > base.time_budget_seconds:
            raise configs.UsageError(f"--min-resource-s {min_resource} is past the trials' budget of "
                                     f"{base.time_budget_seconds:g} s: the first rung must come within it "
                                     "(default: the first validation)")

    storage = storage_url(storage, out_dir)
    study_name = study_name or out_dir.resolve().name
    study = open_study(storage, study_name,
                       make_sampler(sampler, space, base.seed if sampler_seed is None else sampler_seed),
                       make_pruner(pruner, min_resource, int(base.time_budget_seconds), reduction_factor),
                       attrs=study_attrs(base, space, sampler, ranges))
    state = optuna.trial.TrialState
    live_states = (state.RUNNING, state.COMPLETE, state.PRUNED)
    requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)

    def point_of(trial) -> dict:
        # the trial's values as its config takes them (a grid value may be a dict of fields)
        if not sampled:
            return dict(prepared[index_of[tuple(trial.suggest_categorical(k, space[k]) for k in grid)]][0])
        point = {k: labels[k][trial.suggest_categorical(k, space[k])] for k in space}
        for k, r in ranges.items():
            point[k] = (trial.suggest_int(k, r.lo, r.hi, log=r.log) if isinstance(r.lo, int)
                        else _round(trial.suggest_float(k, r.lo, r.hi, log=r.log)))
        return point

    def config_of(point: dict) -> TrainConfig:
        if not sampled:
            return prepared[index_of[tuple(_choice(point[k]) for k in grid)]][1]
        return trial_config(base, point, out_dir / trial_name(point))

    finished_before = {str(config.run_dir) for _, config in prepared if is_finished(config.run_dir)}
    finished_before |= {t.user_attrs["run_dir"] for t in study.get_trials(deepcopy=False)
                        if "run_dir" in t.user_attrs and is_finished(t.user_attrs["run_dir"])}

    def frozen(trial):
        return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)

    def objective(trial):
        point = point_of(trial)
        config = config_of(point)
        run_dir = Path(config.run_dir)
        earlier = [t for t in study.get_trials(deepcopy=False, states=live_states) if t.number < trial.number]
        if sampled:
            taken = any(t.state == state.RUNNING and t.user_attrs.get("run_dir") == str(run_dir) for t in earlier)
            taken = taken or len(earlier) >= n_trials
        else:
            taken = any(t.params == trial.params for t in earlier)
        if taken:
            trial.set_user_attr("held", True)
            raise _Held(f"{run_dir.name} is another trial's, or the study has its {n_trials} trials")
        if sampled:
            config.validate()
            check_reusable(config)
        trial.set_user_attr("run_dir", str(run_dir))
        schedule = Schedule.from_config(config)

        def report(record: dict) -> bool:  # the trainer's on_validation hook: True prunes
            trial.report(record["val_loss"], int(record["elapsed_seconds"]))
            return not schedule.done(record["elapsed_seconds"], record["step"]) and trial.should_prune()

        if not is_finished(run_dir):
            if verbose:
                where = f"trial {trial.number + 1}/{n_trials}" if sampled else \
                    f"trial {trial.number} (grid point {index_of[tuple(trial.params[k] for k in grid)] + 1}/" \
                    f"{len(prepared)})"
                print(f"[search] {where}: {run_dir.name}", flush=True)
            try:
                pretrain(config, on_validation=report)  # resume="auto": a queued-again trial continues
            except BaseException:
                requeue(study, frozen(trial))
                raise
        row = trial_result(run_dir)
        trial.set_user_attr("end_reason", row["end_reason"])
        if row["end_reason"] == "interrupted":
            requeue(study, frozen(trial))
            raise _Interrupted(run_dir.name)
        if row["end_reason"] in ("budget", "max_steps") and math.isfinite(row["val_loss"]):
            return row["val_loss"]
        raise optuna.TrialPruned()  # pruned, early_stop or nan: stopped before its budget's end

    def work_left() -> bool:
        """True while a trial waits (queued again) or fewer than ``n_trials`` are taken."""
        optuna.storages.fail_stale_trials(study)  # a killed process's trial: failed and queued again
        trials = study.get_trials(deepcopy=False)
        if any(t.state == state.WAITING for t in trials):
            return True
        taken = {t.system_attrs.get("grid_id", -1 - t.number) if not sampled else t.number
                 for t in trials if t.state in live_states}
        return len(taken) < n_trials

    def stop_when_done(study, trial):
        if not work_left():
            study.stop()

    try:
        if work_left():
            study.optimize(objective, catch=(_Held,), callbacks=[stop_when_done], gc_after_trial=False)
    except _Interrupted as e:
        raise SearchInterrupted(f"trial {e} was interrupted; its checkpoint is kept and it is queued again: "
                                "run the same command again to go on") from None
    if sampled:
        return _sampled_rows(study, point_of, lambda point: config_of(point).time_budget_seconds, finished_before)
    return _grid_rows(study, prepared, index_of, list(grid), finished_before)


def check_ranges(base: TrainConfig, ranges: dict[str, Range], out_dir) -> None:
    """Refuse, in one line, a range that is empty, a log range that reaches 0, or an end the config refuses."""
    for key, (lo, hi, log) in ranges.items():
        shown = f"--range {key}={lo:g}:{hi:g}{':log' if log else ''}"
        if not lo < hi:
            raise configs.UsageError(f"{shown} is empty: its low end must be below its high end")
        if log and lo <= 0:
            raise configs.UsageError(f"{shown} is on a log scale, which needs a low end above 0: drop :log "
                                     "or raise the low end")
        for end in (lo, hi):
            config = trial_config(base, {key: end}, Path(out_dir) / "range-check")
            config.validate()


def _sampled_rows(study, point_of, budget_of, finished_before) -> list[dict]:
    latest = {}  # run dir -> its newest trial that was not held
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get("held") and "run_dir" in t.user_attrs:
            latest[t.user_attrs["run_dir"]] = t
    return [_row(t, t.user_attrs["run_dir"], point_of(t), finished_before, budget_of(point_of(t)))
            for t in sorted(latest.values(), key=lambda t: t.number)]


def _grid_rows(study, prepared, index_of, keys, finished_before) -> list[dict]:
    latest = {}  # grid index -> the point's newest trial that was not a duplicate
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("held") or set(t.params) != set(keys):
            continue
        latest[index_of[tuple(t.params[k] for k in keys)]] = t
    return [_row(latest.get(i), config.run_dir, params, finished_before, config.time_budget_seconds)
            for i, (params, config) in enumerate(prepared)]


def _row(trial, run_dir, params, finished_before, budget_seconds) -> dict:
    return {**trial_result(run_dir, params), "skipped": str(run_dir) in finished_before,
            "budget_seconds": budget_seconds,
            "state": trial.state.name if trial else None, "number": trial.number if trial else None}


__all__ = ["search_study", "open_study", "study_attrs", "storage_url", "make_pruner", "make_sampler", "Range", "SAMPLERS"]
