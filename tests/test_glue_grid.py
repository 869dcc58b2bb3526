"""GLUE grid and command line: the presets against their sources, config precedence, restartable
runs, the cost arithmetic, length grouping, one-line errors and progress output to a pipe."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bbert import glue, progress
from bbert.budget import DEFAULT_MFU, model_config
from bbert.speed import get_gpu, training_flops_per_sequence
from bbert.glue import grid as glue_grid
from bbert.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(__file__).parent / "fixtures" / "glue" / "glue_data"


# ---- presets ------------------------------------------------------------------------------

# Restated from the sources, so that a change of the preset alone fails here: BERT's grid,
# Devlin et al. (2019), appendix A.3, with the 24hBERT paper's 5 seeds and median (Izsak,
# Berchansky & Levy 2021, appendix B), as BERT_GRID_TABLE says.
BERT_GRID = {"lr": (2e-5, 3e-5, 5e-5), "batch_size": (16, 32), "num_epochs": (2, 3, 4), "seeds": 5}


def _docstring_table(text: str) -> dict[str, tuple]:
    """``| name | v1, v2 | source |`` rows of a Markdown table -> ``{name: (v1, v2)}`` as numbers."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] not in ("hyperparameter", "---"):
            rows[cells[0]] = tuple(float(v) for v in cells[1].split(","))
    return rows


def test_bert_preset_is_the_default_and_matches_the_table_it_cites():
    preset = glue.GRID_PRESETS["bert"]
    table = _docstring_table(glue.BERT_GRID_TABLE)
    text = " ".join(glue.BERT_GRID_TABLE.split())
    assert "Devlin et al. 2019, appendix A.3" in text and "median of the best configuration" in text
    assert "It is not the 24hBERT paper's own grid" in text  # its Table 7 is not in bbert
    for axis in ("lr", "batch_size", "num_epochs"):
        assert tuple(preset[axis]) == pytest.approx(table[axis]), axis
        assert tuple(preset[axis]) == pytest.approx(BERT_GRID[axis]), axis
    assert len(preset["seed"]) == int(table["seeds"][0]) == BERT_GRID["seeds"]
    grid = glue.GridConfig()
    assert (grid.lr, grid.batch_size, grid.num_epochs, grid.seed) == tuple(
        tuple(preset[a]) for a in ("lr", "batch_size", "num_epochs", "seed"))
    assert len(grid.runs()) == 3 * 2 * 3 * 5
    assert glue.build_parser().parse_args(["m", "--out", "o"]).grid == "bert"


def test_no_preset_claims_to_be_the_papers_grid(capsys):
    assert "paper" not in glue.GRID_PRESETS
    assert "not the 24hBERT paper's own grid" in glue.GRID_SOURCES["bert"]
    with pytest.raises(ValueError, match="grid preset 'paper' is now called 'bert'"):
        glue.GridConfig.from_preset("paper")
    assert glue.main(["m", "--out", "o", "--grid", "paper"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bbert finetune: error: grid preset 'paper' is now called 'bert'")
    assert err.count("\n") == 1 and "use --grid bert" in err


def test_official_preset_and_unknown_names():
    # IntelLabs/academic-budget-bert README, "Example for finetuning on MRPC"
    official = glue.GridConfig.from_preset("official")
    run = official.runs()[0]
    assert (run.lr, run.batch_size, run.num_epochs, run.warmup_steps, run.weight_decay) == (
        5e-5, 32, 5, 50, 0.01)
    with pytest.raises(ValueError, match="unknown grid preset 'nope'.*bert"):
        glue.GridConfig.from_preset("nope")


def test_command_line_builds_the_grid_in_order(tmp_path):
    parser = glue.build_parser()
    (tmp_path / "grid.yaml").write_text("lr: [1e-5, 2e-5]\nbase:\n  max_seq_length: 64\n")
    args = parser.parse_args(["m", "--out", "o", "--grid", "bert", "--config", str(tmp_path / "grid.yaml"),
                              "--set", "base.precision=fp32", "--set", "lr=[7e-5]", "--seeds", "3,4",
                              "--no-save-models", "--weight-decay", "0.1"])
    grid = glue.build_grid(args)
    assert grid.lr == (7e-5,)                     # --set after --config
    assert grid.batch_size == (16, 32)            # from the bert preset
    assert grid.seed == (3, 4)                    # the shortcut flag last
    assert (grid.base.max_seq_length, grid.base.precision, grid.base.save_best_model,
            grid.base.weight_decay) == (64, "fp32", False, 0.1)
    assert glue.build_grid(parser.parse_args(["m", "--out", "o"])).lr == glue.GridConfig().lr


@pytest.mark.parametrize("argv, message", [
    (["--set", "base.precision=fp8"], r"precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (["--set", "base.learning_rate=1e-5"], r"unknown config field 'base.learning_rate'. Known fields: lr, batch_size"),
    (["--lrs", "fast"], r"lr\[0\] must be a number"),
    (["--set", "seed=[]"], r"every grid axis"),
])
def test_bad_grid_input_is_one_line_and_exit_2(argv, message, capsys):
    assert glue.main(["model", "--out", "x", "--glue-dir", str(GLUE_DIR)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bbert finetune: error: "), err
    assert re.search(message, err), err


def test_empty_dev_file_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    rte = tmp_path / "RTE"
    rte.mkdir()
    (rte / "train.tsv").write_text((GLUE_DIR / "RTE" / "train.tsv").read_text())
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    assert glue.main(["model", "--out", str(tmp_path / "out"), "--glue-dir", str(tmp_path),
                      "--tasks", "rte"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{rte / 'dev.tsv'} holds no examples" in err and "restore it from the GLUE download" in err
    assert not (tmp_path / "out").exists()  # nothing was started


# ---- restartable runs ---------------------------------------------------------------------


def _finished(config, data, score=0.5, model="unused") -> dict:
    spec = data.spec
    dev = {s: {m: score for m in spec.metrics} for s in spec.dev_splits}
    return {"result_version": glue.RESULT_VERSION, "task": spec.name, "config": config.name,
            "seed": config.seed, "score": score, "dev": dev, "model_path": str(Path(model).resolve()),
            "data_fingerprint": data.fingerprint(), "hyperparameters": dataclasses.asdict(config)}


def test_run_without_result_is_redone_and_with_result_skipped(tmp_path, monkeypatch):
    data = glue.load_glue_dir("rte", GLUE_DIR)
    grid = glue.GridConfig(lr=(1e-4,), batch_size=(4,), num_epochs=(1,), seed=(0, 1, 2))
    killed, done, old = (glue.run_dir(tmp_path, "rte", c) for c in grid.runs())
    # killed mid-run: predictions and weights written, result.json not yet
    (killed / "best_model").mkdir(parents=True)
    (killed / "predictions-test.tsv").write_text("index\tprediction\n0\tentailment\n")
    atomic_write_json(done / "result.json", _finished(grid.runs()[1], data, 0.75))
    # finished by an older bbert (learning_rate/bf16 names, no version): not a finished run
    atomic_write_json(old / "result.json", {"task": "rte", "config": "lr0.0001-bs4-ep1", "seed": 2,
                                            "hyperparameters": {"learning_rate": 1e-4, "bf16": None}})
    assert glue.load_result(killed) is None and glue.load_result(old) is None
    calls = []

    def fake_finetune(model_path, data, config, out_dir):
        calls.append(config.seed)
        atomic_write_json(Path(out_dir) / "result.json", _finished(config, data))

    monkeypatch.setattr(glue_grid, "finetune", fake_finetune)
    results = glue.grid_search("unused", data, grid, tmp_path, num_gpus=0)
    assert calls == [0, 2]
    assert [r["score"] for r in results] == [0.5, 0.75, 0.5]


def test_finetune_clears_a_stale_result_before_it_starts(tmp_path, monkeypatch):
    """A run that is started again must not look finished while it runs (or after it dies)."""
    data = glue.load_glue_dir("rte", GLUE_DIR)
    config = glue.FinetuneConfig(num_epochs=1, batch_size=4, progress=False, save_best_model=False)
    out = tmp_path / "run"
    atomic_write_json(out / "result.json", _finished(config, data))

    def die(*args, **kwargs):
        assert glue.load_result(out) is None  # already cleared when the model loads
        raise RuntimeError("killed")

    monkeypatch.setattr(sys.modules["bbert.glue.finetuning"], "load_classifier", die)
    with pytest.raises(RuntimeError, match="killed"):
        glue.finetune("unused", data, config, out)
    assert not (out / "result.json").exists()


# ---- cost ---------------------------------------------------------------------------------


def test_grid_cost_arithmetic():
    grid = glue.GridConfig(lr=(1e-5, 2e-5), batch_size=(16, 32), num_epochs=(2, 3), seed=(0, 1, 2))
    rows = glue.grid_cost(grid, seconds_per_example=0.5, speed_factor=10.0,
                          train_sizes={"a": 1000, "b": 200})
    # 2 lr x 2 batch sizes x (2 + 3 epochs) x 3 seeds = 60 example-epochs per example
    assert [r["example_epochs"] for r in rows] == [60_000, 12_000, 72_000]
    assert rows[0]["runs"] == 24 and rows[-1]["runs"] == 48
    assert rows[0]["hours"] == pytest.approx(60_000 * 0.05 / 3600)
    assert rows[-1]["hours"] == pytest.approx(72_000 * 0.05 / 3600)
    # the budget arithmetic: large-model FLOPs over the GPU's peak x the planner's MFU
    card = get_gpu("titan-v")
    flops = training_flops_per_sequence(model_config("large"), 128, masked_fraction=0.0)
    assert glue.gpu_seconds_per_example("titan-v") == pytest.approx(
        flops / (card.peak_tflops * 1e12 * DEFAULT_MFU))
    assert glue.gpu_seconds_per_example("h100") < glue.gpu_seconds_per_example("titan-v")


# ---- length grouping ------------------------------------------------------------------------


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 128, (1000,), generator=gen).tolist()

    def pad_share(batches):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    grouped = glue.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1))
    plain = glue.random_batches(len(lengths), 16, torch.Generator().manual_seed(1))
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert sorted(len(b) for b in grouped) == [8] + [16] * 62
    assert pad_share(grouped) < 0.1 < 0.3 < pad_share(plain)
    # the batches come in random order, not longest to shortest
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)
    again = glue.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert again == grouped


# ---- progress ---------------------------------------------------------------------------------


def test_progress_to_a_file_is_plain_periodic_lines():
    out = io.StringIO()  # not a terminal
    bar = glue.Progress(total=200, desc="RTE lr1e-05", stream=out, every=0.25)
    for _ in range(200):
        bar.update(1, loss="0.500")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "RTE lr1e-05: 50/200 steps (25%), loss 0.500"
    assert lines[-1] == "RTE lr1e-05: 200/200 steps (100%), loss 0.500"
    assert len(lines) == 4
    silent = io.StringIO()
    quiet = glue.Progress(total=10, desc="x", enabled=False, stream=silent)
    quiet.update(10)
    quiet.close()
    assert silent.getvalue() == ""


def test_progress_without_a_total_counts_at_intervals(monkeypatch):
    out, clock = io.StringIO(), [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress(None, "prepare", unit="tokens", seconds=30.0, stream=out)
    for _ in range(6):
        clock[0] += 10.0
        bar.update(1_000, docs=3)
    bar.close()
    assert out.getvalue().splitlines() == ["prepare: 3,000 tokens, docs 3", "prepare: 6,000 tokens, docs 3"]


def test_progress_in_a_notebook_is_a_widget_or_nothing_never_stderr(monkeypatch, capsys):
    from tqdm.notebook import tqdm_notebook

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    bar = progress.Progress(total=20, desc="RTE lr1e-05", every=0.25)
    assert isinstance(bar.bar, tqdm_notebook) and not bar.bar.disable
    for _ in range(20):
        bar.update(1, loss="0.500")
    bar.close()
    assert capsys.readouterr().err == ""  # a kernel's stderr is a red block on the page
    monkeypatch.setattr(progress, "has_widgets", lambda: False)
    silent = progress.Progress(total=20, desc="RTE lr1e-05", every=0.25)
    for _ in range(20):
        silent.update(1, loss="0.500")
    silent.close()
    assert capsys.readouterr() == ("", "")


def test_finetuning_progress_in_a_real_kernel_leaves_no_stderr_output():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    code = ("from bbert.progress import Progress\n"
            "bar = Progress(total=30, desc='RTE lr1e-05 seed 0')\n"
            "for _ in range(30):\n"
            "    bar.update(1, loss='0.500')\n"
            "bar.close()")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = notebook.cells[0].outputs
    assert not [o for o in outputs if o.get("name") == "stderr"], outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


def _tiny_model(folder: Path) -> Path:
    from bbert.data.readers import read_sample_corpus
    from bbert.data.tokenizer import train_tokenizer
    from bbert.model import BertConfig, BertForMaskedLM

    tok = train_tokenizer([d["text"] for d in read_sample_corpus()[::20]], vocab_size=1000,
                          max_seq_length=128)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=len(tok), max_position_embeddings=128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_command_output_to_a_pipe_has_no_carriage_returns(tmp_path):
    model = _tiny_model(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bbert.cli", "finetune", str(model), "--out", str(tmp_path / "out"),
           "--glue-dir", str(GLUE_DIR), "--tasks", "rte", "--grid", "tiny", "--set", "seed=[0]",
           "--lrs", "1e-3", "--epochs", "2", "--batch-sizes", "2", "--no-save-models",
           "--model-name", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    # RTE's fixture has 6 training examples: 3 steps an epoch, 6 in all
    assert "RTE lr0.001-bs2-ep2 seed 0: 6/6 steps (100%)" in proc.stderr
    assert "| RTE | accuracy |" in proc.stdout
    result = json.loads((tmp_path / "out" / "runs" / "rte" / "lr0.001-bs2-ep2" / "0" / "result.json").read_text())
    assert result["hyperparameters"]["lr"] == 1e-3 and result["precision"] == "fp32"
