"""The BERT masked-LM that the 24hBERT recipe trains, in one readable file.

    BertConfig                       presets tiny .. large (large = the paper's 24 x 1024 x 16 shape)
    BertModel                        embeddings -> N x BertLayer (pre- or post-LayerNorm) -> final LayerNorm
    BertForMaskedLM                  + the MLM head, sparse: run only at the masked positions
    BertForSequenceClassification    + pooler and classifier, for GLUE
    layer_grad_norms                 each layer's gradient norm at initialization (pre- vs post-LN)

The speed-ups the paper relies on, each switchable for the model chapter to measure:
- ``sparse_mlm_head``: the head transform and the vocabulary decoder run only on the ~15% of
  positions that carry a label, instead of all of them;
- fused QKV projection + ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU);
- ``unpad``: pad tokens are dropped from every per-token op (projections, FFN, LayerNorms), as in
  MosaicBERT; they are put back only around the attention product itself;
- the vocabulary is padded to a multiple of 8 so the decoder matmul is tensor-core friendly.
Post-2021 encoder options, each off by default (``BertConfig`` fields, ``--set model.X=...``):
- ``ffn_type="geglu"|"swiglu"``: a gated-linear-unit feed-forward block (Shazeer 2020, "GLU
  Variants Improve Transformer"), GeGLU as in Cramming (Geiping & Goldstein 2023) and ModernBERT
  (Warner et al. 2024); with ``intermediate_size=0`` its width keeps the 4H MLP's parameter count;
- ``position_embedding_type="rope"``: rotary position embeddings on q and k, no learned position
  table (Su et al. 2021, RoFormer; ModernBERT), base ``rope_theta``;
- ``bias=False``: no bias in any Linear or LayerNorm (Cramming; ModernBERT), the vocabulary bias
  of the decoder kept (as ModernBERT's ``decoder_bias``); ``attention_bias``, ``mlp_bias``,
  ``norm_bias``, ``classifier_bias`` and ``decoder_bias`` switch each part apart (ModernBERT's flags);
- ``local_attention=W``: sliding-window attention, each token seeing the W/2 tokens on either side,
  in every layer but each ``global_attn_every_n_layers``-th, with its own RoPE base
  ``local_rope_theta`` (ModernBERT; Beltagy et al. 2020, Longformer). SDPA with a band mask;
- ``first_attention_norm=False``: layer 0 reads the embedding LayerNorm's output without a second
  LayerNorm (ModernBERT), and ``type_vocab_size=0`` drops the segment table.
``LAYOUTS["modernbert"]`` sets all of these as ModernBERT has them: ``from_preset("mini",
layout="modernbert")`` (or ``--set model.layout=modernbert``) is ModernBERT at the mini shape, and the
``modernbert-base`` / ``modernbert-large`` presets are the published models' shapes.
``bbert.hf`` exports such a model as transformers' ``ModernBertForMaskedLM`` and imports one.
The 30% masking rate of MosaicBERT (Portes et al. 2023) needs no model change: it is the data's
``MaskingConfig.mlm_probability``, and the sparse head follows whatever is masked.

Mixed precision (bf16 autocast, where the device runs bf16 natively) and ``torch.compile`` are
applied from outside, by the trainer. Measuring their speed (FLOPs, timed training steps) is
``bbert.speed``'s job.

Chapter: ``notebooks/03_model.ipynb``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bbert.atomic import atomic_path

# Warner et al. 2024, answerdotai/ModernBERT-{base,large} config.json: layers, hidden, heads, FFN width
MODERNBERT_PRESETS = {
    "modernbert-base": (22, 768, 12, 1152),
    "modernbert-large": (28, 1024, 16, 2624),
}

# A layout is a set of options: the architecture apart from its shape.
LAYOUTS = {
    "bert": {},
    "modernbert": dict(pre_layernorm=True, first_attention_norm=False, type_vocab_size=0,
                       ffn_type="geglu", position_embedding_type="rope", rope_theta=160_000.0,
                       local_attention=128, global_attn_every_n_layers=3, local_rope_theta=10_000.0,
                       bias=False, decoder_bias=True, layer_norm_eps=1e-5,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),  # as published
}

PRESETS = {
    #         layers, hidden, heads
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),  # 24hBERT, BERT-large shaped
}

FFN_TYPES = ("mlp", "geglu", "swiglu")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def default_intermediate_size(hidden_size: int, ffn_type: str = "mlp") -> int:
    """The FFN width when ``intermediate_size`` is 0: 4H for the MLP (two H x 4H matrices). A GLU
    has three H x I matrices, so 2/3 of 4H keeps the parameters (and FLOPs) equal, rounded to a
    multiple of 8 so the matmuls stay tensor-core aligned (the reason ``pad_vocab_multiple`` is 8).
    """
    if ffn_type == "mlp":
        return 4 * hidden_size
    return 8 * round(4 * hidden_size * 2 / 3 / 8)


@dataclass
class BertConfig:
    """Shape and options of the model; defaults are the paper's (BERT-large, pre-LN, sparse head).

    ``vocab_size`` is the tokenizer's; the embedding matrix has ``padded_vocab_size`` rows
    (rounded up to ``pad_vocab_multiple``). ``type_vocab_size`` is 1 for our single-segment
    pretraining (token_type_ids are then ignored); a transformers BERT brings 2.
    """

    vocab_size: int = 30522
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 0  # 0 -> 4 * hidden_size (MLP), or the GLU width of equal parameters
    max_position_embeddings: int = 512
    type_vocab_size: int = 1
    pad_token_id: int = 0
    pre_layernorm: bool = True  # pre-LN + a final LayerNorm (the paper); False = original BERT post-LN
    embedding_layernorm: bool = True
    hidden_act: str = "gelu"  # exact (erf) GELU, as BERT
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    sparse_mlm_head: bool = True
    tie_word_embeddings: bool = True
    unpad: bool = True
    pad_vocab_multiple: int = 8
    # post-2021 options (see the module docstring), each off by default
    ffn_type: str = "mlp"  # "mlp" | "geglu" | "swiglu"
    position_embedding_type: str = "absolute"  # "absolute" (learned table) | "rope"
    rope_theta: float = 10000.0
    bias: bool = True  # False: no bias in any Linear or LayerNorm (the vocabulary bias stays)
    attention_bias: bool | None = None  # QKV and output projections; None: as ``bias``
    mlp_bias: bool | None = None  # the feed-forward block; None: as ``bias``
    norm_bias: bool | None = None  # every LayerNorm; None: as ``bias``
    classifier_bias: bool | None = None  # the MLM head's dense and the pooler; None: as ``bias``
    decoder_bias: bool = True  # the vocabulary bias of the decoder
    local_attention: int = 0  # > 0: sliding window of this many tokens (+- half) in the local layers
    global_attn_every_n_layers: int = 1  # with local_attention: layers 0, n, 2n, ... stay global
    local_rope_theta: float = 10000.0  # RoPE base of the local layers (rope_theta: the global ones)
    first_attention_norm: bool = True  # False: layer 0 has no attention LayerNorm (ModernBERT)

    def __post_init__(self):
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type {self.ffn_type!r} is unknown; choose one of {', '.join(FFN_TYPES)}")
        if self.position_embedding_type not in ("absolute", "rope"):
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is unknown; "
                             "choose 'absolute' or 'rope'")
        if not self.intermediate_size:
            self.intermediate_size = default_intermediate_size(self.hidden_size, self.ffn_type)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}; pick a head count that divides it")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; bbert uses exact 'gelu'")
        if self.type_vocab_size < 0:
            raise ValueError("type_vocab_size must be >= 0 (0 = no segment table, 1 = a single segment)")
        for part in ("attention_bias", "mlp_bias", "norm_bias", "classifier_bias"):
            if getattr(self, part) is None:
                setattr(self, part, self.bias)
        if self.local_attention < 0 or self.global_attn_every_n_layers < 1:
            raise ValueError(f"local_attention must be >= 0 (got {self.local_attention}) and "
                             f"global_attn_every_n_layers >= 1 (got {self.global_attn_every_n_layers})")
        if not self.first_attention_norm and not (self.pre_layernorm and self.embedding_layernorm):
            raise ValueError("first_attention_norm=False needs pre_layernorm=True and embedding_layernorm=True "
                             "(layer 0 then reads the embedding LayerNorm's output); set first_attention_norm=true")
        if self.position_embedding_type == "rope" and (self.head_dim % 2 or self.rope_theta <= 0):
            raise ValueError(f"rope needs an even head_dim (got {self.head_dim}) and rope_theta > 0 "
                             f"(got {self.rope_theta}); change hidden_size / num_attention_heads or rope_theta")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global(self, layer: int) -> bool:
        """Whether layer ``layer`` attends to the whole sequence (else to its local window)."""
        return not self.local_attention or layer % self.global_attn_every_n_layers == 0

    @classmethod
    def from_preset(cls, name: str, layout: str | None = None, **overrides) -> "BertConfig":
        """``BertConfig.from_preset("mini", vocab_size=8192)``; presets: tiny mini small medium base
        large, modernbert-base modernbert-large. ``layout`` (a key of ``LAYOUTS``) sets the options of
        an architecture; ``modernbert-*`` presets bring ``layout="modernbert"``; ``overrides`` win.
        """
        if name in MODERNBERT_PRESETS:
            layers, hidden, heads, width = MODERNBERT_PRESETS[name]
            layout = layout or "modernbert"
        elif name in PRESETS:
            (layers, hidden, heads), width = PRESETS[name], 0
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join([*PRESETS, *MODERNBERT_PRESETS])}")
        if (layout or "bert") not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        shape = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=width)
        return cls.from_dict({**shape, **LAYOUTS[layout or "bert"], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"model_type", "architectures", "num_labels", "bbert_version"}
        if unknown:
            raise ValueError(f"unknown BertConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# ---- building blocks ----------------------------------------------------------------------


@dataclass
class Padding:
    """Where the real tokens of a padded [B, L] batch are, to drop and restore pads (unpadding)."""

    indices: torch.Tensor  # positions of the real tokens in the flattened [B * L]
    batch: int
    seqlen: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Padding":
        B, L = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), B, L)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [n_real, ...]"""
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[n_real, ...] -> [B, L, ...] with zeros at the pads."""
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:]).index_copy(0, self.indices, x)
        return out.view(self.batch, self.seqlen, *x.shape[1:])


def layer_norm(config: BertConfig) -> nn.LayerNorm:
    """A LayerNorm over the hidden size; bias-free with ``config.norm_bias=False``."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.norm_bias)


class BertEmbeddings(nn.Module):
    """Word + position (+ segment) embeddings, optional LayerNorm, dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        # with rope, positions enter in the attention instead: no learned table
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_embedding_type == "absolute" else None)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size else None)
        self.layer_norm = layer_norm(config) if config.embedding_layernorm else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids=None):
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is None:
            pass  # no segment table (ModernBERT)
        elif token_type_ids is None or self.token_type_embeddings.num_embeddings == 1:
            x = x + self.token_type_embeddings.weight[0]  # single segment: a constant row
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.layer_norm(x))


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al. 2021, RoFormer): each pair of q/k channels is rotated
    by an angle proportional to the position, so q·k depends only on the relative position.

    cos/sin for every position up to ``max_position_embeddings`` are computed once (a buffer that
    is not saved). Channels are paired as (i, i + d/2), the "rotate half" layout of GPT-NeoX and
    transformers. ``theta`` is the base (default ``config.rope_theta``).
    """

    def __init__(self, config: BertConfig, theta: float | None = None):
        super().__init__()
        d = config.head_dim
        theta = theta or config.rope_theta
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [max_positions, d]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x):
        """x: [B, heads, L, d], token i at position i."""
        L = x.shape[-2]
        cos, sin = self.cos[:L].to(x.dtype), self.sin[:L].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused QKV matmul, (rotary positions,) then PyTorch SDPA.

    Works on unpadded tokens [n_real, H]: pads are restored only for the attention product.
    A local layer (``config.local_attention``) gets a band mask from the model and its own RoPE base.
    """

    def __init__(self, config: BertConfig, layer: int = 0):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.local = not config.is_global(layer)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.dropout_p = config.attention_probs_dropout_prob
        theta = config.local_rope_theta if self.local else config.rope_theta
        self.rotary = RotaryEmbedding(config, theta) if config.position_embedding_type == "rope" else None

    def forward(self, x, attn_mask=None, padding: Padding | None = None):
        qkv = self.qkv(x)
        if padding is not None:
            qkv = padding.pad(qkv)  # [n_real, 3H] -> [B, L, 3H]
        B, L, _ = qkv.shape
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rotary is not None:  # in the padded layout, where token i sits at position i
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, -1)
        if padding is not None:
            y = padding.unpad(y)
        return self.out(y)


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear (``ffn_type="mlp"``, BERT's), or a gated linear unit
    (Shazeer 2020): ``fc2(act(x W) * (x V))`` with GELU (GeGLU) or SiLU (SwiGLU) as ``act``.
    W and V are fused into one H -> 2I projection, split in two after the matmul.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.gated = config.ffn_type != "mlp"
        self.act = F.silu if config.ffn_type == "swiglu" else F.gelu
        width = config.intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, 2 * width if self.gated else width, bias=config.mlp_bias)
        self.fc2 = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        h = self.fc1(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            return self.fc2(self.act(gate) * value)
        return self.fc2(self.act(h))


class BertLayer(nn.Module):
    """One transformer block, pre-LN (``x + f(LN(x))``, the paper's) or post-LN (``LN(x + f(x))``).

    Pre-LN keeps the residual path an identity, which is what lets the recipe use lr 1e-3
    stably (Xiong et al. 2020). With ``first_attention_norm=False`` layer 0 has no attention norm:
    its input is the embedding LayerNorm's output already (ModernBERT).
    """

    def __init__(self, config: BertConfig, layer: int = 0):
        super().__init__()
        self.pre_layernorm = config.pre_layernorm
        self.attention = SelfAttention(config, layer)
        first_unnormed = layer == 0 and not config.first_attention_norm
        self.attention_norm = nn.Identity() if first_unnormed else layer_norm(config)
        self.ffn = FeedForward(config)
        self.ffn_norm = layer_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, attn_mask=None, padding: Padding | None = None):
        if self.pre_layernorm:
            x = x + self.dropout(self.attention(self.attention_norm(x), attn_mask, padding))
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        else:
            x = self.attention_norm(x + self.dropout(self.attention(x, attn_mask, padding)))
            x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x


# ---- saving and loading --------------------------------------------------------------------


class _PretrainedMixin:
    """save_pretrained / from_pretrained: ``config.json`` (model_type bbert) + ``model.safetensors``."""

    config: BertConfig

    def _extra_config(self) -> dict:
        return {}

    def save_pretrained(self, save_directory) -> Path:
        """Write the model folder atomically."""
        save_directory = Path(save_directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"model_type": "bbert", "architectures": [type(self).__name__],
                **self.config.to_dict(), **self._extra_config()}
        # Write both files into a temporary folder, then swap it in: no half-written model.
        with atomic_path(save_directory) as tmp:
            tmp.mkdir()
            if save_directory.is_dir():  # keep what else lives there (e.g. the tokenizer)
                for item in save_directory.iterdir():
                    if item.name in (CONFIG_NAME, WEIGHTS_NAME):
                        continue
                    if item.is_dir():
                        shutil.copytree(item, tmp / item.name, symlinks=True)
                    else:
                        shutil.copy2(item, tmp / item.name, follow_symlinks=False)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        return save_directory

    @classmethod
    def from_pretrained(cls, model_directory, **kwargs):
        """Load a bbert model folder. Loading a BertForMaskedLM folder into a classifier (or the
        reverse) keeps the encoder and initializes the other head.
        """
        folder = Path(model_directory)
        cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{folder} is not a bbert model folder: it needs {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}. For a transformers folder or a run dir use "
                                    "bbert.hf.load_pretrained(path)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("model_type") != "bbert":
            raise ValueError(f"{cfg_file} has model_type {meta.get('model_type')!r}, not 'bbert'; "
                             "use bbert.hf.load_pretrained(path) to import a transformers model")
        config = BertConfig.from_dict(meta)
        if cls is BertForSequenceClassification:
            kwargs.setdefault("num_labels", meta.get("num_labels", 2))
        model = cls(config, **kwargs)
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        same_arch = type(model).__name__ in meta.get("architectures", [])
        bad_missing = [k for k in missing if k.startswith("bert.") or same_arch]
        bad_unexpected = [k for k in unexpected if k.startswith("bert.") or same_arch]
        if bad_missing or bad_unexpected:
            raise ValueError(f"{weights} does not match the config: missing {bad_missing[:5]}, "
                             f"unexpected {bad_unexpected[:5]}")
        return model


# ---- the models ----------------------------------------------------------------------------


class BertModel(nn.Module, _PretrainedMixin):
    """The encoder: embeddings, N layers, and a final LayerNorm when pre-LN.

    ``forward(input_ids, attention_mask=None, token_type_ids=None) -> hidden [B, L, H]``.
    With ``config.unpad`` and a padded batch, every per-token op runs on the real tokens only.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config) if config.pre_layernorm else nn.Identity()
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} > max_position_embeddings "
                             f"{self.config.max_position_embeddings}; truncate the inputs")
        position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        # Both checks below depend on the data; under torch.compile keep static shapes instead
        # (the mask goes to SDPA, pads are kept), so the graph doesn't break at every step.
        compiling = torch.compiler.is_compiling()
        if attention_mask is not None and not compiling and bool(attention_mask.all()):
            attention_mask = None  # packed batch: no mask, the fastest attention kernel
        attn_mask = padding = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L], True = attend
            if self.config.unpad and not compiling:
                padding = Padding.from_mask(attention_mask)
                input_ids, position_ids = padding.unpad(input_ids), padding.unpad(position_ids)
                if token_type_ids is not None:
                    token_type_ids = padding.unpad(token_type_ids)
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        masks = {False: attn_mask, True: self.local_mask(attn_mask, L, input_ids.device)}
        for layer in self.layers:
            x = layer(x, masks[layer.attention.local], padding)
        x = self.final_norm(x)
        return padding.pad(x) if padding is not None else x

    def local_mask(self, attn_mask, L: int, device):
        """The local layers' mask: ``attn_mask`` within a band of +-``local_attention // 2``.

        Each token also keeps itself, so that a pad far from every real token has a key (a row with
        none gives NaN); real tokens always see themselves anyway.
        """
        half = self.config.local_attention // 2
        if not self.config.local_attention or L <= half + 1:
            return attn_mask  # the window covers the whole sequence
        pos = torch.arange(L, device=device)
        band = (pos[:, None] - pos[None, :]).abs() <= half  # [L, L]
        if attn_mask is None:
            return band
        return (attn_mask & band) | torch.eye(L, dtype=torch.bool, device=device)  # [B, 1, L, L]


class MLMHead(nn.Module):
    """The masked-LM head: dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings).

    The decoder's vocabulary bias stays with ``bias=False`` (as ModernBERT's ``decoder_bias``;
    Cramming drops it): a per-token prior of V parameters and no matmul. ``decoder_bias=False``
    drops it too.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.layer_norm = layer_norm(config)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size)) if config.decoder_bias else None
        self.decoder = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False))

    def forward(self, x, decoder_weight):
        x = self.layer_norm(F.gelu(self.dense(x)))
        return F.linear(x, decoder_weight, self.bias)


@dataclass
class MaskedLMOutput:
    """``loss`` (None without labels) and ``logits``: [B, L, V], or [n_masked, V] from the sparse head."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class SequenceClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class BertForMaskedLM(nn.Module, _PretrainedMixin):
    """BERT with the MLM head. With ``config.sparse_mlm_head`` and labels, the head runs only at
    the positions with a label (``labels != -100``) and ``logits`` is ``[n_masked, vocab_size]``;
    otherwise ``[B, L, vocab_size]`` (the dense head, for comparison and for inference).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm_head = MLMHead(config)
        self.mlm_head.apply(lambda m: init_weights(m, config.initializer_range))

    def decoder_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.bert.embeddings.word_embeddings.weight
        return self.mlm_head.decoder.weight

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None) -> MaskedLMOutput:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        if labels is not None and self.config.sparse_mlm_head:
            selected = labels != -100
            hidden, labels = hidden[selected], labels[selected]  # [n_masked, H], [n_masked]
        logits = self.mlm_head(hidden, self.decoder_weight())
        logits = logits[..., : self.config.vocab_size]  # drop the alignment rows of the vocabulary
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100)
        return MaskedLMOutput(loss, logits)


class BertForSequenceClassification(nn.Module, _PretrainedMixin):
    """BERT + pooler (tanh dense on [CLS]) + classifier, for GLUE. ``num_labels == 1`` is
    regression (MSE loss, STS-B). Chapter: ``notebooks/05_finetuning.ipynb``.

    With ``bias=False`` the pooler is bias-free like the body; the classifier keeps its bias (the
    class prior): it is new at finetuning, not part of the pretrained model the option shapes.
    """

    def __init__(self, config: BertConfig, num_labels: int = 2):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.bert = BertModel(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        for module in (self.pooler, self.classifier):
            init_weights(module, config.initializer_range)

    def _extra_config(self) -> dict:
        return {"num_labels": self.num_labels}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        logits = self.classifier(self.dropout(pooled)).float()
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss, logits)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialization: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count (tied weights counted once)."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                params.pop(id(m.weight), None)
    return sum(p.numel() for p in params.values())


# ---- a diagnostic of the architecture: pre- versus post-LN ---------------------------------


def layer_grad_norms(model: BertForMaskedLM, batch: dict) -> list[float]:
    """The gradient norm of each encoder layer's parameters after one backward pass of the MLM loss.

    At initialization, post-LN gradients grow towards the output layers while pre-LN ones stay
    level (Xiong et al. 2020): why pre-LN tolerates the recipe's high learning rate.
    """
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    norms = [torch.sqrt(sum((p.grad.float() ** 2).sum() for p in layer.parameters())).item()
             for layer in model.bert.layers]
    model.zero_grad(set_to_none=True)
    return norms
