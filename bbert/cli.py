"""The ``bbert`` command: a thin dispatcher over each stage's ``main(argv)``.

    bbert prepare   raw text -> data dir          (bbert.data.prepare)
    bbert pretrain  data dir -> run dir           (bbert.train)
    bbert budget    what a budget buys            (bbert.budget)
    bbert export    run dir -> transformers folder (bbert.hf)
    bbert finetune  model -> GLUE results         (bbert.glue)
    bbert search    a grid of budgeted runs       (bbert.search)
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "prepare": ("bbert.data.prepare", "raw text -> packed, masked training shards"),
    "pretrain": ("bbert.train", "run the time-budgeted masked-LM pretraining"),
    "budget": ("bbert.budget", "plan what a GPU budget buys"),
    "export": ("bbert.hf", "export a bbert model to a transformers folder"),
    "finetune": ("bbert.glue", "finetune and score on GLUE (grid search, median of seeds)"),
    "search": ("bbert.search", "budgeted hyperparameter search: a grid of pretraining runs, bad ones stopped early"),
}


def _usage() -> str:
    lines = ["usage: bbert <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `bbert <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from bbert import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bbert: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C: every command writes atomically, so a re-run is safe
        if os.environ.get("BBERT_DEBUG"):
            raise
        print(f"bbert {name}: interrupted; nothing half-written is kept: run the same command again",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
