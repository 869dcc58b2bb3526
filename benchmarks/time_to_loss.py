"""Time to loss: bbert's budgeted pretraining vs a Hugging Face Trainer + BertForMaskedLM baseline.

Both get the same wall-clock budget on this CPU, the same model shape, tokenizer, training
sequences, batch and optimizer hyperparameters (the tiny-cpu recipe, lr 1e-3, AdamW 0.9/0.98,
eps 1e-6, wd 0.01, 6% warm-up then linear decay, bf16 autocast). They differ in what bbert is
about: pre-LN, the sparse MLM head, the time-based schedule (the baseline's step-based schedule
gets its step count from a throughput estimate, as one would do by hand), and bbert's loop.

The baseline is transformers' ``run_mlm`` example in miniature: ``BertForMaskedLM`` (post-LN,
dense head), ``DataCollatorForLanguageModeling(mlm_probability=0.15)`` and ``Trainer``, stopped
at the budget by a ``TrainerCallback``. Its training sequences are bbert's packed 128-token
samples, so both see the same tokens.

Both final models, and bbert's checkpoints at 25/50/75% of its budget, are scored by one
function on the same validation batches (bbert's held-out split, masks fixed by a seed).
Targets: bbert ends lower, and bbert's loss at half the budget is already at or below the
baseline's final loss.

    .venv/bin/python benchmarks/time_to_loss.py            # 5 minutes each (about 11 minutes)
    .venv/bin/python benchmarks/time_to_loss.py --quick    # 1 minute each
    .venv/bin/python benchmarks/time_to_loss.py --minutes 3 --model tiny

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "time_to_loss"


def prepare_data(out_dir: Path, vocab_size: int) -> Path:
    """The embedded corpus as a bbert data dir: reused when it matches, rebuilt when it is stale."""
    from bbert.data import DataDirError, PrepareConfig, prepare

    config = PrepareConfig(out=str(out_dir), vocab_size=vocab_size, progress=False)
    try:
        prepare(config)
    except DataDirError as err:  # made by an older bbert: this scratch folder is ours to replace
        print(f"rebuilding {out_dir}: {err}", flush=True)
        config.overwrite = True
        prepare(config)
    return out_dir


def validation_batches(data_dir: Path, micro_batch_size: int, max_batches: int, seed: int = 1234):
    """Fixed validation batches (masks drawn once from ``seed``), shared by both models."""
    from bbert.data import build_pretraining_loader

    loader = build_pretraining_loader(data_dir, "val", micro_batch_size, seed=seed, infinite=False)
    batches = []
    for batch in loader:
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        if len(batches) == max_batches:
            break
    if not batches:
        raise RuntimeError(f"{data_dir} has no validation samples")
    return batches


def mlm_loss(model, batches) -> float:
    """Mean cross-entropy over all masked tokens of ``batches`` (fp32, eval mode): the one scorer."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"] != -100).sum())
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / count


def run_bbert(config, batches) -> dict:
    """bbert pretrain in this process; score its final model and its time-marker checkpoints."""
    from bbert.model import BertForMaskedLM
    from bbert.optim import Schedule
    from bbert.run_dir import read_metrics
    from bbert.train import pretrain

    start = time.perf_counter()
    run_dir = pretrain(config, resume=False)
    wall = time.perf_counter() - start
    records = read_metrics(run_dir)
    end = [r for r in records if r.get("type") == "end"][-1]
    curve = []  # (fraction of budget, loss) scored by mlm_loss
    for rec in records:
        if rec.get("type") == "checkpoint" and rec["name"].startswith("marker-"):
            model = BertForMaskedLM.from_pretrained(run_dir / "checkpoints" / rec["name"] / "model")
            curve.append((float(rec["name"].split("-", 1)[1]), rec["step"], mlm_loss(model, batches)))
    final = BertForMaskedLM.from_pretrained(run_dir / "final" / "model")
    final_loss = mlm_loss(final, batches)
    schedule = Schedule.from_config(config)
    curve.append((schedule.progress(end["elapsed_seconds"], end["step"]), end["step"], final_loss))
    own_val = [(schedule.progress(r["elapsed_seconds"], r["step"]), r["val_loss"])
               for r in records if r.get("type") == "val"]
    return dict(run_dir=str(run_dir), steps=end["step"], end_reason=end["reason"], wall_seconds=wall,
                final_loss=final_loss, curve=curve, own_val_curve=own_val)


def hf_model_config(model_config, vocab_size: int):
    """The same shape as a transformers BertConfig (post-LN, as BERT and run_mlm)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=model_config.hidden_size,
                      num_hidden_layers=model_config.num_hidden_layers,
                      num_attention_heads=model_config.num_attention_heads,
                      intermediate_size=model_config.intermediate_size,
                      max_position_embeddings=model_config.max_position_embeddings,
                      type_vocab_size=model_config.type_vocab_size,
                      hidden_dropout_prob=model_config.hidden_dropout_prob,
                      attention_probs_dropout_prob=model_config.attention_probs_dropout_prob,
                      layer_norm_eps=model_config.layer_norm_eps, pad_token_id=model_config.pad_token_id)


def train_samples(data_dir: Path):
    """bbert's packed training sequences as a datasets.Dataset of input_ids (what run_mlm's group_texts makes)."""
    import numpy as np
    from datasets import Dataset

    from bbert.data import load_manifest

    manifest = load_manifest(data_dir)
    length, dtype = manifest["max_seq_length"], np.dtype(manifest["dtype"])
    arrays = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r").reshape(-1, length)
              for s in manifest["splits"]["train"]["shards"]]
    ids = np.concatenate(arrays).astype(np.int64)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": (ids != manifest["special_ids"]["pad"])
                              .astype(np.int64).tolist()})


def run_hf(config, data_dir: Path, batches, vocab_size: int, work: Path) -> dict:
    """transformers' run_mlm recipe (Trainer + BertForMaskedLM + DataCollatorForLanguageModeling), time-boxed."""
    import torch
    from transformers import (BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)

    from bbert.data import load_tokenizer
    from bbert.optim import Schedule

    tokenizer = load_tokenizer(data_dir / "tokenizer")
    torch.manual_seed(config.seed)
    model = BertForMaskedLM(hf_model_config(config.model_config(vocab_size), vocab_size))
    dataset = train_samples(data_dir)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=config.masking.mlm_probability)
    budget = Schedule.from_config(config).length  # seconds: the config uses a time schedule
    accumulation = config.gradient_accumulation_steps(1)

    # run_mlm's schedule is step-based: estimate the steps that fit in the budget from a
    # short timing of this pipeline (not counted in the budget), as one would by hand.
    feats = [dataset[i] for i in range(config.micro_batch_size)]

    def micro_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            model(**collator(feats)).loss.backward()

    micro_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(2 * accumulation):
        micro_step()
    model.zero_grad(set_to_none=True)  # no optimizer step was taken: the weights are untouched
    step_seconds = (time.perf_counter() - t0) / 2
    max_steps = max(1, int(budget / step_seconds))

    class StopAtBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.log = []

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.start
            self.log.append((state.global_step, elapsed))
            if elapsed >= budget:
                control.should_training_stop = True

    stopper = StopAtBudget()
    args = TrainingArguments(
        output_dir=str(work / "hf"), use_cpu=True, seed=config.seed, data_seed=config.seed,
        per_device_train_batch_size=config.micro_batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=config.lr, adam_beta1=config.betas[0], adam_beta2=config.betas[1],
        adam_epsilon=config.eps, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear", warmup_steps=int(config.warmup_proportion * max_steps), max_steps=max_steps,
        bf16=config.precision == "bf16", logging_steps=10, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[stopper])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steps, elapsed = stopper.log[-1]
    return dict(steps=steps, planned_steps=max_steps, wall_seconds=wall, train_seconds=elapsed,
                final_loss=mlm_loss(model, batches))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="budget of each run, in minutes")
    parser.add_argument("--quick", action="store_true", help="1 minute each")
    parser.add_argument("--model", default="mini", help="model preset of both runs")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    minutes = 1.0 if args.quick else args.minutes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from bbert.ablation import time_to_reach
    from bbert.data import load_manifest
    from bbert.train_config import TrainConfig
    from bbert.atomic import atomic_write_json
    from bbert.env import set_seed

    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.out / "data", args.vocab_size)
    vocab_size = load_manifest(data_dir)["vocab_size"]
    run_dir = args.out / "bbert-run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # a fresh run each time (bbert refuses to overwrite a run dir)
    config = TrainConfig.from_preset(
        "tiny-cpu", data_dir=str(data_dir), run_dir=str(run_dir), model=args.model, seed=args.seed,
        # bbert's own validation costs it budget time (the baseline runs none): keep it light
        time_budget_hours=minutes / 60, validation_every_minutes=minutes / 4, max_val_batches=4,
        checkpoint_every_minutes=None,
        checkpoint_fractions=[0.25, 0.5, 0.75])
    config.validate(1)
    batches = validation_batches(data_dir, 32, args.val_batches)
    print(f"time_to_loss: {minutes:g} min each, model {args.model}, batch {config.batch_size}, "
          f"lr {config.lr:g}, {config.precision}, {torch.get_num_threads()} threads, "
          f"{sum(int((b['labels'] != -100).sum()) for b in batches)} masked validation tokens", flush=True)
    load = os.getloadavg()[0]

    set_seed(args.seed)
    print("\n-- bbert pretrain --", flush=True)
    ours = run_bbert(config, batches)
    set_seed(args.seed)
    print("\n-- baseline: transformers Trainer + BertForMaskedLM (run_mlm) --", flush=True)
    base = run_hf(config, data_dir, batches, vocab_size, args.out)
    load = max(load, os.getloadavg()[0])

    reach = time_to_reach([(f, loss) for f, _, loss in ours["curve"]], base["final_loss"], 1.0)
    reach_own_val = time_to_reach(ours["own_val_curve"], base["final_loss"], 1.0)
    result = dict(minutes=minutes, model=args.model, load_average_max=load, bbert=ours, baseline=base,
                  loss_ratio_bbert_over_baseline=ours["final_loss"] / base["final_loss"],
                  budget_fraction_bbert_reaches_baseline_final=reach,
                  budget_fraction_from_bbert_own_val_curve=reach_own_val)
    atomic_write_json(args.out / "result.json", result)

    print(f"\n== time to loss ({minutes:g} min each, load average up to {load:.1f} on "
          f"{os.cpu_count()} cores: other work shares this CPU) ==")
    print(f"{'':<28}{'steps':>8}{'val MLM loss':>14}")
    print(f"{'bbert pretrain':<28}{ours['steps']:>8}{ours['final_loss']:>14.4f}")
    print(f"{'HF Trainer (baseline)':<28}{base['steps']:>8}{base['final_loss']:>14.4f}"
          f"   (planned {base['planned_steps']} steps)")
    print("bbert's loss at time markers (same scorer): " +
          ", ".join(f"{f:.0%}: {loss:.4f}" for f, _, loss in ours["curve"]))
    print(f"ratio final loss bbert / baseline: {result['loss_ratio_bbert_over_baseline']:.3f} "
          f"(target < 1: {'met' if ours['final_loss'] < base['final_loss'] else 'NOT met'})")
    if reach is None:
        print("bbert never reached the baseline's final loss (target <= 0.5 of the budget: NOT met)")
    else:
        print(f"bbert reached the baseline's final loss at {reach:.2f} of its budget "
              f"(target <= 0.50: {'met' if reach <= 0.5 else 'NOT met'}); "
              f"from bbert's own validation curve: {reach_own_val if reach_own_val is None else f'{reach_own_val:.2f}'}")
    print(f"full result: {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
