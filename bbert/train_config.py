"""Everything about a pretraining run in one dataclass: ``TrainConfig``, its presets, YAML, checks.

``TrainConfig.from_preset("24hbert")`` is the paper's 8-GPU, 24-hour run; ``"tiny-cpu"`` the
same recipe shrunk to minutes on a laptop CPU. A config loads from and saves to YAML and takes
``--set KEY=VALUE`` overrides, all through :mod:`bbert.configs`; :meth:`TrainConfig.validate`
names what to change before anything starts.

Chapter: ``notebooks/04_pretraining.ipynb``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bbert.configs import build_config, coerce, parse_value, to_dict
from bbert.data import MaskingConfig, load_manifest, load_tokenizer, manifest_path, tokenizer_dir
from bbert.data.layout import SHARD_SUFFIX
from bbert.model import BertConfig
from bbert.optim import Schedule
from bbert.atomic import atomic_write_text
from bbert.precision import fast_bf16

# Hours and minutes are for people (the config's fields); inside bbert time is seconds. These
# are the only conversions: TrainConfig's *_seconds properties, and hours()/minutes() to fill
# the fields from seconds (e.g. a notebook's budget).
SECONDS_PER_HOUR = 3600.0
SECONDS_PER_MINUTE = 60.0

ENGINES = ("deepspeed", "torch")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("time", "step")
OPTIMIZERS = ("adamw", "lamb")
# The model fields a run may change on a model it continues from (init_from): how it trains,
# not the shape or the function of its weights.
TRAINING_MODEL_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
                         "sparse_mlm_head", "unpad")


@dataclass
class EarlyStopConfig:
    """Stop a bad run early: validation loss above ``max_val_loss`` once ``after_minutes`` have passed.

    The paper's runs used 180 minutes and a loss of 6.
    """

    enabled: bool = False
    after_minutes: float = 180.0
    max_val_loss: float = 6.0


@dataclass
class DebugConfig:
    """Knobs for tests and debugging; leave them at their defaults for real runs.

    ``step_time_seconds`` replaces the wall clock by a simulated one where every optimizer step
    takes exactly that long, which makes a time-budgeted run deterministic (same lr and loss at
    every step, same end), e.g. to check that a killed and resumed run matches an uninterrupted
    one. ``nan_at_step`` poisons the loss of that optimizer step (tests the NaN stop).
    ``sleep_seconds_per_step`` slows each step down (gives a test time to kill the process).
    """

    step_time_seconds: float | None = None
    nan_at_step: int | None = None
    sleep_seconds_per_step: float = 0.0


@dataclass
class TrainConfig:
    """Everything about a pretraining run. Defaults are the paper's 8-GPU 24hBERT run.

    ``model`` names a ``bbert.model.BertConfig`` preset; ``model_overrides`` changes its fields
    (``vocab_size`` always comes from the data dir). ``init_from`` continues pretraining from a
    model (any folder ``bbert.hf.load_pretrained`` reads): its shape replaces ``model``, and
    ``model_overrides`` may change only :data:`TRAINING_MODEL_FIELDS`. ``batch_size`` is
    global; the engine accumulates ``batch_size / (micro_batch_size x world_size)``
    micro-batches per step.
    ``schedule`` picks the clock of :class:`bbert.optim.Schedule`: ``"time"`` (the paper's,
    over ``time_budget_hours``) or ``"step"`` (over ``max_steps``); ``max_steps`` also caps a
    time-budgeted run. ``lr_schedule`` is the lr's shape: ``"linear"`` (the paper's decay after
    warm-up) or ``"wsd"`` (warmup-stable-decay: the peak held until the last ``decay_proportion``
    of the budget). ``batch_ramp_proportion > 0`` grows the global batch linearly from
    ``batch_ramp_start`` to ``batch_size`` over that share of the budget (Cramming's batch ramp).
    ``schedule_hours`` (None: the budget) is the length the warm-up, decay and ramp are planned
    for, while the run still stops at ``time_budget_hours`` (the official code's
    ``--total_training_time`` and ``--early_exit_time_marker``); on the step clock it stretches
    the schedule to ``max_steps x schedule_hours / time_budget_hours`` steps.
    ``max_grad_norm = 0`` means no clipping (the paper's setting).
    ``checkpoint_fractions`` are the time markers (fractions of the budget) where a checkpoint
    is kept for finetuning.
    """

    data_dir: str = "data/sample"
    run_dir: str = "runs/24hbert"
    model: str = "large"
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # a model to continue from; None = a new model
    max_seq_length: int = 128
    seed: int = 42
    # budget and schedule
    time_budget_hours: float = 24.0
    schedule_hours: float | None = None  # None = the budget; longer: the run stops mid-schedule
    max_steps: int | None = None
    schedule: str = "time"
    warmup_proportion: float = 0.06
    lr_schedule: str = "linear"  # "wsd": warmup-stable-decay over the last decay_proportion
    decay_proportion: float = 0.2
    batch_ramp_proportion: float = 0.0  # the batch grows to batch_size over this share; 0 = off
    batch_ramp_start: int | None = None  # None = one micro-batch per rank
    # optimizer
    optimizer: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 0.0
    # batch, precision, engine
    batch_size: int = 4096
    micro_batch_size: int = 32
    precision: str = "fp16"
    engine: str = "deepspeed"
    zero_stage: int = 0
    compile: bool = False
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # validation, checkpoints, early stop, logging
    validation_every_minutes: float | None = 30.0
    max_val_batches: int | None = None
    checkpoint_every_minutes: float | None = 60.0
    keep_last_checkpoints: int = 2
    checkpoint_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log_every_steps: int = 10
    tensorboard: bool = False
    peak_flops: float | None = None  # per device, for MFU; None = look up / measure, 0 = skip MFU
    debug: DebugConfig = field(default_factory=DebugConfig)

    # -- presets, dicts, YAML, overrides (all through bbert.configs) -------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """``"24hbert"`` (the paper's 8-GPU, 24-hour run) or ``"tiny-cpu"`` (about 3 minutes here).

        Keyword overrides replace fields (nested ones as dataclasses or dicts).
        """
        return build_config(cls, preset(name), updates=overrides)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build a config from a (possibly partial) dict; unknown keys are an error."""
        return build_config(cls, data)

    @staticmethod
    def dotted_key(key: str, value):
        """Where a dotted override (``--set``, a search grid, ``updates``) lands; consulted by
        :func:`bbert.configs.build_config`.

        ``model.<field>`` is ``model_overrides.<field>``, its value read as YAML (``96``, ``true``),
        since ``model_overrides`` is a free mapping that ``from_dict`` can't check field by field
        (:meth:`model_config` does). Every other key is a field path of ``TrainConfig``.
        """
        if key.startswith("model."):
            return "model_overrides." + key[len("model."):], parse_value(value, key)
        return key, value

    def to_dict(self) -> dict:
        """A plain dict (lists, not tuples) that YAML and JSON can hold."""
        return to_dict(self)

    def to_yaml(self, path) -> Path:
        """Write the full config to ``path`` atomically."""
        path = Path(path)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        """Read a config written by :meth:`to_yaml` (or a hand-written partial one)."""
        return build_config(cls, config_file=path)

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> "TrainConfig":
        """A copy with ``["key=value", "model.hidden_size=256", "early_stop.enabled=true"]`` applied.

        ``model.<field>=...`` sets a model override; ``model=<preset>`` picks the model preset.
        """
        return build_config(type(self), self, assignments=assignments)

    # -- derived values ---------------------------------------------------------------------

    @property
    def time_budget_seconds(self) -> float:
        """The budget on the wall clock: the one place where ``time_budget_hours`` becomes seconds."""
        return self.time_budget_hours * SECONDS_PER_HOUR

    @property
    def validation_interval_seconds(self) -> float:
        """``validation_every_minutes`` in seconds; ``inf`` when validation is off."""
        return _in_seconds(self.validation_every_minutes)

    @property
    def checkpoint_interval_seconds(self) -> float:
        """``checkpoint_every_minutes`` in seconds; ``inf`` when periodic checkpoints are off."""
        return _in_seconds(self.checkpoint_every_minutes)

    @property
    def early_stop_after_seconds(self) -> float:
        """``early_stop.after_minutes`` in seconds: when the early stop starts to judge."""
        return _in_seconds(self.early_stop.after_minutes)

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank: batch / (micro-batch x world size)."""
        per_pass = self.micro_batch_size * world_size
        if per_pass <= 0 or self.batch_size % per_pass:
            fix = f"change batch_size to a multiple of {per_pass}"
            if world_size > 0 and self.batch_size % world_size == 0:
                fix += f" or pick a micro_batch_size that divides {self.batch_size // world_size}"
            else:  # no micro-batch size can help: the batch must split evenly over the ranks
                fix += f" (batch_size must split evenly over the {world_size} ranks)"
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by micro_batch_size x world_size = "
                f"{self.micro_batch_size} x {world_size} = {per_pass}; {fix}")
        return self.batch_size // per_pass

    def model_config(self, vocab_size: int) -> BertConfig:
        """The ``BertConfig`` of this run, for a tokenizer of ``vocab_size`` tokens."""
        # model_overrides is a free mapping: check its values against BertConfig's fields here
        hints = typing.get_type_hints(BertConfig)
        overrides = {k: coerce(v, hints[k], f"model.{k}") if k in hints else v
                     for k, v in self.model_overrides.items()}
        if self.init_from:
            return self._init_model_config(vocab_size, overrides)
        overrides["vocab_size"] = vocab_size
        overrides.setdefault("max_position_embeddings", max(512, self.max_seq_length))
        return BertConfig.from_preset(self.model, **overrides)

    def _init_model_config(self, vocab_size: int, overrides: dict) -> BertConfig:
        """The config of ``init_from``, with the overrides that only change how it trains."""
        config = init_model(self.init_from)[0]
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"model.{key} is not a BertConfig field; known: "
                                 f"{', '.join(f.name for f in dataclasses.fields(config))}")
            if key not in TRAINING_MODEL_FIELDS and getattr(config, key) != value:
                raise ValueError(f"model.{key}={value!r} contradicts init_from {self.init_from} "
                                 f"({key}={getattr(config, key)!r}): the model's shape comes from "
                                 f"init_from, so drop that setting, or leave out init_from to train "
                                 "a new model")
        if vocab_size != config.vocab_size:
            raise ValueError(f"the data has a vocabulary of {vocab_size} tokens but init_from "
                             f"{self.init_from} has {config.vocab_size}: prepare the data with its "
                             f"tokenizer, `bbert prepare --tokenizer {self.init_from} --out DATA_DIR`")
        return dataclasses.replace(config, **overrides)

    # -- validation -------------------------------------------------------------------------

    def validate(self, world_size: int = 1, check_data: bool = True) -> "TrainConfig":
        """Raise ``ValueError`` naming what to change if this run can't start; return self.

        Checks the config's own consistency: the choices, the batch arithmetic, the schedule, the
        model and (``check_data``) the data dir. What the machine must offer (the precision on
        this device, DeepSpeed and its known bugs) is :func:`bbert.engines.check_engine`'s.
        """
        def choice(name, value, options):
            if value not in options:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, options))}")

        choice("engine", self.engine, ENGINES)
        choice("precision", self.precision, PRECISIONS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.zero_stage == 3:
            # ZeRO-3 partitions the weights themselves; bbert's checkpoints and mid-run
            # validation assume whole weights on every rank (tested up to ZeRO-2)
            raise ValueError("zero_stage=3 is not supported by bbert.train: use 0 (the paper's), 1 or 2")
        choice("zero_stage", self.zero_stage, (0, 1, 2))
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.micro_batch_size < 1 or self.batch_size < 1:
            raise ValueError("batch_size and micro_batch_size must be >= 1")
        self.gradient_accumulation_steps(world_size)
        if not 0 < self.time_budget_hours < math.inf:  # also refuses nan
            raise ValueError(f"time_budget_hours must be > 0 and finite, got {self.time_budget_hours} "
                             "(e.g. 24 for the paper's run, 0.05 for 3 minutes)")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion} "
                             "(the paper warms up for 0.06 of the budget)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        # the budget, warm-up, lr shape and batch ramp as the trainer will read them
        Schedule.from_config(self, world_size)
        if not self.lr > 0 or not self.eps > 0:
            raise ValueError(f"lr and eps must be > 0, got lr={self.lr}, eps={self.eps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm=0: no clipping)")
        if self.keep_last_checkpoints < 1:
            raise ValueError(f"keep_last_checkpoints must be >= 1 (the last good checkpoint is always kept), "
                             f"got {self.keep_last_checkpoints}")
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {self.log_every_steps}")
        bad = [f for f in self.checkpoint_fractions if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"checkpoint_fractions must lie in (0, 1) (the end is always saved), got {bad}")
        for name in ("validation_every_minutes", "checkpoint_every_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, or null to turn it off; got {value}")
        if self.early_stop.enabled and self.validation_every_minutes is None:
            raise ValueError("early_stop needs validation: set validation_every_minutes, or early_stop.enabled=false")
        if self.debug.step_time_seconds is not None and self.debug.step_time_seconds <= 0:
            raise ValueError("debug.step_time_seconds must be > 0 or null (null = the real clock)")
        if self.zero_stage and self.engine != "deepspeed":
            raise ValueError(f"zero_stage={self.zero_stage} needs engine='deepspeed'; "
                             "with engine='torch' set zero_stage=0")
        if self.init_from:
            self._validate_init_from()
        else:
            try:
                self.model_config(vocab_size=self.model_overrides.get("vocab_size", 30522))
            except (TypeError, ValueError) as e:
                raise ValueError(f"model={self.model!r} with model_overrides={self.model_overrides}: {e}") from e
        if check_data:
            self._validate_data(world_size)
        return self

    def _validate_init_from(self) -> None:
        """``init_from`` fits this run: the model overrides, and the data's sequence length."""
        config = self.model_config(init_model(self.init_from)[0].vocab_size)
        if self.max_seq_length > config.max_position_embeddings:
            raise ValueError(f"max_seq_length={self.max_seq_length} (the data's sequence length) is longer "
                             f"than the {config.max_position_embeddings} positions of init_from "
                             f"{self.init_from}: prepare the data with --max-seq-length "
                             f"{config.max_position_embeddings} or less and set max_seq_length to it")

    def _validate_data(self, world_size: int = 1) -> None:
        data_dir = Path(self.data_dir)
        if data_dir.is_file():
            raise ValueError(f"data_dir {str(data_dir)!r} is a file; a data dir is the folder that `bbert prepare "
                             f"--out` wrote (it holds manifest.json): pass its folder, {data_dir.parent}")
        if (data_dir.is_dir() and not manifest_path(data_dir).exists() and any(data_dir.iterdir())
                and not any(data_dir.glob(f"*{SHARD_SUFFIX}"))):  # shards without a manifest: an older or unfinished prepare
            raise ValueError(f"data_dir {str(data_dir)!r} holds no manifest.json, so it is not a data dir (raw text?): "
                             f"prepare it first, `bbert prepare {data_dir} --out DATA_DIR`, then pass "
                             "--data-dir DATA_DIR")
        if not manifest_path(data_dir).is_file():
            raise ValueError(f"data_dir {str(data_dir)!r} has no manifest.json: prepare it first with "
                             f"`bbert prepare --out {data_dir}` (or bbert.data.prepare), or set data_dir")
        manifest = load_manifest(data_dir)
        if manifest.get("max_seq_length") != self.max_seq_length:
            raise ValueError(f"data_dir {str(data_dir)!r} holds sequences of {manifest.get('max_seq_length')} tokens "
                             f"but max_seq_length={self.max_seq_length}: set max_seq_length="
                             f"{manifest.get('max_seq_length')} or prepare the data with that length")
        if self.init_from:
            self._validate_init_vocabulary(data_dir, manifest)
        splits = manifest.get("splits", {})
        if not splits.get("train", {}).get("num_samples"):
            raise ValueError(f"data_dir {str(data_dir)!r} has no training samples; re-run bbert prepare")
        if self.validation_every_minutes is not None and not splits.get("val", {}).get("num_samples"):
            raise ValueError(f"data_dir {str(data_dir)!r} has no validation split: prepare it with a val "
                             "split, or set validation_every_minutes=null")
        # The loaders give every rank whole micro-batches; catch a too-small split now, not at the end.
        per_step = world_size * self.micro_batch_size
        for split in ("train", "val") if self.validation_every_minutes is not None else ("train",):
            have = splits.get(split, {}).get("num_samples", 0)
            if have < per_step:
                share = "raise --val-fraction" if split == "val" else "lower --val-fraction"
                raise ValueError(f"split {split!r} of {str(data_dir)!r} has {have} samples, fewer than one "
                                 f"micro-batch on every rank ({world_size} x {self.micro_batch_size}): prepare "
                                 f"more text (or {share}), or lower micro_batch_size")

    def _validate_init_vocabulary(self, data_dir: Path, manifest: dict) -> None:
        """The data's token ids mean what ``init_from``'s embeddings learned: the same vocabulary."""
        config, vocab = init_model(self.init_from)
        data_vocab = load_tokenizer(tokenizer_dir(data_dir)).get_vocab() if vocab is not None else None
        if manifest.get("vocab_size") == config.vocab_size and data_vocab == vocab:
            return
        moved = (f"{sum(vocab.get(t) != i for t, i in data_vocab.items())} of its tokens have other ids"
                 if data_vocab is not None and len(data_vocab) == len(vocab)
                 else f"{manifest.get('vocab_size')} tokens against the model's {config.vocab_size}")
        raise ValueError(f"data_dir {str(data_dir)!r} was tokenized with another vocabulary than init_from "
                         f"{self.init_from} ({moved}): prepare the data with the model's tokenizer, "
                         f"`bbert prepare --tokenizer {self.init_from} --out NEW_DATA_DIR`")


def init_model(path) -> tuple[BertConfig, dict | None]:
    """The config and tokenizer vocabulary (None without a tokenizer) of the model at ``path``,
    any folder that :func:`bbert.hf.load_pretrained` reads; a run continues from it (``init_from``).

    Chapter: ``notebooks/08_your_domain.ipynb``.
    """
    from bbert.hf import find_model_folder

    try:
        folder = find_model_folder(path).resolve()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_from: {e}") from None
    stamp = tuple(p.stat().st_mtime_ns for p in (folder, folder / "config.json"))
    config, vocab = _read_model(str(folder), stamp)
    return dataclasses.replace(config), vocab


@functools.lru_cache(maxsize=4)
def _read_model(folder: str, stamp: tuple) -> tuple[BertConfig, dict | None]:
    # loading is the one way to get an imported model's config; validate and the trainer both ask
    from bbert.hf import load_pretrained

    model, tokenizer = load_pretrained(folder)
    return model.config, (tokenizer.get_vocab() if tokenizer is not None else None)


def _preset_24hbert() -> dict:
    """The paper's run (Izsak et al. 2021, and the README command of IntelLabs/academic-budget-bert):
    BERT-large shape, pre-LN, sparse MLM head, seq 128, AdamW lr 1e-3 (0.9, 0.98) eps 1e-6 wd 0.01,
    no clipping, 6% warm-up of 24 h then linear decay to zero, batch 4096 = 32 x 8 GPUs x 16,
    fp16 with DeepSpeed, validation, early stop (validation loss > 6 after 180 minutes).

    Where this preset differs from the paper, and why:

    * masking: dynamic (a new mask each epoch). The paper's data is masked statically, duplication
      factor 10, at most 20 predictions per sequence: ``--masking static --duplication-factor 10
      --set masking.max_predictions_per_seq=20``.
    * ZeRO: stage 1; the paper's DeepSpeed config has none. DeepSpeed 0.19's fp16 does not train at
      stage 0 (deepspeedai/DeepSpeed#8393, see ``bbert.engines.check_engine``); stage 1 shards the
      optimizer state only, the same arithmetic.
    * fused kernels: the paper used apex (fused LayerNorm, fused linear + GELU); bbert uses PyTorch
      SDPA attention, unpadding and torch's fused AdamW.
    * tokenizer: the paper used ``bert-large-uncased``'s vocabulary; ``bbert prepare`` trains its own
      WordPiece of the same size (30,522) on the corpus, offline. ``--tokenizer bert-large-uncased``
      takes BERT's where the hub is reachable.
    * validation: every 30 minutes on 1% of the documents; the paper validated every few passes over
      its shards on a 10% test split of samples.
    """
    return dict(run_dir="runs/24hbert", model="large",
                model_overrides={"pre_layernorm": True, "sparse_mlm_head": True},
                max_seq_length=128, time_budget_hours=24.0, schedule="time", warmup_proportion=0.06,
                optimizer="adamw", lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, max_grad_norm=0.0,
                batch_size=4096, micro_batch_size=32, precision="fp16", engine="deepspeed", zero_stage=1,
                validation_every_minutes=30.0, checkpoint_every_minutes=60.0,
                checkpoint_fractions=[0.25, 0.5, 0.75],
                early_stop={"enabled": True, "after_minutes": 180.0, "max_val_loss": 6.0},
                log_every_steps=10)


def _preset_tiny_cpu() -> dict:
    # The same recipe, shrunk to about 3 minutes on a 2-core CPU: a 2-layer model, a small batch;
    # bf16 only where the CPU has native bf16 (emulated it is ~100x slower than fp32).
    return {**_preset_24hbert(),
            "run_dir": "runs/tiny-cpu", "model": "tiny", "model_overrides": {}, "time_budget_hours": 0.04,
            "batch_size": 32, "micro_batch_size": 16, "precision": "bf16" if fast_bf16("cpu") else "fp32",
            "engine": "torch", "zero_stage": 0, "validation_every_minutes": 0.5, "max_val_batches": 8,
            "checkpoint_every_minutes": 1.0, "keep_last_checkpoints": 2, "early_stop": {"enabled": False}}


PRESETS = {"24hbert": _preset_24hbert, "tiny-cpu": _preset_tiny_cpu}


def _in_seconds(minutes: float | None) -> float:
    return math.inf if minutes is None else minutes * SECONDS_PER_MINUTE


def hours(seconds: float) -> float:
    """``seconds`` in hours, for ``time_budget_hours`` (``time_budget_hours=hours(90)``)."""
    return seconds / SECONDS_PER_HOUR


def minutes(seconds: float) -> float:
    """``seconds`` in minutes, for the ``*_minutes`` fields (``validation_every_minutes=minutes(15)``)."""
    return seconds / SECONDS_PER_MINUTE


def preset(name: str) -> dict:
    """The fields of training preset ``name`` as a dict."""
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def load_config(preset_name: str | None = None, config_file=None, assignments=()) -> TrainConfig:
    """A preset (default ``24hbert``, none under a ``config_file``), then the file, then ``--set``."""
    if preset_name is None:
        base = {} if config_file else preset("24hbert")
    else:
        base = preset(preset_name)
    return build_config(TrainConfig, base, config_file, assignments)
