"""Hugging Face interoperability: export bbert to transformers, import transformers BERTs.

Export picks the transformers architecture that the model's options fit:
- a post-LN bbert model exports to ``transformers.BertForMaskedLM`` (the original BERT layout);
- a pre-LN bbert model (the paper's) exports to ``RobertaPreLayerNormForMaskedLM``, the
  architecture transformers has for pre-LayerNorm BERT-style encoders. RoBERTa numbers positions
  from ``pad_token_id + 1``, so bbert's position table is placed at that offset. ``bias=False``
  exports to either as zero biases (the same function);
- a model in the ModernBERT layout (``LAYOUTS["modernbert"]``: RoPE, a GLU, local attention, ...)
  exports to ``ModernBertForMaskedLM`` (``bbert.hf_modernbert``).
A model that fits none (e.g. RoPE with BERT's embedding table and layer norms) is refused in one line
naming the option to change for the closest architecture; it stays a bbert folder, which
``bbert finetune`` loads directly.
``load_pretrained(path)`` reads any of: a bbert model folder, a checkpoint or run dir, a
transformers BERT / RoBERTa-PreLayerNorm / ModernBERT folder (or, online, a hub id such as
bert-base-uncased).

Command line: ``bbert export <model folder | checkpoint | run dir> --out DIR [--overwrite]``.
Nothing is lost on the way:
- ``--out`` may not be the source, hold it or lie inside it. A run dir belongs to its run
  (checkpoints rotate, a resumed run rewrites ``final/``), so an export inside it could vanish or
  be taken for the run's model; export beside it instead (``runs/x-hf``).
- A folder that already holds other files is replaced only with ``--overwrite``; an earlier
  export (recognized by the ``bbert-export.json`` it holds) is simply refreshed.
- The new folder is built beside ``--out`` and swapped in whole, so a failed export leaves the
  old one as it was.

Chapter: ``notebooks/03_model.ipynb`` (interoperability with transformers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from bbert import __version__
from bbert.configs import UsageError, command
from bbert.hf_modernbert import ARCHITECTURE as MODERNBERT, from_modernbert, modernbert_misfits, to_modernbert
from bbert.model import CONFIG_NAME, BertConfig, BertForMaskedLM
from bbert.atomic import atomic_path
from bbert.data.layout import tokenizer_dir
from bbert.hub import require_hub
from bbert.identity import check_safetensors
from bbert.run_dir import final_dir, latest_checkpoint, model_dir

HF_BERT, HF_PRELN, HF_MODERNBERT = "bert", "roberta-prelayernorm", "modernbert"
HF_TYPES = (HF_BERT, HF_PRELN, HF_MODERNBERT)  # the model_types bbert imports and exports
EXPORT_MARKER = "bbert-export.json"  # written into every export, so a re-export may replace it


# ---- finding the model folder inside whatever we were given ---------------------------------


def find_model_folder(path) -> Path:
    """The model folder inside ``path``: the folder itself, ``model/``, ``final/`` (or
    ``final/model``), or the model of a run dir's latest checkpoint (the highest step).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a model folder, a checkpoint folder or a run dir")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file; pass the folder that holds the model "
                                "(a model folder, a checkpoint folder or a run dir)")
    for candidate in (path, model_dir(path), final_dir(path), model_dir(final_dir(path))):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None and (model_dir(checkpoint) / CONFIG_NAME).is_file():
        return model_dir(checkpoint)
    raise FileNotFoundError(
        f"no model found in {path}: it is neither a model folder nor a run dir; pass a folder with "
        f"{CONFIG_NAME} in it, in model/, in final/ or in checkpoints/<name>/model/ (a run dir "
        "from `bbert pretrain`)")


def find_tokenizer_folder(folder) -> Path | None:
    """The tokenizer beside a model folder: in it, or in a ``tokenizer/`` one or two levels up."""
    folder = Path(folder)
    for candidate in (folder, tokenizer_dir(folder.parent), tokenizer_dir(folder.parent.parent)):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.txt").is_file():
            return candidate
    return None


def _load_tokenizer(folder: Path):
    candidate = find_tokenizer_folder(folder)
    if candidate is None:
        warnings.warn(f"no tokenizer found beside {folder}; returning tokenizer=None")
        return None
    # AutoTokenizer also reads the folder's config.json to guess the tokenizer class and warns that
    # bbert's model_type is not one of its own; tokenizer_config.json names the class, so the
    # warning says nothing here.
    with _dropping_records("transformers.configuration_utils",
                           lambda r: r.getMessage().startswith("You are using a model of type `bbert`")):
        return AutoTokenizer.from_pretrained(str(candidate))


@contextlib.contextmanager
def _dropping_records(logger_name: str, drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """Inside the block, drop the records of one library logger that ``drop`` matches."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not drop(record)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_pretrained(path) -> tuple[BertForMaskedLM, object]:
    """Load ``(BertForMaskedLM, tokenizer)`` from a bbert model folder, a checkpoint or run dir,
    a transformers BERT / BertForMaskedLM / RoBERTa-PreLayerNorm / ModernBERT folder, or
    (online only) a hub id.
    """
    name = str(path)
    if not Path(path).exists() and not name.startswith(("/", ".", "~")) and name.count("/") <= 1:
        return _load_from_hub(name)  # no such folder: a hub id such as "bert-base-uncased"
    folder = find_model_folder(path)
    check_safetensors(folder)  # a truncated file: one line naming it, not safetensors' own error
    model_type = json.loads((folder / CONFIG_NAME).read_text()).get("model_type")
    if model_type == "bbert":
        model = BertForMaskedLM.from_pretrained(folder)
    elif model_type in HF_TYPES:
        model = import_from_transformers(folder)
    else:
        raise ValueError(f"{folder / CONFIG_NAME} has model_type {model_type!r}; bbert reads 'bbert', "
                         f"'{HF_BERT}', '{HF_PRELN}' and '{HF_MODERNBERT}' folders")
    return model, _load_tokenizer(folder)


def _load_from_hub(name: str):
    require_hub(f"no local folder {name!r} exists, so it was taken as a hub id; loading it", "download the model once elsewhere with "
                f"`transformers.AutoModelForMaskedLM.from_pretrained({name!r}).save_pretrained(DIR)` "
                "(and its tokenizer), copy DIR here and pass its path")

    with _quiet_transformers():
        hf_model = AutoModelForMaskedLM.from_pretrained(name)
    return import_from_transformers(hf_model), AutoTokenizer.from_pretrained(name)


# ---- transformers -> bbert -----------------------------------------------------------------


def import_from_transformers(source) -> BertForMaskedLM:
    """Convert a transformers ``BertForMaskedLM``/``BertModel`` (post-LN),
    ``RobertaPreLayerNormForMaskedLM`` (pre-LN) or ``ModernBertForMaskedLM`` -- a folder or a
    loaded model -- into bbert.

    A folder without an MLM head (a plain ``BertModel``) gets a freshly initialized head.
    """
    if isinstance(source, (str, Path)):
        hf_config = AutoConfig.from_pretrained(str(source))
        if hf_config.model_type not in HF_TYPES:
            raise ValueError(f"{source}: model_type {hf_config.model_type!r} can't be imported; "
                             f"bbert imports {', '.join(map(repr, HF_TYPES))}")
        with _quiet_transformers():
            hf = AutoModelForMaskedLM.from_pretrained(str(source), attn_implementation="eager")
    else:
        hf = source
    c = hf.config
    if c.model_type == HF_MODERNBERT:
        return from_modernbert(hf)
    pre_ln = c.model_type == HF_PRELN
    if c.hidden_act != "gelu":
        raise ValueError(f"hidden_act {c.hidden_act!r} is not supported; bbert uses exact 'gelu'")
    offset = c.pad_token_id + 1 if pre_ln else 0  # RoBERTa positions start at pad_token_id + 1
    config = BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings - offset, type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0, pre_layernorm=pre_ln,
        embedding_layernorm=True, hidden_dropout_prob=c.hidden_dropout_prob,
        attention_probs_dropout_prob=c.attention_probs_dropout_prob, layer_norm_eps=c.layer_norm_eps,
        initializer_range=c.initializer_range, tie_word_embeddings=True)
    sd = hf.state_dict()
    model = BertForMaskedLM(config)
    new = {}
    for ours, theirs in _name_map(config).items():
        if theirs in sd:
            new[ours] = sd[theirs]
    for i in range(config.num_hidden_layers):
        q, k, v = (_layer_prefix(config, i) + f"attention.self.{n}" for n in ("query", "key", "value"))
        for kind in ("weight", "bias"):
            new[f"bert.layers.{i}.attention.qkv.{kind}"] = torch.cat(
                [sd[f"{q}.{kind}"], sd[f"{k}.{kind}"], sd[f"{v}.{kind}"]])
    pos = new["bert.embeddings.position_embeddings.weight"]
    new["bert.embeddings.position_embeddings.weight"] = pos[offset:]
    # Pad the vocabulary to padded_vocab_size (the extra rows are never predicted).
    extra = config.padded_vocab_size - config.vocab_size
    for key in ("bert.embeddings.word_embeddings.weight", "mlm_head.bias"):
        if key in new and extra:
            new[key] = torch.cat([new[key], new[key].new_zeros(extra, *new[key].shape[1:])])
    missing, unexpected = model.load_state_dict(new, strict=False)
    missing = [k for k in missing if not k.startswith("mlm_head.")]
    if missing or unexpected:
        raise ValueError(f"could not map the transformers weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _layer_prefix(config: BertConfig, i: int) -> str:
    return f"{'roberta_prelayernorm' if config.pre_layernorm else 'bert'}.encoder.layer.{i}."


def _name_map(config: BertConfig) -> dict[str, str]:
    """bbert parameter name -> transformers name (the fused QKV is handled apart)."""
    if config.pre_layernorm:
        root, head = "roberta_prelayernorm", "lm_head"
        m = {"bert.final_norm.weight": f"{root}.LayerNorm.weight", "bert.final_norm.bias": f"{root}.LayerNorm.bias",
             "mlm_head.dense.weight": f"{head}.dense.weight", "mlm_head.dense.bias": f"{head}.dense.bias",
             "mlm_head.layer_norm.weight": f"{head}.layer_norm.weight",
             "mlm_head.layer_norm.bias": f"{head}.layer_norm.bias", "mlm_head.bias": f"{head}.bias"}
        norms = {"attention_norm": "attention.LayerNorm", "ffn_norm": "intermediate.LayerNorm"}
    else:
        root, head = "bert", "cls.predictions"
        m = {"mlm_head.dense.weight": f"{head}.transform.dense.weight",
             "mlm_head.dense.bias": f"{head}.transform.dense.bias",
             "mlm_head.layer_norm.weight": f"{head}.transform.LayerNorm.weight",
             "mlm_head.layer_norm.bias": f"{head}.transform.LayerNorm.bias", "mlm_head.bias": f"{head}.bias"}
        norms = {"attention_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[f"bert.embeddings.{name}.weight"] = f"{root}.embeddings.{name}.weight"
    for kind in ("weight", "bias"):
        m[f"bert.embeddings.layer_norm.{kind}"] = f"{root}.embeddings.LayerNorm.{kind}"
    for i in range(config.num_hidden_layers):
        ours, theirs = f"bert.layers.{i}.", _layer_prefix(config, i)
        layer = {"attention.out": "attention.output.dense", "ffn.fc1": "intermediate.dense",
                 "ffn.fc2": "output.dense", **norms}
        for a, b in layer.items():
            for kind in ("weight", "bias"):
                m[f"{ours}{a}.{kind}"] = f"{theirs}{b}.{kind}"
    return m


# ---- bbert -> transformers -----------------------------------------------------------------


def bert_misfits(config: BertConfig) -> list[tuple[str, object]]:
    """``[(field, value it needs), ...]`` for each option transformers' BERT / RoBERTa-PreLN lack."""
    needs = (("ffn_type", "mlp"), ("position_embedding_type", "absolute"), ("local_attention", 0),
             ("embedding_layernorm", True), ("first_attention_norm", True), ("tie_word_embeddings", True))
    return [(field, value) for field, value in needs if getattr(config, field) != value]


def export_architecture(config: BertConfig) -> str:
    """The transformers class a model of ``config`` exports to, or a one-line ``ValueError`` naming
    the option to change for the architecture it is closest to."""
    bert = "RobertaPreLayerNormForMaskedLM" if config.pre_layernorm else "BertForMaskedLM"
    fits = {MODERNBERT: modernbert_misfits(config), bert: bert_misfits(config)}  # a tie: ModernBERT
    closest = min(fits, key=lambda name: len(fits[name]))
    if not fits[closest]:
        return closest
    field, value = fits[closest][0]
    shown = str(value).lower() if isinstance(value, bool) else value
    raise ValueError(f"this model fits no transformers architecture: as the closest, {closest}, it needs "
                     f"{field}={value!r} (pretrain with --set model.{field}={shown}); or keep it as a bbert "
                     "model folder, which `bbert finetune` loads directly")


def to_transformers(model: BertForMaskedLM):
    """The equivalent transformers model (in memory): ``BertForMaskedLM`` for post-LN,
    ``RobertaPreLayerNormForMaskedLM`` for pre-LN, ``ModernBertForMaskedLM`` for the ModernBERT layout
    (see :func:`export_architecture`).
    """

    if not isinstance(model, BertForMaskedLM):
        raise TypeError(f"export takes a bbert BertForMaskedLM, got {type(model).__name__}")
    config = model.config
    if export_architecture(config) == MODERNBERT:
        return to_modernbert(model)
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                  intermediate_size=config.intermediate_size, hidden_act="gelu",
                  hidden_dropout_prob=config.hidden_dropout_prob,
                  attention_probs_dropout_prob=config.attention_probs_dropout_prob,
                  type_vocab_size=max(2, config.type_vocab_size), layer_norm_eps=config.layer_norm_eps,
                  initializer_range=config.initializer_range, pad_token_id=config.pad_token_id,
                  tie_word_embeddings=True)
    offset = config.pad_token_id + 1 if config.pre_layernorm else 0
    if config.pre_layernorm:
        hf_config = transformers.RobertaPreLayerNormConfig(
            max_position_embeddings=config.max_position_embeddings + offset, **common)
        hf = transformers.RobertaPreLayerNormForMaskedLM(hf_config)
    else:
        hf_config = transformers.BertConfig(max_position_embeddings=config.max_position_embeddings, **common)
        hf = transformers.BertForMaskedLM(hf_config)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    V = config.vocab_size
    sd["bert.embeddings.word_embeddings.weight"] = sd["bert.embeddings.word_embeddings.weight"][:V]
    sd["mlm_head.bias"] = sd["mlm_head.bias"][:V] if config.decoder_bias else torch.zeros(V)
    key = "bert.embeddings.token_type_embeddings.weight"
    if config.type_vocab_size == 1:
        # bbert ignores token_type_ids with one segment; two equal rows make transformers ignore
        # them too, instead of failing on the 1s a BERT tokenizer gives sentence pairs.
        sd[key] = sd[key].repeat(2, 1)
    elif config.type_vocab_size == 0:  # no segment table: rows of zeros add nothing
        sd[key] = torch.zeros(2, config.hidden_size)
    pos = sd["bert.embeddings.position_embeddings.weight"]
    # RoBERTa looks up position pad_token_id + 1 + i for token i; rows below are never used by real tokens.
    sd["bert.embeddings.position_embeddings.weight"] = torch.cat([pos.new_zeros(offset, pos.shape[1]), pos])
    new = {theirs: sd[ours] for ours, theirs in _name_map(config).items() if ours in sd}  # bias=False: no biases
    for i in range(config.num_hidden_layers):
        prefix = _layer_prefix(config, i) + "attention.self."
        for kind in ("weight", "bias") if config.attention_bias else ("weight",):
            q, k, v = sd[f"bert.layers.{i}.attention.qkv.{kind}"].chunk(3)
            new.update({f"{prefix}query.{kind}": q, f"{prefix}key.{kind}": k, f"{prefix}value.{kind}": v})
    head = "lm_head" if config.pre_layernorm else "cls.predictions"
    new[f"{head}.decoder.weight"] = new[f"{_root(config)}.embeddings.word_embeddings.weight"]
    new[f"{head}.decoder.bias"] = new[f"{head}.bias"]
    # transformers' layers all have biases: zeros make the bias-free parts (bias=False etc.) so
    new.update({k: torch.zeros_like(v) for k, v in hf.state_dict().items() if k.endswith("bias") and k not in new})
    missing, unexpected = hf.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def transformers_baseline(config: BertConfig, attn_implementation: str = "sdpa"):
    """A freshly initialized ``transformers.BertForMaskedLM`` of the same shape as ``config``:
    the model a user would otherwise pick, which the benchmark and the model chapter time bbert
    against.
    """

    hf_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob, attn_implementation=attn_implementation)
    model = transformers.BertForMaskedLM(hf_config)
    if model.config._attn_implementation != attn_implementation:
        raise RuntimeError(f"transformers did not take attn_implementation={attn_implementation!r}")
    return model


def _root(config: BertConfig) -> str:
    return "roberta_prelayernorm" if config.pre_layernorm else "bert"


def is_export(folder) -> bool:
    """Whether ``folder`` is one that :func:`export_to_transformers` wrote (it holds the marker
    beside a transformers ``config.json``)."""
    folder = Path(folder)
    if not (folder / EXPORT_MARKER).is_file():
        return False
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("model_type") in HF_TYPES
    except (OSError, ValueError):
        return False


def check_out_dir(out_dir, keep: Iterable = (), overwrite: bool = False) -> Path:
    """``out_dir`` if an export may be written there, else a ``UsageError`` saying why and what to do.

    Refused: ``out_dir`` is one of the folders in ``keep`` (the source, its model and tokenizer
    folders), holds one or lies inside one; it is a file; it is a folder with files that is not an
    earlier export, unless ``overwrite``.
    """
    out = Path(out_dir)
    target = out.resolve()
    for path in (Path(p) for p in keep):
        kept = path.resolve()
        if target == kept:
            problem = "is the folder the export reads from"
        elif kept.is_relative_to(target):
            problem = f"holds {path}, which the export reads from"
        elif target.is_relative_to(kept):
            problem = f"lies inside {path}, the run or model being exported"
        else:
            continue
        raise UsageError(f"--out {out} {problem}; write the export beside it, "
                         f"e.g. --out {kept.parent / (kept.name + '-hf')}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; remove it or choose a folder path")
    if out.is_dir() and not overwrite and not is_export(out):
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise UsageError(f"--out {out} already holds files ({shown}) and is not an earlier export; "
                             "choose a new or empty folder, or pass --overwrite (overwrite=True) to replace it")
    return out


def export_to_transformers(model: BertForMaskedLM, tokenizer, out_dir, overwrite: bool = False) -> Path:
    """Write a folder that ``transformers.AutoModelForMaskedLM`` and ``AutoTokenizer`` load.

    ``out_dir`` may be new, empty or an earlier export; a folder with other files is replaced only
    with ``overwrite=True`` (see :func:`check_out_dir`). Written atomically: the new folder is
    built beside ``out_dir`` and swapped in, so ``out_dir`` is either the old folder or the
    complete new one.
    """
    hf = to_transformers(model)  # first: a model that can't be exported needs no tokenizer
    if tokenizer is None:
        raise ValueError("export needs the tokenizer, so that AutoTokenizer.from_pretrained(out_dir) works; "
                         "load it with bbert.data.load_tokenizer(data_dir)")
    out_dir = check_out_dir(out_dir, overwrite=overwrite)
    marker = {"exported_by": f"bbert {__version__}", "architecture": type(hf).__name__}
    with atomic_path(out_dir) as tmp, _quiet_transformers():
        hf.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence what transformers prints around ``save_pretrained`` / ``from_pretrained`` that is
    not about the export or the load: its progress bars, and DeepSpeed's start-up line."""
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" for a single file
    try:
        # save_pretrained unwraps the model through accelerate, which imports DeepSpeed (where it is
        # installed) only to check for a DeepSpeedEngine; DeepSpeed then logs its accelerator choice.
        with _dropping_records("DeepSpeed", lambda r: r.levelno < logging.ERROR):
            yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


@command("bbert export")
def main(argv: list[str] | None = None) -> int:
    """``bbert export SRC --out DIR [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="bbert export", description="Export a bbert model (folder, checkpoint or run dir) to a "
        "transformers folder: post-LN -> BertForMaskedLM, pre-LN -> RobertaPreLayerNormForMaskedLM, the "
        "ModernBERT layout -> ModernBertForMaskedLM.")
    parser.add_argument("source", help="a bbert model folder, a checkpoint folder or a run dir")
    parser.add_argument("--out", required=True,
                        help="the folder to write: new, empty or an earlier export (swapped in whole)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds other files")
    args = parser.parse_args(argv)
    folder = find_model_folder(args.source)
    keep = [args.source, folder, find_tokenizer_folder(folder) or folder]
    check_out_dir(args.out, keep=keep, overwrite=args.overwrite)  # before the slow load
    model, tokenizer = load_pretrained(folder)
    out = export_to_transformers(model, tokenizer, args.out, overwrite=args.overwrite)
    arch = export_architecture(model.config)
    print(f"exported {folder} -> {out} ({arch}); load it with "
          f"transformers.AutoModelForMaskedLM.from_pretrained({str(out)!r})")
    return 0
