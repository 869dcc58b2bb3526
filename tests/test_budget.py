"""The budget planner (its arithmetic, its calibration, the command) and bbert.speed's measurements
(FLOPs, peaks, MFU, the GPU table, measure_throughput)."""
from types import SimpleNamespace

import pytest
import torch

from bbert import budget, speed
from bbert.budget import DEFAULT_MFU, PAPER_RUN, paper_plan, plan_budget
from bbert.model import BertConfig, BertForMaskedLM
from bbert.speed import (KNOWN_GPUS, compare_throughput, get_gpu, gpu_from_device_name, matmul_peak_flops,
                         measure_throughput, mfu, random_mlm_batch, seq_per_s_at_mfu,
                         training_flops_per_sequence)


def test_paper_setup_lands_near_23k_steps():
    plan = paper_plan()
    assert plan.num_gpus == 8 and plan.hours == 24 and plan.batch_size == 4096 and plan.model == "large"
    assert plan.optimizer_steps == pytest.approx(PAPER_RUN["optimizer_steps"], rel=0.05)
    # about 12 B tokens of 128-token sequences
    assert 11e9 < plan.tokens < 13e9


def test_arithmetic_is_consistent():
    plan = plan_budget(4, "a100", 10, price_per_gpu_hour=2.5, batch_size=1024, seq_len=128)
    assert plan.cost == pytest.approx(4 * 10 * 2.5)
    assert plan.gpu_hours == 40
    assert plan.tokens == pytest.approx(plan.sequences * 128)
    assert plan.optimizer_steps == pytest.approx(plan.sequences / 1024)
    assert plan.sequences == pytest.approx(plan.seq_per_s_per_gpu * 4 * 10 * 3600)
    assert plan.total_flops == pytest.approx(plan.sequences * plan.flops_per_sequence)
    # table throughput = peak x MFU / FLOPs per sequence
    gpu = get_gpu("a100")
    assert plan.seq_per_s_per_gpu == pytest.approx(gpu.peak_tflops * 1e12 * DEFAULT_MFU
                                                   / plan.flops_per_sequence)
    assert plan_budget(4, "a100", 10, mfu=0.6).seq_per_s_per_gpu == pytest.approx(2 * plan.seq_per_s_per_gpu)


def test_scaling_hours_gpus_batch():
    base = plan_budget(8, "titan-v", 24)
    assert plan_budget(8, "titan-v", 48).optimizer_steps == pytest.approx(2 * base.optimizer_steps)
    assert plan_budget(16, "titan-v", 24).optimizer_steps == pytest.approx(2 * base.optimizer_steps)
    assert plan_budget(8, "titan-v", 24, batch_size=2048).optimizer_steps == pytest.approx(2 * base.optimizer_steps)
    # a smaller model costs fewer FLOPs per sequence, so the same GPUs see more sequences
    assert plan_budget(8, "titan-v", 24, model="base").sequences > 2 * base.sequences
    # the sparse MLM head saves FLOPs
    dense = plan_budget(8, "titan-v", 24, sparse_mlm_head=False)
    assert dense.flops_per_sequence > base.flops_per_sequence
    # a faster GPU buys proportionally more
    h100 = plan_budget(8, "h100", 24)
    assert h100.optimizer_steps / base.optimizer_steps == pytest.approx(989.0 / 110.0)


def test_measured_throughput_overrides_the_table():
    plan = plan_budget(2, None, 1.5, seq_per_s_per_gpu=10.0, batch_size=100, throughput_source="measured")
    assert plan.sequences == pytest.approx(10.0 * 2 * 1.5 * 3600)
    assert plan.optimizer_steps == pytest.approx(plan.sequences / 100)
    assert plan.gpu == "this device" and plan.throughput_source == "measured"


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        plan_budget(8, "gtx-480", 24)
    message = str(err.value)
    assert "gtx-480" in message
    for name in KNOWN_GPUS:
        assert name in message
    assert get_gpu("Titan V").name == "titan-v"  # spelling-tolerant lookup
    # the name nvidia-smi prints works too, whole words only
    assert get_gpu("NVIDIA H100 80GB HBM3").name == "h100"
    with pytest.raises(ValueError, match="unknown GPU 'NVIDIA L40S'"):
        get_gpu("NVIDIA L40S")


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_gpus=0), "num_gpus"),
    (dict(hours=0), "hours"),
    (dict(hours=float("inf")), "hours must be > 0 and finite"),  # printed inf steps and $inf
    (dict(hours=float("nan")), "hours must be > 0 and finite"),
    (dict(seq_per_s_per_gpu=float("nan")), "seq_per_s_per_gpu must be > 0 and finite"),
    (dict(price_per_gpu_hour=float("nan")), "price"),
    (dict(price_per_gpu_hour=-1), "price"),
    (dict(mfu=1.5), "mfu"),
    (dict(gpu=None), "seq_per_s_per_gpu"),
])
def test_bad_input_is_a_clear_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        plan_budget(**kwargs)


def test_str_is_a_readable_table_with_the_paper_line():
    text = str(paper_plan(price_per_gpu_hour=0.5))
    for label in ("optimizer steps", "sequences", "tokens", "total FLOPs", "GPU-hours", "cost", "Paper"):
        assert label in text
    assert "$96.00" in text  # 8 GPUs x 24 h x $0.5
    small = plan_budget(1, "t4", 1, model="tiny", batch_size=32)
    assert "not the paper's" in str(small)


def test_measure_throughput_times_the_steps_it_runs(monkeypatch):
    calls, step = [], speed.train_step
    monkeypatch.setattr(speed, "train_step", lambda *a: calls.append(a) or step(*a))
    clock = iter([10.0, 12.5])  # start, end: the 2 timed steps took 2.5 s
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    result = measure_throughput("tiny", seq_len=64, micro_batch_size=4, steps=2, precision="fp32")
    assert len(calls) == 3  # one warm-up step, then the 2 timed ones
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result.seq_per_s == pytest.approx(2 * 4 / 2.5)
    flops = training_flops_per_sequence(budget.model_config("tiny"), 64)
    assert result.flops_per_s == pytest.approx(result.seq_per_s * flops)
    with pytest.raises(ValueError, match="bf16"):
        measure_throughput("tiny", precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        measure_throughput("tiny", precision="half", device="cpu")


def test_measure_throughput_auto_precision_follows_fast_bf16(monkeypatch):
    for flag, precision in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv("BBERT_CPU_BF16", flag)
        result = measure_throughput("tiny", seq_len=16, micro_batch_size=2, steps=1, device="cpu")
        assert result.precision == precision  # what notebook 01 reads to pick its peak's dtype


def test_measure_throughput_and_compare_throughput_time_the_same_step(monkeypatch):
    # Both go through speed.train_step on random_mlm_batch: for one seed, their first loss is the
    # loss the model itself gives on that batch.
    losses, step = [], speed.train_step
    monkeypatch.setattr(speed, "train_step", lambda *a: losses.append(step(*a)) or losses[-1])
    measure_throughput("tiny", seq_len=32, micro_batch_size=4, steps=1, precision="fp32", device="cpu", seed=3)
    assert len(losses) == 2

    def fresh_model():  # as measure_throughput builds it
        torch.manual_seed(3)
        return BertForMaskedLM(BertConfig.from_preset("tiny", vocab_size=30522)).train()

    batch = random_mlm_batch(4, 32, 30522, 0.15, seed=3)
    expected = fresh_model()(**batch).loss.item()
    model = fresh_model()
    compare_throughput({"m": (model, torch.optim.AdamW(model.parameters(), lr=1e-4), None)}, batch,
                       rounds=1, progress=False)
    assert len(losses) == 4
    assert losses[0] == pytest.approx(expected, rel=1e-6)  # measure_throughput's warm-up step
    assert losses[2] == pytest.approx(expected, rel=1e-6)  # compare_throughput's warm-up step
    assert losses[1] == pytest.approx(losses[3], rel=1e-5)  # and the same optimizer step after it
    assert losses[1] != losses[0]


def test_cli(capsys):
    assert budget.main(["--gpus", "8", "--gpu", "titan-v", "--hours", "24", "--price", "1"]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps" in out and "$192.00" in out
    assert budget.main(["--list-gpus"]) == 0
    out = capsys.readouterr().out
    assert "h100" in out and f"{DEFAULT_MFU:.2f}" in out
    # bad input: one line naming the problem, exit 2
    for argv, words in ((["--gpu", "nope"], "unknown GPU 'nope'"), (["--hours", "0"], "hours must be > 0"),
                        (["--mfu", "2"], "mfu must be in")):
        assert budget.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bbert budget: error: {words}") and err.count("\n") == 1


def test_cli_measures_this_device(capsys):
    argv = ["--measure", "--model", "tiny", "--seq-len", "16", "--micro-batch-size", "2", "--gpus", "1",
            "--hours", "0.01"]
    if not torch.cuda.is_available():
        argv += ["--precision", "fp32"]
    assert budget.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("measured: tiny on ") and "measured on " in out


def test_budget_plots(tmp_path):
    from bbert import plot

    fig = plot.plot_budget_plan(plan_budget(2, "a10", 12, price_per_gpu_hour=1.2))
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    fig = plot.plot_gpu_table()
    assert len(fig.axes[0].patches) == len(KNOWN_GPUS)
    fig.savefig(tmp_path / "gpus.png")
    assert (tmp_path / "gpus.png").stat().st_size > 1000


def test_matmul_peak_defaults_to_the_native_precision(monkeypatch):
    seen, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.append(a.dtype) or mm(a, b))
    for flag, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv("BBERT_CPU_BF16", flag)
        seen.clear()
        matmul_peak_flops(n=64, min_seconds=0.0)
        assert seen and set(seen) == {dtype}


@pytest.mark.parametrize("clock", ["wall", "thread"])
def test_matmul_peak_is_flops_over_the_chosen_clock(monkeypatch, clock):
    # One function serves the budget chapter (wall clock, all threads) and the model chapter's
    # one-thread comparison (that thread's CPU time): each reads its own clock and thread count.
    ticks = iter(range(100))
    fake = lambda: 0.25 * next(ticks)  # noqa: E731
    other = lambda: pytest.fail("read the wrong clock")  # noqa: E731
    clocks = {"perf_counter": fake, "thread_time": other} if clock == "wall" else \
             {"perf_counter": other, "thread_time": fake}
    monkeypatch.setattr(speed, "time", SimpleNamespace(**clocks))
    threads, seen, mm = torch.get_num_threads(), [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.append((a.dtype, torch.get_num_threads())) or mm(a, b))
    peak = matmul_peak_flops(torch.float32, n=32, min_seconds=1.0, clock=clock)
    assert peak == 2 * 32**3 * 4 / 1.0  # 4 timed products of 0.25 s each (after an untimed warm-up)
    assert seen == [(torch.float32, threads if clock == "wall" else 1)] * 5
    assert torch.get_num_threads() == threads  # restored


def test_matmul_peak_bad_clock():
    with pytest.raises(ValueError, match="clock"):
        matmul_peak_flops(n=8, clock="cpu")
    with pytest.raises(ValueError, match="wall"):
        matmul_peak_flops(n=8, device="cuda", clock="thread")


def test_flops_and_mfu():
    config = BertConfig.from_preset("large", vocab_size=30522)
    h, L, v = 1024, 24, 30528  # the padded vocabulary
    encoder = L * 128 * (2 * (4 * h * h + 2 * h * 4 * h) + 2 * 2 * 128 * h)
    head = 2 * (h * h + h * v)
    assert training_flops_per_sequence(config, 128, 0.15) == pytest.approx(3 * (encoder + 0.15 * 128 * head))
    assert training_flops_per_sequence(config, 128, 0.15, sparse_mlm_head=False) == \
        pytest.approx(3 * (encoder + 128 * head))
    assert mfu(1e9, 50.0, 1e11) == pytest.approx(0.5)
    assert mfu(1e9, 50.0, 1e11, n_devices=4) == pytest.approx(0.125)
    # the inverse: the speed an MFU means, as the planner and the GLUE cost model use it
    assert seq_per_s_at_mfu(1e9, 0.5, 1e11) == pytest.approx(50.0)
    assert seq_per_s_at_mfu(1e9, 0.125, 1e11, n_devices=4) == pytest.approx(50.0)
    assert seq_per_s_at_mfu(2.4e11, mfu(2.4e11, 37.5, 125e12, 8), 125e12, 8) == pytest.approx(37.5)


@pytest.mark.parametrize("device_name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 2080 Ti", "rtx-2080-ti"), ("Tesla V100-SXM2-32GB", "v100"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A10", "a10"), ("NVIDIA TITAN V", "titan-v"),
    ("NVIDIA TITAN RTX", "titan-rtx"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", None), ("NVIDIA B200", None),
])
def test_gpu_from_device_name_matches_whole_words(device_name, key):
    gpu = gpu_from_device_name(device_name)
    assert (gpu.name if gpu else None) == key
