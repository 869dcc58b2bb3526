"""Your own task in ``bbert finetune``: the files people really have (BOM, CRLF, quotes, JSONL),
the mistakes they make (short rows, empty labels, a forgotten --regression), re-runs into the
same --out, and the scores checked against scikit-learn on the written model."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score

from bbert import glue
from bbert.atomic import atomic_write_json
from bbert.glue import command as glue_command
from bbert.glue import grid as glue_grid

GLUE_DIR = Path(__file__).parent / "fixtures" / "glue" / "glue_data"
DEV = "sentence\tlabel\ngood film\tpos\nbad film\tneg\n"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _load(tmp_path, train: str, file: str = "train.tsv", dev: str = DEV, **kw):
    return glue.load_custom_task(_write(tmp_path / file, train), _write(tmp_path / "dev.tsv", dev),
                                 kw.pop("text_columns", ["sentence"]), **kw)


# ---- file formats ----------------------------------------------------------------------------


def test_bom_crlf_and_quotes_are_read_as_written(tmp_path):
    # a spreadsheet's UTF-8 CSV: a byte-order mark, CRLF, quoted commas and a quoted newline
    _write(tmp_path / "train.csv", 'sentence,label\r\n"good, really good",pos\r\n"bad\r\nfilm",neg\r\n'
                                   'fine,pos\r\n', "utf-8-sig")
    # a GLUE-style TSV: stray quote marks are text, not quoting
    _write(tmp_path / "dev.tsv",
           'sentence\tlabel\r\n" good\tpos\r\nhe said "bad\tneg\r\nok "\tpos\r\n', "utf-8-sig")
    data = glue.load_custom_task(tmp_path / "train.csv", tmp_path / "dev.tsv", ["sentence"])
    assert data.spec.labels == ("neg", "pos")
    assert [(e["text_a"], e["label"]) for e in data.splits["train"]] == [
        ("good, really good", 1), ("bad\r\nfilm", 0), ("fine", 1)]
    assert [(e["text_a"], e["label"]) for e in data.splits["validation"]] == [
        ('" good', 1), ('he said "bad', 0), ('ok "', 1)]


@pytest.mark.parametrize("name, train, line, which", [
    ("train.tsv", "sentence\tlabel\ngood\tpos\nbad film\nawful\tneg\n", 3, "fewer"),
    ("train.tsv", "sentence\tlabel\ngood\tpos\nbad\tfilm\tneg\n", 3, "more"),
    ("train.csv", "sentence,label\ngood,pos\nbad, film,neg\n", 3, "more"),
    ("train.csv", "sentence,label\ngood,pos\nbad\n", 3, "fewer"),
])
def test_a_row_with_too_few_or_too_many_cells_is_refused_by_line(tmp_path, name, train, line, which):
    # before: a missing label became the class "None", an extra cell was dropped without a word
    with pytest.raises(ValueError, match=rf"{name}, line {line}: {which} cells than the 2 columns "
                                         r"of the header \['sentence', 'label'\]; fix that row"):
        _load(tmp_path, train, name)


def test_empty_label_cells_are_refused_with_their_lines(tmp_path):
    # before: "" silently became a third class
    rows = "".join(f"s{i}\t{'' if i in (2, 5) else 'pos' if i % 2 else 'neg'}\n" for i in range(8))
    with pytest.raises(ValueError, match=r"train.tsv: 2 row\(s\) with an empty 'label' cell "
                                         r"\(line\(s\) 4, 7\): label them or remove them"):
        _load(tmp_path, "sentence\tlabel\n" + rows)
    # JSONL: a null label is an empty label
    with pytest.raises(ValueError, match=r"train.jsonl: 1 row\(s\) with an empty 'label' cell \(line\(s\) 2\)"):
        _load(tmp_path, '{"sentence": "a", "label": "pos"}\n{"sentence": "b", "label": null}\n',
              "train.jsonl")


@pytest.mark.parametrize("train, message", [
    ('{"sentence": "a", "label": "pos"}\n{"sentence": "b", label: "neg"}\n',
     r"train.jsonl, line 2: not valid JSON \(.*\); the file must hold one JSON object per line"),
    ('[{"sentence": "a", "label": "pos"}]\n', r"train.jsonl, line 1: expected one JSON object per line"),
    ('{"sentence": "a", "label": "pos"}\n{"sentence": "b"}\n',
     r"train.jsonl, line 2: no column\(s\) \['label'\]; its columns are \['sentence'\]"),
    ('{"sentence": null, "label": "pos"}\n', r"train.jsonl, line 1: 'sentence' is null"),
])
def test_jsonl_mistakes_name_the_file_and_line(tmp_path, train, message):
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, train, "train.jsonl")


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "train.tsv").write_bytes("sentence\tlabel\ncaf\xe9\tpos\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train.tsv is not UTF-8 text .*: save it as UTF-8"):
        glue.load_custom_task(tmp_path / "train.tsv", _write(tmp_path / "dev.tsv", DEV), ["sentence"])


# ---- labels --------------------------------------------------------------------------------


def test_a_dev_label_missing_from_train_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"dev.tsv, line 4: label 'neutral' is not one of the training "
                                         r"file's 2 labels \('neg', 'pos'\): list every class with --labels$"):
        _load(tmp_path, "sentence\tlabel\na\tpos\nb\tneg\n", dev=DEV + "meh\tneutral\n")
    # given --labels, the message points there
    with pytest.raises(ValueError, match=r"not one of --labels's 2 labels .*: add it to --labels"):
        _load(tmp_path, "sentence\tlabel\na\tpos\nb\tneg\n", dev=DEV + "meh\tneutral\n",
              labels=["neg", "pos"])


def test_scores_without_regression_suggest_it_and_the_list_is_short(tmp_path):
    scores = "".join(f"s{i}\t{i / 10:.1f}\n" for i in range(30))
    with pytest.raises(ValueError) as e:
        _load(tmp_path, "sentence\tlabel\n" + scores, dev="sentence\tlabel\nx\t4.25\n")
    assert "the training file's 30 labels ('0.0', '0.1'," in str(e.value)
    assert "..." in str(e.value) and "'2.9'" not in str(e.value)
    assert str(e.value).endswith("or add --regression if the labels are scores")
    with pytest.raises(ValueError, match=r"train.tsv, line 3: score 'n/a' is not a number; fix or remove"):
        _load(tmp_path, "sentence\tlabel\na\t1.5\nb\tn/a\n", dev="sentence\tlabel\nx\t2\n",
              regression=True)


def test_labels_keep_inner_spaces_and_lose_outer_ones(tmp_path):
    data = _load(tmp_path, "sentence\tlabel\na\tvery good\nb\tvery good \nc\tnot sure\n",
                 dev="sentence\tlabel\nx\t very good\n")
    # before: "very good " was a class of its own that no row could reach
    assert data.spec.labels == ("not sure", "very good")
    assert [e["label"] for e in data.splits["train"]] == [1, 1, 0]


@pytest.mark.parametrize("train, kw, message", [
    ("sentence\tlabel\na\tpos\nb\tpos\n", {}, r"train.tsv: every row has the label 'pos'; a classifier "
                                              r"needs two or more classes"),
    ("sentence\tlabel\na\tpos\nb\tneg\n", {"labels": ["pos"]}, r"two or more distinct labels, got \['pos'\]"),
    ("sentence\tlabel\na\tpos\nb\tneg\n", {"labels": ["pos", "neg", "pos"]}, r"list each class once"),
    ("sentence\tlabel\na\t1\nb\t2\n", {"labels": ["1", "2"], "regression": True},
     r"drop --labels or --regression"),
    ("sentence\tlabel\na\tpos\nb\tneg\n", {"name": "my/task"}, r"task name 'my/task' must be letters"),
])
def test_label_and_name_mistakes(tmp_path, train, kw, message):
    # before: one class built a one-output head, i.e. a regression on class ids
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, train, **kw)


# ---- the command line --------------------------------------------------------------------------


def _args(*argv):
    return glue_command.build_parser().parse_args(["model", "--out", "o", *argv])


def test_cli_labels_strip_spaces_and_tasks_count_once(tmp_path):
    train = _write(tmp_path / "train.tsv", "sentence\tlabel\na\tpos\nb\tneg\n")
    dev = _write(tmp_path / "dev.tsv", DEV)
    [data] = glue_command._load_tasks(_args("--train-file", str(train), "--dev-file", str(dev),
                                            "--labels", "pos, neg"))
    assert data.spec.labels == ("pos", "neg")
    loaded = glue_command._load_tasks(_args("--glue-dir", str(GLUE_DIR), "--tasks", "rte,RTE, mrpc"))
    assert [d.spec.name for d in loaded] == ["rte", "mrpc"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", ""], r"every grid axis"),
    (["--max-train-examples", "0"], r"max_train_examples must be positive \(or unset for all\), got 0"),
    (["--max-train-examples", "-5"], r"max_train_examples must be positive"),
    (["--weight-decay", "-1"], r"weight_decay must be 0 or more"),
])
def test_cli_empty_or_negative_grid_values_are_one_line(argv, message, capsys):
    # before: "--seeds ''" fell back to the preset's seeds; -5 dropped the last 5 examples
    assert glue.main(["model", "--out", "x", "--glue-dir", str(GLUE_DIR)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bbert finetune: error: "), err
    assert re.search(message, err), err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(glue_grid, "run_glue", interrupted)
    out = tmp_path / "out"
    assert glue.main(["model", "--out", str(out), "--glue-dir", str(GLUE_DIR), "--tasks", "rte"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"bbert finetune: interrupted; the finished runs are kept in {out}: run the same "
                   "command again to go on")


# ---- re-runs into the same --out ---------------------------------------------------------------



def write_finished_result(model_path, data, config, out_dir):
    """What a finished run leaves, without training: a stand-in for ``finetune`` in grid tests."""
    atomic_write_json(Path(out_dir) / "result.json", {
        "result_version": glue.RESULT_VERSION, "task": "rte", "config": config.name,
        "seed": config.seed, "score": 0.5, "dev": {"validation": {"accuracy": 0.5}},
        "model_path": str(Path(model_path).resolve()), "data_fingerprint": data.fingerprint(),
        "hyperparameters": dataclasses.asdict(config)})


def test_rerun_with_other_settings_is_refused_and_neutral_changes_are_not(tmp_path, monkeypatch):
    data = glue.load_glue_dir("rte", GLUE_DIR)
    grid = glue.GridConfig(lr=(1e-4,), batch_size=(4,), num_epochs=(1,), seed=(0,))
    calls = []

    def fake_finetune(model_path, data, config, out_dir):
        calls.append(config.seed)
        write_finished_result(model_path, data, config, out_dir)

    monkeypatch.setattr(glue_grid, "finetune", fake_finetune)
    glue.grid_search("model", data, grid, tmp_path, num_gpus=0)
    # what doesn't change a score may change: the run is skipped
    neutral = dataclasses.replace(grid, base=dataclasses.replace(grid.base, save_best_model=False,
                                                                 progress=False, eval_batch_size=7))
    glue.grid_search("model", data, neutral, tmp_path, num_gpus=0)
    assert calls == [0]
    where = str(glue.run_dir(tmp_path, "rte", grid.runs()[0]))
    other = dataclasses.replace(grid, base=dataclasses.replace(grid.base, max_train_examples=3,
                                                               max_seq_length=64))
    with pytest.raises(ValueError) as e:
        glue.grid_search("model", data, other, tmp_path, num_gpus=0)
    assert str(e.value) == (f"{where} holds a finished run with other settings (max_seq_length "
                            "128 -> 64; max_train_examples None -> 3): pass --redo to finetune those "
                            "runs again, or give a new --out")
    with pytest.raises(ValueError, match=r"other settings \(model .*model -> .*other-model\)"):
        glue.grid_search("other-model", data, grid, tmp_path, num_gpus=0)
    fewer = glue.TaskData(data.spec, {k: v[:-1] for k, v in data.splits.items()})
    with pytest.raises(ValueError, match=r"other settings \(other examples or labels in the task's files\)"):
        glue.grid_search("model", fewer, grid, tmp_path, num_gpus=0)
    assert calls == [0]


# ---- a real run: predictions and scores checked ---------------------------------------------


def _tiny_model(folder: Path, with_tokenizer: bool = True) -> Path:
    from bbert.data.readers import read_sample_corpus
    from bbert.data.tokenizer import train_tokenizer
    from bbert.model import BertConfig, BertForMaskedLM

    tok = train_tokenizer([d["text"] for d in read_sample_corpus()[::20]], vocab_size=1000,
                          max_seq_length=128)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=len(tok), max_position_embeddings=128))
    model.save_pretrained(folder)
    if with_tokenizer:
        tok.save_pretrained(folder)
    return folder


def test_a_model_folder_without_a_tokenizer_is_named(tmp_path):
    model = _tiny_model(tmp_path / "model", with_tokenizer=False)
    with pytest.warns(UserWarning, match="no tokenizer"), \
            pytest.raises(ValueError, match=r"model has a model but no tokenizer .*: copy the tokenizer"):
        glue.load_classifier(model, 2)


def test_a_length_beyond_the_models_positions_is_refused_not_cut(tmp_path):
    model = _tiny_model(tmp_path / "model")  # 128 positions
    data = glue.load_glue_dir("rte", GLUE_DIR)
    with pytest.raises(ValueError, match=r"max_seq_length=256 is longer than the model's 128 "
                                         r"positions: use --max-seq-length 128 or less"):
        glue.finetune(model, data, glue.FinetuneConfig(max_seq_length=256, num_epochs=1))


def test_custom_run_predictions_and_scores_match_sklearn(tmp_path):
    from transformers import AutoTokenizer

    from bbert.model import BertForSequenceClassification

    model = _tiny_model(tmp_path / "model")
    words = {"very good": "good great fine nice", "very bad": "bad awful poor sad",
             "not sure": "table chair stone cloud"}
    rows = [(" ".join(words[lab].split()[(i + j) % 4] for j in range(5)), lab)
            for i in range(60) for lab in words]
    for name, part in (("train.csv", rows[:150]), ("dev.csv", rows[150:])):
        with open(tmp_path / name, "w", newline="", encoding="utf-8-sig") as f:
            csv.writer(f).writerows([("sentence", "label"), *part])
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"sentence": s}) + "\n" for s, _ in rows[:13]))
    data = glue.load_custom_task(tmp_path / "train.csv", tmp_path / "dev.csv", ["sentence"],
                                 test_file=tmp_path / "test.jsonl", name="mood")
    grid = glue.GridConfig(lr=(2e-3,), batch_size=(16,), num_epochs=(2,), seed=(0, 1),
                           base=glue.FinetuneConfig(progress=False))
    report = glue.run_glue(model, [data], grid, tmp_path / "out", "tiny")
    sel = report["selections"]["mood"]
    run = tmp_path / "out" / "runs" / "mood" / sel["config"] / str(sel["median_run"])
    # the test predictions: one per test row, in order, as label names
    lines = (run / "predictions-test.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 13
    assert [ln.split("\t")[0] for ln in lines[1:]] == [str(i) for i in range(13)]
    assert {ln.split("\t")[1] for ln in lines[1:]} <= set(words)
    assert (tmp_path / "out" / "submission" / "mood.tsv").read_text() == "\n".join(lines) + "\n"
    # the dev score: recomputed with scikit-learn from the kept best model
    clf = BertForSequenceClassification.from_pretrained(run / "best_model")
    tok = AutoTokenizer.from_pretrained(run / "best_model")
    preds = glue.predict(clf, tok, data.splits["validation"])
    refs = [e["label"] for e in data.splits["validation"]]
    result = glue.load_result(run)
    assert result["dev"]["validation"]["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert data.spec.metrics == ("accuracy",)  # three classes: no F1
    # median of the best configuration over its two seeds (the mean of the middle two)
    scores = [glue.load_result(run.parent / str(s))["score"] for s in (0, 1)]
    assert sel["score"] == pytest.approx(sum(scores) / 2)
    # the same command again skips both runs; with another max_seq_length it is refused
    assert glue.run_glue(model, [data], grid, tmp_path / "out", "tiny")["selections"] == report["selections"]
    shorter = dataclasses.replace(grid, base=dataclasses.replace(grid.base, max_seq_length=32))
    with pytest.raises(ValueError, match=r"max_seq_length 128 -> 32"):
        glue.run_glue(model, [data], shorter, tmp_path / "out", "tiny")
    assert glue.load_result(run) == result  # nothing was touched


def test_model_dot_names_its_folder_and_out_must_be_a_folder(tmp_path, monkeypatch, capsys):
    data = glue.load_glue_dir("rte", GLUE_DIR)
    grid = glue.GridConfig(lr=(1e-4,), batch_size=(4,), num_epochs=(1,), seed=(0,))
    monkeypatch.setattr(glue_grid, "finetune", write_finished_result)
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    report = glue.run_glue(".", [data], grid, tmp_path / "out")
    # before: results-.md, "GLUE results for :"
    assert report["table"]["md"] == tmp_path / "out" / "results-my-model.md"
    assert report["table"]["md"].read_text().startswith("Finetuning results for my-model: ")
    (tmp_path / "a-file").write_text("")
    assert glue.main([".", "--out", str(tmp_path / "a-file"), "--glue-dir", str(GLUE_DIR)]) == 2
    assert capsys.readouterr().err.strip() == (f"bbert finetune: error: --out {tmp_path / 'a-file'} "
                                               "is a file: give a folder for the results")


def test_a_capped_training_set_of_one_class_is_refused(tmp_path):
    # a file sorted by label: its first rows are all one class (before: trained on them silently)
    data = _load(tmp_path, "sentence\tlabel\n" + "".join(f"s{i}\tneg\n" for i in range(5)) + "t\tpos\n")
    config = glue.FinetuneConfig(max_train_examples=4, progress=False)
    with pytest.raises(ValueError, match=r"custom: the first 4 training examples all have the label "
                                         r"'neg': shuffle the training file, or raise --max-train-examples"):
        glue.finetune("no-model-needed", data, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
