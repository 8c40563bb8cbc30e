"""`phitune quantize` end to end on the embedded model, and every bad input it must refuse."""

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phitune.formats.awq_gemm import load_awq_dequantized

CALIB = ["--calib_samples", "64", "--calib_seq_len", "256"]  # the defaults


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Checkpoints of the embedded model by every algorithm, made once through the CLI."""
    from phitune.cli.main import main
    root = tmp_path_factory.mktemp("quantize")
    for algorithm in ("awq", "rtn", "gptq", "awq_gptq"):
        try:
            main(["quantize", "-m", "tiny-phi3", "--algorithm", algorithm, "-o",
                  str(root / algorithm), *CALIB])
        except SystemExit as exc:
            assert exc.code == 0
    return root


def _manifest(path: Path) -> dict:
    return json.loads((path / "phitune.json").read_text())


def test_awq_closes_more_of_the_gap_than_rtn(outputs):
    awq, rtn = _manifest(outputs / "awq")["metrics"], _manifest(outputs / "rtn")["metrics"]
    assert awq["ppl_before"] == pytest.approx(rtn["ppl_before"])
    assert rtn["ppl_gap"] > 0
    assert awq["ppl_gap"] <= 0.5 * rtn["ppl_gap"]  # the paper's Llama-2 ratio; measured 0.24


def test_gptq_and_awq_gptq_close_more_of_the_gap_than_rtn(outputs):
    """tiny-phi3 has real activation outliers (facts.md). Each lands nearer the float
    perplexity than RTN by the bound's factor, on either side: on held-out text a quantized
    model can come out a little below float (GPTQ with act-order and searched ranges did here,
    -0.43x RTN's gap; AWQ+GPTQ 0.15x and AWQ 0.20x measured before act-order)."""
    rtn = _manifest(outputs / "rtn")["metrics"]
    for algorithm, bound in (("gptq", 0.5), ("awq_gptq", 0.3)):
        m = _manifest(outputs / algorithm)["metrics"]
        assert m["ppl_before"] == pytest.approx(rtn["ppl_before"])
        assert abs(m["ppl_gap"]) <= bound * rtn["ppl_gap"], (algorithm, m["ppl_gap"])
        config = json.loads((outputs / algorithm / "config.json").read_text())
        assert config["quantization_config"]["meta"]["algorithm"] == algorithm


def test_checkpoint_has_the_autoawq_gemm_layout(outputs):
    out = outputs / "awq"
    config = json.loads((out / "config.json").read_text())
    from phitune import __version__
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128,
                                             "zero_point": True, "version": "gemm",
                                             "modules_to_not_convert": None,
                                             "meta": {"quantizer": [f"phitune:{__version__}"],
                                                      "algorithm": "awq"}}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{prefix}.qweight").shape == (inter, hidden // 8)
        assert f.get_tensor(f"{prefix}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{prefix}.qzeros").shape == (inter // 128, hidden // 8)
        assert f.get_tensor(f"{prefix}.scales").dtype == torch.float16
    assert f"{prefix}.weight" not in keys and "lm_head.weight" in keys
    metrics = _manifest(out)["metrics"]
    for key in ("seconds", "peak_rss_mb", "size_mb", "size_before_mb", "ppl_before", "ppl_after",
                "calib_tokens"):
        assert key in metrics
    assert metrics["size_mb"] < 0.65 * metrics["size_before_mb"]  # fp16 embeddings dominate here


def test_plain_transformers_loads_it_and_matches_the_reference(outputs):
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM
    out = outputs / "awq"
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float16)
    ours = load_awq_dequantized(out, torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits.float()
        mine = ours(ids).logits
    scale = mine.abs().max().item()
    assert (theirs - mine).abs().max().item() < 0.01 * scale + 0.02  # fp16 kernel vs fp32 reference
    assert (theirs.argmax(-1) == mine.argmax(-1)).float().mean() > 0.95


def test_second_run_is_up_to_date_and_costs_nothing(outputs, cli):
    before = _manifest(outputs / "rtn")
    start = time.perf_counter()
    result = cli("--json", "quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "-o",
                 str(outputs / "rtn"), *CALIB)
    assert result.code == 0
    assert time.perf_counter() - start < 5
    assert "up to date" in result.err
    assert json.loads(result.out)["up_to_date"] is True
    assert _manifest(outputs / "rtn") == before


def test_changed_option_redoes_the_step(outputs, cli, tmp_path):
    import shutil
    target = tmp_path / "rtn"
    shutil.copytree(outputs / "rtn", target)
    result = cli("quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "-o", str(target),
                 "--group_size", "64", "--no-eval")
    assert result.code == 0
    manifest = _manifest(target)
    assert manifest["params"]["group_size"] == 64
    assert json.loads((target / "config.json").read_text())["quantization_config"]["group_size"] == 64


def test_llama_family_quantizes_too(random_llama, cli, tmp_path):
    result = cli("quantize", "-m", str(random_llama), "-o", str(tmp_path / "q"),
                 "--calib_samples", "4", "--calib_seq_len", "64", "--no-eval")
    assert result.code == 0, result.err
    model = load_awq_dequantized(tmp_path / "q")
    assert type(model).__name__ == "LlamaForCausalLM"


# ------------------------------------------------------------------ bad input


def _unsupported(tmp_path: Path) -> Path:
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2"}))
    return path


def _odd_width(tmp_path: Path) -> Path:
    from conftest import build_random_model
    return build_random_model(tmp_path / "odd", hidden=192, heads=6, kv_heads=2, intermediate=384)


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    return path


BAD_INPUTS = {
    "missing model dir": (lambda t: ["-m", str(t / "nope")], "no such model directory"),
    "not a model": (lambda t: ["-m", str(t)], "is not a model directory"),
    "unsupported architecture": (lambda t: ["-m", str(_unsupported(t))],
                                 "architecture GPT2LMHeadModel is not supported"),
    "group size does not divide": (lambda t: ["-m", str(_odd_width(t)), "--group_size", "128"],
                                   "does not divide the model's hidden_size (192)"),
    "group size not offered": (lambda t: ["-m", "tiny-phi3", "--group_size", "100"],
                               "--group_size 100 is not supported"),
    "empty calibration file": (lambda t: ["-m", "tiny-phi3", "--calib_data", str(_empty_file(t))],
                               "has no text"),
    "missing calibration file": (lambda t: ["-m", "tiny-phi3", "--calib_data", str(t / "no.txt")],
                                 "calibration file not found"),
    "bits other than 4": (lambda t: ["-m", "tiny-phi3", "--bits", "3"], "--bits 3 is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, cli, tmp_path):
    make_args, message = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    args = make_args(work)  # building a bad model is not the refusal: untimed
    start = time.perf_counter()
    result = cli("quantize", *args, "-o", str(out))
    assert result.code == 2, result.err
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.err
    assert "Traceback" not in result.err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))
    # refused before any calibration (which takes tens of seconds); generous for a loaded CI
    assert time.perf_counter() - start < 15


def test_output_that_is_a_file_is_refused(cli, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = cli("quantize", "-m", "tiny-phi3", "-o", str(target))
    assert result.code == 2 and "is an existing file" in result.error_lines[0]
    assert target.read_text() == "keep me"


def test_quantize_killed_halfway_keeps_the_earlier_output(outputs, tmp_path):
    """SIGKILL a real `phitune quantize --force` mid-run: the earlier good output stays whole."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    target = tmp_path / "rtn"
    shutil.copytree(outputs / "rtn", target)
    before = _manifest(target)
    child = subprocess.Popen([sys.executable, "-m", "phitune", "quantize", "-m", "tiny-phi3",
                              "-o", str(target), "--force", *CALIB],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".rtn.phitune-tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _manifest(target) == before
    assert load_awq_dequantized(target) is not None
