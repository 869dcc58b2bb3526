"""The budget planner: its arithmetic, the GPU table's calibration, the measurement, the command."""
import pytest

from bbert import budget
from bbert.budget import KNOWN_GPUS, PAPER_RUN, get_gpu, measure_throughput, paper_plan, plan_budget


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
    assert plan.seq_per_s_per_gpu == pytest.approx(gpu.peak_tflops * 1e12 * gpu.assumed_mfu
                                                   / plan.flops_per_sequence)


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


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_gpus=0), "num_gpus"),
    (dict(hours=0), "hours"),
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


def test_measure_throughput_runs_real_steps():
    result = measure_throughput("tiny", seq_len=64, micro_batch_size=4, steps=2, precision="fp32")
    assert result.device == "cpu" and result.seq_per_s > 0
    flops = budget.training_flops_per_sequence(budget.model_config("tiny"), 64)
    assert result.flops_per_s == pytest.approx(result.seq_per_s * flops)
    with pytest.raises(ValueError, match="bf16"):
        measure_throughput("tiny", precision="fp16", device="cpu")


def test_measure_throughput_auto_precision_follows_fast_bf16(monkeypatch):
    for flag, precision in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv("BBERT_CPU_BF16", flag)
        result = measure_throughput("tiny", seq_len=16, micro_batch_size=2, steps=1, device="cpu")
        assert result.precision == precision  # what notebook 01 reads to pick its peak's dtype


def test_cli(capsys):
    assert budget.main(["--gpus", "8", "--gpu", "titan-v", "--hours", "24", "--price", "1"]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps" in out and "$192.00" in out
    assert budget.main(["--list-gpus"]) == 0
    assert "h100" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        budget.main(["--gpu", "nope"])
    assert "unknown GPU 'nope'" in capsys.readouterr().err


def test_budget_plots(tmp_path):
    from bbert import plot

    fig = plot.plot_budget_plan(plan_budget(2, "a10", 12, price_per_gpu_hour=1.2))
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    fig = plot.plot_gpu_table()
    assert len(fig.axes[0].patches) == len(KNOWN_GPUS)
    fig.savefig(tmp_path / "gpus.png")
    assert (tmp_path / "gpus.png").stat().st_size > 1000


def test_matmul_peak_defaults_to_the_native_precision(monkeypatch):
    import torch

    from bbert.budget import matmul_peak_flops

    seen, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.append(a.dtype) or mm(a, b))
    for flag, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv("BBERT_CPU_BF16", flag)
        seen.clear()
        assert matmul_peak_flops(n=64, min_seconds=0.0) > 0
        assert seen and set(seen) == {dtype}


@pytest.mark.parametrize("device_name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 2080 Ti", "rtx-2080-ti"), ("Tesla V100-SXM2-32GB", "v100"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A10", "a10"), ("NVIDIA TITAN V", "titan-v"),
    ("NVIDIA TITAN RTX", "titan-rtx"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", None), ("NVIDIA B200", None),
])
def test_gpu_from_device_name_matches_whole_words(device_name, key):
    from bbert.budget import gpu_from_device_name

    gpu = gpu_from_device_name(device_name)
    assert (gpu.name if gpu else None) == key
