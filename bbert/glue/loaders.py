"""GLUE's examples: from the original GLUE download on disk, or from the hub (nyu-mll/glue).

Your own files and the offline corpus-source task load in ``custom.py``.
Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from bbert.glue.tasks import GLUE_TASKS, TaskData, TaskSpec, TsvLayout, get_task
from bbert.hub import require_hub


def _label_id(spec: TaskSpec, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: score {raw!r} is not a number; is this the "
                             f"{spec.display} file in the original GLUE format?") from None
    if raw not in spec.labels:
        raise ValueError(f"{where}: label {raw!r} is not one of {list(spec.labels)} for task "
                         f"{spec.display}; is this the {spec.display} file in the original GLUE format?")
    return spec.labels.index(raw)


def _read_table(path: Path, layout: TsvLayout, spec: TaskSpec, delimiter: str = "\t",
                skip_short_rows: bool = False) -> list[dict]:
    """Rows of one file as examples; QUOTE_NONE because GLUE text holds stray quote marks.

    ``skip_short_rows`` skips rows with too few cells, and says how many: some GLUE downloads of
    QQP's train.tsv hold a few broken lines. Elsewhere a short row is an error.
    """
    examples, short = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None) if layout.header else None
        if layout.header and header is None:
            raise ValueError(f"{path}: the file is empty (a header line was expected)")

        def position(col: str | int) -> int:
            if isinstance(col, int):
                return col
            if col not in header:
                raise ValueError(f"{path}: no column {col!r} in the header {header}; is this the "
                                 f"{spec.display} file in the original GLUE format?")
            return header.index(col)

        text_pos = [position(c) for c in layout.texts]
        label_pos = None if layout.label is None else position(layout.label)
        index_pos = None if layout.index is None else position(layout.index)
        needed = max(text_pos + [p for p in (label_pos, index_pos) if p is not None]) + 1
        for row_no, row in enumerate(reader):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            line = row_no + (2 if layout.header else 1)
            if len(row) < needed:
                if skip_short_rows:
                    short.append(line)
                    continue
                raise ValueError(f"{path}, line {line}: {len(row)} columns, expected at least "
                                 f"{needed} for task {spec.display}")
            texts = [row[p] for p in text_pos]
            examples.append({
                "idx": int(row[index_pos]) if index_pos is not None else len(examples),
                "text_a": texts[0],
                "text_b": texts[1] if len(texts) > 1 else None,
                "label": None if label_pos is None else _label_id(spec, row[label_pos],
                                                                  f"{path}, line {line}"),
            })
    if short:
        print(f"{path}: skipped {len(short)} broken line(s) with fewer than {needed} columns "
              f"(line(s) {', '.join(map(str, short[:5]))}{', ...' if len(short) > 5 else ''}); "
              f"kept {len(examples):,} examples")
    return examples


def load_glue_dir(task: str | TaskSpec, glue_dir: str | os.PathLike) -> TaskData:
    """Load a task from the original GLUE download layout: ``glue_dir/<TASK>/train.tsv`` ...

    ``glue_dir`` may be the ``glue_data`` folder or the task's own folder. Train and dev files
    are required; test files are optional (without them no submission is written).
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    glue_dir = Path(glue_dir)
    if not glue_dir.is_dir():
        raise FileNotFoundError(f"--glue-dir {glue_dir} is not a folder: pass the GLUE download's "
                                "glue_data folder (glue_data/RTE/train.tsv ...)")
    folder = glue_dir / spec.display if (glue_dir / spec.display).is_dir() else glue_dir
    other = next((t for t in GLUE_TASKS.values() if t.display == glue_dir.name), spec)
    if folder == glue_dir and other.name != spec.name:
        raise FileNotFoundError(f"--glue-dir {glue_dir} is {other.display}'s folder, not "
                                f"{spec.display}'s: pass the glue_data folder above it, "
                                f"or --tasks {other.name}")
    if folder == glue_dir and not (glue_dir / spec.files["train"]).exists():
        found = sorted(p.name for p in glue_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no {spec.display} folder in {glue_dir} (its folders: {', '.join(found) or 'none'}): "
            f"add glue_data/{spec.display}/ from the GLUE download, leave {spec.name} out of --tasks, "
            "or use --hub where the Hugging Face hub is reachable")
    splits = {}
    for split, name in spec.files.items():
        path = (folder / name).resolve()
        if not path.exists():
            if split.startswith("test"):
                continue
            raise FileNotFoundError(
                f"{path} not found: expected the original GLUE layout "
                f"<glue_dir>/{spec.display}/{name} (the GLUE download script's glue_data folder), "
                "or use --hub where the Hugging Face hub is reachable")
        # a broken training line costs one example; a dev or test line would change the scores
        splits[split] = _read_table(path, spec.layouts[split], spec, skip_short_rows=split == "train")
        if not splits[split] and not split.startswith("test"):
            raise ValueError(f"{path} holds no examples (only a header line?): restore it from the "
                             f"GLUE download (glue_data/{spec.display}/{name}) or point --glue-dir "
                             "at a complete copy")
    return TaskData(spec, splits, source=str(folder))


def load_glue_hub(task: str | TaskSpec) -> TaskData:
    """Load a task from the Hugging Face hub (``nyu-mll/glue``); fails at once offline."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    require_hub(f"GLUE task {spec.display} from nyu-mll/glue",
                "the original GLUE download layout on disk (--glue-dir glue_data, with "
                f"glue_data/{spec.display}/train.tsv ...), or your own files "
                "(--train-file/--dev-file)")
    import datasets  # deferred: only the hub path needs it, and it takes ~2 s to import

    hub = datasets.load_dataset("nyu-mll/glue", spec.name)
    if "test_ax" in spec.test_splits:
        hub["test_ax"] = datasets.load_dataset("nyu-mll/glue", "ax")["test"]
    splits = {}
    for split in spec.files:
        if split not in hub:
            continue
        rows = hub[split]
        cols = spec.text_columns  # the hub's AX uses MNLI's premise/hypothesis columns too
        splits[split] = [{
            "idx": int(r["idx"]),
            "text_a": r[cols[0]],
            "text_b": r[cols[1]] if len(cols) > 1 else None,
            # the hub marks unlabeled test rows with -1
            "label": (None if split.startswith("test") or r["label"] == -1 else
                      (float(r["label"]) if spec.is_regression else int(r["label"]))),
        } for r in rows]
    return TaskData(spec, splits, source="hub:nyu-mll/glue")


def load_task(task: str, glue_dir: str | os.PathLike | None = None, hub: bool = False) -> TaskData:
    """Load a GLUE task from ``glue_dir`` (original layout) or, with ``hub=True``, the hub."""
    if hub:
        return load_glue_hub(task)
    if glue_dir is None:
        raise ValueError("say where GLUE comes from: glue_dir=<glue_data folder> (offline) "
                         "or hub=True (needs the Hugging Face hub)")
    return load_glue_dir(task, glue_dir)
