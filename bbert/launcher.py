"""Start a pretraining run from a notebook cell (or a script) with the right launcher.

``launch(config)`` writes ``run_dir/config.yaml``, prints the equivalent shell command, starts
it as a subprocess, shows a live progress bar of the budget consumed (fed by the run's
``metrics.jsonl``), and returns the run dir. Interrupting the cell (the notebook's stop
button, or Ctrl-C) sends SIGINT to the run, which finishes its optimizer step, saves a
checkpoint and exits cleanly, exactly as Ctrl-C would in a terminal.

Launchers (``build_launch_command`` shows the command without running anything):

    python     python -m bbert.train --config RUN/config.yaml                    (one process)
    torchrun   torchrun --nnodes 1 --nproc_per_node N --master_addr 127.0.0.1
               --master_port P -m bbert.train --config RUN/config.yaml           (DDP, one node)
    deepspeed  deepspeed --num_gpus N --master_port P --no_local_rank
               --module bbert.train --config RUN/config.yaml                     (engine "deepspeed")

Several nodes: pass ``hostfile`` (MPI style, one ``host slots=N`` line per node) and
``master_addr`` (node 0's address); the deepspeed launcher then starts the ranks on every
node over passwordless ssh (pdsh). The run dir and the data dir must be on a filesystem that
every node sees at the same path.

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import collections
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from bbert import run_dir as rd
from bbert.engines import check_engine
from bbert.locks import DirLock
from bbert.env import free_port

LAUNCHERS = ("auto", "deepspeed", "torchrun", "python")


class LaunchError(RuntimeError):
    """The training process failed; the message holds its exit code and the tail of its log."""


def hostfile_slots(hostfile) -> dict[str, int]:
    """Read an MPI-style hostfile (``host slots=N`` per line, ``#`` comments) into {host: slots}."""
    path = Path(hostfile)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} does not exist: write one line 'HOST slots=GPUS' per node")
    slots = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ValueError(f"bad hostfile line {line!r} in {path}: expected 'HOST slots=N'")
        slots[parts[0]] = int(parts[1][6:])
    if not slots:
        raise ValueError(f"hostfile {path} lists no hosts: write one line 'HOST slots=GPUS' per node")
    return slots


def _default_num_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def _executable(name: str) -> str:
    # Prefer the launcher installed beside this Python (the venv), so the command runs this env.
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def resolve_launcher(config, num_gpus: int, launcher: str = "auto") -> str:
    """``auto``: deepspeed for the deepspeed engine, torchrun for several processes, else python."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    if launcher != "auto":
        return launcher
    if config.engine == "deepspeed":
        return "deepspeed"
    return "torchrun" if num_gpus > 1 else "python"


def build_launch_command(config, num_gpus: int | None = None, launcher: str = "auto",
                         hostfile=None, master_addr: str | None = None, master_port: int | None = None,
                         config_path=None, resume: bool | None = None) -> list[str]:
    """The command that runs ``config``: a list of strings for ``subprocess`` (:func:`format_command` to print).

    ``num_gpus`` is per node (default: the GPUs here, at least 1; on CPU, the number of
    processes). ``config_path`` defaults to ``run_dir/config.yaml``. ``resume``: None lets the
    trainer continue a run dir with the same config by itself, True continues even if the
    config changed (``--resume``), False refuses to continue (``--no-resume``).
    """
    num_gpus = _default_num_gpus() if num_gpus is None else int(num_gpus)
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    launcher = resolve_launcher(config, num_gpus, launcher)
    train_args = ["--config", str(config_path or rd.config_path(config.run_dir))]
    if resume is not None:
        train_args.append("--resume" if resume else "--no-resume")
    port = str(master_port or free_port())
    if hostfile is not None and launcher != "deepspeed":
        raise ValueError(f"a hostfile (several nodes) needs launcher='deepspeed', not {launcher!r}")
    if launcher == "python":
        if num_gpus > 1:
            raise ValueError(f"the python launcher runs one process; for {num_gpus} use "
                             "launcher='torchrun' or 'deepspeed'")
        return [sys.executable, "-m", "bbert.train", *train_args]
    if launcher == "torchrun":
        # Static rendezvous: --standalone sometimes aborts at exit (see environment notes).
        return [_executable("torchrun"), "--nnodes", "1", "--nproc_per_node", str(num_gpus),
                "--master_addr", master_addr or "127.0.0.1", "--master_port", port,
                "-m", "bbert.train", *train_args]
    cmd = [_executable("deepspeed")]
    if hostfile is not None:
        hostfile_slots(hostfile)  # fail here, with a clear message, rather than inside pdsh
        if not master_addr:
            raise ValueError("several nodes need master_addr: the address of the first host in the hostfile")
        cmd += ["--hostfile", str(hostfile), "--master_addr", master_addr]
    elif master_addr:
        cmd += ["--master_addr", master_addr]
    # --no_local_rank: the rank comes from LOCAL_RANK in the environment, not an extra argument.
    cmd += ["--num_gpus", str(num_gpus), "--master_port", port, "--no_local_rank",
            "--module", "bbert.train", *train_args]
    return cmd


def format_command(cmd: list[str]) -> str:
    """The command as one would type it: launchers that live beside this Python (the active
    environment) by their bare name."""
    first = Path(cmd[0])
    if first.parent == Path(sys.executable).parent:
        first = Path("python" if cmd[0] == sys.executable else first.name)
    return shlex.join([str(first), *cmd[1:]])


def world_size_of(num_gpus: int, hostfile=None) -> int:
    """Processes in all: ``num_gpus`` per node on every hostfile node, or ``num_gpus`` on one node."""
    if hostfile is None:
        return num_gpus
    return sum(min(slots, num_gpus) for slots in hostfile_slots(hostfile).values())


# ---- progress ----------------------------------------------------------------------


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _Progress:
    """A bar of the budget consumed (percent) with the latest step, loss and validation loss."""

    def __init__(self, enabled: bool, notebook: bool):
        self.bar = None
        if enabled:
            if notebook:
                from tqdm.notebook import tqdm
            else:
                from tqdm import tqdm
            self.bar = tqdm(total=100.0, unit="%", desc="budget",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        self.postfix: dict[str, str] = {}

    def update(self, record: dict) -> None:
        if self.bar is None:
            return
        kind = record.get("type")
        if "budget_fraction" in record:
            target = min(100.0, 100.0 * float(record["budget_fraction"]))
            self.bar.update(max(0.0, target - self.bar.n))
        if kind == "train":
            self.postfix.update(step=str(record.get("step")), loss=f"{record.get('loss', float('nan')):.3f}")
        elif kind == "val":
            self.postfix["val_loss"] = f"{record.get('val_loss', float('nan')):.3f}"
        elif kind == "end":
            self.postfix["end"] = str(record.get("reason"))
            if record.get("reason") == rd.EndReason.BUDGET:
                self.bar.update(100.0 - self.bar.n)
        self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- launch ------------------------------------------------------------------------


def launch(config, num_gpus: int | None = None, launcher: str = "auto", hostfile=None,
           master_addr: str | None = None, master_port: int | None = None, progress: bool = True,
           echo: bool | None = None, env: dict | None = None, stop_timeout: float = 600.0,
           tail_lines: int = 40, resume: bool | None = None) -> Path:
    """Run ``config`` (a :class:`bbert.train_config.TrainConfig`) in a subprocess; return its run dir.

    Prints the shell command first, then shows the budget consumed and the latest loss live.
    ``echo`` (default: on in a terminal, off in a notebook) also prints the run's own output.
    On KeyboardInterrupt the run gets SIGINT, saves a checkpoint and stops (resume it by
    launching the same config again; ``resume`` as in :func:`build_launch_command`); a second
    interrupt kills it. If the run fails, raises
    :class:`LaunchError` with the tail of its output (all of it is in ``run_dir/launch.log``).
    """
    num_gpus = _default_num_gpus() if num_gpus is None else int(num_gpus)
    config.validate(world_size_of(num_gpus, hostfile))  # fail before anything starts
    check_engine(config)
    run_dir = Path(config.run_dir)
    with DirLock(run_dir, "trained into"):
        pass  # a run in progress holds it: fail now, before its config.yaml is replaced
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = config.to_yaml(rd.config_path(run_dir))
    cmd = build_launch_command(config, num_gpus, launcher, hostfile, master_addr, master_port, config_file,
                               resume)
    print("$ " + format_command(cmd), flush=True)

    notebook = _in_notebook()
    echo = (not notebook) if echo is None else echo
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    log_path = run_dir / "launch.log"
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    # A new session: the run gets its own process group, so we can signal all its ranks at
    # once, and the notebook kernel's own SIGINT never reaches it unannounced.
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, env=child_env, start_new_session=True)
    reader = threading.Thread(target=_pump, args=(child, log_path, tail, echo), daemon=True)
    reader.start()
    metrics = rd.MetricsTail(run_dir)
    # In a terminal the run's own progress lines are echoed; a second bar would only garble them.
    bar = _Progress(progress and (notebook or not echo), notebook)
    end_record = None
    interrupted = False
    try:
        try:
            while child.poll() is None:
                for record in metrics.new_records():
                    bar.update(record)
                    end_record = record if record.get("type") == "end" else end_record
                time.sleep(0.3)
        except KeyboardInterrupt:
            interrupted = True
            print("\nInterrupted: asking the run to save a checkpoint and stop "
                  "(interrupt again to kill it)...", flush=True)
            _stop(child, stop_timeout)
        reader.join(timeout=10)
        for record in metrics.new_records():
            bar.update(record)
            end_record = record if record.get("type") == "end" else end_record
    finally:
        bar.close()
        if child.poll() is None:  # an exception of our own: never leave the run orphaned
            _signal_group(child, signal.SIGKILL)
            child.wait()

    code = child.returncode
    if code != 0 and not (interrupted and end_record and end_record.get("reason") == rd.EndReason.INTERRUPTED):
        last = "\n".join(tail)
        ended = f" (run ended: {end_record.get('reason')})" if end_record else ""
        raise LaunchError(f"the training process exited with code {code}{ended}.\n"
                          f"command: {shlex.join(cmd)}\nfull output: {log_path}\n"
                          f"last {len(tail)} lines:\n{last}")
    if end_record:
        print(f"run ended: {end_record.get('reason')} at step {end_record.get('step')} after "
              f"{float(end_record.get('elapsed_seconds', 0)):.0f} s; run dir {run_dir}", flush=True)
    return run_dir


def _pump(child: subprocess.Popen, log_path: Path, tail: collections.deque, echo: bool) -> None:
    """Copy the run's output to ``launch.log`` (appended: a resumed run keeps the first part)."""
    with open(log_path, "a", encoding="utf-8") as log:
        for line in child.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if echo:
                print(line, end="", flush=True)


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


def _trainer_pids(child: subprocess.Popen) -> list[int]:
    """The processes running ``-m bbert.train`` in the run (the ranks), launcher processes left out."""
    try:
        root = psutil.Process(child.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    pids = []
    for proc in procs:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if any(a == "-m" and b == "bbert.train" for a, b in zip(cmd, cmd[1:])):
            pids.append(proc.pid)
    return pids


def _stop(child: subprocess.Popen, timeout: float) -> None:
    """Ask the ranks to save a checkpoint and stop (SIGINT, as Ctrl-C), then wait for them.

    The signal goes to the trainer processes only: the deepspeed and torchrun launchers answer
    a SIGINT of their own by terminating the ranks with a 30-second grace, which a large
    checkpoint may need more than. Once the ranks exit, the launchers exit by themselves.
    If no rank is found, the whole process group gets the SIGINT (what a terminal's Ctrl-C does).
    """
    pids = _trainer_pids(child)
    if pids:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    else:
        _signal_group(child, signal.SIGINT)
    try:
        child.wait(timeout=timeout)
    except KeyboardInterrupt:
        print("Second interrupt: killing the run (the last complete checkpoint is kept).", flush=True)
        _signal_group(child, signal.SIGKILL)
        child.wait()
    except subprocess.TimeoutExpired:
        print(f"The run did not stop within {timeout:g} s: killing it "
              "(the last complete checkpoint is kept).", flush=True)
        _signal_group(child, signal.SIGKILL)
        child.wait()
