"""GLUE: loaders (both on-disk formats, custom), metrics, selection, re-run skipping,
submission files, and a tiny end-to-end finetune from a tiny pretrained checkpoint."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from bbert import glue
from bbert.atomic import atomic_write_json, atomic_write_text
from bbert.glue import grid as glue_grid
from bbert.hub import HubUnavailableError

FIXTURES = Path(__file__).parent / "fixtures" / "glue"
GLUE_DIR = FIXTURES / "glue_data"

# (task, split, n rows, first example's idx, text_a, text_b, label) from the fixture files
EXPECTED = {
    "cola": ("validation", 4, 0, "rain fell softly over the town .", None, 1),
    "sst2": ("train", 6, 0, "a warm and funny film ", None, 1),
    "mrpc": ("train", 6, 0, "the cat sat on the warm mat .", "the cat is on a mat .", 0),
    "stsb": ("validation", 3, 5, "rain fell softly over the town .", "the town was dry all day .", 0.0),
    "qqp": ("validation", 2, 50, "how do i fix a flat tire ?", "how can i repair a flat tire ?", 1),
    "mnli": ("validation_mismatched", 4, 3, "the river flows past the old mill .",
             "water moves by the mill .", 0),
    "qnli": ("train", 4, 0, "where did the cat sit ?", "the cat sat on the warm mat .", 0),
    "rte": ("validation", 3, 0, "rain fell softly over the town .", "the town was dry all day .", 0),
    "wnli": ("train", 5, 0, "the cat sat on the warm mat .", "the cat is on a mat .", 1),
}


# ---- tasks and loaders ---------------------------------------------------------------

def test_nine_tasks_with_names_people_type():
    assert sorted(glue.GLUE_TASKS) == sorted(
        ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
    assert glue.get_task("SST-2") is glue.get_task("sst2") is glue.get_task("sst-2")
    assert glue.get_task("STS-B").is_regression and glue.get_task("stsb").num_labels == 1
    assert glue.get_task("mnli").num_labels == 3
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'.*cola"):
        glue.get_task("squad")


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_glue_dir_loader_reads_each_original_format(task):
    data = glue.load_glue_dir(task, GLUE_DIR)
    spec = data.spec
    split, n, idx, a, b, label = EXPECTED[task]
    ex = data.splits[split][0]
    assert len(data.splits[split]) == n
    assert (ex["idx"], ex["text_a"], ex["text_b"], ex["label"]) == (idx, a, b, label)
    for dev in spec.dev_splits:
        assert all(e["label"] is not None for e in data.splits[dev])
    for test in spec.test_splits:
        if test in data.splits:
            assert all(e["label"] is None for e in data.splits[test])
            assert [e["idx"] for e in data.splits[test]] == list(range(len(data.splits[test])))


def test_cola_headerless_labels_and_mnli_extra_splits():
    cola = glue.load_glue_dir("CoLA", GLUE_DIR)
    assert [e["label"] for e in cola.splits["train"]] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert cola.splits["test"][2]["text_a"] == "she reads a long book every night ."
    mnli = glue.load_glue_dir("mnli", GLUE_DIR)
    assert set(mnli.splits) == {"train", "validation_matched", "validation_mismatched",
                                "test_matched", "test_mismatched", "test_ax"}
    assert [e["label"] for e in mnli.splits["validation_matched"]] == [0, 1, 2, 0]
    assert len(mnli.splits["test_ax"]) == 2
    # STS-B keeps float scores; a task folder can be passed directly too
    stsb = glue.load_glue_dir("stsb", GLUE_DIR / "STS-B")
    assert [e["label"] for e in stsb.splits["train"]] == [5.0, 1.2, 0.4, 3.8, 4.2, 0.0]


def test_glue_dir_errors_name_the_problem(tmp_path):
    (tmp_path / "CoLA").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no RTE folder in .* \(its folders: CoLA\): add "
                                                r"glue_data/RTE/ .*--hub"):
        glue.load_glue_dir("rte", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--glue-dir .*nowhere is not a folder"):
        glue.load_glue_dir("rte", tmp_path / "nowhere")
    # a task's own folder works for that task, and names the mistake for the others
    assert len(glue.load_glue_dir("rte", GLUE_DIR / "RTE").splits["train"]) == 5
    with pytest.raises(FileNotFoundError, match=r"RTE is RTE's folder, not CoLA's: pass the glue_data "
                                                r"folder above it, or --tasks rte"):
        glue.load_glue_dir("cola", GLUE_DIR / "RTE")
    bad = tmp_path / "RTE"
    bad.mkdir()
    with pytest.raises(FileNotFoundError, match=r"RTE/train.tsv not found.*--hub"):
        glue.load_glue_dir("rte", tmp_path)
    (bad / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (bad / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(ValueError, match=r"line 2: label 'maybe' is not one of"):
        glue.load_glue_dir("rte", tmp_path)
    (bad / "train.tsv").write_text("idx\ttext\n0\ta\n")
    with pytest.raises(ValueError, match=r"no column 'sentence1'"):
        glue.load_glue_dir("rte", tmp_path)


def test_broken_glue_training_lines_are_skipped_and_counted_dev_lines_refused(tmp_path, capsys):
    # some GLUE downloads of QQP's train.tsv hold lines cut short (GLUE-baselines issue 5)
    qqp = tmp_path / "QQP"
    shutil.copytree(GLUE_DIR / "QQP", qqp)
    train = (qqp / "train.tsv").read_text().splitlines(keepends=True)
    (qqp / "train.tsv").write_text("".join(train[:2] + ["\tWas it real?\t0\n"] + train[2:]))
    data = glue.load_glue_dir("qqp", tmp_path)
    assert len(data.splits["train"]) == len(train) - 1  # every complete row, nothing else
    assert f"train.tsv: skipped 1 broken line(s) with fewer than 6 columns (line(s) 3); kept " \
           f"{len(train) - 1} examples" in capsys.readouterr().out
    dev = (qqp / "dev.tsv").read_text()
    (qqp / "dev.tsv").write_text(dev + "\tWas it real?\t0\n")
    with pytest.raises(ValueError, match=r"dev.tsv, line \d+: 3 columns, expected at least 6"):
        glue.load_glue_dir("qqp", tmp_path)


def test_hub_fails_at_once_offline_naming_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"--glue-dir"):
        glue.load_task("mrpc", hub=True)
    with pytest.raises(ValueError, match="glue_dir"):
        glue.load_task("mrpc")


def test_custom_task_from_tsv_csv_and_jsonl():
    data = glue.load_custom_task(FIXTURES / "custom" / "train.tsv", FIXTURES / "custom" / "dev.csv",
                                 ["text"], "topic", test_file=FIXTURES / "custom" / "test.jsonl",
                                 name="topic")
    assert data.spec.labels == ("animal", "other")
    assert data.spec.metrics == ("accuracy", "f1")
    assert [e["label"] for e in data.splits["train"]] == [0, 0, 1, 1, 1, 1]
    assert data.splits["validation"][2] == {"idx": 2, "text_a": "the dog, the cat and a bird",
                                            "text_b": None, "label": 0}
    assert data.splits["test"][1]["text_a"] == "a dog ran across the quiet field ."
    assert data.splits["test"][1]["label"] is None
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\].*\['text', 'topic'\]"):
        glue.load_custom_task(FIXTURES / "custom" / "train.tsv", FIXTURES / "custom" / "dev.csv",
                              ["sentence"], "topic")


def test_custom_regression_task(tmp_path):
    (tmp_path / "tr.csv").write_text("a,b,y\nx,y,1.5\nz,w,0.25\n")
    data = glue.load_custom_task(tmp_path / "tr.csv", tmp_path / "tr.csv", ["a", "b"], "y",
                                 regression=True)
    assert data.spec.is_regression and data.spec.main_metric == "spearman"
    assert [(e["text_b"], e["label"]) for e in data.splits["train"]] == [("y", 1.5), ("w", 0.25)]


# ---- metrics (hand-computed) ---------------------------------------------------------

def test_metrics_match_hand_computed_values():
    # TP=2 FN=1 TN=2 FP=1: MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    m = glue.compute_metrics(["matthews_corr", "accuracy"], [1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 1, 0])
    assert m["matthews_corr"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # TP=2 FP=1 FN=2: precision 2/3, recall 1/2, F1 = 4/7; 3 of 6 right
    m = glue.compute_metrics(["accuracy", "f1"], [1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 0, 0])
    assert m == pytest.approx({"accuracy": 0.5, "f1": 4 / 7})
    # Pearson of (1,2,3) vs (1,2,4) = 3 / sqrt(2 * 42/9) = 9 / sqrt(84); Spearman ranks agree
    m = glue.compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert m == pytest.approx({"pearson": 9 / math.sqrt(84), "spearman": 1.0})
    # one swapped pair of 4: rho = 1 - 6*2 / (4*15) = 0.8
    assert glue.compute_metrics(["spearman"], [1, 3, 2, 4], [1, 2, 3, 4])["spearman"] == pytest.approx(0.8)
    # a constant prediction correlates with nothing (0, not NaN, so medians stay defined)
    assert glue.compute_metrics(["pearson", "spearman"], [2.0, 2.0, 2.0], [1.0, 2.0, 4.0]) == {
        "pearson": 0.0, "spearman": 0.0}
    assert glue.compute_metrics(["matthews_corr"], [1, 1, 1, 1], [1, 0, 1, 0])["matthews_corr"] == 0.0
    with pytest.raises(ValueError, match="same length"):
        glue.compute_metrics(["accuracy"], [1, 0], [1])


# ---- grid, selection, re-run skipping ------------------------------------------------

def _result(config, seed, score, spec):
    dev = {s: {m: score for m in spec.metrics} for s in spec.dev_splits}
    return {"result_version": glue.RESULT_VERSION, "task": spec.name, "config": config, "seed": seed,
            "score": score, "dev": dev}


def _settings(data, config, model="unused") -> dict:
    """The fields of result.json that say what made a run (a re-run checks them)."""
    return {"model_path": str(Path(model).resolve()), "data_fingerprint": data.fingerprint(),
            "hyperparameters": dataclasses.asdict(config)}


def test_median_of_best_selection():
    spec = glue.get_task("rte")
    results = [_result("A", s, v, spec) for s, v in zip((0, 1, 2), (0.5, 0.9, 0.6))]
    results += [_result("B", s, v, spec) for s, v in zip((0, 1, 2), (0.7, 0.65, 0.1))]
    sel = glue.select_best(results, spec)
    # A has the single best run (0.9) but B has the better median (0.65 > 0.6)
    assert sel["config"] == "B" and sel["score"] == pytest.approx(0.65)
    assert sel["per_config"] == pytest.approx({"A": 0.6, "B": 0.65})
    assert sel["median_run"] == 1 and sel["dev"]["validation"]["accuracy"] == pytest.approx(0.65)
    # an even number of seeds: the reported number is the mean of the middle two
    sel = glue.select_best([_result("C", s, v, spec) for s, v in enumerate((0.2, 0.4, 0.6, 0.8))], spec)
    assert sel["score"] == pytest.approx(0.5) and sel["median_run"] == 1
    with pytest.raises(ValueError, match="no finished runs"):
        glue.select_best([None], spec)


def test_grid_runs_and_folder_names():
    grid = glue.GridConfig(lr=(1e-5, 3e-5), batch_size=(16,), num_epochs=(2, 3), seed=(0, 1, 2))
    runs = grid.runs()
    assert len(runs) == 12
    assert {r.name for r in runs} == {"lr1e-05-bs16-ep2", "lr1e-05-bs16-ep3",
                                      "lr3e-05-bs16-ep2", "lr3e-05-bs16-ep3"}
    assert glue.run_dir("out", "rte", runs[1]) == Path("out/runs/rte/lr1e-05-bs16-ep2/1")


def test_rerun_skips_finished_runs(tmp_path, monkeypatch):
    data = glue.load_glue_dir("rte", GLUE_DIR)
    grid = glue.GridConfig(lr=(1e-4, 2e-4), batch_size=(4,), num_epochs=(1,), seed=(0, 1))
    calls = []

    def fake_finetune(model_path, data, config, out_dir):
        calls.append((config.name, config.seed))
        result = {**_result(config.name, config.seed, config.lr * 1000 + config.seed, data.spec),
                  **_settings(data, config)}
        atomic_write_json(Path(out_dir) / "result.json", result)
        return result

    monkeypatch.setattr(glue_grid, "finetune", fake_finetune)
    # one run finished earlier; one crashed mid-write (truncated result.json) and must re-run
    done = glue.run_dir(tmp_path, "rte", grid.runs()[0])
    atomic_write_json(done / "result.json", {**_result("lr0.0001-bs4-ep1", 0, 0.42, data.spec),
                                             **_settings(data, grid.runs()[0])})
    crashed = glue.run_dir(tmp_path, "rte", grid.runs()[3])
    crashed.mkdir(parents=True)
    (crashed / "result.json").write_text('{"task": "rte", "sco')
    results = glue.grid_search("unused", data, grid, tmp_path, num_gpus=0)
    assert calls == [("lr0.0001-bs4-ep1", 1), ("lr0.0002-bs4-ep1", 0), ("lr0.0002-bs4-ep1", 1)]
    assert results[0]["score"] == 0.42 and len(results) == 4
    calls.clear()
    again = glue.grid_search("unused", data, grid, tmp_path, num_gpus=0)
    assert calls == [] and again == results


# ---- results table and submission ----------------------------------------------------

def test_results_table_beside_the_papers(tmp_path):
    sels = {
        "mnli": {"config": "lr3e-05-bs32-ep3", "seeds": [0, 1, 2],
                 "dev": {"validation_matched": {"accuracy": 0.8012},
                         "validation_mismatched": {"accuracy": 0.7988}}},
        "mrpc": {"config": "lr5e-05-bs16-ep4", "seeds": [0, 1, 2, 3, 4],
                 "dev": {"validation": {"accuracy": 0.80, "f1": 0.8666}}},
    }
    rows = glue.results_rows(sels)
    assert [(r["task"], r["dev_median"], r["paper_24hbert_test"], r["bert_base_test"]) for r in rows] == [
        ("MNLI-m", 80.1, 84.4, 84.6), ("MNLI-mm", 79.9, 83.8, 83.4), ("MRPC", 86.7, 87.5, 88.9)]
    assert rows[2]["metric"] == "F1" and rows[2]["all_dev_metrics"] == "accuracy 80.0 / F1 86.7"
    paths = glue.write_results_table(rows, tmp_path, "tiny bert")
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["task"] for r in table] == ["MNLI-m", "MNLI-mm", "MRPC"]
    assert table[2]["seeds"] == "5" and table[0]["paper_24hbert_test"] == "84.4"
    md = paths["md"].read_text()
    assert paths["md"].name == "results-tiny_bert.md"
    assert "| MRPC | F1 | 86.7 |" in md and "24hBERT (paper, test)" in md


def test_submission_files_names_and_formats(tmp_path):
    preds = {"cola": [1, 0, 1], "stsb": [5.7, 2.25, -0.3], "mnli": [0, 2, 1], "qnli": [1, 0, 0],
             "wnli": [0, 1, 1]}
    runs = {}
    for task, p in preds.items():
        data = glue.load_glue_dir(task, GLUE_DIR)
        runs[task] = tmp_path / "runs" / task
        for split in data.spec.test_splits:
            ex = data.splits[split]
            text = glue.predictions_tsv(data.spec, ex, p[:len(ex)])
            atomic_write_text(runs[task] / f"predictions-{split}.tsv", text)
    path = glue.write_submission(runs, tmp_path)
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        read = {n: zf.read(n).decode().splitlines() for n in names}
    assert names == ["AX.tsv", "CoLA.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv", "STS-B.tsv",
                     "WNLI.tsv"]
    assert read["CoLA.tsv"] == ["index\tprediction", "0\t1", "1\t0", "2\t1"]
    assert read["STS-B.tsv"] == ["index\tprediction", "0\t5.000", "1\t2.250", "2\t0.000"]
    assert read["MNLI-m.tsv"][1:] == ["0\tentailment", "1\tcontradiction", "2\tneutral"]
    assert read["AX.tsv"] == ["index\tprediction", "0\tentailment", "1\tcontradiction"]
    assert read["QNLI.tsv"][1:] == ["0\tnot_entailment", "1\tentailment", "2\tentailment"]
    assert read["WNLI.tsv"][1:] == ["0\t0", "1\t1", "2\t1"]
    assert sorted(p.name for p in (tmp_path / "submission").iterdir()) == names
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        glue.write_submission({"rte": tmp_path / "nothing"}, tmp_path / "other")


def test_cli_rejects_missing_source(capsys):
    for argv, message in [
        (["model", "--out", "x", "--tasks", "rte"], "--glue-dir"),
        (["model", "--out", "x", "--train-file", "a.tsv"], "--dev-file"),
        (["model", "--out", "x", "--glue-dir", "no/such/dir", "--tasks", "rte"],
         r"--glue-dir no/such/dir is not a folder: pass the GLUE download's glue_data folder"),
        (["model", "--out", "x", "--glue-dir", str(GLUE_DIR), "--tasks", ","], r"--tasks ',' names no task"),
    ]:
        assert glue.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("bbert finetune: error: ")
        assert re.search(message, err), err


# ---- end to end: a tiny pretrained checkpoint, finetuned on a learnable offline task ----

def _pretrain_tiny_checkpoint(work: Path, seconds: float = 30.0) -> Path:
    """A tiny BERT pretrained for ``seconds`` on the shipped corpus with bbert.data + bbert.train."""
    from bbert.data import PrepareConfig, prepare
    from bbert.run_dir import read_metrics
    from bbert.train import pretrain
    from bbert.train_config import TrainConfig

    prepare(PrepareConfig(out=str(work / "data"), vocab_size=4096, max_bytes=1_000_000,
                          val_fraction=0.03, progress=False))
    config = TrainConfig.from_preset(
        "tiny-cpu", data_dir=str(work / "data"), run_dir=str(work / "run"),
        time_budget_hours=seconds / 3600, validation_every_minutes=None,
        checkpoint_every_minutes=None, checkpoint_fractions=[], log_every_steps=5)
    run_dir = pretrain(config, resume=False)
    losses = [r["loss"] for r in read_metrics(run_dir) if r["type"] == "train"]
    assert losses[-1] < losses[0] - 1.0  # it did learn something
    return Path(run_dir)


@pytest.mark.slow
def test_tiny_finetune_scores_clearly_above_chance(tmp_path):
    import torch

    # tiny ops don't parallelise; with a busy second core two threads are ~10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _tiny_end_to_end(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _tiny_end_to_end(tmp_path):
    ckpt = _pretrain_tiny_checkpoint(tmp_path / "pretraining")  # a run dir: final/ is read
    data = glue.make_corpus_source_task(tmp_path / "task", train_per_source=150, eval_per_source=50)
    # a tiny model wants a higher lr than BERT's grid; one seed (selection is tested above)
    config = glue.FinetuneConfig(batch_size=16, progress=False)
    grid = glue.GridConfig(lr=(2e-3,), batch_size=(16,), num_epochs=(3,), seed=(0,), base=config)
    report = glue.run_glue(ckpt, [data], grid, tmp_path / "results", model_name="tiny")
    sel = report["selections"]["corpus-source"]
    # three balanced classes: chance is 1/3
    assert sel["score"] > 0.6, sel
    run = tmp_path / "results" / "runs" / "corpus-source" / "lr0.002-bs16-ep3" / "0"
    result = json.loads((run / "result.json").read_text())
    assert result["best_epoch"] in (1, 2, 3) and len(result["history"]) == 3
    assert (run / "best_model" / "model.safetensors").is_file()
    # the kept checkpoint is the best epoch: reloading it reproduces the recorded dev score
    from bbert.model import BertForSequenceClassification
    from transformers import AutoTokenizer

    best = BertForSequenceClassification.from_pretrained(run / "best_model")
    tok = AutoTokenizer.from_pretrained(run / "best_model")
    assert best.num_labels == 3
    rescored = glue.evaluate(best, tok, data)
    assert rescored["validation"]["accuracy"] == pytest.approx(result["dev"]["validation"]["accuracy"])
    lines = (run / "predictions-test.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 151
    assert {l.split("\t")[1] for l in lines[1:]} <= {"kjv", "python_docs", "wordnet"}
    with zipfile.ZipFile(report["submission"]) as zf:
        assert zf.namelist() == ["corpus-source.tsv"]
    assert "| corpus-source | accuracy |" in Path(report["table"]["md"]).read_text()
    # the command line on the GLUE-format fixtures: a grid, its table, a submission; then a
    # re-run that finds every run finished and trains nothing
    out = tmp_path / "cli"
    argv = [str(ckpt), "--out", str(out), "--glue-dir", str(GLUE_DIR), "--tasks", "RTE,STS-B",
            "--lrs", "1e-3", "--batch-sizes", "4", "--epochs", "1", "--seeds", "0,1",
            "--no-save-models", "--model-name", "tiny"]
    assert glue.main(argv) == 0
    table = list(csv.DictReader(open(out / "results-tiny.csv")))
    assert [r["task"] for r in table] == ["RTE", "STS-B"] and table[0]["seeds"] == "2"
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == ["RTE.tsv", "STS-B.tsv"]
        assert zf.read("RTE.tsv").decode().splitlines()[1].split("\t")[1] in glue.get_task("rte").labels
    assert not (out / "runs" / "rte" / "lr0.001-bs4-ep1" / "0" / "best_model").exists()
    stamp = (out / "runs" / "rte" / "lr0.001-bs4-ep1" / "0" / "result.json").stat().st_mtime_ns
    assert glue.main(argv) == 0
    assert (out / "runs" / "rte" / "lr0.001-bs4-ep1" / "0" / "result.json").stat().st_mtime_ns == stamp
