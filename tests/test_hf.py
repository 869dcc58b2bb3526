"""Tests of bbert.hf: export to transformers (both layouts), import, load_pretrained, `bbert export`."""
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from bbert import hf
from bbert import run_dir as rd
from bbert.cli import main as cli_main
from bbert.data.tokenizer import wrap_tokenizer
from bbert.model import BertConfig, BertForMaskedLM
from bbert.run_dir import write_budget
from bbert.hub import HubUnavailableError

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
        model.save_pretrained(rd.model_dir(run / "checkpoints" / name))
        tokenizer.save_pretrained(rd.model_dir(run / "checkpoints" / name))
        write_budget(run / "checkpoints" / name, {"step": int(name.split("-")[1])})
    os.utime(run / "checkpoints" / "step-200", (1, 1))  # the highest step wins, not the newest folder
    model, tok = hf.load_pretrained(run)
    assert torch.all(model.bert.final_norm.bias == 0.5) and tok.get_vocab() == tokenizer.get_vocab()
    model, _ = hf.load_pretrained(run / "checkpoints" / "step-100")  # a checkpoint folder
    assert torch.all(model.bert.final_norm.bias == 0)
    older.save_pretrained(rd.final_dir(run))  # final/ wins over checkpoints/
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
    with pytest.raises(ValueError, match="it needs embedding_layernorm=True"):
        hf.export_to_transformers(tiny_model(True, embedding_layernorm=False), make_tokenizer(), tmp_path / "out")
    with pytest.raises(ValueError, match="tokenizer"):
        hf.export_to_transformers(tiny_model(False), None, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"  # nothing written over


def test_cli_export(tmp_path, capsys):
    model = tiny_model(True)
    model.save_pretrained(rd.model_dir(tmp_path / "ckpt"))
    make_tokenizer().save_pretrained(rd.model_dir(tmp_path / "ckpt"))
    assert cli_main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "RobertaPreLayerNormForMaskedLM" in capsys.readouterr().out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "roberta-prelayernorm"
    assert hf.is_export(tmp_path / "hf")
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert error_line(capsys).endswith("does not exist; pass a model folder, a checkpoint folder or a run dir")
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a model folder nor a run dir" in error_line(capsys)
    assert not (tmp_path / "x").exists()


# ---- nothing lost: what `bbert export --out` may replace -------------------------------------


def error_line(capsys) -> str:
    """The one line a refused `bbert export` prints (and nothing on stdout)."""
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("bbert export: error: "), (out, err)
    return err.strip()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_run_dir(path: Path, model=None) -> Path:
    """A run dir as `bbert pretrain` leaves it: config, metrics and a checkpoint with its tokenizer."""
    model_dir = rd.model_dir(path / "checkpoints" / "step-10")
    (model or tiny_model(True)).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (path / "checkpoints" / "step-10" / "optimizer.pt").write_bytes(os.urandom(256))
    write_budget(path / "checkpoints" / "step-10", {"step": 10})
    (path / "config.yaml").write_text("time_budget_hours: 24\n")
    (path / "metrics.jsonl").write_text('{"step": 10, "loss": 7.1}\n')
    return path


def test_export_refuses_to_write_over_its_source(tmp_path, capsys):
    run = make_run_dir(tmp_path / "runs" / "x")
    before = tree_hashes(tmp_path)
    model_dir = rd.model_dir(run / "checkpoints" / "step-10")
    cases = [(run, "is the folder the export reads from"),
             (run / "export", f"lies inside {run}, the run or model being exported"),
             (tmp_path / "runs", f"holds {run}, which the export reads from"),
             (model_dir, f"lies inside {run}, the run or model being exported")]
    for out, problem in cases:
        for extra in ([], ["--overwrite"]):  # --overwrite never makes the source a target
            assert cli_main(["export", str(run), "--out", str(out), *extra]) == 2
            line = error_line(capsys)
            assert line == (f"bbert export: error: --out {out} {problem}; write the export beside it, "
                            f"e.g. --out {run.parent / 'x-hf'}"), line
    # exporting a model folder: --out may not be the folder, nor inside it
    assert cli_main(["export", str(model_dir), "--out", str(model_dir / "hf")]) == 2
    assert f"lies inside {model_dir}" in error_line(capsys)
    assert tree_hashes(tmp_path) == before  # byte-identical, and no temporary folder left behind
    assert cli_main(["export", str(run), "--out", str(tmp_path / "runs" / "x-hf")]) == 0
    assert tree_hashes(run) == {k[len("runs/x/"):]: v for k, v in before.items()}


def test_export_refuses_a_folder_of_other_files_without_overwrite(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (out / "config.json").write_text('{"model_type": "bert"}')  # a transformers folder, not an export
    before = tree_hashes(out)
    assert cli_main(["export", str(run), "--out", str(out)]) == 2
    assert error_line(capsys) == (f"bbert export: error: --out {out} already holds files (config.json, "
                                  "notes.txt, sub) and is not an earlier export; choose a new or empty "
                                  "folder, or pass --overwrite (overwrite=True) to replace it")
    assert tree_hashes(out) == before
    assert cli_main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert "RobertaPreLayerNormForMaskedLM" in capsys.readouterr().out
    assert not (out / "notes.txt").exists() and not (out / "sub").exists() and hf.is_export(out)
    (tmp_path / "empty").mkdir()  # an empty folder is fine without --overwrite
    assert cli_main(["export", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert hf.is_export(tmp_path / "empty")


def test_export_replaces_an_earlier_export(tmp_path, capsys):
    first, second = tiny_model(False), tiny_model(False)
    with torch.no_grad():
        second.mlm_head.bias.fill_(0.25)
    make_run_dir(tmp_path / "a", first)
    make_run_dir(tmp_path / "b", second)
    out = tmp_path / "hf"
    assert cli_main(["export", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert cli_main(["export", str(tmp_path / "a"), "--out", str(out)]) == 0  # a re-export refreshes it
    assert cli_main(["export", str(tmp_path / "b"), "--out", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.count("exported ") == 3
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert type(loaded).__name__ == "BertForMaskedLM"
    assert torch.all(loaded.cls.predictions.bias == 0.25)  # the second model, not the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "hf"]  # no temporary siblings


def test_failed_export_leaves_the_earlier_one_intact(tmp_path):
    out = hf.export_to_transformers(tiny_model(True), make_tokenizer(), tmp_path / "hf")
    before = tree_hashes(out)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hf.export_to_transformers(tiny_model(False), BrokenTokenizer(), out, overwrite=True)
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_refuses_a_file_at_out(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    (tmp_path / "model.safetensors").write_bytes(b"not a folder")
    for extra in ([], ["--overwrite"]):
        assert cli_main(["export", str(run), "--out", str(tmp_path / "model.safetensors"), *extra]) == 2
        assert error_line(capsys) == (f"bbert export: error: --out {tmp_path / 'model.safetensors'} is a file, "
                                      "not a folder; remove it or choose a folder path")
    assert (tmp_path / "model.safetensors").read_bytes() == b"not a folder"


@pytest.mark.slow
def test_cli_export_prints_only_its_own_lines(tmp_path):
    run = make_run_dir(tmp_path / "run")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}

    def bbert_export(*args):
        return subprocess.run([sys.executable, "-m", "bbert.cli", "export", *map(str, args)], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)

    done = bbert_export(run, "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines() == [
        f"exported {run / 'checkpoints' / 'step-10' / 'model'} -> {tmp_path / 'hf'} (RobertaPreLayerNormForMaskedLM); "
        f"load it with transformers.AutoModelForMaskedLM.from_pretrained({str(tmp_path / 'hf')!r})"]
    refused = bbert_export(run, "--out", run)
    assert refused.returncode == 2
    assert refused.stdout.splitlines() == [f"bbert export: error: --out {run} is the folder the export reads from; "
                                           f"write the export beside it, e.g. --out {tmp_path / 'run-hf'}"]
    # loading the export back (as `bbert finetune` does) prints nothing either: no progress bar in a log
    load = subprocess.run([sys.executable, "-c", "from bbert.hf import load_pretrained; import sys; "
                           "load_pretrained(sys.argv[1])", str(tmp_path / "hf")], env=env, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert load.returncode == 0 and load.stdout == "", load.stdout
