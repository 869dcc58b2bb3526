"""Tests of bbert.data: corpus, readers, tokenizer, packing, shards, masking, loader, prepare CLI."""
from __future__ import annotations

import gzip
import importlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bbert.data import (CorpusError, DataDirError, IGNORE_INDEX, group_rows, Masker, MaskingConfig, Packer,
                        PrepareConfig, PretrainingDataset, ReadStats, TokenizerError,
                        build_pretraining_loader, check_tokenizer, choose_dtype, clean_text,
                        is_validation, load_manifest, load_tokenizer, prepare, read_documents,
                        read_sample_corpus, sample_corpus_path, train_tokenizer, verify_shards)
from bbert.data.layout import manifest_path, shard_name, tokenizer_dir, verified_path
from bbert.data.readers import iter_clean_documents
from bbert.hub import HubUnavailableError

SMALL = dict(max_documents=300, vocab_size=2048, val_fraction=0.05, progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "small"
    prepare(PrepareConfig(out=str(out), **SMALL))
    return out


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return load_tokenizer(tokenizer_dir(data_dir))


def tree_state(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- embedded corpus
def test_embedded_corpus_is_small_real_prose_with_sources_and_license():
    path = sample_corpus_path()
    assert path.exists() and path.stat().st_size < 10 * 2**20
    docs = read_sample_corpus()
    assert {d["source"] for d in docs} == {"kjv", "python_docs", "wordnet"}
    assert sum(len(d["text"]) for d in docs) > 10_000_000
    assert all(d["text"].strip() and d["title"] for d in docs)
    assert "In the beginning God created the heaven and the earth." in docs[0]["text"]
    assert len(read_sample_corpus("wordnet")) < len(docs)
    license = (path.parent / "SOURCE.md").read_text()
    assert "Public domain" in license and "PSF" in license and "WordNet 3.0" in license


# ---------------------------------------------------------------- readers
def test_text_reader_paragraphs_lines_and_books(tmp_path):
    (tmp_path / "a.txt").write_text("First para\nstill first.\n\n\nSecond para.\n")
    assert list(read_documents([tmp_path / "a.txt"])) == ["First para\nstill first.\n", "Second para.\n"]
    assert len(list(read_documents([tmp_path / "a.txt"], text_unit="line"))) == 5
    books = tmp_path / "books"
    books.mkdir()
    (books / "b1.txt").write_text("Book one.\n\nMore of book one.")
    (books / "b2.txt").write_text("Book two.")
    (books / "notes.md").write_text("not a book")
    assert list(read_documents([books], fmt="books")) == ["Book one.\n\nMore of book one.", "Book two."]


def test_jsonl_reader_gzip_and_text_field(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"body": "hello there"}) + "\n\n" + json.dumps({"body": "again"}) + "\n")
    assert list(read_documents([path], text_field="body")) == ["hello there", "again"]
    with pytest.raises(CorpusError, match="no field 'text'.*--text-field"):
        list(read_documents([path]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2 is not valid JSON"):
        list(read_documents([bad]))


def test_jsonl_text_that_is_not_a_string_is_refused_naming_the_row(tmp_path):
    # a dict or list used to enter the corpus as its Python repr ("{'a': 1}"), numbers as digits
    for value, kind in (({"a": "some nested words"}, "dict"), (["a", "list"], "list"), (12345, "int")):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(json.dumps({"text": "a fine row"}) + "\n" + json.dumps({"text": value}) + "\n")
        with pytest.raises(CorpusError, match=rf"{kind}.jsonl:2: field 'text' holds a {kind}, not text.*--text-field"):
            list(read_documents([path]))
    nulls = tmp_path / "nulls.jsonl"  # null is an empty document, counted as such
    nulls.write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "words"}) + "\n")
    assert list(read_documents([nulls])) == ["", "words"]
    rows = [{"doc_id": 1, "text": "one"}, {"doc_id": 1, "text": {"x": 1}}]
    with pytest.raises(CorpusError, match="row 2: field 'text' holds a dict"):
        list(group_rows(rows))


def test_a_folder_walk_skips_hidden_folders_counts_skipped_files_and_refuses_a_data_dir(tmp_path, data_dir):
    import shutil

    corpus = tmp_path / "corpus"
    (corpus / ".ipynb_checkpoints").mkdir(parents=True)
    (corpus / "a.txt").write_text("Kept text.")
    (corpus / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("A copy that was read twice.")
    (corpus / "notes.md").write_text("# Not read")
    (corpus / "README").write_text("Not read either")
    stats = ReadStats()
    assert list(read_documents([corpus], stats=stats)) == ["Kept text."]
    assert stats.files == 1 and stats.files_skipped == 2
    assert sorted(stats.files_skipped_examples) == [str(corpus / "README"), str(corpus / "notes.md")]
    # a data dir left inside the input folder: its manifest and tokenizer files are not text
    shutil.copytree(data_dir, corpus / "data")
    with pytest.raises(CorpusError, match=r"corpus holds a bbert data dir .*corpus/data.*move it out"):
        list(read_documents([corpus]))


def test_prepare_refuses_out_inside_an_input_folder_and_an_input_inside_out(tmp_path, capsys):
    from bbert.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text about rivers and mountains.\n")
    assert main(["prepare", str(corpus), "--out", str(corpus / "data"), "--quiet"]) == 2
    assert re.search(r"--out .*corpus/data lies inside the input folder .*corpus.*choose an --out outside",
                     capsys.readouterr().err)
    assert not (corpus / "data").exists()
    # --overwrite would replace the folder that holds the input, deleting it
    assert main(["prepare", str(corpus / "a.txt"), "--out", str(corpus), "--quiet", "--overwrite"]) == 2
    assert re.search(r"input .*a.txt lies inside --out .*corpus", capsys.readouterr().err)
    assert (corpus / "a.txt").read_text() == "Some text about rivers and mountains.\n"


def test_prepare_console_names_skipped_files(tmp_path, capsys):
    from bbert.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text about rivers and mountains, long enough to keep.\n" * 20)
    (corpus / "notes.md").write_text("# Not read\n")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "d"), "--quiet", "--vocab-size", "100",
                 "--val-fraction", "0"]) == 0
    assert (f"1 file in the input folders skipped (not .txt, .jsonl, ...), e.g. {corpus / 'notes.md'}: "
            "pass such files by name to read them") in capsys.readouterr().out


def test_a_utf8_byte_order_mark_is_dropped_not_refused(tmp_path):
    # Windows tools write one; JSONL with it was refused as "not valid JSON (Unexpected UTF-8 BOM)"
    rows = tmp_path / "bom.jsonl"
    rows.write_bytes(("\ufeff" + json.dumps({"text": "first"}) + "\r\n" + json.dumps({"text": "second"}) + "\r\n").encode())
    assert list(read_documents([rows])) == ["first", "second"]
    text = tmp_path / "bom.txt"
    text.write_bytes("\ufeffFirst para.\r\n\r\nSecond para.\r\n".encode())
    assert list(read_documents([text])) == ["First para.\r\n", "Second para.\r\n"]
    assert list(read_documents([text], text_unit="file")) == ["First para.\r\n\r\nSecond para.\r\n"]


def test_a_row_missing_the_text_field_after_good_rows_is_named_as_one_bad_row(tmp_path):
    path = tmp_path / "some.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n" + json.dumps({"body": "odd one"}) + "\n")
    # "pass --text-field NAME" was wrong advice: the other rows have the field
    with pytest.raises(CorpusError, match=r"some.jsonl:2 has no field 'text' \(found \['body'\]\), which the rows "
                                          r"before it have: fix or remove that row"):
        list(read_documents([path]))


def test_utf16_text_and_jsonl_read_when_declared_and_are_named_when_not(tmp_path):
    # a UTF-16 newline is two bytes: read line by line, --encoding utf-16 failed on the first line
    text = tmp_path / "u16.txt"
    text.write_bytes("Première partie.\nSuite.\n\nDeuxième partie.\n".encode("utf-16"))
    assert list(read_documents([text], encoding="utf-16")) == ["Première partie.\nSuite.\n", "Deuxième partie.\n"]
    rows = tmp_path / "u16.jsonl"
    rows.write_bytes((json.dumps({"text": "un"}) + "\n" + json.dumps({"text": "deux"}) + "\n").encode("utf-16"))
    assert list(read_documents([rows], encoding="utf-16")) == ["un", "deux"]
    with pytest.raises(CorpusError, match="u16.txt:1 is not utf-8 text .* e.g. --encoding utf-16"):
        list(read_documents([text]))  # its byte order mark says UTF-16: latin-1 was the advice


def test_wikiextractor_reader(tmp_path):
    folder = tmp_path / "AA"
    folder.mkdir()
    (folder / "wiki_00").write_text(
        '<doc id="1" url="u" title="Anarchism">\nAnarchism\n\nAnarchism is a political philosophy.\n</doc>\n'
        '<doc id="2" url="u" title="Autism">\nAutism\n\nAutism is a condition.\n</doc>\n')
    docs = [clean_text(d) for d in read_documents([tmp_path])]
    assert docs == ["Anarchism is a political philosophy.", "Autism is a condition."]


def test_folder_without_text_files_is_a_clear_error(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(CorpusError, match="holds no text files"):
        list(read_documents([tmp_path]))
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_documents([tmp_path / "missing.txt"]))


def test_hub_dataset_fails_fast_offline_naming_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="Offline alternative: .*JSONL"):
        list(read_documents(["hf:wikimedia/wikipedia:20231101.en"]))
    with pytest.raises(HubUnavailableError, match="train one on your corpus"):
        load_tokenizer("bert-large-uncased")
    assert time.perf_counter() - started < 5


def test_hf_dataset_saved_to_disk_reads_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["one doc", "two doc"]})}
                         ).save_to_disk(tmp_path / "saved")
    assert list(read_documents([f"hf:{tmp_path / 'saved'}"], text_field="body")) == ["one doc", "two doc"]


def test_text_that_is_not_utf8_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("plain ascii paragraph\n\ncaf\xe9 au lait is served here\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1.txt:3 is not utf-8 text .*--encoding latin-1"):
        list(read_documents([path]))
    # --encoding decodes every input: said, so that the UTF-8 files beside it don't become mojibake
    with pytest.raises(CorpusError, match=r"--encoding applies to every input file.*convert this one to UTF-8"):
        list(read_documents([path]))
    docs = list(read_documents([path], encoding="latin-1"))
    assert docs == ["plain ascii paragraph\n", "caf\xe9 au lait is served here\n"]
    noise = tmp_path / "noise.bin.txt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(CorpusError, match="noise.bin.txt:.* is not utf-8 text"):
        list(read_documents([noise]))
    # Declared as Latin-1, random bytes still decode, but their NULs give them away.
    with pytest.raises(CorpusError, match="contains NUL characters: a binary file"):
        list(read_documents([noise], encoding="latin-1"))
    with pytest.raises(CorpusError, match="unknown encoding 'latin-9x'"):
        list(read_documents([path], encoding="latin-9x"))


def test_prepare_refuses_latin1_and_keeps_its_accents_when_declared(tmp_path, capsys):
    from bbert.cli import main

    corpus = tmp_path / "fr.txt"
    para = "Le caf\xe9 est servi au comptoir avec une tartine et un verre d'eau fra\xeeche."
    corpus.write_bytes("\n\n".join([para] * 60).encode("latin-1"))
    out = tmp_path / "fr"
    args = ["prepare", str(corpus), "--out", str(out), "--vocab-size", "300", "--cased", "--quiet",
            "--val-fraction", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fr.txt:1 is not utf-8 text" in err and "--encoding latin-1" in err
    assert not out.exists()
    assert main(args + ["--encoding", "latin-1"]) == 0
    assert "documents: 60 read, 60 kept; dropped 0 empty" in capsys.readouterr().out
    tok = load_tokenizer(out)
    ids = np.fromfile(out / shard_name("train", 0), dtype=np.uint16)
    text = tok.decode(ids.tolist(), skip_special_tokens=True)
    assert "caf\xe9" in text and "fra\xeeche" in text


# ---------------------------------------------------------------- cleaning and split
def test_cleaning_drops_empty_and_short_and_normalizes_whitespace():
    stats = ReadStats()
    raw = ["  Hello \t world,\n\n  this is   long enough. ", "", "   \n", "tiny", "x" * 30]
    out = list(iter_clean_documents(raw, min_chars=20, val_fraction=0, stats=stats))
    assert out == [("train", "Hello world, this is long enough."), ("train", "x" * 30)]
    assert (stats.empty, stats.too_short, stats.documents_kept) == (2, 1, 2)


def test_split_is_deterministic_document_level_and_close_to_fraction():
    texts = [d["text"] for d in read_sample_corpus()]
    val = [is_validation(t, 0.1, seed=3) for t in texts]
    assert val == [is_validation(t, 0.1, seed=3) for t in texts]
    assert 0.07 < np.mean(val) < 0.13
    assert val != [is_validation(t, 0.1, seed=4) for t in texts]
    # Every piece of a document cut for length stays in that document's split.
    long_doc = " ".join(["word"] * 5000)
    splits = {s for s, _ in iter_clean_documents([long_doc], max_chars=1000, val_fraction=0.5, seed=1)}
    assert len(splits) == 1


def test_a_single_50mb_line_is_cut_not_fatal(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "w") as f:
        f.write("start " + "x" * (50 * 2**20) + " end\n")
    stats = ReadStats()
    pieces = list(iter_clean_documents(read_documents([path], stats=stats), max_chars=1_000_000,
                                       val_fraction=0, stats=stats))
    assert stats.long_documents_split == 1 and stats.documents_kept == 1
    assert len(pieces) == 53 and max(len(t) for _, t in pieces) <= 1_000_000
    assert sum(len(t) for _, t in pieces) == 50 * 2**20 + len("start  end")  # nothing lost


# ---------------------------------------------------------------- tokenizer
def test_trained_tokenizer_round_trips_through_autotokenizer(tmp_path, tokenizer, data_dir):
    from transformers import AutoTokenizer

    texts = [d["text"] for d in read_sample_corpus("kjv")[:200]]
    tok = train_tokenizer(texts, vocab_size=1500)
    trained = len(tok)
    assert 1000 < trained <= 1500
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(loaded) == trained
    enc = loaded("And God said, Let there be light.")["input_ids"]
    assert enc[0] == loaded.cls_token_id and enc[-1] == loaded.sep_token_id
    # The data dir's tokenizer too: real text gives almost no [UNK].
    unseen = read_sample_corpus("kjv")[1000:1030]  # chapters the data dir's tokenizer never saw
    ids = tokenizer(" ".join(d["text"] for d in unseen))["input_ids"]
    assert len(tokenizer) == load_manifest(data_dir)["vocab_size"]
    assert np.mean(np.array(ids) == tokenizer.unk_token_id) < 0.01


def test_five_token_vocabulary_mistake_is_caught(tmp_path, tokenizer):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))) + "\n")
    broken = BertTokenizerFast(vocab_file=str(vocab))
    with pytest.raises(TokenizerError, match="only .* tokens"):
        check_tokenizer(broken)


# ---------------------------------------------------------------- packing and shards
def test_packer_round_trips_the_stream_and_pads_only_the_last_sample():
    packer = Packer(8, cls_id=2, sep_id=3, pad_id=0, dtype=np.uint16)
    docs = [[10, 11, 12], [13] * 7, [14, 15]]
    full = np.concatenate([packer.add(docs[:2]), packer.add(docs[2:]), packer.finish()])
    assert full.shape == (3, 8) and (full[:, 0] == 2).all() and (full[:, -1] == 3).all()
    stream = full[:, 1:-1].ravel()
    expected = [t for d in docs for t in d + [3]]
    assert stream[:len(expected)].tolist() == expected and (stream[len(expected):] == 0).all()
    assert packer.real_tokens == 2 * 8 + 5  # the last sample: [CLS] 14 15 [SEP] [SEP]


def test_manifest_shards_dtype_and_packing_efficiency(data_dir, tokenizer):
    m = load_manifest(data_dir)
    assert m["dtype"] == "uint16" and m["max_seq_length"] == 128 and m["masking"] == "dynamic"
    assert m["special_ids"]["cls"] == tokenizer.cls_token_id and m["vocab_size"] == len(tokenizer)
    assert m["packing_efficiency"] >= 0.98
    assert m["bytes_per_token"] <= 2.1
    assert m["stats"]["documents_kept"] == 300 and m["args"]["max_documents"] == 300
    train, val = (m["splits"][split]["num_samples"] for split in ("train", "val"))
    assert 0.02 < val / (train + val) < 0.1  # val_fraction=0.05 of the documents
    for split in ("train", "val"):  # the count is the rows in the split's shard files
        rows = sum((data_dir / s["file"]).stat().st_size // (2 * 128) for s in m["splits"][split]["shards"])
        assert m["splits"][split]["num_samples"] == rows
    assert [s["file"] for s in m["splits"]["train"]["shards"]][:1] == [shard_name("train", 0)]
    shard = m["splits"]["train"]["shards"][0]
    arr = np.fromfile(data_dir / shard["file"], dtype=np.uint16).reshape(-1, 128)
    assert len(arr) == shard["num_samples"] == m["splits"]["train"]["num_samples"]
    assert (arr[:, 0] == tokenizer.cls_token_id).all() and arr.max() < len(tokenizer)
    assert (arr[:-1] != tokenizer.pad_token_id).all()  # padding only in the last sample
    assert verify_shards(data_dir, m) == []
    # The stored tokens are the tokenizer's: decode the first sample back to corpus text.
    first = tokenizer.decode(arr[0, 1:20].tolist())
    assert first.startswith("in the beginning god created the heaven and the earth")


def test_vocabulary_too_big_for_dtype(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bbert.data.tokenizer import wrap_tokenizer

    with pytest.raises(ValueError, match="does not fit in uint16"):
        choose_dtype(70_000, "uint16")
    assert choose_dtype(70_000) == np.uint32 and choose_dtype(65_536) == np.uint16
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(70_000)]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wrap_tokenizer(backend).save_pretrained(tmp_path / "bigtok")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{(i * 7919 + j) % 70000}" for j in range(50))
                                  for i in range(40)))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="70,005 tokens does not fit in uint16"):
        prepare(PrepareConfig([str(corpus)], str(out), tokenizer=str(tmp_path / "bigtok"),
                              dtype="uint16", progress=False, val_fraction=0))
    assert not out.exists()
    m = prepare(PrepareConfig([str(corpus)], str(out), tokenizer=str(tmp_path / "bigtok"),
                              progress=False, val_fraction=0))
    arr = np.fromfile(out / shard_name("train", 0), dtype=np.uint32)
    assert m["dtype"] == "uint32" and arr.max() >= 65_536


# ---------------------------------------------------------------- prepare: re-runs and bad input
def test_rerun_skips_a_good_dir_and_redoes_a_damaged_one(tmp_path, data_dir, capsys):
    out = tmp_path / "d"
    cfg = PrepareConfig(out=str(out), samples_per_shard=400, tokenizer=str(tokenizer_dir(data_dir)),
                        **{**SMALL, "max_documents": 120})
    m1 = prepare(cfg)
    assert len(m1["splits"]["train"]["shards"]) >= 2
    before = tree_state(out)
    assert prepare(cfg) == m1 and tree_state(out) == before  # verified, nothing rewritten

    shards = [s["file"] for s in m1["splits"]["train"]["shards"]]
    (out / shards[1]).write_bytes(b"corrupt")
    capsys.readouterr()
    m2 = prepare(cfg)
    err = capsys.readouterr().err
    assert f"shard {out / shards[1]} does not match its SHA-256" in err and "redoing the data dir" in err
    assert m2["splits"] == m1["splits"] and verify_shards(out, m2) == []


def _failing_write_shard(monkeypatch, fail_at: int, error: BaseException):
    prep = importlib.import_module("bbert.data.prepare")  # the module, not the function
    real, calls = prep.write_shard, []

    def write_shard(path, array):
        calls.append(path)
        if len(calls) == fail_at:
            raise error
        return real(path, array)

    monkeypatch.setattr(prep, "write_shard", write_shard)
    return calls


def test_failed_overwrite_leaves_the_old_data_dir_byte_identical(tmp_path, monkeypatch, data_dir, capsys):
    import errno

    from bbert.cli import main

    out = tmp_path / "d"
    base = ["prepare", "--out", str(out), "--tokenizer", str(tokenizer_dir(data_dir)), "--quiet",
            "--max-documents", "120", "--set", "samples_per_shard=400"]
    assert main(base) == 0
    before = tree_state(out)
    capsys.readouterr()
    calls = _failing_write_shard(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device",
                                                         str(out) + ".x"))
    assert main(base + ["--max-seq-length", "64", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(calls) == 2 and len(err.splitlines()) == 1
    assert "No space left on device" in err and f"{out} is left as it was" in err
    assert tree_state(out) == before and load_manifest(out)["max_seq_length"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no half-built folder, no lock file left

    # Killed mid-write: the old dir is untouched too, and nothing half-built looks finished.
    monkeypatch.undo()
    _failing_write_shard(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(out=str(tmp_path / "fresh"), **{**SMALL, "max_documents": 60}))
    assert not (tmp_path / "fresh").exists() and tree_state(out) == before


def test_an_interrupted_prepare_is_noticed_and_redone(tmp_path, data_dir, capsys):
    cfg = PrepareConfig(out=str(tmp_path / "d"), tokenizer=str(tokenizer_dir(data_dir)),
                        **{**SMALL, "max_documents": 60})
    # What a prepare killed by SIGKILL (no cleanup) leaves: a half-built sibling folder ...
    build = tmp_path / ".d.building"
    build.mkdir()
    (build / shard_name("train", 0)).write_bytes(b"\0" * 256)
    m = prepare(cfg)
    assert "unfinished build" in capsys.readouterr().err and not build.exists()
    assert verify_shards(tmp_path / "d", m) == []
    # ... or, from an older bbert, shards in the folder itself without a finished manifest.
    partial = tmp_path / "p"
    partial.mkdir()
    (partial / shard_name("train", 0)).write_bytes(b"\0" * 256)
    with pytest.raises(DataDirError, match="no manifest.json; create it"):
        load_manifest(partial)
    m = prepare(PrepareConfig(**{**cfg.__dict__, "out": str(partial)}))
    assert "p is an unfinished data dir (shards without a finished manifest" in capsys.readouterr().err
    assert load_manifest(partial) == m and verify_shards(partial, m) == []
    # A folder of something else is never replaced without --overwrite.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataDirError, match="exists and is not a data dir"):
        prepare(PrepareConfig(**{**cfg.__dict__, "out": str(other)}))
    assert (other / "notes.txt").read_text() == "keep me"


def test_other_tokenizer_or_arguments_in_existing_dir_is_refused_untouched(tmp_path, data_dir):
    out = tmp_path / "d"
    cfg = PrepareConfig(out=str(out), **{**SMALL, "max_documents": 60})
    prepare(cfg)
    before = tree_state(out)
    with pytest.raises(DataDirError, match="another tokenizer .differing: tokenizer"):
        prepare(PrepareConfig(**{**cfg.__dict__, "tokenizer": str(tokenizer_dir(data_dir))}))
    # Same arguments, but the tokenizer folder's content changed since.
    tok_dir = tmp_path / "tok"
    cfg_tok = PrepareConfig(**{**cfg.__dict__, "out": str(tmp_path / "d2"), "tokenizer": str(tok_dir)})
    load_tokenizer(tokenizer_dir(data_dir)).save_pretrained(tok_dir)
    prepare(cfg_tok)
    load_tokenizer(tokenizer_dir(out)).save_pretrained(tok_dir)
    with pytest.raises(DataDirError, match="another tokenizer .fingerprint"):
        prepare(cfg_tok)
    with pytest.raises(DataDirError, match="differing: max_seq_length"):
        prepare(PrepareConfig(**{**cfg.__dict__, "max_seq_length": 64}))
    assert tree_state(out) == before
    m = prepare(PrepareConfig(**{**cfg.__dict__, "max_seq_length": 64, "overwrite": True}))
    assert m["max_seq_length"] == 64 and load_manifest(out)["max_seq_length"] == 64


def test_empty_input_is_a_clear_error_and_writes_nothing(tmp_path, data_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    for i, tok in enumerate((None, str(tokenizer_dir(data_dir)))):
        out = tmp_path / f"out-{i}"
        with pytest.raises(CorpusError, match="no usable documents in .*empty.txt: 0 read"):
            prepare(PrepareConfig([str(empty)], str(out), tokenizer=tok, progress=False))
        assert not out.exists()


def test_cli_prepare_and_bad_input_exit_codes(tmp_path, capsys):
    from bbert.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d["text"]}) for d in read_sample_corpus("wordnet")[:40]))
    out = tmp_path / "cli"
    assert main(["prepare", str(corpus), "--out", str(out), "--vocab-size", "1000", "--quiet",
                 "--val-fraction", "0.1"]) == 0
    assert "packing efficiency" in capsys.readouterr().out
    assert load_manifest(out)["vocab_size"] <= 1000
    assert main(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--val-fraction", "1"], r"--val-fraction must be at least 0 and below 1, got 1.0"),  # was "no usable documents"
    (["--val-fraction", "-0.1"], r"--val-fraction must be at least 0"),  # was silently 0
    (["--vocab-size", "-5"], r"--vocab-size must be at least 16"),  # was an OverflowError traceback
    (["--vocab-size", "0"], r"--vocab-size must be at least 16"),  # was silently the alphabet
    (["--max-seq-length", "4"], r"--max-seq-length must be at least 8"),  # was refused after the tokenizer
    (["--max-documents", "0"], r"--max-documents must be at least 1"),  # was "no usable documents"
    (["--set", "max_bytes=0"], r"max_bytes must be at least 1"),
    (["--set", "max_document_chars=0"], r"max_document_chars must be at least 1"),  # looped forever
    (["--set", "seed=-1"], r"seed must be at least 0"),  # was an OverflowError traceback
])
def test_bad_prepare_values_are_refused_before_anything_is_read(tmp_path, capsys, flags, message):
    from bbert.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("Some text about rivers and mountains.\n\nMore text about gardens.\n")
    out = tmp_path / "out"
    assert main(["prepare", str(corpus), "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bbert prepare: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_ctrl_c_on_the_command_line_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    from bbert.cli import main

    prepare_module = importlib.import_module("bbert.data.prepare")  # the attribute is the function
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "prepare", interrupted)
    monkeypatch.delenv("BBERT_DEBUG", raising=False)
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "d")]) == 130
    assert capsys.readouterr().err == ("bbert prepare: interrupted; nothing half-written is kept: "
                                       "run the same command again\n")


def test_a_damaged_manifest_is_named_for_readers_and_redone_by_prepare(tmp_path, data_dir, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    manifest_path(damaged).write_text("{broken")
    # was the bare "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    with pytest.raises(DataDirError, match=r"damaged/manifest.json is not valid JSON \(damaged\?\); rebuild it with"):
        load_manifest(damaged)
    prepare(PrepareConfig(**{**SMALL, "out": str(damaged)}))
    assert "redoing it" in capsys.readouterr().err
    assert load_manifest(damaged)["complete"]


def test_a_missing_input_is_refused_before_the_others_are_read(tmp_path, monkeypatch):
    prepare_module = importlib.import_module("bbert.data.prepare")
    good = tmp_path / "good.txt"
    good.write_text("Some text about rivers and mountains, long enough to keep.\n")

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained before the missing input was noticed")

    monkeypatch.setattr(prepare_module, "train_tokenizer", no_training)
    with pytest.raises(CorpusError, match=r"input .*missing.txt does not exist; check the path"):
        prepare(PrepareConfig([str(good), str(tmp_path / "missing.txt")], str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- masking
def _mask_many(tokenizer, samples, config, n=600):
    masker = Masker.from_tokenizer(tokenizer, config)
    special = np.isin(samples[:n], tokenizer.all_special_ids)
    out = [masker(s, seed=0, epoch=0, index=i) for i, s in enumerate(samples[:n])]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), special


def test_dynamic_masking_statistics(data_dir, tokenizer):
    samples = np.fromfile(data_dir / shard_name("train", 0), dtype=np.uint16).reshape(-1, 128).astype(np.int64)
    inputs, labels, special = _mask_many(tokenizer, samples, MaskingConfig())
    original = samples[:len(inputs)]
    predicted = labels != IGNORE_INDEX
    assert not (predicted & special).any() and (inputs[special] == original[special]).all()
    assert abs(predicted.sum() / (~special).sum() - 0.15) < 0.005
    assert (labels[predicted] == original[predicted]).all()
    assert (inputs[~predicted] == original[~predicted]).all()  # nothing else is touched
    as_mask = (inputs[predicted] == tokenizer.mask_token_id).mean()
    kept = (inputs[predicted] == original[predicted]).mean()
    replaced = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(replaced - 0.1) < 0.02
    assert not np.isin(inputs[predicted & (inputs != original) & (inputs != tokenizer.mask_token_id)],
                       tokenizer.all_special_ids).any()


def test_whole_word_masking_masks_whole_words(data_dir, tokenizer):
    samples = np.fromfile(data_dir / shard_name("train", 0), dtype=np.uint16).reshape(-1, 128).astype(np.int64)
    inputs, labels, special = _mask_many(tokenizer, samples, MaskingConfig(whole_word_masking=True), n=300)
    predicted = labels != IGNORE_INDEX
    continuation = np.vectorize(lambda t: t.startswith("##"))(
        np.array(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))))[samples[:300]]
    assert continuation.any()
    # A ## piece is predicted exactly when the token before it is (same word).
    pairs = continuation[:, 1:] & ~special[:, :-1]
    assert (predicted[:, 1:][pairs] == predicted[:, :-1][pairs]).all()
    assert abs(predicted.sum() / (~special).sum() - 0.15) < 0.01


def test_static_masking_cycles_duplication_factor_masks_and_dynamic_does_not(data_dir):
    static = PretrainingDataset(data_dir, "train", seed=3, masking=MaskingConfig(mode="static", duplication_factor=10))
    dynamic = PretrainingDataset(data_dir, "train", seed=3)
    for index in (0, 7):
        labels = [static.sample(index, epoch)["labels"] for epoch in (0, 1, 10, 11, 20)]
        assert torch.equal(labels[0], labels[2]) and torch.equal(labels[0], labels[4])  # e, e+10, e+20
        assert torch.equal(labels[1], labels[3])
        assert not torch.equal(labels[0], labels[1])  # e and e+1 differ
        assert len({tuple(static.sample(index, e)["input_ids"].tolist()) for e in range(10)}) == 10
        assert not torch.equal(dynamic.sample(index, 0)["labels"], dynamic.sample(index, 10)["labels"])
    # Static epoch 0 is the dynamic epoch 0: the same stream, only cycled.
    assert torch.equal(static.sample(5, 0)["labels"], dynamic.sample(5, 0)["labels"])


def test_max_predictions_per_seq_caps_and_bad_values_are_refused(data_dir, tokenizer):
    samples = np.fromfile(data_dir / shard_name("train", 0), dtype=np.uint16).reshape(-1, 128).astype(np.int64)
    for wwm in (False, True):
        _, labels, _ = _mask_many(tokenizer, samples, MaskingConfig(max_predictions_per_seq=12,
                                                                     whole_word_masking=wwm), n=200)
        per_seq = (labels != IGNORE_INDEX).sum(axis=1)
        assert per_seq.max() == 12 and per_seq.min() >= 1  # 15% of 126 is 19: the cap binds
    _, labels, _ = _mask_many(tokenizer, samples, MaskingConfig(max_predictions_per_seq=20), n=200)
    assert (labels != IGNORE_INDEX).sum(axis=1).max() == 19  # BERT's 20 at length 128 rarely binds
    for bad, message in ((dict(mode="statik"), "mode must be dynamic or static"),
                         (dict(duplication_factor=0), "duplication_factor must be a whole number >= 1"),
                         (dict(max_predictions_per_seq=0), "max_predictions_per_seq must be")):
        with pytest.raises(ValueError, match=message):
            MaskingConfig(**bad)


# ---------------------------------------------------------------- loader
def _batches(data_dir, **kw):
    return [{k: v.clone() for k, v in b.items()} for b in build_pretraining_loader(data_dir, "train", **kw)]


def test_loader_shapes_and_determinism(data_dir):
    a = _batches(data_dir, micro_batch_size=8, infinite=False, seed=5)
    b = _batches(data_dir, micro_batch_size=8, infinite=False, seed=5)
    c = _batches(data_dir, micro_batch_size=8, infinite=False, seed=6)
    assert a[0]["input_ids"].shape == (8, 128) and a[0]["input_ids"].dtype == torch.int64
    assert set(a[0]) == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    n = load_manifest(data_dir)["splits"]["train"]["num_samples"]
    assert len(a) == n // 8
    # Background workers give exactly the same batches, in the same order.
    workers = _batches(data_dir, micro_batch_size=8, infinite=False, seed=5, num_workers=2)
    assert len(workers) == len(a) and all(torch.equal(x[k], y[k]) for x, y in zip(a, workers) for k in x)
    # Masks differ between epochs of the same sample, and are a pure function of (seed, epoch, index).
    ds = PretrainingDataset(data_dir, "train", seed=5)
    assert torch.equal(ds.sample(7, epoch=1)["labels"], ds.sample(7, epoch=1)["labels"])
    assert not torch.equal(ds.sample(7, epoch=0)["labels"], ds.sample(7, epoch=1)["labels"])


def test_ranks_are_disjoint_with_equal_batch_counts(data_dir):
    world, batch = 3, 5
    per_rank = []
    for rank in range(world):
        ds = PretrainingDataset(data_dir, "train", rank, world, seed=1, micro_batch_size=batch, infinite=False)
        per_rank.append([i for _, i in ds.indices()])
        loader = build_pretraining_loader(data_dir, "train", batch, rank, world, seed=1, infinite=False)
        assert sum(1 for _ in loader) == ds.batches_per_epoch
    n = load_manifest(data_dir)["splits"]["train"]["num_samples"]
    assert {len(r) for r in per_rank} == {n // (world * batch) * batch}
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen))  # disjoint
    # The same global batches whatever the rank layout: 1 rank x 15 == 3 ranks x 5.
    one = [i for _, i in PretrainingDataset(data_dir, "train", seed=1, micro_batch_size=15,
                                            infinite=False).indices()]
    assert sorted(one[:15]) == sorted(r[k] for r in per_rank for k in range(5))
    # Validation is served in order and can be read once.
    val = build_pretraining_loader(data_dir, "val", 4, infinite=False)
    assert sum(len(b["input_ids"]) for b in val) == load_manifest(data_dir)["splits"]["val"]["num_samples"] // 4 * 4


def test_resume_from_sample_offset_matches_uninterrupted_run(data_dir):
    world, batch = 2, 4
    ds = PretrainingDataset(data_dir, "train", 0, world, micro_batch_size=batch)
    spe = ds.samples_per_epoch
    start = spe - 3 * world * batch  # three global batches before the end of epoch 0
    for rank in range(world):
        full = build_pretraining_loader(data_dir, "train", batch, rank, world, seed=2)
        it = iter(full)
        reference = [next(it) for _ in range(spe // (world * batch) + 3)]
        resumed = build_pretraining_loader(data_dir, "train", batch, rank, world, seed=2, start_sample=start)
        it = iter(resumed)
        for expected in reference[start // (world * batch):]:  # crosses into epoch 1
            got = next(it)
            assert all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(ValueError, match="multiple of"):
        PretrainingDataset(data_dir, "train", 0, world, start_sample=3, micro_batch_size=batch)


def test_dataset_errors_on_missing_or_tiny_data(tmp_path, data_dir):
    with pytest.raises(DataDirError, match="bbert prepare --out"):
        PretrainingDataset(tmp_path)
    with pytest.raises(DataDirError, match="fewer than one global batch"):
        PretrainingDataset(data_dir, "val", micro_batch_size=10**6)


def test_loader_leaves_the_global_torch_rng_alone(data_dir):
    # A resumed run restores the global RNG (dropout); iterating the loader must not draw from it.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches = iter(build_pretraining_loader(data_dir, "train", 4, seed=1))
    next(batches)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- checksums and a changing data dir
def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)  # copy2 keeps the modification times, like rsync -a
    return dst


def test_a_flipped_byte_of_the_same_size_is_caught_at_the_start(tmp_path, data_dir):
    from bbert.data import check_data_dir

    d = _copy_dir(data_dir, tmp_path / "d")
    m = check_data_dir(d)  # untouched: passes
    assert m == load_manifest(d) and verified_path(d).is_file()
    shard = d / m["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataDirError, match=r"train-00000.bin does not match its SHA-256.*"
                                           r"bbert prepare \.\.\. --out .*/d --overwrite"):
        check_data_dir(d)
    with pytest.raises(DataDirError, match="train-00000.bin does not match"):
        build_pretraining_loader(d, "train", 8)
    # A manifest edited to another checksum is refused the same way.
    d2 = _copy_dir(data_dir, tmp_path / "d2")
    m2 = json.loads(manifest_path(d2).read_text())
    m2["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    manifest_path(d2).write_text(json.dumps(m2))
    with pytest.raises(DataDirError, match="val-00000.bin does not match"):
        PretrainingDataset(d2, "train")


def test_checksums_are_hashed_once_then_checked_by_size_and_time(tmp_path, data_dir, monkeypatch):
    from bbert.data import check_data_dir
    from bbert.data import shards as shards_module

    d = _copy_dir(data_dir, tmp_path / "d")
    hashed = []
    real = shards_module.sha256_file
    monkeypatch.setattr(shards_module, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    check_data_dir(d)
    first = len(hashed)
    check_data_dir(d)
    assert first == len(hashed)  # prepare's sidecar made even the first check free
    verified_path(d).unlink()
    check_data_dir(d)
    check_data_dir(d)
    assert sorted(hashed) == sorted(s["file"] for sp in load_manifest(d)["splits"].values() for s in sp["shards"])


def test_a_data_dir_replaced_under_a_reader_is_refused(tmp_path, data_dir):
    d = _copy_dir(data_dir, tmp_path / "d")
    ds = PretrainingDataset(d, "val", shuffle=False)
    ds.sample(0)
    manifest_path(d).write_text(manifest_path(d).read_text() + "\n")  # e.g. prepare --overwrite
    ds.sample(1)  # an open shard keeps serving the data it started with
    ds._arrays.clear()  # as when the next shard is opened
    with pytest.raises(DataDirError, match="changed while this run was reading it"):
        ds.sample(2)


def test_data_fingerprint_names_what_a_resumed_run_depends_on(tmp_path, data_dir):
    from bbert.data import data_fingerprint

    m = load_manifest(data_dir)
    fp = data_fingerprint(m)
    assert fp["tokenizer_fingerprint"] == m["tokenizer_fingerprint"] and fp["vocab_size"] == m["vocab_size"]
    assert fp["max_seq_length"] == 128 and fp["num_samples"]["train"] == m["splits"]["train"]["num_samples"]
    other = json.loads(json.dumps(m))
    other["splits"]["train"]["shards"][0]["sha256"] = "f" * 64
    assert data_fingerprint(other)["shards_sha256"] != fp["shards_sha256"]
    assert data_fingerprint(json.loads(json.dumps(m))) == fp


# ---------------------------------------------------------------- tokenizer messages
def test_tokenizer_paths_get_messages_that_say_what_is_wrong(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match=r"tokenizer folder .*/nope does not exist; check the path"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="tokenizer folder data/nope-tok does not exist"):
        monkeypatch.chdir(tmp_path)
        (tmp_path / "data").mkdir()
        load_tokenizer("data/nope-tok")
    (tmp_path / "notatok").mkdir()
    (tmp_path / "notatok" / "README.md").write_text("hello")
    with pytest.raises(TokenizerError, match="notatok is not a tokenizer folder: it should hold tokenizer.json"):
        load_tokenizer(tmp_path / "notatok")
    # files of the right names that transformers can't read: a KeyError traceback, or its bare message
    broken = tmp_path / "broken"
    broken.mkdir()
    for content in ("{}", "not json"):
        (broken / "tokenizer.json").write_text(content)
        with pytest.raises(TokenizerError, match=r"broken holds tokenizer files that transformers can't load "
                                                 r"\(.*\); point --tokenizer at a folder written by save_pretrained"):
            load_tokenizer(broken)
    with pytest.raises(HubUnavailableError, match="no local folder of that name"):
        load_tokenizer("google-bert/bert-base-uncased")
    assert len(load_tokenizer(data_dir)) == load_manifest(data_dir)["vocab_size"]  # a data dir works


def test_vocabulary_shortfall_is_said_and_uint16_is_checked_before_training(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d["text"]}) for d in read_sample_corpus("wordnet")[:30]))
    m = prepare(PrepareConfig([str(corpus)], str(tmp_path / "o"), vocab_size=70_000, progress=False,
                              val_fraction=0))
    err = capsys.readouterr().err
    assert f"the corpus yields only {m['vocab_size']:,} WordPiece tokens of the 70,000 asked" in err
    assert "shards are stored as uint32" in err and m["vocab_size"] < 65_536 and m["dtype"] == "uint16"
    started = time.perf_counter()
    with pytest.raises(ValueError, match="--vocab-size 70,000 needs token ids above 65,535.*dtype=auto"):
        prepare(PrepareConfig([str(corpus)], str(tmp_path / "u"), vocab_size=70_000, dtype="uint16"))
    assert time.perf_counter() - started < 0.5 and not (tmp_path / "u").exists()  # before training


def test_a_vocabulary_larger_than_asked_is_said(tmp_path, capsys):
    # WordPiece keeps every character of the corpus, so --vocab-size 20 silently gave ~60 tokens
    corpus = tmp_path / "c.txt"
    corpus.write_text("Café au lait, déjà vu and naïve façades line the old quarter of town.\n" * 5)
    m = prepare(PrepareConfig([str(corpus)], str(tmp_path / "o"), vocab_size=20, progress=False, val_fraction=0))
    assert m["vocab_size"] > 20
    assert (f"the corpus has more distinct characters than --vocab-size 20 allows: WordPiece keeps "
            f"them all, so the vocabulary has {m['vocab_size']} tokens") in capsys.readouterr().err


# ---------------------------------------------------------------- sentence-per-row datasets
def _books():
    rng = np.random.default_rng(0)
    words = [w for d in read_sample_corpus("wordnet")[:20] for w in d["text"].split()]
    return {f"book{b}": [" ".join(rng.choice(words, 12)) + "." for _ in range(30)] for b in range(40)}


def test_sentence_per_row_dataset_is_grouped_into_documents(tmp_path, monkeypatch):
    import datasets

    from bbert.data.readers import iter_clean_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    books = _books()
    rows = [(b, s) for b, sentences in books.items() for s in sentences]
    with_id = tmp_path / "with_id"
    datasets.Dataset.from_dict({"book_id": [b for b, _ in rows], "text": [s for _, s in rows]}).save_to_disk(with_id)
    plain = tmp_path / "plain"
    datasets.Dataset.from_dict({"text": [s for _, s in rows]}).save_to_disk(plain)
    expected = [" ".join(s) for s in books.values()]
    assert list(read_documents([f"hf:{with_id}"])) == expected  # by the book_id column
    assert list(read_documents([f"hf:{plain}"], rows_per_document=30)) == expected  # by blocks of rows
    assert len(list(read_documents([f"hf:{plain}"]))) == len(rows)  # one per row, as asked
    # Wikipedia (one article per row, an "id" column) read in the same run stays one per row.
    wiki = tmp_path / "wiki"
    articles = [f"article {i} about something" for i in range(5)]
    datasets.Dataset.from_dict({"id": [str(i) for i in range(5)], "text": articles}).save_to_disk(wiki)
    assert list(read_documents([f"hf:{wiki}", f"hf:{plain}"], rows_per_document=30)) == articles + expected

    # Split by document: each book lies wholly on one side, and no text is lost.
    split_of = {}
    for split, text in iter_clean_documents(read_documents([f"hf:{with_id}"]), val_fraction=0.3, seed=0):
        book = next(b for b, s in books.items() if s[0] in text)
        split_of.setdefault(book, set()).add(split)
        assert text == " ".join(books[book])
    assert all(len(v) == 1 for v in split_of.values()) and len(split_of) == len(books)
    assert {"train", "val"} == set().union(*split_of.values())

    # Packed: one [SEP] per book, none between its sentences.
    out = tmp_path / "out"
    m = prepare(PrepareConfig([f"hf:{with_id}"], str(out), vocab_size=800, val_fraction=0, progress=False))
    tok = load_tokenizer(out)
    ids = np.fromfile(out / shard_name("train", 0), dtype=np.uint16).reshape(-1, 128)[:, 1:-1].ravel()
    ids = ids[ids != tok.pad_token_id]
    assert (ids == tok.sep_token_id).sum() == len(books) and m["stats"]["rows_grouped"] == len(rows)
    first_doc = tok.decode(ids[:np.flatnonzero(ids == tok.sep_token_id)[0]].tolist())
    assert first_doc.replace(" ", "") == "".join(books["book0"]).lower().replace(" ", "")


# ---------------------------------------------------------------- CLI: --config and --set
def test_cli_takes_config_file_set_and_flags_in_that_order(tmp_path, capsys):
    from bbert.cli import main

    cfg = tmp_path / "prep.yaml"
    cfg.write_text("max_documents: 50\nvocab_size: 900\nval_fraction: 0.2\nseed: 3\n")
    out = tmp_path / "o"
    assert main(["prepare", "--config", str(cfg), "--set", "vocab_size=800", "--set", "max_seq_length=64",
                 "--vocab-size", "700", "--out", str(out), "--quiet"]) == 0
    args = load_manifest(out)["args"]
    assert (args["max_documents"], args["vocab_size"], args["max_seq_length"], args["seed"]) == (50, 700, 64, 3)
    capsys.readouterr()
    assert main(["prepare", "--set", "vocab_sise=10", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bbert prepare: error: unknown config field 'vocab_sise'. Did you mean 'vocab_size'?")
    assert len(err.splitlines()) == 1
    assert main(["prepare", "--set", "max_documents=many", "--out", str(tmp_path / "x")]) == 2
    assert "max_documents must be a number" in capsys.readouterr().err


def test_a_data_dir_from_an_older_bbert_is_reused_when_its_settings_match(tmp_path, data_dir, capsys):
    d = _copy_dir(data_dir, tmp_path / "d")
    m = json.loads(manifest_path(d).read_text())
    for key in ("encoding", "document_field", "rows_per_document"):
        del m["args"][key]  # fields it did not have yet
    m["args"].update(masking="dynamic", duplication_factor=10, mlm_probability=0.15, whole_word_masking=False)
    manifest_path(d).write_text(json.dumps(m))
    assert prepare(PrepareConfig(out=str(d), **SMALL)) == m
    m["args"]["masking"] = "static"
    manifest_path(d).write_text(json.dumps(m))
    with pytest.raises(DataDirError, match="other arguments .differing: masking"):
        prepare(PrepareConfig(out=str(d), **SMALL))


def test_prepare_into_a_pipe_prints_plain_lines_not_a_bar(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, "-m", "bbert.cli", "prepare", "--out", str(tmp_path / "d"),
                             "--set", "max_bytes=300000", "--vocab-size", "1000"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "\r" not in output and "samples of 128 tokens" in output
