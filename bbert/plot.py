"""The matplotlib figures the book shows. Each function returns the matplotlib Figure.

Chapters: budget, model, pretraining, finetuning, beyond 24hBERT, your own domain.
"""
from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
import numpy as np

from bbert import run_dir
from bbert.budget import PAPER_RUN, paper_plan, plan_budget
from bbert.optim import linear_warmup_decay
from bbert.speed import KNOWN_GPUS

# ---- budget + pretraining chapters --------------------------------------------------
# Chapters: notebooks/01_budget.ipynb, notebooks/04_pretraining.ipynb.


def read_metrics(source, record_type: str | None = None) -> list[dict]:
    """The records of a run (a run dir or its ``metrics.jsonl``), optionally of one type.

    :func:`bbert.run_dir.read_metrics`, refusing a folder that holds no run.
    """
    if not run_dir.metrics_path(source).is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {source}: pass a run dir made by bbert pretrain")
    return run_dir.read_metrics(source, record_type)


def _new_figure(ncols: int = 1, width: float = 6.4, height: float = 3.6):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    plt.close(fig)  # returned, not shown twice: a notebook displays it as the cell's value
    return fig, list(axes[0])


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit in which a span of ``seconds`` reads best on an axis: ``(name, seconds per unit)``.

    Hours from 2 hours, minutes from 2 minutes, else seconds. Plots take seconds (the package's
    one unit) and label their axes with this.
    """
    for name, size in (("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= 2 * size:
            return name, size
    return "seconds", 1.0


def plot_schedule(warmup_proportion: float = 0.06, time_budget_seconds: float = 24 * 3600.0, lr: float = 1e-3,
                  run=None, ax=None):
    """The time-based schedule: lr against elapsed time; a run's logged lr on top when given.

    Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    fig, (ax,) = _new_figure() if ax is None else (ax.figure, [ax])
    unit, size = time_unit(time_budget_seconds)
    fractions = np.linspace(0.0, 1.0, 501)
    ax.plot(fractions * time_budget_seconds / size,
            [lr * linear_warmup_decay(f, warmup_proportion) for f in fractions],
            label=f"warm-up {warmup_proportion:.0%} of the budget, linear decay to 0")
    if run is not None:
        train = read_metrics(run, "train")
        # each lr at the clock where the step set it (older logs: the step's end)
        at = [r.get("lr_elapsed_seconds", r["elapsed_seconds"]) for r in train]
        ax.plot([t / size for t in at], [r["lr"] for r in train], ".",
                ms=4, label="lr logged by the run (at each step's start)")
    ax.axvline(warmup_proportion * time_budget_seconds / size, color="gray", ls=":", lw=1)
    ax.set_xlabel(f"elapsed wall-clock time ({unit})")
    ax.set_ylabel("learning rate")
    ax.set_title(f"Time-based schedule, budget {time_budget_seconds / size:g} {unit}")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_loss_curves(runs, labels=None, x: str = "time", ax=None):
    """Training loss (thin) and validation loss (markers) of one or more runs.

    ``runs``: a run dir / metrics file or a list of them. ``x``: ``"time"`` (elapsed, in the
    unit of :func:`time_unit`) or ``"step"``.
    Chapter: ``notebooks/04_pretraining.ipynb``.
    """
    if x not in ("time", "step"):
        raise ValueError(f"x must be 'time' or 'step', got {x!r}")
    runs = [runs] if not isinstance(runs, (list, tuple)) else list(runs)
    labels = labels or [str(r).rstrip("/").split("/")[-1] for r in runs]
    fig, (ax,) = _new_figure() if ax is None else (ax.figure, [ax])
    curves = [(read_metrics(run, "train"), read_metrics(run, "val"), label) for run, label in zip(runs, labels)]
    unit, size = time_unit(max((r["elapsed_seconds"] for train, val, _ in curves for r in train + val), default=0.0))

    def xs(records):
        return [r["elapsed_seconds"] / size if x == "time" else r["step"] for r in records]

    for train, val, label in curves:
        line, = ax.plot(xs(train), [r["loss"] for r in train], lw=1, alpha=0.8, label=f"{label}: train")
        if val:
            ax.plot(xs(val), [r["val_loss"] for r in val], "o-", color=line.get_color(),
                    ms=4, label=f"{label}: validation")
    ax.set_xlabel(f"elapsed time ({unit})" if x == "time" else "optimizer step")
    ax.set_ylabel("MLM loss")
    ax.set_title("Masked-LM loss")
    ax.legend(fontsize="small")
    return fig


def _time_unit(seconds: float) -> tuple[str, float]:
    """The axis unit for a span of ``seconds``: seconds, minutes or hours, and its length in seconds."""
    if seconds < 180:
        return "seconds", 1.0
    return ("minutes", 60.0) if seconds < 3 * 3600 else ("hours", 3600.0)


def plot_loss_vs_wall_clock(curves: dict, baseline: str | None = "baseline", title: str | None = None, ax=None):
    """Validation loss against elapsed wall-clock time, one line per run; the baseline bold.

    ``curves``: ``{label: [(elapsed seconds, loss), ...]}`` (``bbert.ablation.loss_curve``).
    The axis unit follows the longest curve. Chapter: ``notebooks/07_beyond.ipynb``.
    """
    fig, (ax,) = _new_figure(width=7.5, height=4.0) if ax is None else (ax.figure, [ax])
    longest = max((t for curve in curves.values() for t, _ in curve), default=1.0)
    unit, per = _time_unit(longest)
    for label, curve in curves.items():
        bold = label == baseline
        ax.plot([t / per for t, _ in curve], [loss for _, loss in curve], "-o" if bold else "-",
                color="black" if bold else None, lw=2.5 if bold else 1.2, ms=3, label=label,
                zorder=3 if bold else 2)
    if baseline in curves and curves[baseline]:
        ax.axhline(curves[baseline][-1][1], color="black", lw=0.8, ls=":")
    ax.set_xlabel(f"elapsed wall-clock time ({unit})")
    ax.set_ylabel("validation MLM loss")
    ax.set_title(title or "Validation loss at equal wall clock")
    ax.legend(fontsize="small", ncol=2)
    return fig


def plot_budget_plan(plan, reference=None):
    """A plan beside a reference (default: the paper's run): steps over the budget, and cost.

    Left: optimizer steps reached against hours. Right: GPU-hours and cost.
    Chapter: ``notebooks/01_budget.ipynb``.
    """
    reference = reference or paper_plan(plan.price_per_gpu_hour)
    fig, (ax_steps, ax_cost) = _new_figure(ncols=2, width=10, height=3.8)
    for p, name in ((plan, "this plan"), (reference, "paper (estimate)")):
        hours = np.linspace(0, p.hours, 50)
        steps = p.optimizer_steps * hours / p.hours
        ax_steps.plot(hours, steps, label=f"{name}: {p.num_gpus} x {p.gpu}, {p.model}, batch {p.batch_size}")
        ax_steps.annotate(f"{p.optimizer_steps:,.0f}", (p.hours, p.optimizer_steps), fontsize="small",
                          xytext=(-5, 5), textcoords="offset points", ha="right")
    ax_steps.set_xlabel("hours")
    ax_steps.set_ylabel("optimizer steps")
    ax_steps.set_title("Optimizer steps the budget buys")
    ax_steps.legend(fontsize="small", loc="lower right")
    ax_steps.margins(y=0.15)
    names = ["this plan", "paper"]
    bars = ax_cost.bar(names, [plan.cost, reference.cost], color=["C0", "C1"])
    ax_cost.bar_label(bars, labels=[f"${c:,.0f}\n{p.gpu_hours:,.0f} GPU-h"
                                    for c, p in ((plan.cost, plan), (reference.cost, reference))],
                      fontsize="small")
    ax_cost.set_ylabel("cost ($)")
    ax_cost.set_title(f"Cost at ${plan.price_per_gpu_hour:g} per GPU-hour")
    ax_cost.margins(y=0.25)
    return fig


def plot_gpu_table(num_gpus: int = 8, hours: float = 24.0, model: str = "large", batch_size: int = 4096):
    """Optimizer steps each known GPU buys in the same budget, with the paper's ~23k marked.

    Chapter: ``notebooks/01_budget.ipynb``.
    """
    plans = [plan_budget(num_gpus, name, hours, model=model, batch_size=batch_size) for name in KNOWN_GPUS]
    fig, (ax,) = _new_figure(width=7, height=4.2)
    ax.barh([p.gpu for p in plans], [p.optimizer_steps for p in plans], color="C0")
    ax.axvline(PAPER_RUN["optimizer_steps"], color="C1", ls="--",
               label=f"paper: ~{PAPER_RUN['optimizer_steps']:,} steps (8 GPUs, 24 h)")
    ax.set_xlabel("optimizer steps")
    ax.set_title(f"{num_gpus} GPUs x {hours:g} h, {model}, batch {batch_size} (table throughput)")
    ax.legend(fontsize="small", loc="upper right")
    ax.invert_yaxis()
    return fig


# ---- model chapter ------------------------------------------------------------------
# Chapter: notebooks/03_model.ipynb.


def plot_speedups(speedups: dict, mfu: dict | None = None, title: str = "training step, this machine",
                  peak: str = "bf16"):
    """Bar chart of measured speed-ups (x times a baseline), and the MFU of each model when given.

    ``speedups``: ``{label: ratio}``; ``mfu``: ``{label: fraction of the matmul peak}``
    in precision ``peak`` (``"bf16"``, or ``"fp32"`` where bf16 is not native).
    Chapter: ``notebooks/03_model.ipynb``.
    """
    fig, axes = _new_figure(ncols=2 if mfu else 1, width=11 if mfu else 6.4,
                            height=0.5 + 0.45 * max(len(speedups), 3))
    ax = axes[0]
    labels = list(speedups)[::-1]
    values = [speedups[k] for k in labels]
    bars = ax.barh(labels, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], padding=3)
    ax.set_xlim(0, max(values) * 1.25)
    ax.set_xlabel("speed-up (throughput ratio, measured alternately)")
    ax.set_title(title)
    if mfu:
        ax = axes[1]
        labels = list(mfu)[::-1]
        values = [100 * mfu[k] for k in labels]
        bars = ax.barh(labels, values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], padding=3)
        ax.set_xlim(0, max(100, max(values) * 1.2))
        ax.set_xlabel(f"MFU: % of the measured {peak} torch.mm peak")
        ax.set_title("model FLOPs utilization")
    fig.tight_layout()
    return fig


def plot_layer_grad_norms(norms: dict, ax=None):
    """Gradient norm of each layer's weights at initialization, one line per model (pre- vs post-LN).

    Chapter: ``notebooks/03_model.ipynb``.
    """
    fig, (ax,) = _new_figure() if ax is None else (ax.figure, [ax])
    for label, values in norms.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("gradient norm")
    ax.set_title("gradients at initialization")
    ax.legend()
    fig.tight_layout()
    return fig

# ---- finetuning chapter -------------------------------------------------------------
# Chapter: notebooks/05_finetuning.ipynb.


def plot_finetune_history(result: dict, ax=None):
    """Training loss and dev score per epoch of one finetuning run (a ``result.json`` dict).

    The marked epoch is the one kept (best dev score). Chapter: ``notebooks/05_finetuning.ipynb``.
    """
    fig, (ax,) = _new_figure() if ax is None else (ax.figure, [ax])
    history = result["history"]
    epochs = [h["epoch"] for h in history]
    split = next(iter(history[0]["dev"]))
    metric = result["main_metric"]
    scores = [h["dev"][split][metric] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", color="tab:gray", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_xticks(epochs)
    right = ax.twinx()
    right.plot(epochs, scores, marker="s", color="tab:blue", label=f"dev {metric}")
    right.plot([result["best_epoch"]], [result["score"]], marker="*", markersize=16, color="tab:orange",
               linestyle="none", label="kept (best epoch)")
    right.set_ylabel(f"dev {metric}")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    ax.set_title(f"{result['display']}: {result['config']}, seed {result['seed']}")
    fig.tight_layout()
    return fig


def plot_grid_search(results: list[dict], best: str | None = None, ax=None):
    """Every run of a grid: one dot per seed, a bar at each configuration's median.

    ``best`` (from ``bbert.glue.select_best``) is highlighted: the reported number is its median,
    not the single best dot. Chapter: ``notebooks/05_finetuning.ipynb``.
    """
    fig, (ax,) = _new_figure(width=7.5) if ax is None else (ax.figure, [ax])
    configs = sorted({r["config"] for r in results}, key=lambda c: [r["config"] for r in results].index(c))
    for x, config in enumerate(configs):
        scores = [r["score"] for r in results if r["config"] == config]
        color = "tab:orange" if config == best else "tab:blue"
        ax.scatter([x] * len(scores), scores, color=color, alpha=0.6, zorder=3)
        ax.hlines(statistics.median(scores), x - 0.3, x + 0.3, color=color, linewidth=3, zorder=4)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, rotation=30, ha="right")
    ax.set_ylabel(f"dev {results[0].get('main_metric', 'score')}")
    ax.set_title("grid search: seeds (dots) and their median (bar); orange = chosen")
    fig.tight_layout()
    return fig


def plot_glue_scores(scores: dict, title: str = "GLUE"):
    """Grouped bars: ``scores[model][task]`` (x100), one group per task, one bar per model.

    Chapter: ``notebooks/05_finetuning.ipynb``.
    """
    fig, (ax,) = _new_figure(width=9.0)
    tasks = list(dict.fromkeys(t for per_task in scores.values() for t in per_task))
    width = 0.8 / max(1, len(scores))
    for i, (label, per_task) in enumerate(scores.items()):
        xs = [t + i * width for t in range(len(tasks))]
        values = [per_task.get(task, float("nan")) for task in tasks]
        bars = ax.bar(xs, values, width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))])
    ax.set_xticklabels(tasks)
    ax.set_ylabel("score (x100)")
    ax.set_ylim(0, 118)
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(scores), fontsize=8)
    fig.tight_layout()
    return fig


# ---- your own domain chapter -------------------------------------------------------------
# Chapter: notebooks/08_your_domain.ipynb.


def plot_seed_bands(runs: dict, title: str | None = None, ax=None):
    """Validation loss against wall-clock time for several arms, each run at several seeds: the
    mean over the seeds as a line, the band from the lowest to the highest seed, each seed faint.

    ``runs``: ``{arm: [curve, ...]}``, one curve per seed as ``[(elapsed seconds, loss), ...]``
    (``bbert.ablation.loss_curve``). The seeds validate at slightly different times, so the
    mean and the band are taken on a common grid where every curve of the arm has points.
    """
    fig, (ax,) = _new_figure(width=7.5, height=4.0) if ax is None else (ax.figure, [ax])
    longest = max((t for curves in runs.values() for curve in curves for t, _ in curve), default=1.0)
    unit, per = time_unit(longest)
    for arm, curves in runs.items():
        curves = [c for c in curves if c]
        if not curves:
            continue
        grid = np.linspace(max(c[0][0] for c in curves), min(c[-1][0] for c in curves), 60)
        losses = np.array([np.interp(grid, *zip(*c)) for c in curves])
        line, = ax.plot(grid / per, losses.mean(axis=0), lw=2, label=f"{arm} (mean of {len(curves)})")
        ax.fill_between(grid / per, losses.min(axis=0), losses.max(axis=0), color=line.get_color(),
                        alpha=0.2, lw=0)
        for c in curves:
            ax.plot([t / per for t, _ in c], [loss for _, loss in c], color=line.get_color(), lw=0.6,
                    alpha=0.5)
    ax.set_xlabel(f"elapsed wall-clock time ({unit})")
    ax.set_ylabel("validation MLM loss")
    ax.set_title(title or "Validation loss at equal wall clock: mean and range over seeds")
    ax.legend(fontsize="small")
    return fig


# ---- findings chapter: runs repeated over seeds ------------------------------------
# Chapter: notebooks/06_findings.ipynb.


def val_curve(source, x: str = "time", tokens_per_step: float | None = None):
    """A run's validation losses against ``x``: ``"time"`` (elapsed s), ``"steps"`` or
    ``"tokens"`` (steps x ``tokens_per_step``). Returns ``(xs, losses)`` as two lists."""
    if x not in ("time", "steps", "tokens"):
        raise ValueError(f"x must be 'time', 'steps' or 'tokens', got {x!r}")
    if x == "tokens" and not tokens_per_step:
        raise ValueError("x='tokens' needs tokens_per_step (batch size x sequence length)")
    val = read_metrics(source, "val")
    per = {"time": lambda r: r["elapsed_seconds"], "steps": lambda r: r["step"],
           "tokens": lambda r: r["step"] * tokens_per_step}[x]
    return [per(r) for r in val], [r["val_loss"] for r in val]


def seed_band(sources, x: str = "time", tokens_per_step: float | None = None):
    """The seeds of one experiment: ``(xs, mean, low, high)`` of their validation losses,
    point by point (the mean of the seeds' x where they differ; runs cut to the shortest)."""
    curves = [val_curve(s, x, tokens_per_step) for s in sources]
    n = min(len(xs) for xs, _ in curves)
    if n == 0:
        raise ValueError("a run has no validation record: set validation_every_minutes")
    xs = np.mean([c[0][:n] for c in curves], axis=0)
    losses = np.array([c[1][:n] for c in curves])
    return xs, losses.mean(axis=0), losses.min(axis=0), losses.max(axis=0)


def plot_run_bands(groups: dict, x: str = "time", tokens_per_step: float | None = None,
                    scale: float = 1.0, xlabel: str | None = None, title: str | None = None,
                    ax=None):
    """The mean validation loss of each ``{label: [run dirs of its seeds]}`` with its
    min-max band over the seeds, against elapsed time, steps or tokens (x divided by
    ``scale``, e.g. seconds per minute). Returns the figure."""
    fig = None
    if ax is None:
        fig, (ax,) = _new_figure()
    for label, sources in groups.items():
        xs, mean, low, high = seed_band(sources, x, tokens_per_step)
        line, = ax.plot(xs / scale, mean, "o-", ms=3, label=f"{label} (n={len(sources)})")
        ax.fill_between(xs / scale, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel or {"time": "elapsed seconds", "steps": "optimizer steps",
                             "tokens": "tokens seen"}[x])
    ax.set_ylabel("validation MLM loss")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    if fig is not None:
        fig.tight_layout()
    return fig if fig is not None else ax.figure
