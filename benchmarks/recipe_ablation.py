"""Recipe ablation: the post-2021 encoder options against the 24hBERT recipe, at one wall clock.

The baseline is 24hBERT's recipe shrunk to this CPU (the tiny-cpu preset at the mini shape:
pre-LN, sparse MLM head, AdamW lr 1e-3 (0.9, 0.98) eps 1e-6 wd 0.01, 6% warm-up then linear
decay on the time clock, batch 32). Then, each with the same wall-clock budget, one run after
another on this machine:

1. each option of ``bbert.ablation.OPTIONS`` alone (30% masking, GeGLU, RoPE, no biases, WSD
   with a 20% cool-down, a batch ramp over the first half), and all of them together;
2. a search over the options' on/off combinations (``bbert search`` with the ASHA pruner);
3. the head-to-head that counts: the plain recipe against the best combination found on the
   tuning text (by the runs of step 1 and the search's trials) on a text the tuning never saw
   (``--eval-corpus``; by default the embedded corpus's Python documentation, which the tuning
   data leaves out), each trained from scratch on it.

The options' settings come from their papers, not from this text; only the on/off choice is
searched, on the tuning text. Fair to the plain recipe in three ways:

- a **tuned baseline**: the plain recipe gets the same search (trials, ASHA, rungs) over its own
  learning rate and batch size (``bbert.ablation.tune_baseline``), and the head-to-head has it as
  an arm beside the untuned recipe;
- **ASHA's first rung after the plateau**: the runs of step 1 are the pilots. A run's plateau is
  its first validation less than 2% below the one before; it leaves it at the first later
  validation 5% below that. Where the plain recipe leaves it sets the first rung of both searches
  (if it never does, where the first other run does; ``bbert.ablation.pilot_rung``), so no trial
  is ranked while every run is still on the plateau;
- **seeds**: the head-to-head trains every arm at every seed of ``--seeds``; it prints each
  arm's mean and standard deviation and the 95% interval of the paired ratio (per seed, the
  arm's final loss over the baseline's), a Student t-interval on the log ratios
  (``scipy.stats``), mapped back with exp.

Validation always scores at 15% masking on the same batches, so every loss compares on one
yardstick. That yardstick is not the anchors' (GLUE, SQuAD): the median-seed checkpoints of the
best combination and the tuned baseline are finetuned on the offline corpus-source task
(``bbert.glue.make_corpus_source_task``) as a downstream check. Goal: the best combination ends
>= 5% below the TUNED plain recipe on the unseen text, with the 95% interval of the ratio below 1.

    .venv/bin/python benchmarks/recipe_ablation.py --budget-s 60 --seeds 0,1,2   # <= 37 runs of 60 s, 2 finetunings
    .venv/bin/python benchmarks/recipe_ablation.py --quick                       # 20 s runs, 3 trials
    .venv/bin/python benchmarks/recipe_ablation.py --eval-corpus my_text.txt

Chapter: ``notebooks/07_beyond.ipynb``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "recipe_ablation"
TUNING_SOURCES = ("kjv", "wordnet")
HELD_OUT_SOURCE = "python_docs"


def prepare_data(text: Path, out_dir: Path, vocab_size: int) -> Path:
    """A data dir from ``text`` (its own WordPiece vocabulary), reused when it matches."""
    from bbert.data import DataDirError, PrepareConfig, prepare

    config = PrepareConfig(inputs=[str(text)], out=str(out_dir), vocab_size=vocab_size, val_fraction=0.02,
                           progress=False)
    try:
        prepare(config)
    except DataDirError as err:  # made by an older bbert: this scratch folder is ours to replace
        print(f"rebuilding {out_dir}: {err}", flush=True)
        config.overwrite = True
        prepare(config)
    return out_dir


def baseline_config(data_dir: Path, model: str, budget_s: float, seed: int):
    """The tiny-cpu preset (24hBERT's recipe on a CPU) at ``model``'s shape; ten validations per run."""
    from bbert.train_config import TrainConfig, hours, minutes

    return TrainConfig.from_preset(
        "tiny-cpu", data_dir=str(data_dir), run_dir=str(OUT / "unused"), model=model, seed=seed,
        time_budget_hours=hours(budget_s), validation_every_minutes=minutes(budget_s / 10), max_val_batches=8,
        checkpoint_every_minutes=None, checkpoint_fractions=[], log_every_steps=25)


def report(rows: list[dict], title: str) -> None:
    from bbert.ablation import ablation_table

    print(f"\n== {title} ==", flush=True)
    print(ablation_table(rows), flush=True)


def seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give at least two different seeds for an interval")
    return seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=60.0, help="wall-clock budget of every run, in seconds")
    parser.add_argument("--search-trials", type=int, default=10,
                        help="trials of each search (the options' and the tuned baseline's)")
    parser.add_argument("--seeds", type=seeds_arg, default=[0, 1, 2], help="seeds of the head-to-head")
    parser.add_argument("--quick", action="store_true", help="20-second runs and 3 search trials")
    parser.add_argument("--eval-corpus", type=Path,
                        help=f"held-out text (file or folder) for the final comparison; none: the embedded "
                             f"corpus's {HELD_OUT_SOURCE!r} source, which the tuning text excludes")
    parser.add_argument("--model", default="mini", help="model preset of every run")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0, help="seed of the tuning runs (ablation and searches)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a machine others load")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_s, args.search_trials = 20.0, 3
    if args.eval_corpus is not None and not args.eval_corpus.exists():
        parser.error(f"--eval-corpus {args.eval_corpus} does not exist; pass a text/JSONL file or folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bbert import glue
    from bbert.ablation import (OPTIONS, BASELINE, best_combination, combinations_table, finetune_arms, pilot_rung,
                                head_to_head, head_to_head_table, overrides, run_ablation, search_combinations,
                                summarize, tune_baseline, write_sample_sources)
    from bbert.atomic import atomic_write_json

    args.out.mkdir(parents=True, exist_ok=True)
    for runs in ("ablation", "search", "tune-baseline", "final", "finetune"):
        shutil.rmtree(args.out / runs, ignore_errors=True)  # fresh runs every time
    started, loads = time.time(), [os.getloadavg()[0]]
    tune_text = write_sample_sources(args.out / "tune.jsonl", TUNING_SOURCES)
    eval_text = args.eval_corpus or write_sample_sources(args.out / "eval.jsonl", [HELD_OUT_SOURCE])
    tune_data = prepare_data(tune_text, args.out / "data-tune", args.vocab_size)
    eval_data = prepare_data(eval_text, args.out / "data-eval", args.vocab_size)
    base = baseline_config(tune_data, args.model, args.budget_s, args.seed)
    print(f"recipe_ablation: {args.budget_s:g} s per run, model {args.model}, batch {base.batch_size}, "
          f"lr {base.lr:g}, {base.precision}, {torch.get_num_threads()} threads; tuning text {tune_text.name} "
          f"({', '.join(TUNING_SOURCES)}), unseen text {eval_text}; seeds {args.seeds}", flush=True)

    everything = [o.name for o in OPTIONS]
    rows = run_ablation(base, args.out / "ablation", args.budget_s, combinations=[everything])
    report(rows, f"each option alone, {args.budget_s:g} s each (tuning text, seed {args.seed})")
    pilot = rows[0]
    loads.append(os.getloadavg()[0])
    rung, rung_note = pilot_rung(rows, args.budget_s)
    print(f"\nASHA's first rung: {rung:.1f} s of {args.budget_s:g} s ({rung_note})", flush=True)

    print(f"\n-- ASHA search over the {2 ** len(OPTIONS)} on/off combinations, {args.search_trials} trials --",
          flush=True)
    found = search_combinations(base, args.out / "search", args.budget_s, args.search_trials, min_resource_s=rung)
    print(combinations_table(found["rows"]), flush=True)
    best = best_combination(rows, found)  # of every run on the tuning text that spent its budget
    print(f"best combination on the tuning text (the runs above and the search's trials): "
          f"{' + '.join(best) if best else 'none (the plain recipe won)'}", flush=True)

    loads.append(os.getloadavg()[0])
    print(f"\n-- the control: the plain recipe's lr and batch size, ASHA, {args.search_trials} trials --",
          flush=True)
    tuned = tune_baseline(base, args.out / "tune-baseline", args.budget_s, args.search_trials,
                          min_resource_s=rung, plain_loss=pilot["final_val_loss"])
    print(combinations_table(tuned["rows"]), flush=True)
    print(f"tuned baseline: {tuned['overrides'] or 'the untuned recipe (no trial beat it)'}", flush=True)

    loads.append(os.getloadavg()[0])
    arms = {BASELINE: {}, "tuned baseline": tuned["overrides"]}
    if best:
        arms["best combination"] = overrides(best)
    eval_base = baseline_config(eval_data, args.model, args.budget_s, args.seed)
    final = head_to_head(eval_base, args.out / "final", args.budget_s, arms, args.seeds)
    summary = summarize(final, baselines=(BASELINE, "tuned baseline"))
    print(f"\n== head-to-head on the unseen text, {args.budget_s:g} s each, seeds {args.seeds} ==")
    print("per run: " + ", ".join(f"{r['name']} seed {r['seed']}: {r['final_val_loss']:.4f} ({r['steps']} steps)"
                                  for r in final))
    print(head_to_head_table(summary), flush=True)

    loads.append(os.getloadavg()[0])
    downstream = {}
    if best:
        task = glue.make_corpus_source_task(args.out / "task", train_per_source=200, eval_per_source=60)
        downstream = finetune_arms(final, ["best combination", "tuned baseline"], task, args.out / "finetune")
        print("\n== finetuned on the corpus-source task (median-seed checkpoints; median of 3 finetuning seeds) ==")
        for name, d in downstream.items():
            seeds = ", ".join(f"{score:.3f}" for score in d["scores"])
            print(f"{name}: {d['metric']} {d['score']:.3f} (finetuning seeds: {seeds}; pretraining seed {d['seed']})",
                  flush=True)
    loads.append(os.getloadavg()[0])
    load = max(loads)
    atomic_write_json(args.out / "result.json", dict(
        budget_s=args.budget_s, model=args.model, search_trials=args.search_trials, seeds=args.seeds,
        eval_corpus=str(eval_text), load_average_max=load, load_averages=loads, first_rung_s=rung, ablation=rows,
        search=found["rows"], best_options=best, tune_baseline=tuned["rows"], tuned_overrides=tuned["overrides"],
        final=final, summary=summary, downstream=downstream))

    print(f"\n== verdict (load average {', '.join(f'{x:.1f}' for x in loads)} at the start and each phase's end, on "
          f"{os.cpu_count()} cores; "
          f"{(time.time() - started) / 60:.1f} min in all) ==")
    if not best:
        print("no combination beat the plain recipe on the tuning text: goal NOT met")
        return 0
    line = next(s for s in summary if s["name"] == "best combination")
    for other in (BASELINE, "tuned baseline"):
        v = line["vs"][other]
        met = v["ratio"] <= 0.95 and v["high"] < 1
        print(f"best combination / {other}: {v['ratio']:.3f}, 95% interval [{v['low']:.3f}, {v['high']:.3f}] "
              f"over {v['n']} seeds (goal: <= 0.95 with the interval below 1: {'met' if met else 'NOT met'})")
    print(f"full result: {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
