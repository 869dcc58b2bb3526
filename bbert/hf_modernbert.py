"""bbert <-> transformers' ``ModernBertForMaskedLM`` (Warner et al. 2024), weight for weight.

    modernbert_misfits(config)   the options that keep a bbert model from being a ModernBERT ([] if none)
    to_modernbert(model)         the equivalent ``ModernBertForMaskedLM`` (in memory)
    from_modernbert(hf)          a loaded ``ModernBertForMaskedLM`` as a bbert ``BertForMaskedLM``
    modernbert_baseline(config)  a fresh ``ModernBertForMaskedLM`` of a bbert config's shape (benchmarks)

A bbert model is a ModernBERT when its options are ``LAYOUTS["modernbert"]``'s (any shape, window,
global-layer period, RoPE bases and bias flags): pre-LN, no attention norm in layer 0, no segment
table, RoPE, a GLU. The two agree on the rest: the fused QKV's rows are [Q | K | V] in both, the
GLU's fused input projection is [activated half | gate] in both (bbert's ``gate, value`` is
ModernBERT's ``input, gate``), RoPE pairs channels (i, i + d/2) in both, and a local layer sees the
tokens within ``local_attention // 2`` on either side in both. What differs is only where dropout
sits during training (ModernBERT: after ``Wo`` and inside the MLP; bbert: on each residual branch).
``bbert.hf`` picks this module's export when a model fits it (``bbert export``) and imports
``model_type: modernbert`` folders.

Chapter: ``notebooks/03_model.ipynb`` (interoperability with transformers).
"""
from __future__ import annotations

import torch
import transformers

from bbert.model import BertConfig, BertForMaskedLM

ARCHITECTURE = "ModernBertForMaskedLM"
GLU_ACTIVATIONS = {"geglu": "gelu", "swiglu": "silu"}  # bbert ffn_type -> ModernBERT hidden_activation
FITS = (("pre_layernorm", True), ("embedding_layernorm", True), ("first_attention_norm", False),
        ("type_vocab_size", 0), ("position_embedding_type", "rope"))


def modernbert_misfits(config: BertConfig) -> list[tuple[str, object]]:
    """``[(field, value it needs), ...]`` for each option that ModernBERT has otherwise."""
    misfits = [(field, value) for field, value in FITS if getattr(config, field) != value]
    if config.ffn_type not in GLU_ACTIVATIONS:
        misfits.append(("ffn_type", "geglu"))
    return misfits


def _name_map(config: BertConfig) -> dict[str, str]:
    """bbert parameter name -> ModernBERT's (the vocabulary rows are cut or padded apart)."""
    m = {"bert.embeddings.word_embeddings": "model.embeddings.tok_embeddings",
         "bert.embeddings.layer_norm": "model.embeddings.norm", "bert.final_norm": "model.final_norm",
         "mlm_head.dense": "head.dense", "mlm_head.layer_norm": "head.norm"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in (("attention.qkv", "attn.Wqkv"), ("attention.out", "attn.Wo"),
                             ("attention_norm", "attn_norm"), ("ffn.fc1", "mlp.Wi"), ("ffn.fc2", "mlp.Wo"),
                             ("ffn_norm", "mlp_norm")):
            m[f"bert.layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    names = {f"{a}.{kind}": f"{b}.{kind}" for a, b in m.items() for kind in ("weight", "bias")}
    names.update({"mlm_head.bias": "decoder.bias", "mlm_head.decoder.weight": "decoder.weight"})
    return names


def modernbert_config(config: BertConfig) -> "transformers.ModernBertConfig":
    """The ``ModernBertConfig`` of a bbert config that fits (see :func:`modernbert_misfits`)."""
    layer_types = ["full_attention" if config.is_global(i) else "sliding_attention"
                   for i in range(config.num_hidden_layers)]
    rope = {"full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta}}
    return transformers.ModernBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_activation=GLU_ACTIVATIONS.get(config.ffn_type, "gelu"), classifier_activation="gelu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        norm_eps=config.layer_norm_eps, norm_bias=config.norm_bias, attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias, classifier_bias=config.classifier_bias, decoder_bias=config.decoder_bias,
        layer_types=layer_types, rope_parameters=rope, local_attention=config.local_attention or 128,
        attention_dropout=config.attention_probs_dropout_prob, embedding_dropout=config.hidden_dropout_prob,
        mlp_dropout=config.hidden_dropout_prob, pad_token_id=config.pad_token_id, bos_token_id=None,
        eos_token_id=None, cls_token_id=None, sep_token_id=None,
        tie_word_embeddings=config.tie_word_embeddings)


def to_modernbert(model: BertForMaskedLM):
    """The equivalent ``transformers.ModernBertForMaskedLM`` (eval mode) of a model that fits."""
    config = model.config
    if misfits := modernbert_misfits(config):
        field, value = misfits[0]
        raise ValueError(f"a ModernBERT needs {field}={value!r}; set model.{field}={value}")
    hf = transformers.ModernBertForMaskedLM(modernbert_config(config))
    V = config.vocab_size
    names = _name_map(config)
    theirs = {names[k]: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for key in ("model.embeddings.tok_embeddings.weight", "decoder.weight", "decoder.bias"):
        if key in theirs:
            theirs[key] = theirs[key][:V]  # drop the alignment rows of the vocabulary
    if config.tie_word_embeddings:
        theirs["decoder.weight"] = theirs["model.embeddings.tok_embeddings.weight"]
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ModernBERT mapping is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def _global_period(layer_types: list[str]) -> int | None:
    """The ``n`` with layer i global exactly when i % n == 0, or None if there is no such ``n``."""
    for n in range(1, len(layer_types) + 1):
        if all((t == "full_attention") == (i % n == 0) for i, t in enumerate(layer_types)):
            return n
    return None


def from_modernbert(hf) -> BertForMaskedLM:
    """A bbert ``BertForMaskedLM`` with the weights (and the same outputs) of a loaded
    ``ModernBertForMaskedLM``. Raises ``ValueError`` naming what bbert can't represent.
    """
    c = hf.config
    ffn_type = {act: ffn for ffn, act in GLU_ACTIVATIONS.items()}.get(c.hidden_activation)
    if ffn_type is None or c.classifier_activation != "gelu":
        raise ValueError(f"hidden_activation {c.hidden_activation!r} / classifier_activation "
                         f"{c.classifier_activation!r}: bbert has GeGLU (gelu) and SwiGLU (silu) layers "
                         "and a gelu head")
    rope = c.rope_parameters
    if any(rope[t].get("rope_type", "default") != "default" for t in set(c.layer_types)):
        raise ValueError(f"rope_parameters {rope}: bbert has the default RoPE only (no scaling)")
    all_global = all(t == "full_attention" for t in c.layer_types)
    period = 1 if all_global else _global_period(list(c.layer_types))
    if period is None:
        raise ValueError(f"layer_types {c.layer_types}: bbert makes every n-th layer global "
                         "(global_attn_every_n_layers), and no n gives this pattern")
    config = BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=0,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0, pre_layernorm=True,
        first_attention_norm=False, hidden_dropout_prob=c.mlp_dropout,
        attention_probs_dropout_prob=c.attention_dropout, layer_norm_eps=c.norm_eps,
        initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
        ffn_type=ffn_type, position_embedding_type="rope",
        rope_theta=rope["full_attention"]["rope_theta"],
        local_rope_theta=rope.get("sliding_attention", {}).get("rope_theta", 10_000.0),
        local_attention=0 if all_global else c.local_attention, global_attn_every_n_layers=period,
        bias=False, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, norm_bias=c.norm_bias,
        classifier_bias=c.classifier_bias, decoder_bias=c.decoder_bias)
    model = BertForMaskedLM(config)
    theirs = hf.state_dict()
    ours = {k: theirs[name] for k, name in _name_map(config).items() if name in theirs}
    if config.tie_word_embeddings:
        ours.pop("mlm_head.decoder.weight", None)  # the word embeddings are the decoder
    extra = config.padded_vocab_size - config.vocab_size  # pad the vocabulary (rows never predicted)
    for key in ("bert.embeddings.word_embeddings.weight", "mlm_head.decoder.weight", "mlm_head.bias"):
        if key in ours and extra:
            ours[key] = torch.cat([ours[key], ours[key].new_zeros(extra, *ours[key].shape[1:])])
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ValueError(f"could not map the ModernBERT weights: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def modernbert_baseline(config: BertConfig, attn_implementation: str = "sdpa"):
    """A freshly initialized ``ModernBertForMaskedLM`` of the same shape and options as ``config``
    (which must fit): what the benchmark times bbert's ModernBERT layout against."""
    if misfits := modernbert_misfits(config):
        raise ValueError(f"a ModernBERT needs {misfits[0][0]}={misfits[0][1]!r}")
    hf_config = modernbert_config(config)
    hf_config._attn_implementation = attn_implementation
    return transformers.ModernBertForMaskedLM(hf_config)
