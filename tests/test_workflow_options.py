"""`run --config` builds each step's options dataclass from the file's mapping through the
option fields the CLI is made of (phitune/workflow/step_options.py): no command line is built
or parsed, a value means what the same text means on the command line, and a bad one is one
line naming the file and the step, in the CLI's words, before anything runs."""

from __future__ import annotations

import json

import click
import pytest
import yaml

from conftest import REPO
from test_hostile import one_error

DATA = str(REPO / "data" / "travel.jsonl")
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def _write(tmp_path, *steps, name="wf.yaml"):
    config = tmp_path / name
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                      "cache_dir": str(tmp_path / "cache"),
                                      "steps": list(steps)}, sort_keys=False))
    return config


def _finetune(**options):
    return {"name": "tune", "type": "finetune", "model": "tiny-phi3", "data_files": DATA,
            "data_name": "json", "text_template": TEMPLATE, **options}


@pytest.fixture
def no_command_line(monkeypatch):
    """Fails the test if anything parses a command line (click's parser or a context made
    from arguments) while the fixture is active."""
    def refuse(*args, **kwargs):
        raise AssertionError("a command line was parsed")
    monkeypatch.setattr(click.Command, "make_context", refuse)
    monkeypatch.setattr(click.Command, "parse_args", refuse)


def test_options_come_from_the_mapping_without_a_command_line(tmp_path, no_command_line):
    from phitune.finetune.options import FinetuneOptions
    from phitune.quantize.options import QuantizeOptions
    from phitune.workflow.plan import load_workflow
    from phitune.workflow.run import step_options
    config = _write(tmp_path,
                    {"name": "q", "type": "quantize", "m": "tiny-phi3", "group-size": 64,
                     "eval": False, "calib_samples": "16"},
                    _finetune(model="@q", learning_rate="1e-3", lora_alpha=8,
                              text_cols=["prompt", "response"], data_files=[DATA, DATA],
                              packing=False))
    wf = load_workflow(config)
    q, tune = (step_options(wf, s) for s in wf.steps)
    assert isinstance(q, QuantizeOptions) and isinstance(tune, FinetuneOptions)
    assert (q.model, q.group_size, q.eval, q.calib_samples) == ("tiny-phi3", 64, False, 16)
    assert q.output == str(wf.steps[0].entry) and q.force is False
    assert tune.model == str(wf.steps[0].entry)           # "@q" → q's cache entry
    assert tune.learning_rate == 0.001 and tune.lora_alpha == 8.0   # YAML's "1e-3" is a string
    assert type(tune.lora_alpha) is float
    assert tune.text_cols == "prompt,response" and tune.data_files == (DATA, DATA)
    assert tune.packing is False and tune.lora_r == 64   # left out: the CLI's default
    # the entry key keeps the parameter names keys always had (quantize's eval is `eval_`)
    assert "eval_" in wf.steps[0].params and "eval" not in wf.steps[0].params
    assert wf.steps[1].command_line().startswith(
        "phitune finetune --model @q --data_files " + DATA)


@pytest.mark.parametrize("options, words", [
    ({"lora_r": 0.5}, [("Invalid value for '--lora_r' / '--lora-r': '0.5' is not a valid "
                       "integer.")]),
    ({"lora_r": True}, ["'true' is not a valid integer"]),
    ({"learning_rate": "fast"}, ["'fast' is not a valid float"]),
    ({"method": "dora"}, ["'--method'", "'dora' is not one of 'lora', 'qlora'"]),
    ({"lora_r": 0}, ["--lora_r 0 is out of range (≥ 1)", "pass a value ≥ 1"]),
    ({"lora_alpha": "0"}, ["--lora_alpha 0.0 is out of range (> 0)"]),
    ({"learning_rate": "nan"}, ["--learning_rate nan is not a finite number"]),
    ({"max_steps": -2}, ["--max_steps -2 is out of range (≥ 1, or -1)"]),
    ({"lora_dropout": 1}, ["--lora_dropout 1.0 is out of range (≥ 0 and < 1)"]),
])
def test_a_bad_value_is_one_line_naming_file_and_step(cli, tmp_path, options, words):
    config = _write(tmp_path, _finetune(**options))
    before = config.read_bytes()
    result = cli("run", "--config", str(config), "--dry-run")
    assert result.code == 2
    one_error(result, "step 'tune' (finetune):", str(config), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert config.read_bytes() == before


def test_a_bad_value_reads_as_the_cli_says_it(cli, tmp_path):
    """The same mistake on the command line and in a file: the same words after the step."""
    config = _write(tmp_path, {"name": "q", "type": "quantize", "model": "tiny-phi3",
                               "group_size": 100, "bits": "8"}, name="wf.json")
    config.write_text(json.dumps(yaml.safe_load(config.read_text())))
    in_file = one_error(cli("run", "--config", str(config)), "step 'q' (quantize):")
    on_line = one_error(cli("quantize", "-m", "tiny-phi3", "--group_size", "100", "--bits", "8",
                            "-o", str(tmp_path / "q")))
    what = on_line.removeprefix("error: ").split(" — ")[0]
    assert in_file.startswith(f"error: step 'q' (quantize): {what} — {config} — ")
    assert not (tmp_path / "q").exists()


def test_the_shape_of_a_value_is_checked_before_its_text(cli, tmp_path):
    cases = [({"merge": "yes"}, "merge takes true or false, not 'yes'"),
             ({"lora_r": {"a": 1}}, "lora_r takes a value, not a mapping"),
             ({"lora_r": [1, 2]}, "lora_r takes one value, not a list"),
             ({"model": None}, "Missing option '-m' / '--model'.")]
    for options, words in cases:
        result = cli("run", "--config", str(_write(tmp_path, _finetune(**options))),
                     "--dry-run")
        assert result.code == 2, options
        one_error(result, "step 'tune'", words)


def test_a_step_runs_from_its_options_without_a_command_line(cli, tmp_path, no_command_line):
    """The run, not only the plan: a real quantize step into its cache entry."""
    from phitune.artifacts.manifest import read_manifest
    from phitune.workflow.plan import load_workflow, make_plan
    from phitune.workflow.run import execute
    config = _write(tmp_path, {"name": "q", "type": "quantize", "model": "tiny-phi3",
                               "algorithm": "rtn", "eval": False, "group_size": "64"})
    wf = load_workflow(config)
    summary = execute(wf, make_plan(wf))
    assert [s["action"] for s in summary["steps"]] == ["ran"]
    manifest = read_manifest(wf.steps[0].entry)
    assert manifest["params"]["group_size"] == 64 and manifest["params"]["algorithm"] == "rtn"
    assert (tmp_path / "out" / "q").resolve() == wf.steps[0].entry.resolve()
