"""Where a search's Optuna study lives: one ``--storage`` string, three backends, a heartbeat on each.

Every process that runs the same ``bbert search --pruner asha`` command with the same
``--storage`` joins one study (:mod:`bbert.study`), so the string names what all machines share:

* ``sqlite:///runs/search/study.db`` -- a file database, for the processes of one machine (SQLite's
  own documentation warns against sharing its file over a network file system);
* ``journal:runs/search/journal.log`` -- Optuna's journal, an append-only log file
  (``JournalStorage`` with its file backend and a symlink lock), for machines that share a file
  system and no database server;
* ``postgresql://user:password@host:5432/db`` -- a database server, for a cluster (the driver is
  ``psycopg``; ``postgresql://`` means ``postgresql+psycopg://``).

Each running trial sends a heartbeat every ``HEARTBEAT_SECONDS`` (``BBERT_HEARTBEAT_SECONDS``
overrides it); a trial silent for ``GRACE_HEARTBEATS`` heartbeats belonged to a machine that died.
The next worker that asks for work fails it and queues a copy (Optuna's
``RetryHeartbeatStaleTrialCallback``, with the reports it had made), takes the copy and resumes the
trial's run dir from its last checkpoint. The RDB storages have this heartbeat built in. Optuna's
journal has none, so ``JournalWithHeartbeat`` here adds it the simplest way that stays in the one
log file: a heartbeat is a trial system attribute holding the writer's ``time.time()``, and a
running trial whose newest one (or, before its first, its start) is older than the grace period
is stale. The machines' clocks must
therefore agree to well within the grace period (NTP does).

The study remembers what it searches (:func:`check_same_search`): a second command with another grid
or another base config under the same study name is refused in one line instead of mixing its
trials into the first one's table.

Chapter: ``book/many_machines.md``.
"""
from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path

from bbert import configs
from bbert.identity import changed_fields

HEARTBEAT_SECONDS = 60  # how often a running trial tells the storage that its process lives
GRACE_HEARTBEATS = 5  # a trial silent for this many heartbeats is failed and queued again
MAX_RETRIES = 3  # how often a killed trial is queued again
JOURNAL = "journal:"
HEARTBEAT_ATTR = "bbert:heartbeat"  # the journal's heartbeat: trial system attribute HEARTBEAT_ATTR:<trial id>
EXAMPLES = "sqlite:///runs/search/study.db, journal:runs/search/journal.log or postgresql://user@host/db"


def heartbeat_seconds() -> int:
    """``HEARTBEAT_SECONDS``, or the ``BBERT_HEARTBEAT_SECONDS`` environment variable (whole seconds)."""
    raw = os.environ.get("BBERT_HEARTBEAT_SECONDS", "").strip()
    if not raw:
        return HEARTBEAT_SECONDS
    if not raw.isdigit() or int(raw) < 1:
        raise configs.UsageError(f"BBERT_HEARTBEAT_SECONDS={raw!r} must be a whole number of seconds >= 1")
    return int(raw)


def open_storage(url: str):
    """The Optuna storage that ``url`` names, with a heartbeat and retries; bad storage is one line.

    A server that does not answer, a wrong password, a missing driver or folder, and a journal
    path that cannot be written all raise :class:`bbert.configs.UsageError`.
    """
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    interval = heartbeat_seconds()
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)
    if url.startswith(JOURNAL):
        return _open_journal(url, interval, retry)
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise configs.UsageError(f"--storage {url!r} is not a database URL; give one like {EXAMPLES}") from None
    shown = parsed.render_as_string(hide_password=True)  # never print a password
    engine_kwargs = {}
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "postgresql":
        # a dead network path fails in seconds, and a connection the server dropped is replaced
        engine_kwargs = {"pool_pre_ping": True,
                         "connect_args": {} if "connect_timeout" in parsed.query else {"connect_timeout": 10}}
    try:
        return retry_races(lambda: optuna.storages.RDBStorage(
            parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
            heartbeat_interval=interval, grace_period=GRACE_HEARTBEATS * interval,
            heartbeat_stale_trial_callback=retry), shown)
    except ImportError as e:
        missing = e.name or getattr(e.__cause__, "name", None) or "of its driver"  # Optuna wraps the error
        raise configs.UsageError(f"--storage {shown!r} needs the Python module {missing}, which is not "
                                 "installed; pip install 'bbert[search]' brings psycopg, the driver of "
                                 "postgresql://") from None


RACES = ("UNIQUE constraint", "already exists", "duplicate key", "locked")


def retry_races(open_, storage: str):
    """``open_()``, tried again when workers that start together race to create the same tables or
    study (the loser sees a unique-key or lock error); any other database error is one line."""
    import sqlalchemy

    for attempt in range(5):
        try:
            return open_()
        except sqlalchemy.exc.SQLAlchemyError as e:
            reason = _first_line(e)
            if attempt < 4 and any(s in reason for s in RACES):
                time.sleep(0.5 + random.random())
                continue
            raise configs.UsageError(f"--storage {hide_password(storage)!r} could not be opened ({reason}); "
                                     "check the URL, its password, its database driver and that the server "
                                     "or folder exists") from None


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()  # the driver's words, without SQLAlchemy's wrapping
    return " ".join(text.splitlines()[0].split()) if text else type(error).__name__


def _open_journal(url: str, interval: int, retry):
    import optuna

    path = Path(url[len(JOURNAL):]).expanduser()
    if not url[len(JOURNAL):].strip() or path.is_dir():
        raise configs.UsageError(f"--storage {url!r} must name the journal's file, e.g. "
                                 "journal:runs/search/journal.log")
    try:
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return _journal_class()(backend, interval, GRACE_HEARTBEATS * interval, retry)
    except OSError as e:
        reason = e.strerror or _first_line(e)
        raise configs.UsageError(f"--storage {url!r} could not be opened ({reason}); the journal's folder "
                                 "must exist and be writable (for many machines: on their shared file "
                                 "system)") from None


@functools.cache
def _journal_class():  # built on first use: importing this module needs no optuna
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat

    class JournalWithHeartbeat(optuna.storages.JournalStorage, BaseHeartbeat):
        """Optuna's ``JournalStorage`` with a heartbeat per running trial, kept in the journal itself."""

        def __init__(self, backend, heartbeat_interval: int, grace_period: int, stale_trial_callback=None):
            super().__init__(backend)
            self.heartbeat_interval = heartbeat_interval
            self.grace_period = grace_period
            self.stale_trial_callback = stale_trial_callback

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                self.set_trial_system_attr(trial_id, f"{HEARTBEAT_ATTR}:{trial_id}", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker already failed the trial as stale: it is no longer ours

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            running = self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            # keyed by trial id: a queued-again copy carries the dead worker's heartbeat, which is not its own
            return [t._trial_id for t in running
                    if now - t.system_attrs.get(f"{HEARTBEAT_ATTR}:{t._trial_id}", t.datetime_start.timestamp())
                    > self.grace_period]

        def get_heartbeat_interval(self) -> int:
            return self.heartbeat_interval

        def get_heartbeat_stale_trial_callback(self):
            return self.stale_trial_callback

    return JournalWithHeartbeat


def check_same_search(study, storage: str, **identity) -> None:
    """Remember what ``study`` searches (``grid=...``, ``base=...``) on first open; refuse another.

    Each keyword is stored as a study user attribute the first time and compared (as JSON) on
    every later open, so two different searches can't share one study name.
    """
    for key, value in identity.items():
        if value is None:
            continue
        value = json.loads(json.dumps(value))  # compare what the storage gives back
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            what = {"grid": "grid", "base": "base config or data"}.get(key, key)
            differ = ", ".join(_differences(stored, value)) or "its values"
            raise configs.UsageError(f"study {study.study_name!r} in {hide_password(storage)} searches another "
                                     f"{what} (changed: {differ}); choose a new --out (or --study-name) for this "
                                     "search")


def _differences(a, b) -> list[str]:
    # the top-level fields that differ (``data``: the data's fingerprint), as a trial's check names them
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ["its values"] if a != b else []
    return changed_fields(a, b)


def hide_password(url: str) -> str:
    if url.startswith(JOURNAL):
        return url
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: it was refused before a study opened
        return url


__all__ = ["open_storage", "retry_races", "check_same_search", "hide_password", "heartbeat_seconds", "HEARTBEAT_SECONDS", "GRACE_HEARTBEATS"]
