"""Tests of bbert.hf: export to transformers (both layouts), import, load_pretrained, `bbert export`."""
import os
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from bbert import hf
from bbert.cli import main as cli_main
from bbert.data.tokenizer import wrap_tokenizer
from bbert.model import BertConfig, BertForMaskedLM
from bbert.utils import HubUnavailableError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a cat dog sat on mat budget bert train hour gpu".split()


def make_tokenizer():
    # A small WordPiece vocabulary wrapped the way bbert.data wraps the tokenizers it trains.
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + list("abcdefghijklmnopqrstuvwxyz"))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return wrap_tokenizer(tok)


def tiny_model(pre_layernorm, segments=2, **kw):
    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", vocab_size=len(make_tokenizer()), pre_layernorm=pre_layernorm,
                                    type_vocab_size=segments, **kw)
    return BertForMaskedLM(config).eval()


def padded_batch(tokenizer):
    enc = tokenizer(["the cat sat on the mat", "a dog"], ["bert budget", "gpu hour train"],
                    padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.mark.parametrize("pre_layernorm,arch,segments", [(True, "RobertaPreLayerNormForMaskedLM", 1),
                                                         (False, "BertForMaskedLM", 2)])
def test_export_round_trip_matches_logits(tmp_path, pre_layernorm, arch, segments):
    model, tokenizer = tiny_model(pre_layernorm, segments=segments), make_tokenizer()
    assert model.config.padded_vocab_size != model.config.vocab_size  # the vocab padding is exercised
    out = hf.export_to_transformers(model, tokenizer, tmp_path / "export")
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == arch
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids, mask, types = padded_batch(tok)
    torch.testing.assert_close(ids, padded_batch(tokenizer)[0])
    assert mask.min() == 0 and types.max() == 1  # pads and sentence pairs present
    with torch.no_grad():
        ours = model(ids, mask, token_type_ids=types).logits
        theirs = loaded(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert theirs.shape == ours.shape
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4
    # and back: importing the exported folder gives bbert's weights again
    back, back_tok = hf.load_pretrained(out)
    assert back.config.pre_layernorm == pre_layernorm
    assert back.config.max_position_embeddings == model.config.max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids, mask, token_type_ids=types).logits[real], ours[real],
                                   atol=1e-5, rtol=1e-5)
    assert back_tok("the cat")["input_ids"] == tok("the cat")["input_ids"] == [2, 5, 7, 3]


def test_import_transformers_bert_folder(tmp_path):
    torch.manual_seed(1)
    hf_config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64)
    reference = transformers.BertForMaskedLM(hf_config).eval()
    reference.save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    model, tokenizer = hf.load_pretrained(tmp_path / "bert")
    assert tokenizer is not None and model.config.type_vocab_size == 2 and not model.config.pre_layernorm
    assert model.config.vocab_size == 50 and model.config.padded_vocab_size == 56
    ids = torch.randint(5, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    model.eval()
    with torch.no_grad():
        ours = model(ids, mask, token_type_ids=types).logits
        theirs = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() < 1e-4


def test_import_bert_model_without_head(tmp_path):
    torch.manual_seed(2)
    hf_config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64)
    encoder = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    encoder.save_pretrained(tmp_path / "enc")
    model = hf.import_from_transformers(tmp_path / "enc").eval()
    ids = torch.randint(5, 40, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.bert(ids), encoder(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_load_pretrained_finds_the_model_in_run_dirs(tmp_path):
    tokenizer = make_tokenizer()
    older, newer = tiny_model(True), tiny_model(True)
    with torch.no_grad():
        newer.bert.final_norm.bias.fill_(0.5)
    run = tmp_path / "run"
    for name, model in (("step-100", older), ("step-200", newer)):
        model.save_pretrained(run / "checkpoints" / name / "model")
        tokenizer.save_pretrained(run / "checkpoints" / name / "model")
        time.sleep(0.01)
    os.utime(run / "checkpoints" / "step-100" / "model" / "config.json", (1, 1))  # make the older one old
    model, tok = hf.load_pretrained(run)
    assert torch.all(model.bert.final_norm.bias == 0.5) and tok is not None
    model, _ = hf.load_pretrained(run / "checkpoints" / "step-100")  # a checkpoint folder
    assert torch.all(model.bert.final_norm.bias == 0)
    older.save_pretrained(run / "final")  # final/ wins over checkpoints/
    model, _ = hf.load_pretrained(run)
    assert torch.all(model.bert.final_norm.bias == 0)
    with pytest.raises(FileNotFoundError, match="no model found"):
        hf.load_pretrained(tmp_path / "run" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_pretrained(tmp_path / "nowhere")


def test_hub_names_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="save_pretrained"):
        hf.load_pretrained("bert-base-uncased")
    assert time.perf_counter() - start < 2


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="embedding LayerNorm"):
        hf.export_to_transformers(tiny_model(True, embedding_layernorm=False), make_tokenizer(), tmp_path / "out")
    with pytest.raises(ValueError, match="tokenizer"):
        hf.export_to_transformers(tiny_model(False), None, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"  # nothing written over


def test_cli_export(tmp_path, capsys):
    model = tiny_model(True)
    model.save_pretrained(tmp_path / "ckpt" / "model")
    make_tokenizer().save_pretrained(tmp_path / "ckpt" / "model")
    assert cli_main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "RobertaPreLayerNormForMaskedLM" in capsys.readouterr().out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "roberta-prelayernorm"
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
