"""Tests of the post-2021 model options of bbert.model (GLU feed-forward, rotary positions,
bias-free layers), the 30% masking rate through the sparse head, their FLOPs, saving and export."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from bbert import hf
from bbert.cli import main as cli_main
from bbert.data.masking import Masker, MaskingConfig
from bbert.model import BertConfig, BertForMaskedLM, BertForSequenceClassification, RotaryEmbedding, num_parameters
from bbert.optim import build_optimizer
from bbert.speed import ffn_flops_per_token, training_flops_per_sequence
from bbert.train_config import TrainConfig, load_config

V = 1000
OPTIONS = {  # one non-default setting per option
    "geglu": dict(ffn_type="geglu"),
    "swiglu": dict(ffn_type="swiglu"),
    "rope": dict(position_embedding_type="rope"),
    "no-bias": dict(bias=False),
    "all": dict(ffn_type="geglu", position_embedding_type="rope", bias=False),
}


def config(**kw):
    kw = {"vocab_size": V, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw}
    return BertConfig.from_preset("tiny", **kw)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return BertForMaskedLM(config(**kw)).eval()


def padded_batch(lengths=(16, 11, 4), L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


# ---- configuration --------------------------------------------------------------------------


def test_defaults_are_the_2021_model_and_options_reach_the_config_from_set():
    c = BertConfig()
    assert (c.ffn_type, c.position_embedding_type, c.rope_theta, c.bias) == ("mlp", "absolute", 10000.0, True)
    run = load_config("tiny-cpu", assignments=["model.ffn_type=swiglu", "model.position_embedding_type=rope",
                                               "model.rope_theta=500", "model.bias=false"])
    c = run.model_config(vocab_size=V)
    assert (c.ffn_type, c.position_embedding_type, c.rope_theta, c.bias) == ("swiglu", "rope", 500.0, False)
    # a search grid sets the same model_overrides
    c = TrainConfig(model="tiny", model_overrides={"ffn_type": "geglu"}).model_config(vocab_size=V)
    assert c.ffn_type == "geglu"


def test_bad_option_values_are_one_line_errors():
    with pytest.raises(ValueError, match="ffn_type 'glu' is unknown; choose one of mlp, geglu, swiglu"):
        config(ffn_type="glu")
    with pytest.raises(ValueError, match="position_embedding_type 'alibi' is unknown"):
        config(position_embedding_type="alibi")
    with pytest.raises(ValueError, match="rope needs an even head_dim"):
        config(position_embedding_type="rope", hidden_size=6, num_attention_heads=2)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_shapes_with_each_option(name):
    m = model(**OPTIONS[name])
    ids, mask = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    with torch.no_grad():
        assert m.bert(ids, mask).shape == (3, 16, 128)
        assert m(ids, mask).logits.shape == (3, 16, V)
        assert m(ids, mask, labels=labels).logits.shape == (3, V)


# ---- gated-GLU feed-forward -----------------------------------------------------------------


def test_glu_width_keeps_the_mlp_parameter_count():
    for hidden, width in ((128, 344), (768, 2048), (1024, 2728)):
        c = BertConfig(hidden_size=hidden, num_attention_heads=8, ffn_type="geglu")
        assert c.intermediate_size == width and width % 8 == 0
    mlp, glu = model(), model(ffn_type="geglu")
    mlp_ffn, glu_ffn = (num_parameters(m.bert.layers[0].ffn) for m in (mlp, glu))
    assert abs(glu_ffn / mlp_ffn - 1) < 0.02
    assert abs(num_parameters(glu) / num_parameters(mlp) - 1) < 0.02
    explicit = config(ffn_type="swiglu", intermediate_size=200)
    assert explicit.intermediate_size == 200
    assert BertForMaskedLM(explicit).bert.layers[0].ffn.fc1.weight.shape == (400, 128)  # gate and value, fused


@pytest.mark.parametrize("ffn_type,act", [("geglu", F.gelu), ("swiglu", F.silu)])
def test_glu_is_act_of_gate_times_value(ffn_type, act):
    ffn = model(ffn_type=ffn_type).bert.layers[0].ffn
    x = torch.randn(5, 128)
    I = ffn.fc2.in_features
    W, b = ffn.fc1.weight, ffn.fc1.bias
    gate, value = x @ W[:I].T + b[:I], x @ W[I:].T + b[I:]
    expected = act(gate) * value @ ffn.fc2.weight.T + ffn.fc2.bias
    torch.testing.assert_close(ffn(x), expected)


# ---- rotary position embeddings -------------------------------------------------------------


def test_rope_is_identity_at_position_zero_and_keeps_norms():
    rotary = RotaryEmbedding(config(position_embedding_type="rope"))
    x = torch.randn(2, 3, 10, 64)
    y = rotary(x)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])
    assert "cos" not in rotary.state_dict()  # recomputed, never saved


def test_rope_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(config(position_embedding_type="rope"))
    q, k = torch.randn(64), torch.randn(64)
    L = 12
    Q, K = rotary(q.expand(1, 1, L, 64))[0, 0], rotary(k.expand(1, 1, L, 64))[0, 0]
    scores = Q @ K.T  # scores[i, j]: q at position i, k at position j
    for shift in (1, 5):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 2])


def test_rope_model_has_no_position_table_and_uses_positions():
    m = model(position_embedding_type="rope")
    assert m.bert.embeddings.position_embeddings is None
    assert not any("position" in k for k in m.state_dict())
    assert num_parameters(model()) - num_parameters(m) == m.config.max_position_embeddings * m.config.hidden_size
    ids = torch.randint(5, V, (1, 8))
    with torch.no_grad():
        out, swapped = m.bert(ids)[0], m.bert(ids[:, [1, 0, *range(2, 8)]])[0]
    assert not torch.allclose(out[2:], swapped[2:], atol=1e-4)  # word order matters


# ---- padding: every option gives real tokens the same outputs, unpadded or not --------------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_unpadded_equals_padded_and_unbatched(name):
    lengths = (16, 11, 4)
    ids, mask = padded_batch(lengths)
    unpadded = model(**OPTIONS[name])
    padded = model(**OPTIONS[name], unpad=False)  # pads kept, the mask goes to SDPA (as under compile)
    with torch.no_grad():
        a, b = unpadded(ids, mask).logits, padded(ids, mask).logits
        for row, n in enumerate(lengths):
            torch.testing.assert_close(a[row, :n], b[row, :n], atol=1e-5, rtol=1e-5)
            alone = unpadded(ids[row:row + 1, :n]).logits[0]
            torch.testing.assert_close(a[row, :n], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_rope_and_glu_under_torch_compile():
    m = model(ffn_type="geglu", position_embedding_type="rope", bias=False, num_hidden_layers=1)
    ids, mask = padded_batch()
    labels = torch.where((torch.arange(16) % 3 == 1) & mask.bool(), ids, -100)
    eager = m(ids, mask, labels=labels).loss
    compiled = torch.compile(m)(ids, mask, labels=labels).loss
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), abs=1e-4)
    assert m.bert.layers[0].ffn.fc1.weight.grad is not None


# ---- bias-free ------------------------------------------------------------------------------


def test_bias_free_has_no_bias_but_the_vocabulary_one():
    c = config(bias=False)
    m = BertForMaskedLM(c)
    assert [n for n, _ in m.named_parameters() if "bias" in n] == ["mlm_head.bias"]
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    # per layer: qkv 3H, out H, fc1 I, fc2 H, two LayerNorms 2H; plus the embedding, final and head LayerNorms
    # and the head's dense H
    assert num_parameters(model()) - num_parameters(m) == L * (7 * H + I) + 4 * H
    clf = BertForSequenceClassification(c, num_labels=3)
    assert clf.pooler.bias is None and clf.classifier.bias.shape == (3,)  # the class prior stays


# ---- 30% masking (MosaicBERT) through the sparse head --------------------------------------


def test_sparse_head_gathers_exactly_the_masked_positions_at_30_percent():
    masker = Masker(MaskingConfig(mlm_probability=0.3), vocab_size=V, mask_id=4, special_ids=range(5))
    rows = np.random.default_rng(0).integers(5, V, (4, 32))
    rows[:, 0], rows[:, -1] = 2, 3  # [CLS] ... [SEP]
    pairs = [masker(r, seed=0, epoch=0, index=i) for i, r in enumerate(rows)]
    ids = torch.tensor(np.stack([p[0] for p in pairs]))
    labels = torch.tensor(np.stack([p[1] for p in pairs]))
    n_labels = int((labels != -100).sum())
    assert n_labels == 4 * round(30 * 0.3)  # 30% of the 30 ordinary tokens of each row
    sparse = model()
    dense = model(sparse_mlm_head=False)
    with torch.no_grad():
        s, d = sparse(ids, labels=labels), dense(ids, labels=labels)
    assert s.logits.shape == (n_labels, V) and d.logits.shape == (4, 32, V)
    torch.testing.assert_close(s.logits, d.logits[labels != -100], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.loss, d.loss)


# ---- training: each option learns -----------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_goes_down_on_a_fixed_batch(name):
    m = model(**OPTIONS[name], num_hidden_layers=1, hidden_size=64).train()
    ids, mask = padded_batch(L=16, seed=1)
    labels = torch.where((torch.arange(16) % 4 == 1) & mask.bool(), ids, -100)
    optimizer = build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.01)
    losses = []
    for _ in range(20):
        loss = m(ids, mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


# ---- FLOPs ----------------------------------------------------------------------------------


def test_flops_follow_the_ffn_type_and_not_the_bias():
    mlp = config(intermediate_size=256)
    glu = config(intermediate_size=256, ffn_type="geglu")
    assert ffn_flops_per_token(glu) == 1.5 * ffn_flops_per_token(mlp) == 3 * 2 * 128 * 256
    extra = training_flops_per_sequence(glu, seq_len=64) - training_flops_per_sequence(mlp, seq_len=64)
    # forward + backward (3x), 2 layers, 64 tokens, one more H x I matrix
    assert extra == pytest.approx(3 * 2 * 64 * (2 * 128 * 256), rel=1e-12)
    assert training_flops_per_sequence(config(bias=False)) == training_flops_per_sequence(config())
    equal_params = training_flops_per_sequence(config(ffn_type="swiglu")) / training_flops_per_sequence(config())
    assert abs(equal_params - 1) < 0.02


# ---- saving, loading, export ----------------------------------------------------------------


def test_model_folders_round_trip_the_options_and_old_folders_load_with_defaults(tmp_path):
    m = model(**OPTIONS["all"], rope_theta=1000.0)
    m.save_pretrained(tmp_path / "new")
    back = BertForMaskedLM.from_pretrained(tmp_path / "new").eval()
    assert back.config == m.config
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).logits, m(ids, mask).logits)
    old = model()
    old.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("ffn_type", "position_embedding_type", "rope_theta", "bias"):
        del meta[key]  # a folder written before the options existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    assert BertForMaskedLM.from_pretrained(tmp_path / "old").config == old.config


@pytest.mark.parametrize("pre_layernorm", [True, False])
def test_bias_free_exports_exactly(pre_layernorm):
    m = model(bias=False, pre_layernorm=pre_layernorm)
    with torch.no_grad():  # a trained model's vocabulary bias is not zero
        m.mlm_head.bias.normal_()
    theirs = hf.to_transformers(m)
    vocab_bias = [n for n, p in theirs.named_parameters() if n.endswith("bias") and p.shape == (V,)]
    assert all(p.abs().max() == 0 for n, p in theirs.named_parameters() if n.endswith("bias") and n not in vocab_bias)
    assert vocab_bias and all(theirs.get_parameter(n).abs().max() > 0 for n in vocab_bias)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, hf_logits = m(ids, mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - hf_logits[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("option,value,fix", [("ffn_type", "geglu", "ffn_type='mlp'"),
                                              ("position_embedding_type", "rope", "position_embedding_type='absolute'")])
def test_export_refuses_glu_or_rope_in_bert_layout_in_one_line(tmp_path, capsys, option, value, fix):
    # GLU or RoPE alone, with BERT's embeddings and norms: closest to RoBERTa-PreLN, which lacks it
    m = model(**{option: value})
    with pytest.raises(ValueError, match="fits no transformers architecture"):
        hf.to_transformers(m)
    m.save_pretrained(tmp_path / "model")
    assert cli_main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("bbert export: error: ")
    assert "RobertaPreLayerNormForMaskedLM" in err and fix in err
    assert "bbert finetune" in err and "bbert model folder" in err
    assert not (tmp_path / "hf").exists()
