"""Each step's options are declared once (phitune/options.py): the CLI, `run --config` and the
range checks read the same declaration, and a bad value is refused before anything loads."""

from __future__ import annotations

import importlib

import click
import pytest

from phitune import options, policy, registry
from phitune.errors import OptionError

CLI = {"quantize": "quantize", "finetune": "finetune", "auto-opt": "auto_opt", "eval": "eval_"}


def _cli_command(name: str) -> click.Command:
    module = importlib.import_module(f"phitune.cli.{name.replace('-', '_')}")
    return getattr(module, CLI[name])


@pytest.mark.parametrize("name", sorted(registry.STEPS))
def test_cli_and_workflow_name_and_default_the_same_options(name, tmp_path):
    """A workflow step reads its mapping through the fields the click command is made of:
    every spelling of the CLI (dashes dropped) names the same option in a file, and an option
    left out has the value the CLI gives it when it is not passed."""
    from phitune.workflow.step_options import StepReader
    cls = registry.step(name).options()
    names = options.by_spelling(cls)
    cli = _cli_command(name)
    for param in cli.params:
        if param.name == "help":
            continue
        for spelling in param.opts:
            f, spec = names[spelling.lstrip("-")]
            assert (spec.dest or f.name) == param.name, spelling
    required = ["-m", "m"] + (["-o", "o"] if any(p.name == "output" for p in cli.params) else [])
    parsed = cli.make_context(name, required).params
    reader = StepReader("s", name, tmp_path / "wf.yaml")
    reader.take("model", "model", "m")
    dest = {f.name: spec.dest or f.name for f, spec in options.specs(cls)}
    assert {dest[k]: v for k, v in reader.values().items()} == \
        {k: v for k, v in parsed.items() if k not in ("output", "force")}


@pytest.mark.parametrize("field, value", [("lora_r", 0), ("lora_dropout", 1.0),
                                          ("warmup_steps", -1), ("method", "dora")])
def test_finetune_refuses_a_bad_value_before_any_model_loads(tmp_path, field, value):
    """The model does not exist: a refusal naming the option proves nothing was loaded."""
    from phitune.finetune.step import FinetuneOptions, run
    opts = FinetuneOptions(model=str(tmp_path / "no-such-model"), output=str(tmp_path / "o"),
                           data_files=("x.jsonl",), **{field: value})
    with pytest.raises(OptionError) as err:
        run(opts)
    assert f"--{field}" in err.value.line()


def test_validate_reads_declared_ranges_and_choices():
    from phitune.finetune.step import FinetuneOptions
    options.validate(FinetuneOptions(model="m", output="o", lora_r=1))
    with pytest.raises(OptionError, match="--overflow"):
        options.validate(FinetuneOptions(model="m", output="o", overflow="wrap"))


def test_eval_scores_a_finetune_output_in_the_dtype_it_trained_in(tmp_path):
    import torch
    trained = {"artifact": "finetuned", "metrics": {"dtype": "bfloat16"}}
    assert policy.eval_dtype("auto", tmp_path, "cpu", trained) == torch.bfloat16
    # not a finetune output (a quantize manifest): finetune's own rule, fp32 for a small model
    assert policy.eval_dtype("auto", tmp_path, "cpu", {"artifact": "awq-model"}) == torch.float32
    assert policy.eval_dtype("float16", tmp_path, "cpu", trained) == torch.float16


def test_size_counts_an_awq_checkpoint_as_the_float_model_it_trains_as(tmp_path, monkeypatch):
    """An int4 base is dequantized to float for training: its dtype, compile and memory choices
    must be those of its float source, not of its few bytes on disk."""
    import torch
    from safetensors.torch import save_file
    out_f, in_f, group = 64, 128, 32
    embed = torch.zeros(10, out_f, dtype=torch.float16)
    (tmp_path / "float").mkdir()
    save_file({"proj.weight": torch.zeros(out_f, in_f, dtype=torch.float16), "embed.weight": embed},
              str(tmp_path / "float" / "model.safetensors"))
    (tmp_path / "awq").mkdir()  # AutoAWQ GEMM: 8 int4 weights per int32, per-group zeros/scales
    save_file({"proj.qweight": torch.zeros(in_f, out_f // 8, dtype=torch.int32),
               "proj.qzeros": torch.zeros(in_f // group, out_f // 8, dtype=torch.int32),
               "proj.scales": torch.zeros(in_f // group, out_f, dtype=torch.float16),
               "embed.weight": embed}, str(tmp_path / "awq" / "model.safetensors"))
    assert policy.parameter_count(tmp_path / "awq") == policy.parameter_count(tmp_path / "float") \
        == out_f * in_f + 10 * out_f
    monkeypatch.setattr(policy, "SPEED_FROM_PARAMS", out_f * in_f)
    assert policy.speed_first(tmp_path / "awq") and policy.speed_first(tmp_path / "float")
    assert policy.train_dtype(tmp_path / "awq", "cpu") == policy.train_dtype(tmp_path / "float", "cpu")
    monkeypatch.setattr(policy, "SPEED_FROM_PARAMS", out_f * in_f + 10 * out_f + 1)
    assert policy.train_dtype(tmp_path / "awq", "cpu") == torch.float32


def test_calibration_dtype_follows_the_hardware_from_the_large_threshold(monkeypatch):
    """quantize's search: fp32 for small models (tiny-phi3 stays exact); from SPEED_FROM_PARAMS
    bf16 where the CPU has native bf16 matmul, fp32 where it has not (until 1B, then bf16 for
    memory); --dtype always wins."""
    import torch
    small, large = policy.SPEED_FROM_PARAMS - 1, policy.SPEED_FROM_PARAMS
    huge = policy.QUANTIZE_LEAN_FROM_PARAMS
    for fast_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda fast=fast_bf16: fast)
        assert policy.calibration_dtype("auto", small, "cpu", torch.float32) == torch.float32
        assert policy.calibration_dtype("auto", large, "cpu", torch.float32) == expected
        assert policy.calibration_dtype("auto", huge, "cpu", torch.float32) == torch.bfloat16
        assert policy.calibration_dtype("float32", huge, "cpu", torch.bfloat16) == torch.float32
    assert policy.calibration_dtype("auto", large, "cuda", torch.bfloat16) == torch.float32
    assert policy.calibration_dtype("auto", huge, "cuda", torch.bfloat16) == torch.bfloat16
