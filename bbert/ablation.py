"""Beyond 24hBERT: the post-2021 encoder options, switched on one at a time and together, ranked at one wall clock.

Each option is a handful of config overrides (dotted keys, as ``--set`` and a search grid take
them) with the paper it comes from and what that paper reported. :func:`run_ablation` trains the
plain recipe and each option alone (and any combinations asked for) as ordinary budgeted run
dirs of equal wall-clock budget, one after another on this machine, and compares their
validation-loss curves; :func:`search_combinations` hands the on/off grid of all options to
``bbert.search`` with the ASHA pruner, which stops the weak combinations early::

    rows = run_ablation(base, "runs/ablation", budget_s=60)
    print(ablation_table(rows))
    found = search_combinations(base, "runs/ablation-search", budget_s=60, n_trials=8)

A fair comparison needs three more things, all here. ASHA's first rung goes where the loss leaves
its plateau (:func:`plateau`, :func:`first_rung`, :func:`pilot_rung`), so no trial is ranked while
all of them still predict from token frequencies. The plain recipe gets the same search over its
own learning rate and batch size (:func:`tune_baseline`): the tuned baseline. And the final
comparison is repeated over seeds (:func:`head_to_head`), with a paired interval of the loss
ratio (:func:`paired_ratio_interval`, :func:`summarize`); the median-seed checkpoints go on to a
downstream task (:func:`finetune_arms`), because MLM loss is not what the anchors measured::

    rung, why = pilot_rung(rows, budget_s=60)
    tuned = tune_baseline(base, "runs/tune", 60, n_trials=8, min_resource_s=rung)
    final = head_to_head(eval_base, "runs/final", 60, {"baseline": {}, "tuned": tuned["overrides"],
                                                       "best": overrides(["wsd", "batch_ramp"])}, seeds=[0, 1, 2])
    print(head_to_head_table(summarize(final, baselines=("baseline", "tuned"))))

Every run reads the same validation batches, scored at 15% masking whatever the training rate
(the objective owns that), so losses compare on one yardstick. The runs share one machine in
turn: a busy neighbor slows whichever run is going, which is why the head-to-head takes seeds.

Chapter: ``notebooks/07_beyond.ipynb``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import statistics
from pathlib import Path

from bbert.run_dir import read_metrics
from bbert.search import best_trial, budget_saved, search
from bbert.train import pretrain
from bbert.train_config import TrainConfig, hours
from bbert.trials import RAN_TO_THE_END, is_finished, trial_config

BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class Option:
    """One post-2021 change to the recipe: its overrides when on, the paper's values when off."""

    name: str
    on: dict
    off: dict
    source: str   # the papers, as the book cites them
    anchor: str   # what the anchor reported, in one line


OPTIONS: tuple[Option, ...] = (
    Option("mask30", {"masking.mlm_probability": 0.3}, {"masking.mlm_probability": 0.15},
           "Wettig et al. 2023; Portes et al. 2023 (MosaicBERT)",
           "masking 40% beat 15% for BERT-large on GLUE and SQuAD; MosaicBERT pretrains at 30%"),
    Option("geglu", {"model.ffn_type": "geglu"}, {"model.ffn_type": "mlp"},
           "Shazeer 2020; Warner et al. 2024 (ModernBERT)",
           "GLU feed-forwards of equal parameters lowered T5's perplexity; Cramming, MosaicBERT and ModernBERT use one"),
    Option("rope", {"model.position_embedding_type": "rope"}, {"model.position_embedding_type": "absolute"},
           "Su et al. 2021 (RoFormer); Warner et al. 2024 (ModernBERT)",
           "rotary positions trained faster than absolute ones in RoFormer; ModernBERT uses them"),
    Option("no_bias", {"model.bias": False}, {"model.bias": True},
           "Geiping & Goldstein 2023 (Cramming); Warner et al. 2024 (ModernBERT)",
           "Cramming dropped the biases for speed at no loss in quality; ModernBERT keeps only the decoder's"),
    Option("wsd", {"lr_schedule": "wsd", "decay_proportion": 0.2}, {"lr_schedule": "linear"},
           "Hu et al. 2024 (MiniCPM); Hägele et al. 2024; Warner et al. 2024 (ModernBERT)",
           "warmup-stable-decay with a 20% cool-down matched cosine; the loss drops fast in the decay"),
    Option("batch_ramp", {"batch_ramp_proportion": 0.5}, {"batch_ramp_proportion": 0.0},
           "Geiping & Goldstein 2023 (Cramming)",
           "Cramming grows the batch linearly to its final size over about the first half of its budget"),
)


def option(name: str) -> Option:
    """The option called ``name`` (one of :data:`OPTIONS`)."""
    for opt in OPTIONS:
        if opt.name == name:
            return opt
    raise ValueError(f"unknown option {name!r}; choose from {', '.join(o.name for o in OPTIONS)}")


def _names(options) -> list[str]:
    return [o.name for o in OPTIONS] if options is None else list(options)


def overrides(names) -> dict:
    """The overrides that switch on every option in ``names`` (a combination); ``()`` is the baseline."""
    out: dict = {}
    for name in names:
        out.update(option(name).on)
    return out


def budget_config(base: TrainConfig, run_dir, budget_s: float, names=()) -> TrainConfig:
    """``base`` with the options ``names`` on and a wall-clock budget of ``budget_s`` seconds."""
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds, got {budget_s}")
    return trial_config(base, {**overrides(names), "time_budget_hours": hours(budget_s)}, run_dir)


# ---- reading runs -------------------------------------------------------------------------


def loss_curve(run_dir) -> list[tuple[float, float]]:
    """``[(elapsed seconds, validation loss), ...]`` of a run, from its metrics."""
    return [(r["elapsed_seconds"], r["val_loss"]) for r in read_metrics(run_dir, "val")]


def time_to_reach(curve, target: float, budget_s: float) -> float | None:
    """The first fraction of the budget at which ``curve`` reaches ``target``; None if it never does.

    Between two validations the loss is taken to fall linearly, so the answer lies between them;
    a target met at the first validation gives that validation's time (an upper bound).
    """
    previous = None
    for seconds, loss in curve:
        if loss <= target:
            if previous is None:
                return seconds / budget_s
            t0, l0 = previous  # above the target, so l0 > loss
            return (t0 + (seconds - t0) * (l0 - target) / (l0 - loss)) / budget_s
        previous = (seconds, loss)
    return None


def run_result(name: str, run_dir, budget_s: float, names=()) -> dict:
    """One row of the ablation: the run's final validation loss, curve, steps, end reason and median
    training throughput (``seq_per_s``: the option's own speed, and a neighbor's load if any)."""
    curve = loss_curve(run_dir)
    end = read_metrics(run_dir, "end")
    speeds = [r["seq_per_s"] for r in read_metrics(run_dir, "train") if r.get("seq_per_s")]
    return {"name": name, "options": list(names), "run_dir": str(run_dir), "budget_s": budget_s,
            "final_val_loss": curve[-1][1] if curve else math.nan, "curve": curve,
            "steps": end[-1]["step"] if end else None, "end_reason": end[-1]["reason"] if end else None,
            "seq_per_s": statistics.median(speeds) if speeds else math.nan}


def compare(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Add to each row its ``ratio`` (final loss / the baseline's) and ``time_to_baseline``: the
    fraction of its budget at which it first reached the baseline's final loss (None: never)."""
    base = next((r for r in rows if r["name"] == baseline), None)
    if base is None:
        raise ValueError(f"no row named {baseline!r} among {[r['name'] for r in rows]}")
    target = base["final_val_loss"]
    for row in rows:
        row["ratio"] = row["final_val_loss"] / target
        row["time_to_baseline"] = time_to_reach(row["curve"], target, row["budget_s"])
    return rows


# ---- running ------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(verbose: bool, optuna_logs: bool = False):
    """Runs without their progress lines (and Optuna's per-trial log lines) unless ``verbose``."""
    if verbose:
        yield
        return
    level = None
    if optuna_logs:
        import optuna  # deferred: only the search needs it

        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if level is not None:
            optuna.logging.set_verbosity(level)


def run_ablation(base: TrainConfig, out_dir, budget_s: float, options=None, combinations=(),
                 verbose: bool = True) -> list[dict]:
    """Train the baseline, each option alone and each combination, all with ``budget_s`` seconds.

    ``options``: option names (default: all of :data:`OPTIONS`); ``combinations``: lists of
    option names, run after the single options. Runs go to ``out_dir/<name>`` one after another;
    a run dir that finished with the same config is read, not run again. Returns one row per
    run (see :func:`run_result`) with ``ratio`` and ``time_to_baseline`` (see :func:`compare`).
    """
    out_dir = Path(out_dir)
    plan = [(BASELINE, ())] + [(name, (name,)) for name in _names(options)]
    plan += [("+".join(combo), tuple(combo)) for combo in combinations]
    configs = [(name, names, budget_config(base, out_dir / name, budget_s, names)) for name, names in plan]
    _run_plan("run", [(f"{name} ({budget_s:g} s)", config) for name, _, config in configs], verbose)
    return compare([run_result(name, config.run_dir, budget_s, names) for name, names, config in configs])


def _run_plan(what: str, plan: list, verbose: bool) -> None:
    """Run each ``(label, config)`` of ``plan`` that has not already run with that config; every
    config is validated first, so a bad option (or one this data can't take) fails before any run."""
    for _, config in plan:
        config.validate()
    for i, (label, config) in enumerate(plan):
        if not _done_with(config):
            if verbose:
                print(f"[ablation] {what} {i + 1}/{len(plan)}: {label}", flush=True)
            with _quiet(verbose):
                pretrain(config)


def _done_with(config: TrainConfig) -> bool:
    saved = Path(config.run_dir) / "config.yaml"
    return (is_finished(config.run_dir) and saved.is_file()
            and TrainConfig.from_yaml(saved).to_dict() == config.to_dict())


def search_grid(options=None) -> dict[str, list[dict]]:
    """The on/off grid of the options for ``bbert.search``: each option a key, its off and on
    overrides the two values (a value that is a dict sets its fields together)."""
    return {o.name: [o.off, o.on] for o in map(option, _names(options))}


def options_on(row: dict, options=None) -> list[str]:
    """The options a search trial (a row of ``bbert.search``) had switched on."""
    return [n for n in _names(options) if isinstance(row.get(n), dict)
            and all(row[n].get(k) == v for k, v in option(n).on.items())]


def search_combinations(base: TrainConfig, out_dir, budget_s: float, n_trials: int, options=None,
                        pruner: str = "asha", storage: str | None = None, verbose: bool = True,
                        min_resource_s: float | None = None) -> dict:
    """Search the options' combinations with ``bbert.search`` and its ``pruner`` (ASHA: successive
    halving that stops the weak trials at rungs of their budget, Li et al. 2020).

    Every trial gets ``budget_s`` seconds; ``n_trials`` combinations (of the grid's
    2^options) are tried. The first rung is ``min_resource_s`` (see :func:`first_rung`; default
    a ninth of the budget), the next ones 3 times later each. Returns ``{"rows": the search rows
    of the trials that ran, "best": the best row (or None), "best_options": the option names it
    switched on}``.
    """
    rows = _search(base, search_grid(options), out_dir, budget_s, n_trials, pruner, storage, verbose,
                   min_resource_s)
    for row in rows:
        row["options_on"] = options_on(row, options)
    best = best_trial(rows)
    return {"rows": rows, "best": best, "best_options": best["options_on"] if best else None}


def _search(base, grid, out_dir, budget_s, n_trials, pruner, storage, verbose, min_resource_s) -> list[dict]:
    base = trial_config(base, {"time_budget_hours": hours(budget_s)}, base.run_dir)
    rung = max(1, round(budget_s / 9 if min_resource_s is None else min_resource_s))
    with _quiet(verbose, optuna_logs=True):
        rows = search(base, grid, out_dir, pruner=pruner, storage=storage, n_trials=n_trials,
                      min_resource_s=rung, reduction_factor=3, verbose=verbose)
    return [r for r in rows if r["end_reason"] is not None]  # the grid's other points never started


def baseline_grid(base: TrainConfig, lr_factors=(0.5, 1, 2, 4), batch_factors=(0.5, 1, 2)) -> dict:
    """The plain recipe's own search space: its learning rate and batch size, each times a few
    factors (12 points by default). A batch value sets the micro-batch with it, so it divides."""
    batches = [max(1, round(base.batch_size * f)) for f in batch_factors]
    return {"lr": [base.lr * f for f in lr_factors],
            "batch_size": [{"batch_size": b, "micro_batch_size": min(b, base.micro_batch_size)} for b in batches]}


def tune_baseline(base: TrainConfig, out_dir, budget_s: float, n_trials: int, grid: dict | None = None,
                  pruner: str = "asha", verbose: bool = True, min_resource_s: float | None = None,
                  plain_loss: float | None = None) -> dict:
    """The control for :func:`search_combinations`: the plain recipe (no option on) searched over
    its own learning rate and batch size (:func:`baseline_grid`) with the same trials, pruner and
    rungs. Returns ``{"rows", "best", "overrides"}``; ``overrides`` turn ``base`` into the tuned
    baseline: ``{}`` when no trial ran to its end or none beat ``plain_loss`` (the untuned run's
    final loss on the same text, as :func:`best_combination` counts it for the options)."""
    grid = baseline_grid(base) if grid is None else grid
    rows = _search(base, grid, out_dir, budget_s, n_trials, pruner, None, verbose, min_resource_s)
    for row in rows:
        row["options_on"] = [f"{key}={_value(row[key])}" for key in grid]
    best = best_trial(rows)
    if best is None or (plain_loss is not None and plain_loss <= best["val_loss"]):
        return {"rows": rows, "best": best, "overrides": {}}
    tuned = {}
    for key in grid:
        tuned.update(best[key] if isinstance(best[key], dict) else {key: best[key]})
    return {"rows": rows, "best": best, "overrides": tuned}


def _value(value) -> str:
    return f"{value['batch_size']}" if isinstance(value, dict) and "batch_size" in value else f"{value:g}"


def best_combination(rows: list[dict], found: dict | None = None) -> list[str] | None:
    """The options of the lowest final loss among the runs that spent their whole budget: the
    ablation's ``rows`` and the search's trials (``found``); None when the plain recipe is best."""
    done = [(r["final_val_loss"], r["options"]) for r in rows
            if r["end_reason"] in RAN_TO_THE_END and math.isfinite(r["final_val_loss"])]
    if found and found["best"] is not None:
        done.append((found["best"]["val_loss"], found["best_options"]))
    return list(min(done, key=lambda pair: pair[0], default=(math.nan, []))[1]) or None


# ---- the head-to-head: seeds, a paired interval, a downstream task ---------------------------


def plateau(curve, flat: float = 0.02) -> tuple[float, float]:
    """``(seconds, loss)`` where a run's validation loss reaches its plateau: the first validation
    that is less than ``flat`` (a fraction) below the one before it. Early on the loss falls fast
    from ln(vocabulary) to about the entropy of the token frequencies, then stays there until the
    model learns to use the context. A curve that never flattens gives its first validation."""
    if not curve:
        raise ValueError("the run has no validation: set validation_every_minutes")
    return next(((t, loss) for (_, before), (t, loss) in zip(curve, curve[1:]) if loss > (1 - flat) * before),
                curve[0])


def first_rung(curve, drop: float = 0.05, flat: float = 0.02) -> float | None:
    """When a run leaves its loss :func:`plateau`: the time of the first later validation whose
    loss is ``drop`` (a fraction) below the plateau's. None when the run never leaves it.

    ASHA ranks trials at this rung and later ones; a rung on the plateau ranks noise.
    """
    if not 0 < drop < 1 or not 0 < flat < 1:
        raise ValueError(f"drop and flat must be fractions in (0, 1), got {drop} and {flat}")
    start, level = plateau(curve, flat)
    return next((t for t, loss in curve if t > start and loss <= (1 - drop) * level), None)


def pilot_rung(rows: list[dict], budget_s: float, drop: float = 0.05) -> tuple[float, str]:
    """ASHA's first rung from :func:`run_ablation`'s runs (the pilots), with the reason: where the
    plain recipe leaves its plateau (:func:`first_rung`); if it never does, where the first of the
    other runs does; if none does, a third of the budget."""
    base = next(r for r in rows if r["name"] == BASELINE)
    rung = first_rung(base["curve"], drop)
    if rung is not None:
        return rung, f"the plain recipe's first validation {drop:.0%} below its plateau"
    left = [(t, r["name"]) for r in rows if r["curve"] and (t := first_rung(r["curve"], drop)) is not None]
    if left:
        t, name = min(left)
        return t, (f"the plain recipe never left its plateau by {drop:.0%}; {name}, the first run that "
                   f"did, left it there")
    return budget_s / 3, f"no run left its plateau by {drop:.0%}: a third of the budget"


def paired_ratio_interval(baseline, other, confidence: float = 0.95) -> dict:
    """The per-seed ratios ``other / baseline`` of final losses (paired: the same seed, the same
    data) and a ``confidence`` interval of their geometric mean: Student's t-interval on the log
    ratios (``scipy.stats``), mapped back with exp. ``low``/``high`` are NaN below two seeds."""
    from scipy import stats  # deferred: only the summaries need it

    if len(baseline) != len(other) or not baseline:
        raise ValueError(f"need one baseline loss per seed: got {len(baseline)} and {len(other)}")
    logs = [math.log(o / b) for b, o in zip(baseline, other)]
    mean = statistics.fmean(logs)
    low = high = math.nan
    if len(logs) > 1:
        sem = statistics.stdev(logs) / math.sqrt(len(logs))
        low, high = (stats.t.interval(confidence, len(logs) - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean))
    return {"ratios": [math.exp(x) for x in logs], "ratio": math.exp(mean), "low": math.exp(low),
            "high": math.exp(high), "n": len(logs), "confidence": confidence}


def head_to_head(base: TrainConfig, out_dir, budget_s: float, arms: dict[str, dict], seeds,
                 verbose: bool = True) -> list[dict]:
    """Train every arm (a name and its overrides of ``base``) at every seed, ``budget_s`` seconds
    each, into ``out_dir/<name>-seed<seed>``. The arms take turns within each seed, so a
    neighbor's load drifts over all of them alike. A run that finished with the same config is
    read, not run again. Returns one :func:`run_result` row per run, with its ``seed``."""
    out_dir = Path(out_dir)
    plan = [(name, seed, trial_config(base, {**extra, "seed": seed, "time_budget_hours": hours(budget_s)},
                                      out_dir / f"{name.replace(' ', '_')}-seed{seed}"))
            for seed in seeds for name, extra in arms.items()]
    _run_plan("head-to-head", [(f"{name}, seed {seed}", config) for name, seed, config in plan], verbose)
    return [{**run_result(name, config.run_dir, budget_s), "seed": seed} for name, seed, config in plan]


def summarize(rows: list[dict], baselines=(BASELINE,), confidence: float = 0.95) -> list[dict]:
    """One line per arm of :func:`head_to_head`'s rows: the mean and standard deviation of its
    final losses over seeds, and against each arm of ``baselines`` the paired ratio interval
    (:func:`paired_ratio_interval`, under ``"vs"``)."""
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["seed"]] = r["final_val_loss"]
    out = []
    for name, losses in by.items():
        values = list(losses.values())
        line = {"name": name, "seeds": list(losses), "losses": values, "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else math.nan, "vs": {}}
        for other in baselines:
            if other != name and other in by:
                seeds = [s for s in losses if s in by[other]]
                line["vs"][other] = paired_ratio_interval([by[other][s] for s in seeds],
                                                          [losses[s] for s in seeds], confidence)
        out.append(line)
    return out


def head_to_head_table(summary: list[dict]) -> str:
    """:func:`summarize` as a Markdown table: mean ± sd of the final loss over seeds, and for each
    baseline the geometric mean of the paired ratios with its interval."""
    others = [line["name"] for line in summary if any(line["name"] in x["vs"] for x in summary)]
    conf = next((v["confidence"] for line in summary for v in line["vs"].values()), 0.95)
    lines = ["| run | seeds | final val loss, mean ± sd | "
             + " | ".join(f"ratio to {o} [{conf:.0%} interval]" for o in others) + " |",
             "| --- | ---: | ---: |" + " ---: |" * len(others)]
    for line in summary:
        cells = [f"{v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" if (v := line["vs"].get(o)) else "1"
                 for o in others]
        lines.append(f"| {line['name']} | {len(line['seeds'])} | {line['mean']:.4f} ± {line['std']:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def median_seed_run(rows: list[dict], name: str) -> dict:
    """The run of arm ``name`` whose final loss is the median over its seeds (the lower middle one
    for an even count): the one checkpoint of the arm that goes on to finetuning."""
    runs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["final_val_loss"])
    if not runs:
        raise ValueError(f"no run named {name!r} among {sorted({r['name'] for r in rows})}")
    return runs[(len(runs) - 1) // 2]


def finetune_arms(rows: list[dict], names, task, out_dir, config=None, seeds=(0, 1, 2)) -> dict[str, dict]:
    """Finetune each arm's median-seed checkpoint (:func:`median_seed_run`) on ``task`` (e.g.
    ``bbert.glue.make_corpus_source_task``) once per finetuning seed, and keep the median dev
    score, as the paper scores GLUE: the step from MLM loss to what the anchors measure (GLUE,
    SQuAD). Returns ``{name: {"seed", "run_dir", "score", "scores", "metric"}}``: the
    pretraining seed, the median and every seed's dev score (of its best epoch)."""
    from bbert import glue  # deferred: finetuning pulls in the GLUE stack

    config = config or glue.FinetuneConfig(lr=1e-3, batch_size=16, num_epochs=3, progress=False,
                                           save_best_model=False)
    out = {}
    for name in names:
        run = median_seed_run(rows, name)
        results = [glue.finetune(run["run_dir"], task, dataclasses.replace(config, seed=seed),
                                 Path(out_dir) / name.replace(" ", "_") / f"seed{seed}") for seed in seeds]
        scores = [r["score"] for r in results]
        out[name] = {"seed": run["seed"], "run_dir": run["run_dir"], "score": statistics.median(scores),
                     "scores": scores, "metric": results[0]["main_metric"]}
    return out


# ---- text and tables ----------------------------------------------------------------------


def write_sample_sources(path, sources) -> Path:
    """The embedded corpus restricted to ``sources`` (e.g. ``["kjv", "wordnet"]``) as a JSONL file
    that ``bbert prepare`` reads: how a tuning text and a held-out text are cut from it. The
    sources' documents alternate, so a ``max_bytes`` cut keeps a mix of them."""
    from bbert.atomic import atomic_write_text
    from bbert.data import read_sample_corpus

    per_source = [read_sample_corpus(source=source) for source in sources]
    docs = [d for group in itertools.zip_longest(*per_source) for d in group if d is not None]
    if not docs:
        raise ValueError(f"the embedded corpus has no documents from {list(sources)}; "
                         "its sources are kjv, python_docs and wordnet")
    atomic_write_text(path, "".join(json.dumps({"text": d["text"]}) + "\n" for d in docs))
    return Path(path)


def _fraction(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def ablation_table(rows: list[dict]) -> str:
    """The ablation as a Markdown table: steps, median throughput, final validation loss, ratio to
    the baseline, and the fraction of the budget each run needed to reach the baseline's final loss."""
    lines = ["| run | steps | seq/s | final val loss | ratio to baseline | time to baseline's loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['steps']} | {r['seq_per_s']:.1f} | {r['final_val_loss']:.4f} "
                     f"| {r['ratio']:.3f} | {_fraction(r['time_to_baseline'])} |")
    return "\n".join(lines)


def combinations_table(rows: list[dict]) -> str:
    """The search's trials as a Markdown table (best first): the options each switched on, how it
    ended, the share of its budget it used and its final validation loss."""
    best = best_trial(rows)
    lines = ["| options on | end | steps | budget used | final val loss |", "| --- | --- | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (not math.isfinite(r["val_loss"]), r["val_loss"])):
        name = " + ".join(r["options_on"]) or "none (the plain recipe)"
        name = f"**{name}**" if best is not None and r["run_dir"] == best["run_dir"] else name
        lines.append(f"| {name} | {r['end_reason']} | {r['steps']} | {r['elapsed_seconds'] / r['budget_seconds']:.0%} "
                     f"| {r['val_loss']:.4f} |")
    saved, total = budget_saved(rows)
    if total:
        lines.append(f"\nThe pruned trials gave back {saved:.0f} s of the {total:.0f} s that these trials "
                     f"would have taken in full ({saved / total:.0%}).")
    return "\n".join(lines)


def options_table(options=None) -> str:
    """The options as a Markdown table: overrides, source and what the anchor reported."""
    lines = ["| option | overrides | source | the anchor reported |", "| --- | --- | --- | --- |"]
    for o in map(option, _names(options)):
        sets = ", ".join(f"`{k}={v}`" for k, v in o.on.items())
        lines.append(f"| {o.name} | {sets} | {o.source} | {o.anchor} |")
    return "\n".join(lines)
