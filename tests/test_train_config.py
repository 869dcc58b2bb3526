"""TrainConfig: presets, YAML, overrides, validation errors, the generated DeepSpeed config, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from bbert.data import MaskingConfig, manifest_path
from bbert.engines import check_engine, deepspeed_config
from bbert.optim import Schedule
from bbert.train import build_parser, config_from_args, main
from bbert.train_config import TrainConfig
from bbert.precision import fast_bf16


def test_24hbert_preset_is_the_papers_run():
    c = TrainConfig.from_preset("24hbert")
    assert (c.model, c.max_seq_length, c.time_budget_hours) == ("large", 128, 24.0)
    assert c.model_overrides["pre_layernorm"] is True and c.model_overrides["sparse_mlm_head"] is True
    assert (c.optimizer, c.lr, c.betas, c.eps, c.weight_decay) == ("adamw", 1e-3, (0.9, 0.98), 1e-6, 0.01)
    assert (c.schedule, c.warmup_proportion, c.max_grad_norm) == ("time", 0.06, 0.0)
    assert (c.batch_size, c.micro_batch_size, c.precision, c.engine) == (4096, 32, "fp16", "deepspeed")
    assert c.early_stop.enabled and (c.early_stop.after_minutes, c.early_stop.max_val_loss) == (180.0, 6.0)
    assert c.validation_every_minutes and c.masking.mlm_probability == 0.15
    assert (c.masking.mask_ratio, c.masking.random_ratio) == (0.8, 0.1)
    mc = c.model_config(vocab_size=30522)
    assert (mc.num_hidden_layers, mc.hidden_size, mc.num_attention_heads) == (24, 1024, 16)
    assert mc.pre_layernorm and mc.sparse_mlm_head


def test_24hbert_deepspeed_config_matches_the_paper_on_8_gpus():
    c = TrainConfig.from_preset("24hbert")
    ds = deepspeed_config(c, world_size=8)
    assert ds["train_batch_size"] == 4096 == 32 * 8 * 16
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 16 == c.gradient_accumulation_steps(8)
    assert ds["gradient_clipping"] == 0.0  # no clipping
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 1  # DeepSpeed's fp16 is broken at stage 0
    assert "optimizer" not in ds and "scheduler" not in ds  # bbert owns both
    # on one GPU the same batch takes 128 micro-batches
    assert deepspeed_config(c, world_size=1)["gradient_accumulation_steps"] == 128


def test_24hbert_optimizer_has_the_papers_adamw_settings():
    from bbert.optim import build_optimizer
    from bbert.model import BertForMaskedLM

    c = TrainConfig.from_preset("24hbert", model="tiny", model_overrides={})
    opt = build_optimizer(BertForMaskedLM(c.model_config(128)), c.optimizer, c.lr, c.betas, c.eps, c.weight_decay)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.98), 1e-6, 0.01)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_tiny_cpu_preset_is_valid_on_this_cpu_and_lasts_minutes():
    c = TrainConfig.from_preset("tiny-cpu")
    c.validate(world_size=1, check_data=False)
    assert c.engine == "torch" and c.precision == ("bf16" if fast_bf16("cpu") else "fp32")
    schedule = Schedule.from_config(c)
    assert schedule.clock == "time" and 60 <= schedule.length <= 180


def test_tiny_cpu_preset_trains_in_fp32_without_native_bf16(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU precision check applies only without a GPU")
    monkeypatch.setenv("BBERT_CPU_BF16", "0")
    c = TrainConfig.from_preset("tiny-cpu")
    assert c.precision == "fp32"
    c.precision = "bf16"  # asked for anyway: it runs, with a warning naming the fix
    with pytest.warns(UserWarning, match="without native bf16.*precision='fp32'"):
        check_engine(c, "cpu")
    monkeypatch.setenv("BBERT_CPU_BF16", "1")
    assert TrainConfig.from_preset("tiny-cpu").precision == "bf16"


def test_yaml_round_trip(tmp_path):
    c = TrainConfig.from_preset("tiny-cpu").with_overrides(["lr=5e-4", "model.hidden_size=96"])
    path = c.to_yaml(tmp_path / "run.yaml")
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically
    back = TrainConfig.from_yaml(path)
    assert back == c and back.betas == (0.9, 0.98) and isinstance(back.betas, tuple)
    assert back.model_overrides == {"hidden_size": 96} and back.lr == 5e-4


def test_overrides_parse_values_and_nested_fields():
    c = TrainConfig.from_preset("tiny-cpu").with_overrides(
        ["lr=2e-3", "betas=[0.9, 0.999]", "early_stop.enabled=true", "early_stop.after_minutes=1",
         "masking.mlm_probability=0.2", "max_steps=null", "model=mini", "checkpoint_fractions=[0.1]",
         "model.num_hidden_layers=3", "model.pre_layernorm=true"])
    assert c.lr == 2e-3 and c.betas == (0.9, 0.999)
    assert c.early_stop.enabled and c.early_stop.after_minutes == 1.0
    assert isinstance(c.early_stop.after_minutes, float)
    assert c.masking.mlm_probability == 0.2 and c.max_steps is None and c.model == "mini"
    assert c.checkpoint_fractions == [0.1]
    assert c.model_overrides == {"num_hidden_layers": 3, "pre_layernorm": True}
    mc = c.model_config(vocab_size=100)
    assert (mc.num_hidden_layers, mc.pre_layernorm) == (3, True)  # the overrides reach the model


def test_bad_model_overrides_name_the_field_not_a_python_error():
    # hidden_size='abc' used to surface as "not all arguments converted during string formatting",
    # and an unclosed bracket as a yaml traceback
    c = TrainConfig.from_preset("tiny-cpu").with_overrides(["model.hidden_size=abc"])
    with pytest.raises(ValueError, match="model.hidden_size must be a number, got 'abc'"):
        c.validate(world_size=1, check_data=False)
    with pytest.raises(ValueError, match="model.pre_layernorm must be true or false"):
        TrainConfig.from_preset("tiny-cpu", model_overrides={"pre_layernorm": "maybe"}).model_config(100)
    with pytest.raises(ValueError, match=r"model.num_hidden_layers is not valid YAML"):
        TrainConfig.from_preset("tiny-cpu").with_overrides(["model.num_hidden_layers=[2"])


def test_unknown_fields_are_named_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'lr'"):
        TrainConfig.from_preset("tiny-cpu").with_overrides(["lrr=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        TrainConfig.from_preset("tiny-cpu").with_overrides(["lr"])
    (tmp_path / "bad.yaml").write_text("batch_sise: 8\n")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown training preset"):
        TrainConfig.from_preset("bert-huge")


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 30, "micro_batch_size": 4}, r"not divisible by micro_batch_size x world_size"),
    ({"warmup_proportion": 1.0}, r"warmup_proportion must be in \[0, 1\)"),
    ({"warmup_proportion": -0.1}, r"warmup_proportion must be in \[0, 1\)"),
    ({"time_budget_hours": 0}, r"time_budget_hours must be > 0"),
    ({"time_budget_hours": float("inf")}, r"time_budget_hours must be > 0 and finite"),  # ran forever
    ({"time_budget_hours": float("nan")}, r"time_budget_hours must be > 0 and finite"),
    ({"schedule": "step", "max_steps": None}, r"set max_steps"),
    ({"engine": "jax"}, r"engine='jax' is not one of"),
    ({"zero_stage": 2}, r"zero_stage=2 needs engine='deepspeed'"),
    ({"engine": "deepspeed", "zero_stage": 3}, r"zero_stage=3 is not supported.*use 0"),
    ({"keep_last_checkpoints": 0}, r"keep_last_checkpoints must be >= 1"),
    ({"checkpoint_fractions": [0.5, 1.0]}, r"checkpoint_fractions must lie in \(0, 1\)"),
    ({"model": "gigantic"}, r"unknown preset 'gigantic'"),
    ({"early_stop": {"enabled": True}, "validation_every_minutes": None}, r"early_stop needs validation"),
])
def test_validation_errors_say_what_to_change(overrides, message):
    c = TrainConfig.from_preset("tiny-cpu", **overrides)
    with pytest.raises(ValueError, match=message):
        c.validate(world_size=1, check_data=False)


def test_batch_must_divide_by_world_size():
    c = TrainConfig.from_preset("tiny-cpu", batch_size=32, micro_batch_size=16)
    c.validate(world_size=2, check_data=False)
    with pytest.raises(ValueError, match="16 x 3 = 48"):
        c.validate(world_size=3, check_data=False)


@pytest.mark.parametrize("overrides, message", [
    ({"engine": "deepspeed", "precision": "fp16", "zero_stage": 0}, r"fp16.*needs zero_stage >= 1.*8393"),
    ({"engine": "deepspeed", "optimizer": "lamb", "zero_stage": 1}, r"lamb.*zero_stage=1.*engine='torch'"),
])
def test_deepspeed_known_bugs_are_the_engines_check_not_the_configs(overrides, message):
    c = TrainConfig.from_preset("tiny-cpu", **overrides)
    c.validate(world_size=1, check_data=False)  # a consistent config ...
    with pytest.raises(ValueError, match=message):
        check_engine(c, "cuda")  # ... that DeepSpeed can't train, even on a GPU


def test_fp16_on_cpu_is_refused():
    c = TrainConfig.from_preset("24hbert", engine="torch", zero_stage=0).validate(8, check_data=False)
    with pytest.raises(ValueError, match="fp16.*needs a CUDA GPU.*bf16"):
        check_engine(c, "cpu")
    if torch.cuda.is_available():
        check_engine(c, "cuda")  # fp16 is fine on a GPU


def test_missing_data_dir_names_the_fix(tmp_path):
    c = TrainConfig.from_preset("tiny-cpu", data_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"no manifest.json.*bbert prepare --out"):
        c.validate(world_size=1)


def test_a_data_dir_that_is_raw_text_or_a_file_names_the_right_fix(tmp_path):
    # "prepare it first with bbert prepare --out corpus" told the user to write into the text folder
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Raw text.")
    c = TrainConfig.from_preset("tiny-cpu", data_dir=str(corpus))
    with pytest.raises(ValueError, match=r"holds no manifest.json, so it is not a data dir.*raw text.*"
                                         rf"bbert prepare {corpus} --out DATA_DIR.*--data-dir DATA_DIR"):
        c.validate(world_size=1)
    manifest = manifest_path(tmp_path / "data")
    manifest.parent.mkdir()
    manifest.write_text("{}")
    c = TrainConfig.from_preset("tiny-cpu", data_dir=str(manifest))
    with pytest.raises(ValueError, match=rf"data_dir .*manifest.json' is a file.*pass its folder, {manifest.parent}"):
        c.validate(world_size=1)


def test_cli_arguments_build_the_config(tmp_path):
    args = build_parser().parse_args(["--preset", "tiny-cpu", "--data-dir", "d:ir/x", "--run-dir", "r",
                                      "--set", "lr=3e-4", "--set", "model.num_hidden_layers=1", "--local_rank=0"])
    c = config_from_args(args)
    assert c.data_dir == "d:ir/x" and c.run_dir == "r" and c.lr == 3e-4
    assert c.model_overrides == {"num_hidden_layers": 1} and args.resume == "auto"
    assert build_parser().parse_args(["--resume"]).resume is True
    assert build_parser().parse_args(["--no-resume"]).resume is False


def test_cli_layers_preset_then_config_file_then_flags_and_set(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 2.0e-4\nseed: 7\nrun_dir: from-file\n")
    args = build_parser().parse_args(["--preset", "tiny-cpu", "--config", str(tmp_path / "run.yaml"),
                                      "--set", "seed=8", "--run-dir", "007"])
    c = config_from_args(args)
    assert (c.engine, c.model) == ("torch", "tiny")  # from the preset
    assert c.lr == 2e-4 and c.seed == 8 and c.run_dir == "007"  # file, then --set, then the flag
    # a config file alone is laid over the dataclass defaults, not over a preset
    alone = config_from_args(build_parser().parse_args(["--config", str(tmp_path / "run.yaml")]))
    assert alone.zero_stage == TrainConfig().zero_stage and alone.lr == 2e-4


def test_cli_masking_shorthands_set_the_masking_fields():
    args = build_parser().parse_args(["--preset", "tiny-cpu", "--masking", "static", "--duplication-factor", "5"])
    if "mode" in MaskingConfig.__dataclass_fields__:
        c = config_from_args(args)
        assert (c.masking.mode, c.masking.duplication_factor) == ("static", 5)
    else:  # before MaskingConfig has the fields, the shorthands are plain --set assignments
        with pytest.raises(ValueError, match="masking.mode"):
            config_from_args(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--masking", "sometimes"])


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["--preset", "tiny-cpu", "--data-dir", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bbert pretrain: error:") and "bbert prepare --out" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing started, nothing written
    assert main(["--preset", "tiny-cpu", "--set", "batch_size=33"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no config file" in capsys.readouterr().err
    assert main(["--preset", "tiny-cpu", "--set", "lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_print_config_shows_the_deepspeed_config(capsys):
    assert main(["--preset", "24hbert", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "time_budget_hours: 24.0" in out and '"train_batch_size": 4096' in out



def test_a_split_smaller_than_one_micro_batch_per_rank_is_refused_before_the_run(tmp_path):
    from helpers_train import make_data_dir

    data = make_data_dir(tmp_path / "data")
    n_val = json.loads(manifest_path(data).read_text())["splits"]["val"]["num_samples"]
    too_big = n_val + 1
    c = TrainConfig.from_preset("tiny-cpu", data_dir=str(data), max_seq_length=64,
                                micro_batch_size=too_big, batch_size=2 * too_big)
    with pytest.raises(ValueError, match=r"split 'val'.*fewer than one micro-batch.*raise --val-fraction.*"
                                         r"lower micro_batch_size"):
        c.validate(world_size=1)
    n_train = json.loads(manifest_path(data).read_text())["splits"]["train"]["num_samples"]
    c = TrainConfig.from_preset("tiny-cpu", data_dir=str(data), max_seq_length=64, validation_every_minutes=None,
                                micro_batch_size=n_train + 1, batch_size=n_train + 1)
    with pytest.raises(ValueError, match=r"split 'train'.*fewer than one micro-batch.*lower --val-fraction"):
        c.validate(world_size=1)  # raising it, as this said for both splits, leaves less to train on
    ok = TrainConfig.from_preset("tiny-cpu", data_dir=str(data), max_seq_length=64,
                                 micro_batch_size=1, batch_size=too_big)
    ok.validate(world_size=1)
    with pytest.raises(ValueError, match=rf"\({too_big} x 1\)"):
        ok.validate(world_size=too_big)


def test_pretrain_refuses_a_run_dir_that_is_not_one_before_writing(tmp_path, capsys):
    from helpers_train import make_data_dir

    data = make_data_dir(tmp_path / "data")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "book.txt").write_text("A user's own text.")
    before = sorted(p.name for p in data.iterdir())
    for run_dir, message in ((data, "lies inside the data dir"), (texts, "holds other files (book.txt)")):
        args = ["--preset", "tiny-cpu", "--data-dir", str(data), "--run-dir", str(run_dir),
                "--set", "max_seq_length=64", "--set", "micro_batch_size=4"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in data.iterdir()) == before and [p.name for p in texts.iterdir()] == ["book.txt"]


def test_indivisible_batch_advice_names_only_fixes_that_work():
    paper = TrainConfig.from_preset("24hbert")
    with pytest.raises(ValueError) as on_3:  # 4,096 over 3 ranks: no micro-batch size can help
        paper.gradient_accumulation_steps(3)
    assert "split evenly over the 3 ranks" in str(on_3.value) and "divides" not in str(on_3.value)
    with pytest.raises(ValueError, match=r"micro_batch_size that divides 1024"):  # 4,096 = 4 x 1,024
        TrainConfig.from_preset("24hbert", micro_batch_size=48).gradient_accumulation_steps(4)


def test_every_entry_point_assembles_the_config_one_way(tmp_path):
    from bbert.trials import trial_config
    from bbert.train_config import load_config

    (tmp_path / "c.yaml").write_text("lr: 2e-3\nmodel_overrides: {num_hidden_layers: 3}\n")
    via_cli = load_config("tiny-cpu", tmp_path / "c.yaml", ["model.hidden_size=64", "early_stop.after_minutes=2"])
    assert via_cli.model_overrides == {"num_hidden_layers": 3, "hidden_size": 64} and via_cli.lr == 2e-3
    base = TrainConfig.from_preset("tiny-cpu", lr=2e-3, model_overrides={"num_hidden_layers": 3})
    assert base.with_overrides(["model.hidden_size=64", "early_stop.after_minutes=2"]) == via_cli
    trial = trial_config(base, {"model.hidden_size": 64, "early_stop.after_minutes": 2}, via_cli.run_dir)
    assert trial == via_cli
    # a keyword replaces the preset's value (the 24hbert preset's model overrides are gone)
    assert TrainConfig.from_preset("24hbert", model_overrides={}).model_overrides == {}


def test_times_are_seconds_inside():
    from bbert.train_config import hours, minutes

    c = TrainConfig.from_preset("24hbert")
    assert (c.time_budget_seconds, c.validation_interval_seconds, c.checkpoint_interval_seconds,
            c.early_stop_after_seconds) == (86400.0, 1800.0, 3600.0, 10800.0)
    off = TrainConfig.from_preset("24hbert", validation_every_minutes=None, checkpoint_every_minutes=None)
    assert off.validation_interval_seconds == off.checkpoint_interval_seconds == float("inf")
    filled = TrainConfig.from_preset("tiny-cpu", time_budget_hours=hours(90), validation_every_minutes=minutes(15))
    assert (filled.time_budget_seconds, filled.validation_interval_seconds) == pytest.approx((90.0, 15.0))
