"""``bbert finetune``: the grid on GLUE (or your own task), a results table and a submission.

    bbert finetune MODEL --out results --glue-dir glue_data                 # the paper's grid
    bbert finetune MODEL --out results --glue-dir glue_data --grid bert --tasks rte,mrpc
    bbert finetune MODEL --out results --hub --config grid.yaml --set base.precision=bf16

The grid is a :class:`bbert.glue.config.GridConfig`: a preset (``--grid``), then a YAML file
(``--config``), then ``--set KEY=VALUE`` (``lr=[2e-5,3e-5]``, ``base.max_seq_length=256``), then
the shortcut flags (``--lrs``, ``--epochs``, ...). Bad input prints one line and exits 2.
Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bbert.configs import add_config_arguments, build_config, command
from bbert.glue.config import GRID_PRESETS, PRECISIONS, GridConfig, grid_preset


def _list(text: str) -> list[str]:
    # "2e-5,3e-5" -> ["2e-5", "3e-5"]: bbert.configs parses and checks each against the field's type
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bbert finetune",
        description="Finetune a bbert checkpoint (or a transformers BERT folder) on GLUE with a "
                    "grid search over lr x batch size x epochs x seeds; report the median of the "
                    "best configuration beside the paper's numbers, and write a leaderboard "
                    "submission. Chapter: notebooks/05_finetuning.ipynb")
    p.add_argument("model", help="bbert model folder, pretraining run dir or checkpoint, "
                                 "or a transformers BERT folder")
    p.add_argument("--out", required=True, help="results dir (runs/<task>/<cfg>/<seed>/, tables, "
                                                "submission.zip); re-running skips finished runs")
    p.add_argument("--tasks", help="comma-separated GLUE tasks (default: all nine)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--glue-dir", help="the original GLUE download (glue_data/<TASK>/train.tsv ...)")
    src.add_argument("--hub", action="store_true", help="load GLUE from the hub (nyu-mll/glue)")
    c = p.add_argument_group("custom task (instead of GLUE)")
    c.add_argument("--train-file", help="TSV, CSV or JSONL with a header / named fields")
    c.add_argument("--dev-file")
    c.add_argument("--test-file")
    c.add_argument("--task-name", default="custom")
    c.add_argument("--text-columns", default="sentence", help="one or two names, comma-separated")
    c.add_argument("--label-column", default="label")
    c.add_argument("--labels", help="comma-separated label values in class order (default: the "
                                    "training file's, sorted); with two, F1 scores the second")
    c.add_argument("--regression", action="store_true")
    g = p.add_argument_group("grid (a GridConfig; its base is the FinetuneConfig of every run)")
    g.add_argument("--grid", default="bert", metavar="{" + ",".join(GRID_PRESETS) + "}",
                   help="preset: bert (the default: BERT's grid, Devlin et al. 2019, with the 24hBERT "
                        "paper's 5 seeds and median; not that paper's own grid), official (the "
                        "academic-budget-bert repo's example), tiny (CPU)")
    add_config_arguments(g, "GridConfig")
    g.add_argument("--lrs", help="comma-separated learning rates (sets lr)")
    g.add_argument("--batch-sizes", help="comma-separated batch sizes (sets batch_size)")
    g.add_argument("--epochs", help="comma-separated epoch counts (sets num_epochs)")
    g.add_argument("--seeds", help="comma-separated seeds (sets seed)")
    g.add_argument("--max-train-examples", type=int,
                   help="train on the first N examples of the training file only (quick runs)")
    g.add_argument("--max-seq-length", type=int)
    g.add_argument("--warmup-proportion", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--precision", choices=PRECISIONS, help="default auto: bf16 on a GPU that has it")
    g.add_argument("--no-save-models", action="store_true",
                   help="don't keep each run's best checkpoint (saves disk on big grids)")
    p.add_argument("--model-name", help="name in the results table (default: the model folder)")
    p.add_argument("--redo", action="store_true",
                   help="finetune again the finished runs whose model, weights, data or score-changing "
                        "hyperparameters changed (default: refuse them)")
    return p


def build_grid(args: argparse.Namespace) -> GridConfig:
    """The grid from the preset, ``--config``, ``--set`` and the shortcut flags, in that order."""
    flags = {}
    for flag, key in (("lrs", "lr"), ("batch_sizes", "batch_size"), ("epochs", "num_epochs"),
                      ("seeds", "seed")):
        if getattr(args, flag) is not None:  # "--seeds ''" is an empty axis, an error below
            flags[key] = _list(getattr(args, flag))
    for flag in ("max_train_examples", "max_seq_length", "warmup_proportion", "weight_decay",
                 "precision"):
        if getattr(args, flag) is not None:
            flags[f"base.{flag}"] = getattr(args, flag)
    if args.no_save_models:
        flags["base.save_best_model"] = False
    grid = build_config(GridConfig, grid_preset(args.grid), args.config, args.assignments, updates=flags)
    grid.runs()  # an empty axis is an error now, not after the data has loaded
    return grid


def _load_tasks(args: argparse.Namespace) -> list:
    from bbert.glue import custom, loaders, tasks  # deferred: only a run reads tasks (see main)

    if args.train_file or args.dev_file:
        if not (args.train_file and args.dev_file):
            raise ValueError("a custom task needs both --train-file and --dev-file")
        return [custom.load_custom_task(args.train_file, args.dev_file,
                                        [c.strip() for c in args.text_columns.split(",")],
                                        args.label_column, args.test_file, args.task_name,
                                        [x.strip() for x in args.labels.split(",")]
                                        if args.labels else None,
                                        args.regression)]
    if not (args.glue_dir or args.hub):
        raise ValueError("say where GLUE is: --glue-dir glue_data (the original download layout) "
                         "or --hub; or give a custom task with --train-file/--dev-file")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None \
        else list(tasks.GLUE_TASKS)
    if not names:
        raise ValueError(f"--tasks {args.tasks!r} names no task: give GLUE tasks such as --tasks rte,mrpc, "
                         "or leave --tasks out for all nine")
    unique = dict.fromkeys(tasks.get_task(t).name for t in names)  # "rte,RTE" is one task
    return [loaders.load_task(t, args.glue_dir, args.hub) for t in unique]


@command("bbert finetune")
def main(argv: list[str] | None = None) -> int:
    """``bbert finetune``: parse, build the grid, load the tasks, run the grid, print the table."""
    args = build_parser().parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: give a folder for the results")
    grid = build_grid(args)
    # Deferred, measured: torch, transformers and scikit-learn take 5-8 s to import on a 2-core
    # machine, which --help and a mistyped --set should not wait for.
    from bbert.glue.grid import run_glue

    tasks = _load_tasks(args)
    try:
        report = run_glue(args.model, tasks, grid, args.out, args.model_name, redo=args.redo)
    except KeyboardInterrupt:
        print(f"bbert finetune: interrupted; the finished runs are kept in {args.out}: run the same "
              "command again to go on", file=sys.stderr)
        return 130
    print(Path(report["table"]["md"]).read_text())
    if report["submission"]:
        print(f"leaderboard submission: {report['submission']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
