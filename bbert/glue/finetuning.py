"""One finetuning run: a classification head on a pretrained encoder, trained, scored, kept.

    load_classifier   the encoder from a bbert or transformers folder, a new head
    batches           dynamic padding; length grouping by transformers' get_length_grouped_indices
    predict/evaluate  raw predictions and the task's metrics on each dev split
    finetune          AdamW + linear warm-up/decay, mixed precision, evaluate each epoch, keep the
                      best epoch; result.json is written last, atomically, and marks a finished run

Chapter: ``notebooks/05_finetuning.ipynb``.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.utils import logging as hf_logging

from bbert.atomic import atomic_path, atomic_write_json, atomic_write_text
from bbert.env import set_seed
from bbert.glue.config import FinetuneConfig
from bbert.glue.metrics import compute_metrics, main_score, predictions_tsv
from bbert.glue.tasks import TaskData
from bbert.hf import find_model_folder, load_pretrained
from bbert.identity import weights_fingerprint
from bbert.model import BertForSequenceClassification
from bbert.optim import Schedule, build_optimizer, set_lr
from bbert.precision import autocast, grad_scaler
from bbert.progress import Progress

# Bump when result.json changes shape: a record of another version counts as not finished, so a
# re-run redoes it instead of crashing on it (version 1 used learning_rate/bf16, not lr/precision;
# version 2 had no data_fingerprint and kept model_path as typed; version 3 no weights_fingerprint).
RESULT_VERSION = 4


# ---- model and batches ------------------------------------------------------------------


def load_classifier(model_path: str | os.PathLike, num_labels: int):
    """A ``BertForSequenceClassification`` whose encoder comes from ``model_path``, and its tokenizer.

    ``model_path`` is anything :func:`bbert.hf.load_pretrained` reads: a bbert model folder,
    a pretraining run dir or checkpoint, or a transformers BERT folder. The classifier head
    is new (randomly initialized).
    """
    # AutoTokenizer peeks at the folder's config.json (model_type "bbert") and warns that it
    # doesn't know it; the tokenizer itself loads fine, so keep that warning out of the way.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        mlm, tokenizer = load_pretrained(model_path)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer is None:
        raise ValueError(f"{model_path} has a model but no tokenizer (tokenizer.json, "
                         "tokenizer_config.json): copy the tokenizer it was trained with into it")
    model = BertForSequenceClassification(mlm.config, num_labels)
    model.bert.load_state_dict(mlm.bert.state_dict())
    return model, tokenizer


def model_weights(model_path: str | os.PathLike) -> str | None:
    """The fingerprint of the weights ``model_path`` loads (``bbert.identity``); None for a hub id
    or a folder with no model (loading it says why). A truncated weights file is a ``ValueError``
    here, before any run starts.
    """
    try:
        return weights_fingerprint(find_model_folder(model_path))
    except FileNotFoundError:
        return None


def _encode(examples: list[dict], tokenizer, max_seq_length: int, with_types: bool) -> list[dict]:
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples and examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_seq_length)
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    return [{k: enc[k][i] for k in keys if k in enc} for i in range(len(examples))]


def _max_length(model, config: FinetuneConfig) -> int:
    positions = model.bert.config.max_position_embeddings
    if config.max_seq_length > positions:  # cutting silently would score another setting
        raise ValueError(f"max_seq_length={config.max_seq_length} is longer than the model's "
                         f"{positions} positions: use --max-seq-length {positions} or less")
    return config.max_seq_length


def _uses_token_types(model) -> bool:
    # The recipe pretrains one segment; a model without a second type embedding gets none.
    return int(getattr(model.bert.config, "type_vocab_size", 0) or 0) >= 2


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator) -> list[list[int]]:
    """Batches of similar lengths (little padding), in random order.

    The grouping is transformers' ``get_length_grouped_indices`` (what ``Trainer`` does with
    ``group_by_length``): shuffle, then sort by length within mega-batches of up to 50 batches.
    It lays each mega-batch out longest to shortest; shuffling the batches themselves keeps
    the model from seeing sweeps of long then short sentences, since length often tracks the label.
    """
    order = get_length_grouped_indices(list(lengths), batch_size, generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def random_batches(n: int, batch_size: int, generator) -> list[list[int]]:
    """Plain shuffled batches (the baseline of ``benchmarks/glue_length_grouping.py``)."""
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


# ---- precision --------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` made concrete: bf16 on a GPU that has it, else fp32; fp16 only on a GPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU; use precision='bf16' or 'fp32' here")
    return precision


def _forward(model, batch: dict):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids"), labels=batch.get("labels"))
    return out.loss, out.logits


# ---- predict and evaluate ---------------------------------------------------------------


def predict(model, tokenizer, examples: list[dict], config: FinetuneConfig | None = None):
    """Raw predictions for ``examples``: class ids, or scores for a regression head.

    Batches are sorted by length (less padding) and put back in order.
    """
    config = config or FinetuneConfig()
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device)
    features = _encode(examples, tokenizer, _max_length(model, config), _uses_token_types(model))
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    out: list = [None] * len(features)
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(order), config.eval_batch_size):
            ids = order[start:start + config.eval_batch_size]
            batch = {k: v.to(device) for k, v in collate([features[i] for i in ids]).items()}
            logits = _forward(model, batch)[1].float()
            values = (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).tolist()
            for i, v in zip(ids, values):
                out[i] = v
    return out


def evaluate(model, tokenizer, data: TaskData, config: FinetuneConfig | None = None) -> dict:
    """The task's metrics on each dev split: ``{split: {metric: value}}``."""
    scores = {}
    for split in data.spec.dev_splits:
        examples = data.splits[split]
        preds = predict(model, tokenizer, examples, config)
        scores[split] = compute_metrics(data.spec.metrics, preds, [e["label"] for e in examples])
    return scores


# ---- one run ------------------------------------------------------------------------------


def finetune(model_path: str | os.PathLike, data: TaskData, config: FinetuneConfig,
             out_dir: str | os.PathLike | None = None) -> dict:
    """Finetune ``model_path`` on ``data`` with ``config``; return (and write) the result.

    Each epoch is evaluated on the dev split(s); the best epoch by the task's main metric is
    kept: its scores go in ``result.json``, its test predictions in ``predictions-<split>.tsv``
    (leaderboard format) and, with ``save_best_model``, its weights in ``best_model/``. All
    writes are atomic and ``result.json`` comes last, so it alone marks a finished run.
    """
    spec = data.spec
    for split in ("train",) + spec.dev_splits:
        if not data.splits.get(split):
            raise ValueError(f"{spec.display}: the {split!r} split is missing or empty")
    train = data.splits["train"][:config.max_train_examples]  # the first N: files stay in order
    if not spec.is_regression and len({e["label"] for e in train}) < 2:
        raise ValueError(f"{spec.display}: the first {len(train)} training examples all have the "
                         f"label {spec.labels[train[0]['label']]!r}: shuffle the training file, or "
                         "raise --max-train-examples")
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:  # a run in progress (or killed) must not look finished
        (out_dir / "result.json").unlink(missing_ok=True)
    set_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(config.precision, device)
    weights = model_weights(model_path)  # before loading: these are the weights the run starts from
    model, tokenizer = load_classifier(model_path, spec.num_labels)
    model.to(device)

    features = _encode(train, tokenizer, _max_length(model, config), _uses_token_types(model))
    for f, e in zip(features, train):
        f["labels"] = e["label"]
    lengths = [len(f["input_ids"]) for f in features]
    generator = torch.Generator().manual_seed(config.seed)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = max(1, config.num_epochs * steps_per_epoch)
    warmup = (config.warmup_proportion if config.warmup_steps is None
              else min(config.warmup_steps / total_steps, 0.5))
    schedule = Schedule("steps", total_steps, config.lr, warmup)
    optimizer = build_optimizer(model, "adamw", config.lr, betas=config.betas,
                                eps=config.eps, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, precision)

    history, best, step = [], None, 0
    start = time.time()
    progress = Progress(total_steps, f"{spec.display} {config.name} seed {config.seed}", config.progress)
    for epoch in range(1, config.num_epochs + 1):
        model.train()
        losses = []
        batches = (length_grouped_batches(lengths, config.batch_size, generator) if config.length_grouping
                   else random_batches(len(features), config.batch_size, generator))
        for ids in batches:
            batch = {k: v.to(device) for k, v in collate([features[i] for i in ids]).items()}
            if spec.is_regression:
                batch["labels"] = batch["labels"].float()
            set_lr(optimizer, schedule.lr_at(step=step))
            with autocast(device, precision):
                loss, _ = _forward(model, batch)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            progress.update(1, loss=f"{losses[-1]:.3f}")
        scores = evaluate(model, tokenizer, data, config)
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses), "dev": scores})
        if best is None or main_score(spec, scores) > main_score(spec, best["dev"]):
            best = {"epoch": epoch, "dev": scores}
            if out_dir is not None:
                _save_best(out_dir, model, tokenizer, data, config)
    progress.close()

    result = {
        "result_version": RESULT_VERSION,
        "task": spec.name, "display": spec.display, "config": config.name, "seed": config.seed,
        "hyperparameters": asdict(config), "model_path": str(Path(model_path).resolve()),
        "weights_fingerprint": weights, "data_fingerprint": data.fingerprint(),
        "best_epoch": best["epoch"], "dev": best["dev"], "score": main_score(spec, best["dev"]),
        "main_metric": spec.main_metric, "history": history, "train_examples": len(train),
        "seconds": round(time.time() - start, 2), "precision": precision, "device": str(device),
    }
    if out_dir is not None:
        atomic_write_json(out_dir / "result.json", result)  # last: it marks the run finished
    return result


def _save_best(out_dir: Path, model, tokenizer, data: TaskData, config: FinetuneConfig) -> None:
    """Write the best epoch's test predictions and (optionally) its weights, atomically."""
    for split in data.spec.test_splits:
        examples = data.splits.get(split)
        if examples:
            preds = predict(model, tokenizer, examples, config)
            atomic_write_text(out_dir / f"predictions-{split}.tsv",
                              predictions_tsv(data.spec, examples, preds))
    if config.save_best_model:
        with atomic_path(out_dir / "best_model") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
