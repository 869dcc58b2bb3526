"""Tests of bbert's ModernBERT layout (bbert.model) and its exact mapping to and from transformers'
``ModernBertForMaskedLM`` (bbert.hf, bbert.hf_modernbert), on tiny models built locally (no hub)."""
import dataclasses
import json

import pytest
import torch
import transformers

from bbert import hf
from bbert.cli import main as cli_main
from bbert.glue.finetuning import load_classifier
from bbert.model import LAYOUTS, BertConfig, BertForMaskedLM
from bbert.optim import build_optimizer
from bbert.speed import random_mlm_batch, training_flops_per_sequence
from bbert.train_config import TrainConfig
from test_hf import make_tokenizer

WINDOW = 4  # local_attention: each token of a local layer sees 2 on either side
L = 20      # longer than the window


def hf_modernbert(seed=0, **kw):
    """A tiny ModernBERT as transformers builds it, with weights far enough from their init (norms
    included) that every option moves the logits."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=len(make_tokenizer()), hidden_size=32, intermediate_size=48,
                  num_hidden_layers=4, num_attention_heads=2, local_attention=WINDOW,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                  cls_token_id=None, sep_token_id=None, **kw)
    model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def batch(seed=0):
    """Three rows of length L > WINDOW: one full, two padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(make_tokenizer()), (3, L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor([[L], [13], [6]])).long()
    return ids * mask, mask


def max_diff(a, b, mask):
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def logits(model, ids, mask):
    with torch.no_grad():
        if isinstance(model, BertForMaskedLM):
            return model(ids, mask).logits
        return model(input_ids=ids, attention_mask=mask).logits


def save_with_tokenizer(model, folder):
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# ---- the layout and its presets --------------------------------------------------------------


def test_presets_have_the_published_shapes_and_the_layout_is_orthogonal_to_shape():
    # answerdotai/ModernBERT-base and -large config.json, restated so that a preset change fails here
    published = {"modernbert-base": (22, 768, 12, 1152), "modernbert-large": (28, 1024, 16, 2624)}
    for name, shape in published.items():
        c = BertConfig.from_preset(name, vocab_size=50368)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == shape
        assert (c.local_attention, c.global_attn_every_n_layers, c.rope_theta, c.local_rope_theta) == (
            128, 3, 160_000.0, 10_000.0)
        assert [c.is_global(i) for i in range(6)] == [True, False, False, True, False, False]
    mini = BertConfig.from_preset("mini", layout="modernbert", vocab_size=100)
    assert (mini.num_hidden_layers, mini.hidden_size) == (4, 256)
    assert all(getattr(mini, k) == v for k, v in LAYOUTS["modernbert"].items())
    assert not hf.modernbert_misfits(mini)
    # the same switch from a training config; an explicit option still wins over the layout
    run = TrainConfig.from_preset("tiny-cpu").with_overrides(
        ["model.layout=modernbert", "model.local_attention=8"])
    c = run.model_config(vocab_size=100)
    assert (c.ffn_type, c.local_attention, c.first_attention_norm, c.type_vocab_size) == ("geglu", 8, False, 0)
    with pytest.raises(ValueError, match="unknown layout 'modern'"):
        BertConfig.from_preset("mini", layout="modern")


def test_bias_flags_follow_bias_unless_set_and_layer_zero_has_no_attention_norm():
    c = BertConfig.from_preset("tiny", vocab_size=100, bias=False, mlp_bias=True, decoder_bias=False)
    assert (c.attention_bias, c.mlp_bias, c.norm_bias, c.classifier_bias) == (False, True, False, False)
    m = BertForMaskedLM(BertConfig.from_preset("tiny", layout="modernbert", vocab_size=100, mlp_bias=True,
                                               decoder_bias=False))
    biases = sorted(n for n, _ in m.named_parameters() if n.endswith("bias"))
    assert biases == [f"bert.layers.{i}.ffn.{fc}.bias" for i in range(2) for fc in ("fc1", "fc2")]
    assert isinstance(m.bert.layers[0].attention_norm, torch.nn.Identity)
    assert isinstance(m.bert.layers[1].attention_norm, torch.nn.LayerNorm)
    assert m.bert.embeddings.token_type_embeddings is None
    with pytest.raises(ValueError, match="first_attention_norm=False needs pre_layernorm=True"):
        BertConfig(first_attention_norm=False, pre_layernorm=False)


def test_local_layers_see_only_their_window_with_their_own_rope_base():
    config = BertConfig.from_preset("tiny", layout="modernbert", vocab_size=100, num_hidden_layers=1,
                                    local_attention=WINDOW, global_attn_every_n_layers=2,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = BertForMaskedLM(config).eval()
    m.bert.layers[0].attention.local = True  # layer 0 is global in any pattern: make it the local one
    ids, mask = batch()
    far = ids.clone()
    far[:, WINDOW // 2 + 1:] = 7  # every token beyond position 0's window
    with torch.no_grad():
        near = m.bert(ids, mask)[:, 0], m.bert(far, mask)[:, 0]
        changed = m.bert(ids, mask)[:, WINDOW // 2 + 1], m.bert(far, mask)[:, WINDOW // 2 + 1]
    torch.testing.assert_close(*near)
    assert not torch.allclose(*changed)
    two = BertForMaskedLM(dataclasses.replace(config, num_hidden_layers=2))
    assert two.bert.layers[1].attention.local and not two.bert.layers[0].attention.local
    assert not torch.allclose(two.bert.layers[0].attention.rotary.sin, two.bert.layers[1].attention.rotary.sin)


def test_the_layout_keeps_unpadding_and_the_sparse_head_exact():
    config = BertConfig.from_preset("tiny", layout="modernbert", vocab_size=100, local_attention=WINDOW,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    unpadded = BertForMaskedLM(config).eval()
    padded = BertForMaskedLM(dataclasses.replace(config, unpad=False)).eval()
    padded.load_state_dict(unpadded.state_dict())
    data = random_mlm_batch(3, L, 100, lengths=[L, 13, 6], seed=0)
    with torch.no_grad():
        dense = unpadded(data["input_ids"], data["attention_mask"]).logits
        sparse = unpadded(**data).logits
        assert torch.isfinite(dense).all()
        assert max_diff(dense, padded(data["input_ids"], data["attention_mask"]).logits,
                        data["attention_mask"]) < 1e-5
    torch.testing.assert_close(sparse, dense[data["labels"] != -100], atol=1e-5, rtol=1e-5)


def test_flops_count_only_the_window_of_local_layers():
    full = BertConfig.from_preset("base", layout="modernbert", vocab_size=100, local_attention=0)
    local = dataclasses.replace(full, local_attention=128)
    seq = 1024
    attention = 3 * 2 * 2 * full.hidden_size * seq  # training FLOPs of QK^T and AV, per token, global
    n_local = sum(not local.is_global(i) for i in range(local.num_hidden_layers))
    saved = training_flops_per_sequence(full, seq) - training_flops_per_sequence(local, seq)
    keys = sum(min(seq - 1, i + 64) - max(0, i - 64) + 1 for i in range(seq)) / seq  # mean keys per query
    assert saved == pytest.approx(n_local * seq * attention * (1 - keys / seq))
    # within the window the count is the global one
    assert training_flops_per_sequence(full, 64) == training_flops_per_sequence(local, 64)


# ---- transformers' ModernBERT -> bbert -> transformers ---------------------------------------


@pytest.mark.parametrize("flags", [{}, dict(attention_bias=True, mlp_bias=True, norm_bias=True,
                                            classifier_bias=True, decoder_bias=False),
                                   dict(hidden_activation="silu", tie_word_embeddings=False,
                                        global_attn_every_n_layers=2)],
                         ids=["published", "all-bias-flags", "swiglu-untied"])
def test_modernbert_round_trips_exactly_with_padding_and_windows(tmp_path, flags):
    theirs = hf_modernbert(**flags)
    folder = save_with_tokenizer(theirs, tmp_path / "modernbert")
    ours, tokenizer = hf.load_pretrained(folder)
    ours.eval()
    assert tokenizer is not None and ours.config.local_attention == WINDOW
    ids, mask = batch()
    reference = logits(theirs, ids, mask)
    assert max_diff(logits(ours, ids, mask), reference, mask) < 1e-4
    # the sliding windows are exercised: attending globally gives other logits
    wide = BertForMaskedLM(dataclasses.replace(ours.config, local_attention=0)).eval()
    wide.load_state_dict(ours.state_dict())
    assert max_diff(logits(wide, ids, mask), reference, mask) > 1e-2
    out = hf.export_to_transformers(ours, tokenizer, tmp_path / "back")
    again = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(again).__name__ == "ModernBertForMaskedLM"
    assert again.config.layer_types == theirs.config.layer_types
    assert max_diff(logits(again, ids, mask), reference, mask) < 1e-4


def test_a_folder_in_the_published_config_format_imports(tmp_path):
    # answerdotai/ModernBERT-large's config.json (written by transformers 4.47: global_rope_theta,
    # local_rope_theta, global_attn_every_n_layers instead of layer_types and rope_parameters), shrunk
    published = dict(
        architectures=["ModernBertForMaskedLM"], model_type="modernbert", attention_bias=False,
        attention_dropout=0.0, classifier_activation="gelu", classifier_bias=False, classifier_pooling="mean",
        decoder_bias=True, embedding_dropout=0.0, global_attn_every_n_layers=3, global_rope_theta=160000.0,
        hidden_activation="gelu", layer_norm_eps=1e-12, local_rope_theta=10000.0, mlp_bias=False,
        mlp_dropout=0.0, norm_bias=False, norm_eps=1e-05, position_embedding_type="absolute",
        tie_word_embeddings=True, transformers_version="4.47.0.dev0",
        vocab_size=len(make_tokenizer()), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=2, local_attention=WINDOW, max_position_embeddings=64, pad_token_id=0)
    folder = save_with_tokenizer(hf_modernbert(), tmp_path / "published")
    (folder / "config.json").write_text(json.dumps(published))
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    ours, _ = hf.load_pretrained(folder)
    c = ours.config
    assert (c.rope_theta, c.local_rope_theta, c.global_attn_every_n_layers, c.local_attention) == (
        160000.0, 10000.0, 3, WINDOW)
    ids, mask = batch()
    assert max_diff(logits(ours.eval(), ids, mask), logits(theirs, ids, mask), mask) < 1e-4


def test_bbert_finetune_takes_a_modernbert_folder(tmp_path):
    folder = save_with_tokenizer(hf_modernbert(), tmp_path / "modernbert")
    model, tokenizer = load_classifier(folder, num_labels=3)
    enc = tokenizer(["the cat sat", "a dog"], ["on the mat", "gpu hour"], padding=True, return_tensors="pt")
    out = model(enc["input_ids"], enc["attention_mask"], labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


# ---- bbert -> transformers' ModernBERT ------------------------------------------------------


def test_a_bbert_trained_modernbert_layout_model_exports_and_loads(tmp_path, capsys):
    vocab = len(make_tokenizer())
    config = BertConfig.from_preset("tiny", layout="modernbert", vocab_size=vocab, local_attention=WINDOW,
                                    hidden_size=64, num_hidden_layers=3)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    optimizer = build_optimizer(model, lr=1e-2)
    data = random_mlm_batch(4, L, vocab, mlm_probability=0.3, lengths=[L, L, 15, 9], seed=0)
    losses = []
    for _ in range(4):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_with_tokenizer(model, tmp_path / "model")
    assert cli_main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 0
    assert "ModernBertForMaskedLM" in capsys.readouterr().out
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert json.loads((tmp_path / "hf" / "bbert-export.json").read_text())["architecture"] == "ModernBertForMaskedLM"
    ids, mask = batch()
    assert max_diff(logits(loaded, ids, mask), logits(model.eval(), ids, mask), mask) < 1e-4


def test_a_model_that_fits_no_architecture_is_refused_in_one_line(tmp_path, capsys):
    # the improved recipe's options with BERT's segment table and layer-0 norm: neither BERT nor ModernBERT
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=len(make_tokenizer()), ffn_type="geglu",
                                                   position_embedding_type="rope", bias=False))
    save_with_tokenizer(model, tmp_path / "model")
    assert cli_main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("bbert export: error: ")
    assert "ModernBertForMaskedLM" in err and "model.first_attention_norm=false" in err
    assert not (tmp_path / "hf").exists()


def test_the_improved_recipe_trained_in_the_modernbert_layout_exports(tmp_path, capsys):
    from bbert.ablation import OPTIONS
    from bbert.train import pretrain
    from helpers_train import make_data_dir, tiny_config

    recipe = {k: v for option in OPTIONS for k, v in option.on.items()}  # every post-2021 option on
    assert {"masking.mlm_probability", "lr_schedule", "batch_ramp_proportion", "model.bias"} <= set(recipe)
    config = tiny_config(make_data_dir(tmp_path / "data"), tmp_path / "run", max_steps=6).with_overrides(
        [f"{k}={v}" for k, v in recipe.items()] + ["model.layout=modernbert", "model.local_attention=16"])
    run = pretrain(config)
    capsys.readouterr()
    assert cli_main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "ModernBertForMaskedLM" in capsys.readouterr().out
    ours, tokenizer = hf.load_pretrained(run)
    assert (ours.config.ffn_type, ours.config.bias, ours.config.local_attention) == ("geglu", False, 16)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    enc = tokenizer(["the history of the world " * 8, "a short one"], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] > 16
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert max_diff(logits(theirs, ids, mask), logits(ours.eval(), ids, mask), mask) < 1e-4


def test_the_new_bias_flags_and_no_segment_table_still_export_to_bert_layouts():
    for pre_layernorm, arch in ((True, "RobertaPreLayerNormForMaskedLM"), (False, "BertForMaskedLM")):
        torch.manual_seed(0)
        ours = BertForMaskedLM(BertConfig.from_preset(
            "tiny", vocab_size=len(make_tokenizer()), pre_layernorm=pre_layernorm, type_vocab_size=0,
            attention_bias=False, decoder_bias=False, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)).eval()
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        theirs = hf.to_transformers(ours)
        assert type(theirs).__name__ == arch
        ids, mask = batch()
        assert max_diff(logits(theirs, ids, mask), logits(ours, ids, mask), mask) < 1e-4
