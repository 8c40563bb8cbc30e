"""Hostile input, round 2 (issue 27), part 2: files that are not regular, weights that do not
fit their config, a damaged training checkpoint, bytes that are not UTF-8. Each case asserts
the exit code, one `error:` line naming the file, that nothing was published and that the
inputs are byte-identical; a case that could hang or eat memory runs in a subprocess under a
timeout and an address-space limit.

The rules live in one place each: `phitune.inputfiles.check_regular` / `read_bytes` (every
reader), `phitune.checkpoint.check_supplied` / `check_loading_info` (every load),
`phitune.finetune.loop.Checkpoint.load` (--resume).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from conftest import EMBEDDED, REPO
from test_gguf import _random_llama, write_gguf
from test_hostile import one_error, siblings, tree_sum
from test_hostile_options import TEMPLATE, error_lines, limited

DATA = REPO / "data" / "travel.jsonl"


# ---------------------------------------------------------------- not a regular file

@pytest.fixture(scope="module")
def specials(tmp_path_factory) -> dict[str, Path]:
    """A FIFO, a symlink to /dev/zero, a directory and a socket, with the suffixes readers
    look at."""
    root = tmp_path_factory.mktemp("specials")
    found = {"devzero": Path("/dev/zero")}
    for suffix in (".jsonl", ".gguf", ".yaml", ".txt"):
        os.mkfifo(root / f"fifo{suffix}")
        (root / f"zero{suffix}").symlink_to("/dev/zero")
        (root / f"dir{suffix}").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jsonl"))
    found["root"] = root
    yield found
    sock.close()


def _reader_args(kind: str, path: Path, out: Path) -> list[str]:
    return {"data": ["finetune", "-m", "tiny-phi3", "--data_files", str(path), "--data_name",
                     "json", "--text_template", TEMPLATE, "-o", str(out)],
            "calib": ["quantize", "-m", "tiny-phi3", "--calib_data", str(path), "-o", str(out)],
            "eval": ["eval", "-m", "tiny-phi3", "--text_file", str(path)],
            "gguf": ["quantize", "-m", str(path), "-o", str(out)],
            "config": ["run", "--config", str(path), "--dry-run"]}[kind]


CASES = [("data", "devzero"), ("data", "zero.jsonl"), ("data", "fifo.jsonl"),
         ("data", "sock.jsonl"), ("calib", "devzero"), ("calib", "fifo.txt"),
         ("eval", "devzero"), ("eval", "fifo.txt"), ("eval", "dir.txt"), ("gguf", "fifo.gguf"),
         ("gguf", "zero.gguf"), ("config", "devzero"), ("config", "fifo.yaml"),
         ("config", "dir.yaml")]


@pytest.mark.parametrize("kind, name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_a_file_that_is_not_regular_is_refused_before_it_is_read(specials, tmp_path, kind,
                                                                 name):
    """--data_files /dev/zero grew memory 4.4 → 10.7 GB in 12 s; a FIFO .gguf hung."""
    path = specials["devzero"] if name == "devzero" else specials["root"] / name
    out = tmp_path / "out"
    done = limited(_reader_args(kind, path, out), seconds=60, memory_gb=6)
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert "exists but is not a regular file" in lines[0], lines[0]
    assert not out.exists() and siblings(out) == []


def test_a_line_over_the_limit_is_refused_at_its_file_and_line(cli, tmp_path):
    from phitune.inputfiles import LINE_LIMIT
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                    + json.dumps({"prompt": "x" * (LINE_LIMIT + 10), "response": "y"}) + "\n")
    before = tree_sum(data)
    out = tmp_path / "out"
    result = cli(*_reader_args("data", data, out))
    assert result.code == 2
    one_error(result, f"{data}:2", "limit")
    assert not out.exists() and tree_sum(data) == before


def test_eval_text_file_dev_zero_says_not_regular_not_missing(cli):
    result = cli("eval", "-m", "tiny-phi3", "--text_file", "/dev/zero")
    assert result.code == 2
    line = one_error(result, "/dev/zero", "--text_file", "not a regular file")
    assert "not found" not in line


# ---------------------------------------------------------------- weights that do not fit

def _edited_copy(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def misfits(tmp_path_factory) -> dict[str, Path]:
    """tiny-phi3 and an RTN quantization of it, each with one tensor missing or cut short."""
    import torch

    from phitune.cli.main import main
    root = tmp_path_factory.mktemp("misfits")
    try:
        main(["quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "--no-eval", "-o",
              str(root / "awq")])
    except SystemExit as exc:
        assert not exc.code
    return {
        "float-missing": _edited_copy(EMBEDDED, root / "fm", lambda t: t.pop(
            "model.layers.1.mlp.down_proj.weight")),
        "float-shape": _edited_copy(EMBEDDED, root / "fs", lambda t: t.__setitem__(
            "model.norm.weight", torch.ones(7))),
        "awq-missing": _edited_copy(root / "awq", root / "am", lambda t: t.pop(
            "model.layers.0.self_attn.o_proj.qzeros")),
        "awq-shape": _edited_copy(root / "awq", root / "as", lambda t: t.__setitem__(
            "model.layers.1.mlp.down_proj.scales",
            t["model.layers.1.mlp.down_proj.scales"][:1].clone())),
    }


NAMED = {"float-missing": "model.layers.1.mlp.down_proj.weight",
         "float-shape": "model.norm.weight",
         "awq-missing": "model.layers.0.self_attn.o_proj.qzeros",
         "awq-shape": "model.layers.1.mlp.down_proj.scales"}


# quantize reads float models only (an AWQ one is refused as already quantized)
@pytest.mark.parametrize("case, command", [
    (case, command) for case in sorted(NAMED) for command in ("quantize", "finetune", "auto-opt",
                                                               "eval")
    if not (command == "quantize" and case.startswith("awq"))])
def test_weights_that_do_not_fit_the_config_are_refused(cli, tmp_path, misfits, case, command):
    model = misfits[case]
    before = tree_sum(model)
    out = tmp_path / "out"
    args = {"quantize": ["quantize", "-m", str(model), "--algorithm", "rtn", "-o", str(out)],
            "finetune": ["finetune", "-m", str(model), "--data_files", str(DATA),
                         "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "1",
                         "-o", str(out)],
            "auto-opt": ["auto-opt", "-m", str(model), "-o", str(out)],
            "eval": ["eval", "-m", str(model), "--no-latency"]}[command]
    result = cli(*args)
    assert result.code == 2
    one_error(result, "does not supply 1 of the model's", NAMED[case], str(model))
    assert not out.exists() and siblings(out) == [] and tree_sum(model) == before


@pytest.mark.parametrize("skip", [None, ("blk.0.attn_q.weight",)], ids=["no-tensors", "one-gone"])
def test_a_gguf_missing_tensors_converts_nothing(cli, tmp_path, monkeypatch, skip):
    """A GGUF of 0 tensors used to convert into a random model (held-out ppl 52,690)."""
    monkeypatch.setenv("PHITUNE_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "m.gguf", _random_llama(), skip=skip)
    before = tree_sum(gguf)
    out = tmp_path / "out"
    result = cli("quantize", "-m", str(gguf), "--algorithm", "rtn", "-o", str(out))
    assert result.code == 2
    line = one_error(result, str(gguf), "does not supply")
    assert ("21 of the model's 21" if skip is None else "self_attn.q_proj.weight") in line
    conversions = tmp_path / "cache" / "gguf"
    assert not out.exists() and tree_sum(gguf) == before
    assert not conversions.exists() or list(conversions.iterdir()) == []


# ---------------------------------------------------------------- a damaged checkpoint

def test_resume_on_a_truncated_checkpoint_is_one_line(cli, tmp_path):
    import torch
    out = tmp_path / "ft"
    state = tmp_path / ".ft.phitune-ckpt" / "state.pt"
    state.parent.mkdir()
    torch.save({"step": 3, "trainable": {"w": torch.ones(50_000)}}, state)
    os.truncate(state, state.stat().st_size // 2)
    before = tree_sum(state)
    result = cli("finetune", "-m", "tiny-phi3", "--data_files", str(DATA), "--data_name", "json",
                 "--text_template", TEMPLATE, "--max_steps", "2", "-o", str(out), "--resume")
    assert result.code == 2
    one_error(result, str(state), "damaged", "--force")
    assert not out.exists() and tree_sum(state) == before


# ---------------------------------------------------------------- messages

def test_a_piped_line_that_is_not_utf8_is_skipped_by_number(genai_model):
    done = limited(["--json", "infer", "-m", str(genai_model), "--max_new_tokens", "3"],
                   seconds=120, input=b"hello\n\xff\xfe\nthere\n")
    assert done.returncode == 0, done.stderr[-2000:]
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr and "stdin line 2 is not UTF-8" in stderr
    answers = [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]
    assert len(answers) == 2 and all(a["tokens"] == 3 for a in answers)


def test_serve_on_an_awq_dir_names_auto_opt(cli, misfits):
    awq = misfits["awq-missing"].parent / "awq"
    result = cli("serve", "-m", str(awq))
    assert result.code == 2
    line = one_error(result, "phitune auto-opt", "serve")
    assert "phitune infer" not in line


# ---------------------------------------------------------------- more of the same rules

def _model_with(tmp_path: Path, src: Path, name: str, make) -> Path:
    """A copy of model dir `src` whose file `name` is replaced by `make(path)` (a FIFO, a
    link to /dev/zero)."""
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    target = dst / name
    target.unlink()
    make(target)
    return dst


@pytest.mark.parametrize("command, name, make", [
    ("quantize", "tokenizer.json", os.mkfifo),
    ("quantize", "config.json", os.mkfifo),
    ("eval", "model.safetensors", lambda p: p.symlink_to("/dev/zero")),
    ("infer", "model/genai_config.json", os.mkfifo),   # hung infer
    ("infer", "model/tokenizer.json", lambda p: p.symlink_to("/dev/zero")),
], ids=["tokenizer-fifo", "config-fifo", "weights-devzero", "genai-config-fifo",
        "onnx-tokenizer-devzero"])
def test_a_model_dir_file_that_is_not_regular_is_refused(genai_model, tmp_path, command, name,
                                                         make):
    src = genai_model.parent if command == "infer" else EMBEDDED
    if command == "infer":  # genai_model is D/model; give it the D/model layout of auto-opt
        shutil.copytree(genai_model, tmp_path / "src" / "model")
        src = tmp_path / "src" / "model"
        name = name.removeprefix("model/")
    model = _model_with(tmp_path, src, name, make)
    out = tmp_path / "out"
    args = {"quantize": ["quantize", "-m", str(model), "--algorithm", "rtn", "-o", str(out)],
            "eval": ["eval", "-m", str(model), "--no-latency"],
            "infer": ["infer", "-m", str(model), "--prompt", "hi"]}[command]
    done = limited(args, seconds=60)
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and str(model / name) in lines[0], lines
    assert "not a regular file" in lines[0]
    assert not out.exists()


def test_an_adapter_or_output_that_is_a_fifo_is_refused(genai_model, cli, tmp_path):
    fifo = tmp_path / "a.onnx_adapter"
    os.mkfifo(fifo)
    done = limited(["infer", "-m", str(genai_model), "--adapter", str(fifo), "--prompt", "hi"],
                   seconds=60)
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and str(fifo) in lines[0] and "not a regular file" in lines[0]
    out = tmp_path / "out"
    os.mkfifo(out)  # quantize used to move it aside and publish over it
    result = cli("quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "--no-eval", "-o", str(out))
    assert result.code == 2
    one_error(result, str(out), "existing file")
    assert out.is_fifo() and siblings(out) == [out.name]


@pytest.mark.parametrize("args, option", [
    (["finetune", "-m", "tiny-phi3", "--data_name", "json", "--text_template", TEMPLATE,
      "--data_files"], "{file}:1"),
    (["quantize", "-m", "tiny-phi3", "--calib_data"], "{file}:1"),
])
def test_deeply_nested_json_records_are_one_line(cli, tmp_path, args, option):
    """50,000 nested arrays in a record: a RecursionError traceback before."""
    file = tmp_path / "deep.jsonl"
    file.write_text("[" * 50_000 + "]" * 50_000 + "\n")
    result = cli(*args, str(file), "-o", str(tmp_path / "out"))
    assert result.code == 2
    one_error(result, option.format(file=file))
    assert not (tmp_path / "out").exists()


def test_quantize_eval_data_dev_zero_is_refused_before_the_model_loads(cli, tmp_path):
    result = cli("quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "--eval_data", "/dev/zero",
                 "-o", str(tmp_path / "out"))
    assert result.code == 2
    one_error(result, "/dev/zero", "--eval_data", "not a regular file")
    assert "loading" not in result.err


@pytest.mark.parametrize("command", ["export-adapter", "eval", "auto-opt"])
def test_an_adapter_dir_with_a_fifo_is_refused(genai_model, tmp_path, command):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    os.mkfifo(adapter / "adapter_model.safetensors")
    out = tmp_path / ("x.onnx_adapter" if command == "export-adapter" else "out")
    args = {"export-adapter": ["export-adapter", "-a", str(adapter), "--base", str(genai_model),
                               "-o", str(out)],
            "eval": ["eval", "-m", "tiny-phi3", "--adapter", str(adapter), "--no-latency"],
            "auto-opt": ["auto-opt", "-m", "tiny-phi3", "--adapter_path", str(adapter), "-o",
                         str(out)]}[command]
    done = limited(args, seconds=60)
    assert done.returncode == 2
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "adapter_model.safetensors" in lines[0], lines
    assert "not a regular file" in lines[0] and not out.exists()
