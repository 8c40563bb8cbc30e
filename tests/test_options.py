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
def test_cli_and_workflow_parse_the_same_options(name):
    """The click command and the workflow's parser come from one declaration: same
    spellings, defaults, types and help for every option."""
    def shape(cmd):
        return {p.name: (tuple(p.opts), tuple(p.secondary_opts), p.default, p.help,
                         str(p.type), p.required, p.multiple)
                for p in cmd.params if p.name != "help"}
    assert shape(_cli_command(name)) == shape(registry.step(name).command())


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
