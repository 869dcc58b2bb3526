"""The time-budgeted masked-LM pretraining loop of 24hBERT: accumulate, step, validate, checkpoint, stop.

A run is defined by a wall-clock *budget* (``time_budget_hours``), not a step count. The loop
asks the run's :class:`bbert.optim.Schedule` for the learning rate, the batch, the fraction of
the budget used and whether the run is over:

* the learning rate warms up over ``warmup_proportion`` of the budget and decays linearly to
  zero at its end, with elapsed seconds as the clock (``lr_schedule="wsd"`` holds the peak
  and decays over the last ``decay_proportion`` only);
* the budget is checked after every optimizer step; the run stops at the budget and saves
  a final checkpoint and ``final/model``. The clock starts at the first step (building the
  model and starting DeepSpeed are not counted) and includes validation and checkpoints; the
  budget used so far is saved in every checkpoint, so a resumed run continues the same clock;
* the global batch (4096 in the paper) comes from gradient accumulation:
  ``batch_size = micro_batch_size x world_size x gradient_accumulation_steps``; with a batch
  ramp the schedule gives each step its batch (the samples consumed add up the real ones).

``--init-from MODEL`` (``init_from``) starts from a model's weights instead of new ones, unless
the run resumes from its own checkpoint (chapter ``notebooks/08_your_domain.ipynb``). The
config is :mod:`bbert.train_config`, the engines :mod:`bbert.engines`, the run folder
:mod:`bbert.run_dir`. Run it in one process or under a launcher::

    bbert pretrain --preset tiny-cpu --data-dir data/sample --run-dir runs/tiny
    bbert pretrain --preset tiny-cpu --init-from runs/tiny --data-dir data/domain --run-dir runs/domain
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 -m bbert.train --config run.yaml
    deepspeed --num_gpus 8 --master_port 29512 --module bbert.train --config run.yaml
    deepspeed --hostfile hostfile --master_port 29512 --module bbert.train --config run.yaml

With a hostfile, every node must see the same data dir and run dir (a shared filesystem):
DeepSpeed checkpoints are written by all ranks into the same folder.

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from bbert import run_dir as rd
from bbert.configs import add_config_arguments, command
from bbert.data import (DataDirError, build_pretraining_loader, data_fingerprint, load_manifest,
                        load_tokenizer, tokenizer_dir)
from bbert.engines import DistEnv, build_engine, check_engine, deepspeed_config, init_distributed
from bbert.locks import DirLock
from bbert.objective import build_objective
from bbert.optim import Schedule
from bbert.run_dir import EndReason, MetricsLog, latest_checkpoint, read_metrics
from bbert.speed import device_peak_flops, mfu
from bbert.train_config import PRESETS, TrainConfig, load_config
from bbert.atomic import atomic_path
from bbert.env import StopSignals, set_seed

__all__ = ["Trainer", "pretrain", "main", "TrainConfig", "read_metrics", "latest_checkpoint"]


class Trainer:
    """One pretraining run: setup, resume, the optimizer-step loop, validation, checkpoints.

    Use :func:`pretrain`.
    """

    def __init__(self, config: TrainConfig, dist: DistEnv, resume: bool | str = "auto",
                 allow_data_change: bool = False, on_validation=None):
        self.config, self.dist = config, dist
        self.on_validation = on_validation
        self.run_dir = Path(config.run_dir)
        self.manifest = load_manifest(config.data_dir)
        self.data = data_fingerprint(self.manifest)
        self.tokenizer = load_tokenizer(tokenizer_dir(config.data_dir))
        self.objective = build_objective(config)
        self.model_config = config.model_config(self.manifest["vocab_size"])
        self.schedule = Schedule.from_config(config, dist.world_size)
        self.resume_from = rd.resume_point(self.run_dir, config.to_dict(), self.data, resume,
                                           allow_data_change, config.data_dir, self.model_config.to_dict())

        set_seed(config.seed + dist.rank)
        model = self.objective.build_model(self.model_config)
        if config.init_from and self.resume_from is None:  # a resumed run goes on from its checkpoint
            from bbert.hf import load_pretrained

            model.load_state_dict(load_pretrained(config.init_from)[0].state_dict())
        self.engine = build_engine(model, config, dist, self.objective)

        # run state: everything a checkpoint must hold to continue exactly
        self.step = 0
        self.samples = 0  # global samples consumed
        self.elapsed = 0.0  # seconds of the budget consumed
        self.next_validation = config.validation_interval_seconds
        self.next_checkpoint = config.checkpoint_interval_seconds
        self.markers_done: list[float] = []
        self.last_saved_step = -1
        self.end_reason: EndReason | None = None
        self.pending_rng: dict | None = None
        self.last_val_step = -1
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> Path:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.to_yaml(rd.config_path(self.run_dir))
            leftovers = rd.remove_leftovers(self.run_dir)  # safe: this process holds the run dir's lock
        log = MetricsLog(self.run_dir, self.config.tensorboard, self.dist.is_main)
        if self.dist.is_main and leftovers:
            log.message(f"removed {len(leftovers)} unfinished write(s) of a killed run: "
                        + ", ".join(p.name for p in leftovers))
        try:
            return self._run(log)
        finally:
            log.close()

    def _progress(self) -> float:
        return self.schedule.progress(self.elapsed, self.step)

    def _clock(self, start_wall: float, start_elapsed: float, steps_done: int) -> float:
        """Budget seconds used: the wall clock, or the simulated one of ``debug.step_time_seconds``."""
        simulated = self.config.debug.step_time_seconds
        if simulated is not None:
            return start_elapsed + steps_done * simulated
        return start_elapsed + (time.monotonic() - start_wall)

    def _run(self, log: MetricsLog) -> Path:
        cfg, dist = self.config, self.dist
        if self.resume_from is not None:
            log.message(f"resuming from {self.resume_from} (step {self.step}, {self.elapsed:.1f} s, "
                        f"{100 * self._progress():.1f}% of the budget used)")
            if self.end_reason in (EndReason.EARLY_STOP, EndReason.PRUNED) or self.schedule.done(self.elapsed, self.step):
                log.message("the run had already finished; nothing to do")
                return self.run_dir
        log.write({"type": "start", "step": self.step, "elapsed_seconds": self.elapsed,
                   "resumed": self.resume_from is not None, "world_size": dist.world_size,
                   "engine": cfg.engine, "precision": cfg.precision, "device": str(dist.device)})

        seq_len = self.manifest["max_seq_length"]
        flops_per_seq = self.objective.flops_per_sequence(self.model_config, seq_len)
        peak = cfg.peak_flops if cfg.peak_flops is not None else device_peak_flops(dist.device, cfg.precision)

        loader = build_pretraining_loader(cfg.data_dir, "train", cfg.micro_batch_size, rank=dist.rank,
                                          world_size=dist.world_size, seed=cfg.seed, start_sample=self.samples,
                                          masking=cfg.masking, infinite=True)
        batches = iter(loader)
        if self.pending_rng is not None:
            rd.restore_rng(self.pending_rng, dist.device)
        reason = None
        self.engine.train()
        with StopSignals() as stop:
            start_wall, start_elapsed, start_step = time.monotonic(), self.elapsed, self.step
            last_log_wall, last_log_samples = time.monotonic(), self.samples
            while reason is None:
                # the lr and the batch are set at the step's start
                lr, lr_elapsed = self.schedule.lr_at(self.elapsed, self.step), self.elapsed
                batch_size = self.schedule.batch_size_at(self.elapsed, self.step)
                accumulation = self.schedule.accumulation_at(self.elapsed, self.step)
                self.engine.set_batch_size(batch_size)
                losses = []
                poison = cfg.debug.nan_at_step == self.step + 1
                for micro in range(accumulation):
                    batch = {k: v.to(dist.device, non_blocking=True) for k, v in next(batches).items()}
                    losses.append(self.engine.micro_step(batch, last=micro == accumulation - 1, poison=poison))
                if cfg.debug.sleep_seconds_per_step:
                    time.sleep(cfg.debug.sleep_seconds_per_step)
                local_loss = float(torch.stack(losses).mean())
                local_clock = self._clock(start_wall, start_elapsed, self.step + 1 - start_step)
                # one collective per step: mean loss, mean clock (all ranks agree), any NaN, any stop
                loss_sum, clock_sum, bad, stops = dist.all_reduce_sum(
                    [local_loss if math.isfinite(local_loss) else 0.0, local_clock,
                     float(not math.isfinite(local_loss)), float(stop.requested)])
                if bad:
                    reason = EndReason.NAN  # the weights never see this step: the last checkpoint stays good
                    log.message(f"non-finite loss at step {self.step + 1}: stopping; the last good checkpoint is kept")
                    break
                grad_norm = self.engine.optimizer_step(lr, want_norm=(self.step + 1) % cfg.log_every_steps == 0)
                self.step += 1
                self.samples += batch_size
                self.elapsed = clock_sum / dist.world_size
                loss = loss_sum / dist.world_size

                if self.step % cfg.log_every_steps == 0:
                    now = time.monotonic()
                    seq_per_s = (self.samples - last_log_samples) / max(now - last_log_wall, 1e-9)
                    last_log_wall, last_log_samples = now, self.samples
                    utilization = mfu(flops_per_seq, seq_per_s, peak, dist.world_size) if peak else None
                    record = {"type": "train", "step": self.step, "elapsed_seconds": self.elapsed,
                              "budget_fraction": self._progress(), "loss": loss, "lr": lr,
                              "lr_elapsed_seconds": lr_elapsed, "batch_size": batch_size,
                              "grad_norm": grad_norm, "seq_per_s": seq_per_s,
                              "tokens_per_s": seq_per_s * seq_len, "mfu": utilization}
                    scale = self.engine.loss_scale()
                    if scale is not None:  # fp16: overflowing steps are skipped; show how many
                        record.update(loss_scale=scale, skipped_steps=self.engine.skipped_steps)
                    log.write(record)
                    log.progress(self._progress(),
                                 f"step {self.step} | loss {loss:.4f} | lr {lr:.2e} | {seq_per_s:.1f} seq/s")

                reason = self._after_step(log, stops > 0)
        self._finish(log, reason)
        return self.run_dir

    def _after_step(self, log: MetricsLog, stop_requested: bool) -> EndReason | None:
        """Validation, early stop, the end test and checkpoints, in a fixed order after each step."""
        cfg = self.config
        reason = None
        if self.elapsed >= self.next_validation:
            interval = cfg.validation_interval_seconds
            self.next_validation = (math.floor(self.elapsed / interval) + 1) * interval
            record = self._validate(log)
            val_loss = record["val_loss"]
            es = cfg.early_stop
            if es.enabled and self.elapsed >= cfg.early_stop_after_seconds and not val_loss <= es.max_val_loss:
                log.message(f"early stop: validation loss {val_loss:.4f} > {es.max_val_loss} "
                            f"after {es.after_minutes:g} minutes")
                reason = EndReason.EARLY_STOP
            if reason is None and self.on_validation is not None and self.on_validation(dict(record)):
                log.message(f"pruned by the search at step {self.step} (validation loss {val_loss:.4f})")
                reason = EndReason.PRUNED
        if reason is None:
            reason = self.schedule.end_reason(self.elapsed, self.step)
            reason = EndReason(reason) if reason else (EndReason.INTERRUPTED if stop_requested else None)

        for marker in sorted(cfg.checkpoint_fractions):
            if marker not in self.markers_done and self._progress() >= marker:
                self.markers_done.append(marker)
                self.save_checkpoint(rd.marker_checkpoint(self.run_dir, marker), log)
        if reason is None and self.elapsed >= self.next_checkpoint:
            interval = cfg.checkpoint_interval_seconds
            self.next_checkpoint = (math.floor(self.elapsed / interval) + 1) * interval
            self.save_checkpoint(rd.step_checkpoint(self.run_dir, self.step), log)
        return reason

    def _finish(self, log: MetricsLog, reason: EndReason) -> None:
        if reason in (EndReason.BUDGET, EndReason.MAX_STEPS) and self.config.validation_every_minutes is not None \
                and self.last_val_step != self.step:
            self._validate(log)  # the run's final validation loss
        if reason != EndReason.NAN:
            self.end_reason = reason
            last = rd.step_checkpoint(self.run_dir, self.step)
            if self.last_saved_step != self.step or not last.exists():
                self.save_checkpoint(last, log)
            self._save_final()
        log.write({"type": "end", "reason": reason, "step": self.step, "elapsed_seconds": self.elapsed})
        log.message(f"run ended ({reason}) at step {self.step} after {self.elapsed:.1f} s of budget: {self.run_dir}")
        self.end_reason = reason

    # -- validation ---------------------------------------------------------------------------

    def _validate(self, log: MetricsLog) -> dict:
        val_loss = self.evaluate()
        self.last_val_step = self.step
        record = {"type": "val", "step": self.step, "elapsed_seconds": self.elapsed, "val_loss": val_loss}
        log.write(record)
        log.message(f"step {self.step}: validation loss {val_loss:.4f}")
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """The objective's loss over the held-out split, weighted by predicted tokens, all ranks together.

        Validation masks at the objective's rate (always the paper's 15%), whatever the training rate.
        """
        cfg, dist = self.config, self.dist
        loader = build_pretraining_loader(cfg.data_dir, "val", cfg.micro_batch_size, rank=dist.rank,
                                          world_size=dist.world_size, seed=cfg.seed,
                                          masking=self.objective.validation_masking, infinite=False)
        if data_fingerprint(loader.dataset.manifest) != self.data:  # a new loader would read new data
            raise DataDirError(f"{cfg.data_dir} changed during this run (replaced, e.g. by bbert prepare "
                               "--overwrite), so validation would score other data: restore it, or resume "
                               "with --allow-data-change")
        self.engine.train(False)
        total, count = 0.0, 0.0
        for i, batch in enumerate(loader):
            if cfg.max_val_batches is not None and i >= cfg.max_val_batches:
                break
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            n = float(self.objective.predicted_tokens(batch))
            if n:
                total += float(self.engine.eval_loss(batch)) * n
                count += n
        self.engine.train(True)
        total, count = dist.all_reduce_sum([total, count])
        return total / count if count else float("nan")

    # -- checkpoints ----------------------------------------------------------------------------

    def _budget_record(self) -> dict:
        return {"step": self.step, "samples_consumed": self.samples, "elapsed_seconds": self.elapsed,
                "budget_fraction": self._progress(), "time_budget_hours": self.config.time_budget_hours,
                "next_validation": self.next_validation, "next_checkpoint": self.next_checkpoint,
                "markers_done": self.markers_done, "world_size": self.dist.world_size,
                "end_reason": self.end_reason, "data": self.data}

    def save_checkpoint(self, final: Path, log: MetricsLog) -> Path:
        """Write checkpoint folder ``final`` atomically from every rank, then drop old periodic ones.

        Rank 0 opens a temporary folder (``bbert.atomic.atomic_path``) and tells the others its
        name; everyone writes into it; rank 0 renames it into place. A kill at any moment leaves
        the previous checkpoints intact and at most a ``.tmp-*`` folder, which resume ignores.
        """
        dist = self.dist
        with self._writing(final):
            if dist.is_main:
                with atomic_path(final) as tmp:
                    tmp.mkdir(parents=True)
                    dist.broadcast_object(str(tmp))
                    self._write_checkpoint(tmp)
                    dist.barrier()
            else:
                tmp = Path(dist.broadcast_object(None))
                self._write_checkpoint(tmp)
                dist.barrier()
        dist.barrier()  # the rename is done before anyone goes on
        self.last_saved_step = self.step
        log.write({"type": "checkpoint", "name": final.name, "step": self.step, "elapsed_seconds": self.elapsed})
        if dist.is_main:
            rd.prune_checkpoints(self.run_dir, self.config.keep_last_checkpoints)
        return final

    @contextlib.contextmanager
    def _writing(self, folder: Path):
        """Turn a failed write (a full disk, say) into one message that says what is safe."""
        try:
            yield
        except OSError as e:
            last = latest_checkpoint(self.run_dir)
            raise OSError(f"could not write {folder}: {e.strerror or e}. Nothing of it was kept and the last "
                          f"good checkpoint ({last or 'none yet'}) is intact: free space on that disk, then "
                          "run the same command again to resume") from None

    def _write_checkpoint(self, folder: Path) -> None:
        dist = self.dist
        self.engine.save_state(folder)  # collective for DeepSpeed
        rd.save_rng(folder, dist.rank, dist.device)
        dist.barrier()
        self._save_model(rd.model_dir(folder))
        if dist.is_main:
            self.config.to_yaml(rd.config_path(folder))
            rd.write_budget(folder, self._budget_record())  # last: marks it complete

    def _save_model(self, model_dir: Path) -> None:
        """A bbert model folder plus the tokenizer (collective; rank 0 writes)."""
        state = self.engine.full_state_dict()
        if self.dist.is_main:
            with torch.device("meta"):  # no memory, no init: the weights come from ``state``
                model = self.objective.build_model(self.model_config)
            model.load_state_dict(state, assign=True)
            model.save_pretrained(model_dir)
            self.tokenizer.save_pretrained(str(model_dir))

    def _load_checkpoint(self, folder: Path) -> None:
        record = rd.read_budget(folder)
        if record.get("world_size", self.dist.world_size) != self.dist.world_size and self.config.engine == "deepspeed":
            raise ValueError(f"{folder} was written by {record['world_size']} ranks; resume DeepSpeed runs with "
                             f"the same number of ranks (got {self.dist.world_size})")
        self.engine.load_state(folder)
        self.step, self.samples = int(record["step"]), int(record["samples_consumed"])
        self.elapsed = float(record["elapsed_seconds"])
        self.next_validation = float(record["next_validation"])
        self.next_checkpoint = float(record["next_checkpoint"])
        self.markers_done = list(record["markers_done"])
        self.last_saved_step = self.step
        self.end_reason = record.get("end_reason")
        # restored just before the first step (building the loaders draws from the generators)
        self.pending_rng = rd.load_rng(folder, self.dist.rank)

    def _save_final(self) -> None:
        if self.dist.is_main:
            with self._writing(rd.final_dir(self.run_dir)), atomic_path(rd.final_dir(self.run_dir)) as tmp:
                self._save_model(rd.model_dir(tmp))
                rd.write_budget(tmp, self._budget_record())
        self.dist.barrier()


# ---- entry points ----------------------------------------------------------------------------------


def pretrain(config: TrainConfig, resume: bool | str = "auto", allow_data_change: bool = False,
             on_validation=None) -> Path:
    """Run (or resume) the pretraining described by ``config``; return the run dir.

    ``resume="auto"`` continues from the latest checkpoint when the run dir holds one with the
    same config; ``True`` requires a checkpoint (and accepts a changed config); ``False``
    refuses a run dir that already has checkpoints. A run continues only on the data it started
    on (the data dir's tokenizer, vocabulary and shards), unless ``allow_data_change``. One run
    at a time per run dir: rank 0 holds the run dir's lock (:class:`bbert.locks.DirLock`) for the
    life of the run, and a second run fails at once naming the first. Works in one process and under
    ``torchrun`` / ``deepspeed`` (one call per rank). SIGINT/SIGTERM end the run cleanly with a
    checkpoint (end reason ``"interrupted"``). ``on_validation(record)`` is called (on every
    rank) with each validation's record (``step``, ``elapsed_seconds``, ``val_loss``); when it
    returns True the run ends with reason ``"pruned"``, its checkpoints kept as at an early stop.
    """
    config.validate(int(os.environ.get("WORLD_SIZE", 1)))
    check_engine(config)
    rd.check_run_dir(config.run_dir, config.data_dir)
    dist = init_distributed(config.engine)
    lock = DirLock(config.run_dir, "trained into") if dist.is_main else contextlib.nullcontext()
    try:
        with lock:
            return Trainer(config, dist, resume, allow_data_change, on_validation).run()
    finally:
        dist.close()


def build_parser() -> argparse.ArgumentParser:
    """The ``bbert pretrain`` options: a preset, then ``--config FILE``, then the flags and ``--set``."""
    p = argparse.ArgumentParser(prog="bbert pretrain", description="Time-budgeted masked-LM pretraining (24hBERT).")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a preset (default: 24hbert, or none under --config)")
    add_config_arguments(p, "TrainConfig")
    p.add_argument("--data-dir", help="data dir made by `bbert prepare`")
    p.add_argument("--run-dir", help="where config, metrics and checkpoints go")
    p.add_argument("--init-from", metavar="MODEL",
                   help="continue pretraining from MODEL (a bbert model folder or run dir, a transformers "
                        "folder); its shape replaces --preset's model. Sets init_from")
    p.add_argument("--masking", choices=("dynamic", "static"), help="sets masking.mode")
    p.add_argument("--duplication-factor", type=int, metavar="N", help="sets masking.duplication_factor")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const=True, default="auto",
                        help="continue from the latest checkpoint even if the config changed "
                             "(default: continue automatically when the config is the same)")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                        help="refuse to continue an existing run")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume even though the data dir differs from the one the run started on")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (and DeepSpeed config) and exit")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we read
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` named by parsed command-line arguments (paths taken literally)."""
    shorthands = []
    if args.masking is not None:
        shorthands.append(f"masking.mode={args.masking}")
    if args.duplication_factor is not None:
        shorthands.append(f"masking.duplication_factor={args.duplication_factor}")
    paths = [f"{key}={value}" for key, value in (("data_dir", args.data_dir), ("run_dir", args.run_dir),
                                                 ("init_from", args.init_from)) if value]
    return load_config(args.preset, args.config, [*shorthands, *args.assignments, *paths])


@command("bbert pretrain")
def main(argv: list[str] | None = None) -> int:
    """``bbert pretrain`` / ``python -m bbert.train``.

    Exit code 0 when the run ends (budget, max_steps, early stop, or interrupted by
    SIGINT/SIGTERM after saving), 1 on a NaN loss, 2 on a bad config or data dir.
    """
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.print_config:
        config.validate(int(os.environ.get("WORLD_SIZE", 1)), check_data=False)  # not printed as if fine
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if config.engine == "deepspeed":
            print(json.dumps(deepspeed_config(config, int(os.environ.get("WORLD_SIZE", 1))), indent=2))
        return 0
    run_dir = pretrain(config, resume=args.resume, allow_data_change=args.allow_data_change)
    ends = read_metrics(run_dir, "end")
    return 1 if ends and ends[-1]["reason"] == EndReason.NAN else 0


if __name__ == "__main__":
    sys.exit(main())
