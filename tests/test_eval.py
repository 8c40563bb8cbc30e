"""`phitune eval` agrees with each step's own reported figures on the same data: the float
model with `phitune.evaluate.perplexity`, an AWQ output with quantize's ppl_after, a finetune
output with its eval_loss_before / eval_loss_after on the same held-out split, ONNX fp32 exports
with the torch figures (text and records, with and without an adapter); constraints exit 3 and
bad input exits 2."""

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-phi3"
TRAVEL = REPO / "data" / "travel.jsonl"
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
RECORDS = ("--data_files", str(TRAVEL), "--data_name", "json", "--text_template", TEMPLATE,
           "--max_seq_len", "256", "--eval_split", "0.1")
REL = 1e-3


def _run(*args):
    """The CLI in-process, outside the per-test `cli` fixture (for module fixtures)."""
    from phitune.cli.main import main
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0, args


def _eval(cli, *args) -> dict:
    result = cli("--json", "eval", *args)
    assert result.code == 0, result.err[-2000:]
    return json.loads(result.out)


def _close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * abs(b)


def _manifest(path: Path) -> dict:
    return json.loads((path / "phitune.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def awq(tiny_awq):
    return tiny_awq


@pytest.fixture(scope="module")
def finetuned(tiny_finetuned):
    return tiny_finetuned


@pytest.fixture(scope="module")
def onnx_float(work):
    out = work / "onnx-fp32"
    _run("auto-opt", "-m", "tiny-phi3", "--precision", "fp32", "-o", str(out))
    return out


@pytest.fixture(scope="module")
def onnx_finetuned(tiny_onnx_finetuned):
    return tiny_onnx_finetuned


@pytest.fixture(scope="module")
def float_figures(tmp_path_factory):
    """`phitune --json eval -m tiny-phi3`, all defaults (latency included), run once."""
    from phitune.cli.main import main
    import io
    import sys
    buffer, stdout = io.StringIO(), sys.stdout
    sys.stdout = buffer
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--json", "eval", "-m", "tiny-phi3"])
    finally:
        sys.stdout = stdout
    assert exit_info.value.code == 0
    return json.loads(buffer.getvalue())


# ---------------------------------------------------------------- agreement with each step

def test_float_defaults_match_evaluate_perplexity(float_figures):
    from phitune.evaluate import perplexity
    from phitune.models import load_causal_lm, load_tokenizer
    from phitune.quantize.calib import read_texts
    import torch
    model = load_causal_lm(TINY, dtype=torch.float32)
    expected = perplexity(model, load_tokenizer(TINY), read_texts(REPO / "data" / "heldout.txt"))
    assert float_figures["kind"] == "hf-model"
    assert float_figures["data"].endswith("heldout.txt")
    assert _close(float_figures["ppl"], expected, 1e-5), (float_figures["ppl"], expected)
    assert math.isclose(float_figures["eval_loss"], math.log(expected), rel_tol=1e-5)


def test_latency_figures(float_figures):
    assert float_figures["prefill_tokens"] == 128
    assert 0 < float_figures["latency_ms"] < float_figures["prefill_ms"] * 10
    assert float_figures["prefill_ms"] > 0


def test_awq_defaults_reproduce_quantize_ppl_after(cli, awq):
    reported = _manifest(awq)["metrics"]["ppl_after"]
    figures = _eval(cli, "-m", str(awq), "--no-latency")
    assert figures["kind"] == "awq-model"
    assert "latency_ms" not in figures
    assert _close(figures["ppl"], reported), (figures["ppl"], reported)


def test_finetune_output_reproduces_its_eval_loss(cli, finetuned):
    metrics = _manifest(finetuned)["metrics"]
    figures = _eval(cli, "-m", str(finetuned), *RECORDS, "--no-latency")
    assert figures["adapter"] == str(finetuned / "adapter")
    assert figures["n_records"] == metrics["data_n_eval"] == 25
    assert _close(figures["eval_loss"], metrics["eval_loss_after"]), \
        (figures["eval_loss"], metrics["eval_loss_after"])
    assert math.isclose(figures["ppl"], math.exp(figures["eval_loss"]), rel_tol=1e-5)
    # the base alone is what finetune measured before training (LoRA B starts at zero)
    base = _eval(cli, "-m", str(finetuned / "model"), *RECORDS, "--no-latency", "--no-adapter")
    assert base["adapter"] is None
    assert _close(base["eval_loss"], metrics["eval_loss_before"]), \
        (base["eval_loss"], metrics["eval_loss_before"])
    assert abs(base["eval_loss"] - figures["eval_loss"]) > 1e-3  # the adapter is applied


def test_onnx_fp32_agrees_with_torch_float(cli, onnx_float, float_figures):
    figures = _eval(cli, "-m", str(onnx_float))
    assert figures["kind"] == "onnx-genai" and figures["adapter"] is None
    assert figures["n_tokens"] == float_figures["n_tokens"]
    assert _close(figures["ppl"], float_figures["ppl"]), (figures["ppl"], float_figures["ppl"])
    assert figures["latency_ms"] > 0 and figures["prefill_ms"] > 0


def test_onnx_finetuned_records_agree_with_finetune(cli, onnx_finetuned, finetuned):
    metrics = _manifest(finetuned)["metrics"]
    model = onnx_finetuned / "model"
    figures = _eval(cli, "-m", str(onnx_finetuned), *RECORDS, "--no-latency")
    assert figures["adapter"] == str(model / "adapter_weights.onnx_adapter")
    assert _close(figures["eval_loss"], metrics["eval_loss_after"]), \
        (figures["eval_loss"], metrics["eval_loss_after"])
    base = _eval(cli, "-m", str(model), *RECORDS, "--no-latency", "--no-adapter")
    assert _close(base["eval_loss"], metrics["eval_loss_before"]), \
        (base["eval_loss"], metrics["eval_loss_before"])


# ---------------------------------------------------------------- constraints and refusals

def test_max_ppl_missed_exits_3_after_the_figures(cli, onnx_float):
    args = ("-m", str(onnx_float), "--max_tokens", "2048", "--no-latency")
    ok = cli("--json", "eval", *args, "--max_ppl", "100000")
    assert ok.code == 0, ok.err[-2000:]
    figures = json.loads(ok.out)
    assert figures["constraints_met"] is True
    result = cli("--json", "eval", *args, "--max_ppl", "5")
    assert result.code == 3, result.err[-2000:]
    assert json.loads(result.out)["ppl"] == figures["ppl"]  # the figures still come out
    assert len(result.error_lines) == 1
    line = result.error_lines[0]
    assert "--max_ppl 5" in line and f"ppl {figures['ppl']:g}" in line
    assert "Traceback" not in result.err


def test_max_latency_missed_exits_3(cli, onnx_float):
    result = cli("eval", "-m", str(onnx_float), "--max_tokens", "512", "--max_latency_ms",
                 "0.0001")
    assert result.code == 3, result.err[-2000:]
    assert len(result.error_lines) == 1
    assert "latency_ms" in result.error_lines[0] and "--max_latency_ms 0.0001" in result.error_lines[0]


def test_library_api_raises_with_the_figures(onnx_float):
    from phitune.errors import ConstraintError
    from phitune.eval.options import EvalOptions
    from phitune.eval.step import run
    with pytest.raises(ConstraintError) as info:
        run(EvalOptions(model=str(onnx_float), max_tokens=512, latency=False, max_ppl=1.5))
    assert info.value.exit_code == 3
    assert info.value.metrics["ppl"] > 1.5 and info.value.metrics["constraints_met"] is False


@pytest.mark.parametrize("args, needle", [
    (("--text_file", "no/such/file.txt"), "text file not found"),
    (("--data_files", "data/no-such.jsonl", "--data_name", "json", "--text_template", "{prompt}"),
     "data file not found"),
    (("--data_files", str(TRAVEL), "--data_name", "json", "--text_template", "{prompt} {answer}"),
     "'answer'"),
    (("--text_template", "{prompt}"), "--text_template applies to records"),
    (("--text_file", str(REPO / "data" / "heldout.txt"), "--data_files", str(TRAVEL)),
     "both given"),
    (("--adapter", "x", "--no-adapter"), "contradict"),
    (("--no-latency", "--max_latency_ms", "5"), "--max_latency_ms"),
    (("--max_ppl", "0"), "out of range"),
])
def test_bad_input_exits_2(cli, args, needle):
    result = cli("eval", "-m", "tiny-phi3", *args)
    assert result.code == 2, result.err[-2000:]
    assert len(result.error_lines) == 1 and needle in result.error_lines[0], result.error_lines
    assert "Traceback" not in result.err


def test_wrong_adapter_kind_exits_2(cli, onnx_float, finetuned):
    result = cli("eval", "-m", str(onnx_float), "--adapter", str(finetuned / "adapter"))
    assert result.code == 2 and ".onnx_adapter file" in result.error_lines[0]
    result = cli("eval", "-m", "tiny-phi3", "--adapter", str(REPO / "data"))
    assert result.code == 2 and "no PEFT adapter" in result.error_lines[0]


def test_missing_model_exits_2(cli, tmp_path):
    result = cli("eval", "-m", str(tmp_path / "nothing"))
    assert result.code == 2 and "no such model directory" in result.error_lines[0]


def test_eval_writes_nothing(cli, onnx_float):
    before = sorted(p.relative_to(onnx_float) for p in onnx_float.rglob("*"))
    _eval(cli, "-m", str(onnx_float), "--max_tokens", "512", "--no-latency")
    assert sorted(p.relative_to(onnx_float) for p in onnx_float.rglob("*")) == before
