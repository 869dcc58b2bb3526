"""Tests of bbert.model (shapes, padding invariance, sparse head, pre/post-LN, saving, optim groups)
and of the training step, batch and alternating comparison that bbert.speed times it with."""
import json

import pytest
import torch
from torch import nn

from bbert.model import (PRESETS, BertConfig, BertForMaskedLM, BertForSequenceClassification, BertLayer,
                         BertModel, layer_grad_norms, num_parameters)
from bbert.optim import build_optimizer, param_groups
from bbert.speed import compare_throughput, random_mlm_batch, train_step

V = 1000  # a small vocabulary keeps every preset cheap to build


def no_dropout(name="tiny", **kw):
    return BertConfig.from_preset(name, vocab_size=V, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)


def batch(B=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(B, L, generator=g) < 0.15
    masked[:, 1] = True  # at least one per row
    labels[masked] = ids[masked]
    return ids, labels


# Restated from the sources, so that a change of the preset alone fails here: Turc et al. (2019)'s
# BERT-Tiny/Mini/Small/Medium, Devlin et al. (2019)'s base and large; 64 dimensions per head.
SHAPES = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
          "base": (12, 768, 12), "large": (24, 1024, 16)}


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in ("base", "large") else p
                                    for p in PRESETS])
def test_output_shapes_every_preset(preset):
    torch.manual_seed(0)
    config = BertConfig.from_preset(preset, vocab_size=V)
    layers, hidden, heads = SHAPES[preset]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
    assert config.intermediate_size == 4 * hidden and config.padded_vocab_size == 1000
    model = BertForMaskedLM(config).eval()
    ids, labels = batch(B=2, L=8)
    with torch.no_grad():
        hidden_states = model.bert(ids)
        dense = model(ids).logits
        out = model(ids, labels=labels)
    assert hidden_states.shape == (2, 8, hidden)
    assert dense.shape == (2, 8, V)
    assert out.logits.shape == (int((labels != -100).sum()), V)  # sparse head: masked positions only
    # the sparse head scores the masked positions exactly as the dense one does
    assert torch.allclose(out.logits, dense[labels != -100], atol=1e-5)
    assert out.loss.item() == pytest.approx(
        nn.functional.cross_entropy(dense.reshape(-1, V), labels.reshape(-1)).item(), rel=1e-5)


def test_vocab_padded_to_multiple_of_8_but_logits_are_the_tokenizers():
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=1001))
    assert model.config.padded_vocab_size == 1008
    assert model.bert.embeddings.word_embeddings.weight.shape == (1008, 128)
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 1001)


def test_parameter_count_matches_transformers_bert():
    import transformers

    config = BertConfig.from_preset("tiny", vocab_size=1000, type_vocab_size=2, pre_layernorm=False)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512))
    assert num_parameters(BertForMaskedLM(config)) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("pre_layernorm", [True, False])
def test_padding_never_changes_real_positions(unpad, pre_layernorm):
    torch.manual_seed(0)
    model = BertForMaskedLM(no_dropout(unpad=unpad, pre_layernorm=pre_layernorm)).eval()
    lengths = [16, 11, 4]
    ids, _ = batch(B=3, L=16)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    padded_ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    with torch.no_grad():
        padded = model(padded_ids, mask).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row:row + 1, :n]).logits[0]
            torch.testing.assert_close(padded[row, :n], alone, atol=2e-5, rtol=1e-5)
            # changing what sits in the pads changes nothing either
        noisy = model(torch.where(mask.bool(), ids, torch.randint_like(ids, 5, V)), mask).logits
    torch.testing.assert_close(noisy[mask.bool()], padded[mask.bool()], atol=2e-5, rtol=1e-5)


def test_unpad_on_and_off_agree_including_gradients():
    torch.manual_seed(0)
    on = BertForMaskedLM(no_dropout(unpad=True))
    off = BertForMaskedLM(no_dropout(unpad=False))
    off.load_state_dict(on.state_dict())
    ids, labels = batch(B=4, L=16)
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[3, 3:] = 0
    labels[~mask.bool()] = -100
    losses = []
    for model in (on, off):
        loss = model(ids, mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), b in zip(on.named_parameters(), off.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sparse_and_dense_heads_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    sparse = BertForMaskedLM(no_dropout(sparse_mlm_head=True))
    dense = BertForMaskedLM(no_dropout(sparse_mlm_head=False))
    dense.load_state_dict(sparse.state_dict())
    ids, labels = batch(B=4, L=32)
    out_sparse, out_dense = sparse(ids, labels=labels), dense(ids, labels=labels)
    n_masked = int((labels != -100).sum())
    assert out_sparse.logits.shape == (n_masked, V) and out_dense.logits.shape == (4, 32, V)
    assert out_sparse.loss.item() == pytest.approx(out_dense.loss.item(), abs=1e-6)
    torch.testing.assert_close(out_sparse.logits, out_dense.logits[labels != -100])
    out_sparse.loss.backward()
    out_dense.loss.backward()
    for a, b in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pre_layernorm", [True, False])
def test_layer_is_pre_or_post_layernorm(pre_layernorm):
    torch.manual_seed(0)
    config = no_dropout(pre_layernorm=pre_layernorm)
    layer = BertLayer(config).eval()
    x = torch.randn(2, 8, config.hidden_size)
    attn = lambda h: layer.attention(h)  # noqa: E731
    if pre_layernorm:
        h = x + attn(layer.attention_norm(x))
        expected = h + layer.ffn(layer.ffn_norm(h))
    else:
        h = layer.attention_norm(x + attn(x))
        expected = layer.ffn_norm(h + layer.ffn(h))
    torch.testing.assert_close(layer(x), expected)
    model = BertModel(config)
    assert isinstance(model.final_norm, nn.LayerNorm) == pre_layernorm  # the paper's final LayerNorm


def test_attention_matches_a_plain_softmax_implementation():
    torch.manual_seed(0)
    config = no_dropout()
    attention = BertLayer(config).attention.eval()
    x = torch.randn(2, 6, config.hidden_size)
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 6, config.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = map(split, (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / config.head_dim ** 0.5, dim=-1)
    expected = attention.out((probs @ v).transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_token_type_ids_used_only_with_two_segments():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8]])
    types = torch.tensor([[0, 0, 1, 1]])
    one = BertModel(no_dropout(type_vocab_size=1)).eval()
    torch.testing.assert_close(one(ids, token_type_ids=types), one(ids))
    two = BertModel(no_dropout(type_vocab_size=2)).eval()
    out, ref = two(ids, token_type_ids=types), two(ids)
    assert not torch.allclose(out[0, 2:], ref[0, 2:])


def test_bert_initialization():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("mini", vocab_size=V))
    w = model.bert.layers[0].ffn.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.all(model.bert.layers[0].ffn.fc1.bias == 0)
    assert torch.all(model.bert.final_norm.weight == 1)
    assert model.decoder_weight() is model.bert.embeddings.word_embeddings.weight  # tied


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset"):
        BertConfig.from_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown BertConfig field"):
        BertConfig.from_preset("tiny", hidden=3)
    model = BertModel(BertConfig.from_preset("tiny", vocab_size=V, max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 9, dtype=torch.long))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(no_dropout("tiny", pre_layernorm=False, type_vocab_size=2)).eval()
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "tokenizer.json").write_text("{}")  # other files in the folder survive a save
    (tmp_path / "m" / "sub" / "notes.txt").write_text("kept")
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model_type"] == "bbert" and meta["pre_layernorm"] is False
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    assert (tmp_path / "m" / "sub" / "notes.txt").read_text() == "kept"
    loaded = BertForMaskedLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    ids, _ = batch()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    # a classifier starts from the pretrained encoder
    clf = BertForSequenceClassification.from_pretrained(tmp_path / "m", num_labels=3).eval()
    torch.testing.assert_close(clf.bert(ids), model.bert(ids), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a bbert model folder"):
        BertForMaskedLM.from_pretrained(tmp_path)
    meta["model_type"] = "bert"
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="load_pretrained"):
        BertForMaskedLM.from_pretrained(tmp_path / "m")


def test_sequence_classification_losses():
    torch.manual_seed(0)
    ids, _ = batch(B=4, L=8)
    clf = BertForSequenceClassification(no_dropout(), num_labels=3)
    out = clf(ids, labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 1])))
    reg = BertForSequenceClassification(no_dropout(), num_labels=1)
    target = torch.tensor([0.5, 1.0, 4.0, 2.5])
    out = reg(ids, labels=target)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - target) ** 2).mean())


def test_weight_decay_groups_on_the_real_model():
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=V))
    decay, no_decay = param_groups(model, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & exempt
    assert decayed | exempt == set(names.values())  # every parameter once, the tied decoder included
    for name in exempt:
        assert name.endswith("bias") or "norm" in name, name
    for name in decayed:
        assert name.endswith("weight") and "norm" not in name, name
    assert "bert.layers.0.attention.qkv.weight" in decayed
    assert "bert.embeddings.word_embeddings.weight" in decayed
    assert {"bert.layers.0.ffn_norm.weight", "mlm_head.bias", "bert.final_norm.weight"} <= exempt


def test_bf16_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=V))
    optimizer = build_optimizer(model, lr=1e-3)
    ids, labels = batch(B=8, L=32)
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        assert loss.dtype == torch.float32  # the loss is computed in fp32
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_compile_smoke():
    torch.manual_seed(0)
    model = BertForMaskedLM(no_dropout("tiny", num_hidden_layers=1))
    ids, labels = batch(B=2, L=16)
    eager = model(ids, labels=labels).loss
    eager.backward()
    eager_grad = model.bert.layers[0].ffn.fc1.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model)
    loss = compiled(ids, labels=labels).loss
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), abs=1e-4)
    assert torch.allclose(model.bert.layers[0].ffn.fc1.weight.grad, eager_grad, atol=1e-5)


def test_random_mlm_batch_masks_only_real_tokens():
    b = random_mlm_batch(4, 64, V, lengths=[64, 40, 10, 1], seed=3)
    assert b["attention_mask"].sum(1).tolist() == [64, 40, 10, 1]
    assert torch.all(b["input_ids"][b["attention_mask"] == 0] == 0)  # pads are pad id 0
    assert torch.all(b["labels"][b["attention_mask"] == 0] == -100)
    selected = b["labels"] != -100
    torch.testing.assert_close(b["labels"][selected], b["input_ids"][selected])
    packed = random_mlm_batch(16, 128, V)
    assert packed["attention_mask"].all()
    assert 0.12 < (packed["labels"] != -100).float().mean().item() < 0.18


def test_compare_throughput_alternates_and_reports_every_runner(monkeypatch):
    import statistics

    from bbert import speed

    batch = random_mlm_batch(2, 16, V)
    runners = {}
    for name in ("a", "b"):
        torch.manual_seed(0)
        model = BertForMaskedLM(no_dropout())
        runners[name] = (model, build_optimizer(model), None)  # fp32
    order, step = [], speed.train_step
    names = {id(r[0]): name for name, r in runners.items()}
    monkeypatch.setattr(speed, "train_step", lambda m, *a: order.append(names[id(m)]) or step(m, *a))
    threads = torch.get_num_threads()
    result = compare_throughput(runners, batch, rounds=3, progress=False, clock="thread")
    assert torch.get_num_threads() == threads  # restored
    # one warm-up step each, then ABBA...: the order flips every round
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    for name in ("a", "b"):
        assert len(result["seconds"][name]) == 3
        assert result["seq_s"][name] == pytest.approx(2 / statistics.median(result["seconds"][name]))
    # both took the same 4 optimizer steps (1 warm-up + 3 rounds), so they stayed identical
    for p, q in zip(runners["a"][0].parameters(), runners["b"][0].parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="clock"):
        compare_throughput(runners, batch, clock="cpu")


def test_train_step_auto_precision_follows_fast_bf16(monkeypatch):
    # "auto" autocasts to bf16 only where bf16 is native; the autocast dtype shows in the logits.
    seen = []

    class Spy(BertForMaskedLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            seen.append(out.logits.dtype)
            return out

    torch.manual_seed(0)
    model = Spy(no_dropout("tiny", num_hidden_layers=1))
    optimizer = build_optimizer(model, lr=1e-3)
    data = random_mlm_batch(2, 16, V, seed=0)
    for flag, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv("BBERT_CPU_BF16", flag)
        assert isinstance(train_step(model, optimizer, data), float)
        assert seen[-1] == dtype
    with pytest.raises(ValueError, match="amp_dtype"):
        train_step(model, optimizer, data, amp_dtype="bf16")


def test_layer_grad_norms_are_each_layers_gradient_norm():
    torch.manual_seed(0)
    model = BertForMaskedLM(no_dropout("mini"))
    data = random_mlm_batch(2, 16, V, seed=1)
    norms = layer_grad_norms(model, data)
    assert len(norms) == 4
    assert all(p.grad is None for p in model.parameters())  # it leaves no gradients behind
    model(**data).loss.backward()
    for norm, layer in zip(norms, model.bert.layers):
        grads = torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
        assert norm == pytest.approx(grads.norm().item(), rel=1e-4)  # fp32 sums in another order
