"""Hostile input, round 2 (issue 27), part 1: option values, output locations and workflow
files. Each case asserts the exit code, one `error:` line naming the option or the path, that
nothing was published and that the inputs are byte-identical; a case that could hang or eat
memory runs in a subprocess under `timeout` and an address-space limit.

The rules under test live in one place each: option ranges in the option fields
(`phitune.options.check_value`, run by `from_kwargs` for the CLI and `run --config`), the
writable-output probe in `phitune.artifacts.probe_writable`, the bounded YAML reader in
`phitune.workflow.files._bounded_yaml`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_hostile import one_error, siblings, tree_sum

TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
DATA = REPO / "data" / "travel.jsonl"


def limited(args: list[str], seconds: float = 60, memory_gb: float = 6, **kwargs):
    """`phitune ARGS` in a subprocess that a hang or runaway memory cannot outlive."""
    def limit():
        size = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    return subprocess.run([sys.executable, "-m", "phitune", *args], capture_output=True,
                          timeout=seconds, preexec_fn=limit, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def error_lines(stderr: bytes | str) -> list[str]:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- every numeric option has a range

def _option_classes() -> dict[str, type]:
    from phitune import registry
    classes = {name: step.options() for name, step in registry.STEPS.items()}
    for command, (module, name) in {"infer": ("phitune.infer.chat", "InferOptions"),
                                    "serve": ("phitune.serve.server", "ServeOptions")}.items():
        classes[command] = getattr(importlib.import_module(module), name)
    return classes


def test_every_numeric_option_declares_its_range():
    """A new int or float option without bounds fails here, not at a user's `0`."""
    from phitune.options import specs
    unbounded = []
    for command, cls in _option_classes().items():
        for f, spec in specs(cls):
            default = dataclasses.MISSING if f.default is dataclasses.MISSING else f.default
            kind = spec.type if spec.type in (int, float) else type(default)
            if spec.flag or spec.negatable or spec.choices or kind not in (int, float):
                continue
            if all(b is None for b in (spec.min, spec.max, spec.above, spec.below, spec.among)):
                unbounded.append(f"{command} --{f.name}")
    assert not unbounded, unbounded


FINETUNE = ["finetune", "-m", "tiny-phi3", "--data_files", str(DATA), "--data_name", "json",
            "--text_template", TEMPLATE]


@pytest.mark.parametrize("args, option", [
    (FINETUNE + ["--lora_alpha", "0"], "--lora_alpha"),        # exited 0, an all-zero adapter
    (FINETUNE + ["--lora_alpha", "-1"], "--lora_alpha"),
    (FINETUNE + ["--lora_dropout", "1"], "--lora_dropout"),
    (FINETUNE + ["--learning_rate", "0"], "--learning_rate"),
    (FINETUNE + ["--learning_rate", "nan"], "--learning_rate"),
    (FINETUNE + ["--max_steps", "0"], "--max_steps"),
    (FINETUNE + ["--num_train_epochs", "0"], "--num_train_epochs"),
    (FINETUNE + ["--max_grad_norm", "-1"], "--max_grad_norm"),
    (FINETUNE + ["--eval_split", "1"], "--eval_split"),
    (FINETUNE + ["--seed", "-5"], "--seed"),
    (["quantize", "-m", "tiny-phi3", "--calib_seq_len", "2"], "--calib_seq_len"),
    (["quantize", "-m", "tiny-phi3", "--group_size", "100"], "--group_size"),
    (["auto-opt", "-m", "tiny-phi3", "--block_size", "7"], "--block_size"),
    (["auto-opt", "-m", "tiny-phi3", "--accuracy_level", "9"], "--accuracy_level"),
    (["eval", "-m", "tiny-phi3", "--max_latency_ms", "-1"], "--max_latency_ms"),
    (["eval", "-m", "tiny-phi3", "--seq_len", "1"], "--seq_len"),
    (["infer", "-m", "x", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["infer", "-m", "x", "--top_p", "0"], "--top_p"),
    (["infer", "-m", "x", "--top_p", "1.5"], "--top_p"),
    (["infer", "-m", "x", "--temperature", "-1"], "--temperature"),
    (["serve", "-m", "x", "--port", "0"], "--port"),
])
def test_an_out_of_range_option_is_refused_before_any_load(cli, tmp_path, args, option):
    out = tmp_path / "out"
    before = tree_sum(DATA)
    has_output = args[0] in ("finetune", "quantize", "auto-opt")
    start = time.perf_counter()
    result = cli(*args, *(["-o", str(out)] if has_output else []))
    assert result.code == 2
    one_error(result, option)
    assert time.perf_counter() - start < 5  # refused before a model loaded
    assert not out.exists() and siblings(out) == [] and tree_sum(DATA) == before


def test_run_config_checks_the_same_ranges(cli, tmp_path):
    config = tmp_path / "wf.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"),
                                  "cache_dir": str(tmp_path / "cache"), "steps": [
        {"name": "finetune", "model": "tiny-phi3", "data_files": str(DATA), "data_name": "json",
         "text_template": TEMPLATE, "lora_alpha": 0}]}))
    result = cli("run", "--config", str(config), "--dry-run")
    assert result.code == 2
    one_error(result, "step 'finetune'", "--lora_alpha", str(config))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- outputs that cannot be made

@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["quantize", "auto-opt", "finetune", "export-adapter"])
def test_an_output_that_cannot_be_created_is_refused_before_any_load(cli, tmp_path, command):
    """Root passes os.access everywhere: /proc refused mkdir only after 16 s of training."""
    out = "/proc/phitune-out" + (".onnx_adapter" if command == "export-adapter" else "")
    args = {"quantize": ["quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "-o", out],
            "auto-opt": ["auto-opt", "-m", "tiny-phi3", "-o", out],
            "finetune": [*FINETUNE, "--max_steps", "1", "-o", out],
            "export-adapter": ["export-adapter", "-a", str(tmp_path), "--base", str(tmp_path),
                               "-o", out]}[command]
    start = time.perf_counter()
    result = cli(*args)
    assert result.code == 2
    one_error(result, "cannot create", out, "-o")
    assert time.perf_counter() - start < 5
    assert not Path(out).exists()


def _workflow(tmp_path: Path, model: Path, **top) -> Path:
    config = tmp_path / "wf.yaml"
    lines = [f"{k}: {v}" for k, v in top.items()]
    lines += ["steps:", "  - name: quantize", f"    model: {model}", "    algorithm: rtn"]
    config.write_text("\n".join(lines) + "\n")
    return config


def test_run_config_output_or_cache_inside_an_input_through_a_link_is_refused(cli, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for file in (REPO / "data" / "tiny-phi3").iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    (tmp_path / "link").symlink_to(model)
    before = tree_sum(model)
    for key in ("output_dir", "cache_dir"):
        dirs = {"output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache"}
        dirs[key] = tmp_path / "link" / "inside"
        config = _workflow(tmp_path, model, **dirs)
        result = cli("run", "--config", str(config))
        assert result.code == 2, key
        one_error(result, key, str(model), "inside")
        assert tree_sum(model) == before and not (model / "inside").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_run_config_cache_that_cannot_be_created_is_refused_before_any_step(cli, tmp_path):
    config = _workflow(tmp_path, REPO / "data" / "tiny-phi3", output_dir=tmp_path / "out",
                       cache_dir="/proc/phitune-cache")
    result = cli("run", "--config", str(config))
    assert result.code == 2
    one_error(result, "cannot create", "/proc/phitune-cache", "cache_dir")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- workflow files

BOMB = "".join(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9)}]\n"
               for i in range(1, 9))


@pytest.mark.parametrize("name, text, words", [
    ("bomb.yaml", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + BOMB
     + "steps: *i\noutput_dir: x\n", ["expands to more than", "aliases"]),
    ("loop.yaml", "a: &a [*a]\nsteps: *a\noutput_dir: x\n", ["contains itself"]),
    ("deep.json", "[" * 100_000 + "]" * 100_000, ["too deeply"]),
    ("latin1.yaml", "steps: caf\xe9\n", ["not UTF-8"]),
])
def test_a_hostile_workflow_file_is_one_line_in_under_a_second(tmp_path, name, text, words):
    """A billion-laughs YAML hung `run --config x.yaml --dry-run`."""
    config = tmp_path / name
    config.write_bytes(text.encode("latin-1" if name.startswith("latin1") else "utf-8"))
    before = tree_sum(config)
    start = time.perf_counter()
    done = limited(["run", "--config", str(config), "--dry-run"], seconds=30, memory_gb=4)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and str(config) in lines[0], lines
    assert all(w in lines[0] for w in words), lines[0]
    assert elapsed < 10  # starting Python included; the parse alone is timed below
    assert tree_sum(config) == before and not (tmp_path / "x").exists()
    from phitune.errors import InputError
    from phitune.workflow.files import read_config
    start = time.perf_counter()
    with pytest.raises(InputError):
        read_config(config)
    assert time.perf_counter() - start < 1
