"""The study on real storage (bbert.storage): SQLite, Optuna's journal file and a PostgreSQL server
of the test's own; four worker processes share one study, and one of them is killed mid-trial."""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bbert.env import free_port
from bbert.run_dir import latest_checkpoint, list_checkpoints, read_metrics
from bbert.search import main, search, search_table
from bbert.train_config import TrainConfig
from helpers_train import PYTHON, REPO, make_data_dir, subprocess_env, tiny_config

pytest.importorskip("optuna")

STRONG = 1e-3
# GridSampler gives trial 0 the third of these (its fixed shuffle): the strong lr, which sets the
# first rung's bar before any weak one reaches it, so every worker order prunes the same trials
LRS = [1e-6, 1e-7, STRONG, 1e-8]
BACKENDS = ["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.slow)]  # the server takes seconds


# ---- a PostgreSQL server for the session: initdb + pg_ctl in a temporary folder --------------------


def _unavailable(reason: str):
    if os.environ.get("CI"):  # CI installs postgresql (.ci/run): there the test must run
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """``postgresql://postgres:PASSWORD@localhost:PORT/postgres``: a server on a free port, localhost only."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    bin_dir = Path(found[-1]).parent
    if not (bin_dir / "initdb").exists() or not (bin_dir / "pg_ctl").exists():
        _unavailable("PostgreSQL's initdb and pg_ctl are not installed (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install 'bbert[search]')")
    folder = Path(tempfile.mkdtemp(prefix="bbert-postgres-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the user the package creates
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            _unavailable("there is no postgres user to run the server as (apt-get install postgresql)")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    password, port, data = secrets.token_hex(8), free_port(), folder / "data"
    (folder / "password").write_text(password)

    def run(*args, check=True):
        done = subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert not check or done.returncode == 0, done.stdout + done.stderr
        return done

    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=scram-sha-256",
        f"--pwfile={folder / 'password'}", "--no-sync", "-E", "UTF8")
    run(bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "-o",
        f"-p {port} -c listen_addresses=localhost -k {folder} -c fsync=off", "start")
    try:
        yield f"postgresql://postgres:{password}@localhost:{port}/postgres"
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def storage_url(backend: str, tmp_path: Path, request) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if backend == "journal":
        return f"journal:{tmp_path / 'journal.log'}"
    return request.getfixturevalue("postgres")


# ---- the search the workers share --------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("storage-data") / "data")


def workers_base(data_dir, tmp_path, sleep: float) -> TrainConfig:
    # 10 simulated steps of 18 s in 3 minutes; validation (a report to ASHA) at 72, 126 and 180 s,
    # a checkpoint every minute and at half the budget; the first rung is the first validation
    return tiny_config(data_dir, tmp_path / "unused", log_every_steps=2,
                       debug={"step_time_seconds": 18.0, "sleep_seconds_per_step": sleep})


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The same study run by one process (no sleeping: the simulated clock is the same)."""
    out = tmp_path_factory.mktemp("reference") / "trials"
    rows = search(workers_base(data_dir, out.parent, sleep=0.0), {"lr": LRS}, out, pruner="asha", verbose=False)
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr[STRONG]["number"] == 0 and by_lr[STRONG]["state"] == "COMPLETE", rows  # the premise above
    return rows


def load(url: str, name: str):
    import optuna

    from bbert.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url))


def summary(rows) -> list[tuple]:
    return sorted((r["trial"], r["state"], r["end_reason"], r["steps"], r["val_loss"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_four_workers_share_one_study_and_take_up_a_killed_trial(backend, data_dir, reference, tmp_path, request):
    url, name, out = storage_url(backend, tmp_path, request), f"workers-{backend}", tmp_path / "trials"
    base = workers_base(data_dir, tmp_path, sleep=1.5)
    command = [PYTHON, "-m", "bbert.search", "--config", str(base.to_yaml(tmp_path / "base.yaml")),
               "--grid", "lr=" + ",".join(f"{lr:g}" for lr in LRS), "--out", str(out), "--pruner", "asha",
               "--storage", url, "--study-name", name]
    env = subprocess_env(BBERT_HEARTBEAT_SECONDS="1")  # heartbeat 1 s: stale after 5 s of silence

    def start():
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    # the first worker takes trial 0 (the strong lr); kill it once it has reported at the first rung
    # and a checkpoint is on disk, in the middle of its trial
    first, lines = start(), []
    for line in first.stdout:
        lines.append(line)
        if "validation loss" in line:
            break
    strong = out / f"lr={STRONG:g}"
    deadline = time.monotonic() + 60
    while latest_checkpoint(strong) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()
    assert latest_checkpoint(strong) is not None, "the first worker wrote no checkpoint in 60 s"
    lines += first.communicate(timeout=30)[0].splitlines()
    assert first.returncode == -9 and any(f"lr={STRONG:g}" in line for line in lines), lines
    saved = list_checkpoints(strong)[-1][0]  # the newest complete checkpoint
    assert read_metrics(strong)[-1]["type"] != "end"  # killed mid-trial

    others = [start() for _ in range(3)]
    outputs = [p.communicate(timeout=400)[0] for p in others]
    assert [p.returncode for p in others] == [0, 0, 0], outputs

    # every grid point ran once; the weak ones were pruned at the first rung
    trials = [t for t in load(url, name).trials if not t.user_attrs.get("held")]
    finished = {t.params["lr"]: t for t in trials if t.state.name in ("COMPLETE", "PRUNED")}
    assert sorted(finished) == sorted(LRS) and len(finished) == len(trials) - 1
    assert {lr: t.state.name for lr, t in finished.items()} == {lr: "COMPLETE" if lr == STRONG else "PRUNED"
                                                                for lr in LRS}
    killed = next(t for t in trials if t.state.name == "FAIL")
    assert killed.number == 0 and killed.params["lr"] == STRONG
    assert finished[STRONG].system_attrs["failed_trial"] == 0  # the killed trial, queued again
    for lr in LRS:
        if lr != STRONG:
            assert [r["resumed"] for r in read_metrics(out / f"lr={lr:g}", "start")] == [False]

    # another worker took the killed trial up and resumed it from its checkpoint, not from scratch
    takers = [o for o in outputs if any(line.startswith("[search] trial") and line.endswith(f": lr={STRONG:g}")
                                        for line in o.splitlines())]
    assert len(takers) == 1 and "resuming from" in takers[0], outputs
    starts = read_metrics(strong, "start")
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] >= saved >= 4
    steps = [r["step"] for r in read_metrics(strong, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 10

    # the table is the one process's table
    rows = search(base, {"lr": LRS}, out, pruner="asha", storage=url, study_name=name, verbose=False)
    assert all(r["skipped"] for r in rows)
    assert summary(rows) == summary(reference)
    assert search_table(rows) == search_table(reference)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_journal_heartbeat_fails_a_silent_trial_and_queues_it_again(tmp_path, monkeypatch):
    import optuna

    from bbert import storage

    monkeypatch.delenv("BBERT_HEARTBEAT_SECONDS", raising=False)
    backend = storage.open_storage(f"journal:{tmp_path / 'journal.log'}")
    study = optuna.create_study(storage=backend, study_name="s")
    trial = study.ask()
    trial.report(7.5, 72)
    backend.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # it beats: not stale
    silent = time.time() - storage.GRACE_HEARTBEATS * storage.HEARTBEAT_SECONDS - 1
    backend.set_trial_system_attr(trial._trial_id, f"{storage.HEARTBEAT_ATTR}:{trial._trial_id}", silent)
    optuna.storages.fail_stale_trials(study)
    failed, queued = study.trials
    assert (failed.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert queued.system_attrs["failed_trial"] == 0 and queued.intermediate_values == {72: 7.5}
    taken = study.ask()  # another worker takes the copy, which still carries the old heartbeat
    assert taken.number == 1 and backend._get_stale_trial_ids(study._study_id) == []
    backend.record_heartbeat(trial._trial_id)  # the dead worker's heartbeat thread, late: no error


# ---- bad storage is one line ---------------------------------------------------------------------------


def run_main(args, capsys) -> str:
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bbert search: error: "), err
    return err


def command_args(data_dir, tmp_path, grid: str = "lr=1e-3,2e-3") -> list[str]:
    config = workers_base(data_dir, tmp_path, sleep=0.0).to_yaml(tmp_path / "base.yaml")
    return ["--config", str(config), "--grid", grid, "--out", str(tmp_path / "trials"), "--pruner", "asha"]


def test_no_server_and_bad_paths_fail_in_one_line(data_dir, tmp_path, capsys):
    pytest.importorskip("psycopg")
    args = command_args(data_dir, tmp_path)
    cases = [(f"postgresql://bbert:secret@127.0.0.1:{free_port()}/db", "Connection refused"),
             (f"journal:{tmp_path}/no/such/folder/journal.log", "No such file or directory"),
             (f"journal:{tmp_path}", "must name the journal's file"),
             ("postgresql+nosuchdriver://host/db", "could not be opened"),
             ("postgresql+psycopg2://bbert:secret@host/db", "needs the Python module psycopg2")]
    for url, reason in cases:
        err = run_main([*args, "--storage", url], capsys)
        assert reason in err and "secret" not in err, err  # the password is never printed
    assert not (tmp_path / "trials").exists()


def test_journal_on_a_read_only_file_system_fails_in_one_line(data_dir, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root here, but no read-only tmpfs could be mounted")
        folder.chmod(0o555)  # not root: a folder we may not write is the same failure for the journal
    try:
        err = run_main([*command_args(data_dir, tmp_path), "--storage", f"journal:{folder}/journal.log"], capsys)
        assert ("Read-only file system" if mounted else "Permission denied") in err, err
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.slow
def test_wrong_password_fails_in_one_line(postgres, data_dir, tmp_path, capsys):
    from sqlalchemy.engine import make_url

    wrong = make_url(postgres).set(password="not-the-password").render_as_string(hide_password=False)
    err = run_main([*command_args(data_dir, tmp_path), "--storage", wrong], capsys)
    assert "password authentication failed" in err and "not-the-password" not in err, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_grid_or_base_config_on_one_study_fails_in_one_line(backend, data_dir, tmp_path, capsys, request):
    from bbert.study import make_pruner, make_sampler, open_study, study_attrs

    url, name = storage_url(backend, tmp_path, request), f"grids-{backend}"
    space = {"lr": [1e-3, 2e-3]}

    def join():  # what the command stores with the study it makes
        attrs = study_attrs(workers_base(data_dir, tmp_path, sleep=0.0), space)
        return open_study(url, name, make_sampler("grid", space), make_pruner("asha", 60, 180), attrs=attrs)

    join()
    args = [*command_args(data_dir, tmp_path), "--storage", url, "--study-name", name]
    err = run_main([*args[:2], "--set", "time_budget_hours=0.1", *args[2:]], capsys)  # same grid, another base
    assert "searches another base config or data (changed: time_budget_hours)" in err, err
    err = run_main([*args[:3], "lr=1e-3,3e-3", *args[4:]], capsys)
    assert f"study '{name}'" in err and "searches another grid (changed: lr)" in err, err
    assert backend != "postgresql" or url.split(":")[2].split("@")[0] not in err  # the password is never shown
    assert not (tmp_path / "trials").exists()  # refused before any trial ran
    # the study still holds the first search, and the same search joins it
    assert load(url, name).user_attrs["grid"] == {"lr": [1e-3, 2e-3]}
    assert join().study_name == name
