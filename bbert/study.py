"""The budgeted search as an Optuna study: successive halving stops the weak trials early.

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

Trials are the same run dirs as the plain grid's (same folder names, same rows), and the study
lives in Optuna's storage (``--storage``, default ``sqlite:///<out>/study.db``; :mod:`bbert.storage`). Every
process that runs the same command joins the same study and asks it for its next trial, so one
search spreads over many processes and machines (give them one ``--out`` on a shared
filesystem, and for many machines ``--storage journal:PATH`` or a database server, e.g.
``--storage postgresql://host/db``).
The sampler is Optuna's ``GridSampler``: trial number ``i`` takes grid point ``i`` of one fixed
shuffle (the same in every process), so concurrent processes get different points; a process
stops when every point is finished or held by another process, and a second trial that still
lands on a held point (a race at the grid's end) is failed without running. A process records a
heartbeat for its trial; a trial whose process was killed is failed after a grace period and
queued again, and the next process that asks resumes its run dir from its checkpoint. An
interrupted trial (Ctrl-C, SIGTERM) is queued again at once; run the command again to go on.

Chapter: ``notebooks/06_findings.ipynb``.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path

from bbert import configs
from bbert.env import env_flag
from bbert.optim import Schedule
from bbert.storage import check_same_search, open_storage
from bbert.trials import is_finished, prepare_trials, trial_name, trial_result
from bbert.train import pretrain
from bbert.train_config import TrainConfig

STUDY_PRUNERS = ("asha", "hyperband")


class _Interrupted(Exception):
    """The trial's run was interrupted (Ctrl-C, SIGTERM): it is queued again, this process stops."""


class _Held(Exception):
    """The grid point is already another trial's (a race at the grid's end): this one does not run."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise configs.UsageError("--pruner asha|hyperband needs optuna: pip install 'bbert[search]'") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not env_flag("BBERT_VERBOSE"):  # bbert prints each trial; Optuna's INFO lines would repeat it
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_pruner(name: str, min_resource: int, max_resource: int, reduction_factor: int = 3):
    """Optuna's ``SuccessiveHalvingPruner`` (``"asha"``) or ``HyperbandPruner``; resources in seconds."""
    optuna = _optuna()
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=max_resource,
                                              reduction_factor=reduction_factor)
    raise configs.UsageError(f"--pruner {name!r} has no Optuna pruner; choose asha or hyperband")


def open_study(storage: str, study_name: str, space: dict[str, list], pruner, base: dict | None = None):
    """Create or join the study ``study_name`` in ``storage`` (:mod:`bbert.storage`: SQLite, PostgreSQL or a
    journal file, with a heartbeat per trial); ``space`` and ``base`` must be those it was created with."""
    optuna = _optuna()
    import sqlalchemy

    backend = open_storage(storage)
    for attempt in range(5):
        try:
            study = optuna.create_study(storage=backend, study_name=study_name, load_if_exists=True,
                                        direction="minimize", sampler=optuna.samplers.GridSampler(space),
                                        pruner=pruner)
            break
        except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            # processes that start together race to create the study: the loser tries again
            if attempt < 4 and any(s in reason for s in ("UNIQUE constraint", "already exists", "locked")):
                time.sleep(0.5 + random.random())
                continue
            raise configs.UsageError(f"--storage {storage!r} could not be opened ({reason}); check the URL, its "
                                     "database driver and that the server or folder exists") from None
    check_same_search(study, storage, grid=space, base=base)
    return study


def _choice(value):
    # Optuna stores str/int/float/bool choices; a list or a dict of fields is stored by its label
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return trial_name(value) if isinstance(value, dict) else str(value)


def _work_left(study, n_trials: int) -> bool:
    """True while a trial waits (queued again) or fewer than ``n_trials`` grid points are taken."""
    optuna = _optuna()
    optuna.storages.fail_stale_trials(study)  # a killed process's trial: failed and queued again
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    if any(t.state == state.WAITING for t in trials):
        return True
    taken = {t.system_attrs.get("grid_id", -1 - t.number) for t in trials
             if t.state in (state.RUNNING, state.COMPLETE, state.PRUNED)}
    return len(taken) < n_trials


def search_study(base: TrainConfig, grid: dict[str, list], out_dir, pruner: str = "asha",
                 storage: str | None = None, study_name: str | None = None, n_trials: int | None = None,
                 min_resource_s: int | None = None, reduction_factor: int | None = None,
                 verbose: bool = True) -> list[dict]:
    """Run (this process's share of) the grid as an Optuna study; return the rows of the whole grid.

    The rows are :func:`bbert.search.search`'s (one per grid point, in grid order) plus the
    point's Optuna ``state`` (``"COMPLETE"``, ``"PRUNED"``, ``"RUNNING"``, ...; None before it
    started) and trial ``number``. ``n_trials`` (default: the grid's size) counts trials of the
    whole study, over all processes. ``min_resource_s`` (default: the first validation) and
    ``reduction_factor`` (default 3) set the rungs.
    """
    optuna = _optuna()
    if pruner not in STUDY_PRUNERS:
        raise configs.UsageError(f"--pruner {pruner!r} is not one of {', '.join(STUDY_PRUNERS)} for a study")
    out_dir = Path(out_dir)
    prepared = prepare_trials(base, grid, out_dir)
    n_trials = len(prepared) if n_trials is None else n_trials
    if not 1 <= n_trials <= len(prepared):
        raise configs.UsageError(f"--n-trials {n_trials} must be between 1 and the grid's {len(prepared)} points "
                                 "(each point runs once)")
    if base.validation_every_minutes is None:
        raise configs.UsageError("a pruner ranks trials by their validation loss: set validation_every_minutes")
    min_resource = min_resource_s if min_resource_s is not None else max(int(base.validation_interval_seconds), 1)
    reduction_factor = 3 if reduction_factor is None else reduction_factor
    if min_resource < 1 or reduction_factor < 2:
        raise configs.UsageError(f"--min-resource-s must be >= 1 (got {min_resource}) and --reduction-factor "
                                 f">= 2 (got {reduction_factor})")

    keys = list(grid)
    space = {key: list(dict.fromkeys(_choice(params[key]) for params, _ in prepared)) for key in keys}
    index_of = {tuple(_choice(params[k]) for k in keys): i for i, (params, _) in enumerate(prepared)}
    if storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{out_dir.resolve() / 'study.db'}"
    study_name = study_name or out_dir.resolve().name
    study = open_study(storage, study_name, space,
                       make_pruner(pruner, min_resource, int(base.time_budget_seconds), reduction_factor),
                       base={k: v for k, v in base.to_dict().items() if k != "run_dir"})
    finished_before = [is_finished(config.run_dir) for _, config in prepared]
    requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)

    def frozen(trial):
        return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)

    def objective(trial):
        index = index_of[tuple(trial.suggest_categorical(k, space[k]) for k in keys)]
        state = optuna.trial.TrialState
        if any(t.params == trial.params and t.number < trial.number
               for t in study.get_trials(deepcopy=False, states=(state.RUNNING, state.COMPLETE, state.PRUNED))):
            trial.set_user_attr("held", True)
            raise _Held(f"grid point {index} is another trial's")
        params, config = prepared[index]
        run_dir = Path(config.run_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        schedule = Schedule.from_config(config)

        def report(record: dict) -> bool:  # the trainer's on_validation hook: True prunes
            trial.report(record["val_loss"], int(record["elapsed_seconds"]))
            return not schedule.done(record["elapsed_seconds"], record["step"]) and trial.should_prune()

        if not is_finished(run_dir):
            if verbose:
                print(f"[search] trial {trial.number} (grid point {index + 1}/{len(prepared)}): {run_dir.name}",
                      flush=True)
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

    def stop_when_done(study, trial):
        if not _work_left(study, n_trials):
            study.stop()

    try:
        if _work_left(study, n_trials):
            study.optimize(objective, catch=(_Held,), callbacks=[stop_when_done], gc_after_trial=False)
    except _Interrupted as e:
        if verbose:
            print(f"[search] trial {e} was interrupted and is queued again; run the same command to go on", flush=True)
    return _rows(study, prepared, index_of, keys, finished_before)


def _rows(study, prepared, index_of, keys, finished_before) -> list[dict]:
    latest = {}  # grid index -> the point's newest trial that was not a duplicate
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("held") or set(t.params) != set(keys):
            continue
        latest[index_of[tuple(t.params[k] for k in keys)]] = t
    rows = []
    for i, (params, config) in enumerate(prepared):
        t = latest.get(i)
        rows.append({**trial_result(config.run_dir, params), "skipped": finished_before[i],
                     "budget_seconds": config.time_budget_seconds,
                     "state": t.state.name if t else None, "number": t.number if t else None})
    return rows


__all__ = ["search_study", "open_study", "make_pruner"]
