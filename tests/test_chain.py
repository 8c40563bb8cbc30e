"""The lab's four commands, chained by path on the embedded model, as users type them."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
PROMPT = "what is the best thing to see in chicago"


def _ok(cli, *args):
    result = cli(*args)
    assert result.code == 0, result.err[-2000:]
    return result


def test_quantize_finetune_auto_opt_infer(cli, tmp_path):
    phi = tmp_path / "models" / "phi"
    _ok(cli, "quantize", "-m", "tiny-phi3", "--algorithm", "awq", "--calib_samples", "8",
        "--calib_seq_len", "128", "--no-eval", "-o", str(phi / "awq"))
    _ok(cli, "finetune", "--method", "lora", "-m", str(phi / "awq"), "--data_files",
        str(REPO / "data" / "travel.jsonl"), "--data_name", "json", "--text_template", TEMPLATE,
        "--max_steps", "20", "--max_seq_len", "256", "--lora_r", "8", "--learning_rate", "2e-3",
        "-o", str(phi / "ft"))
    _ok(cli, "auto-opt", "-m", str(phi / "ft" / "model"), "--adapter_path", str(phi / "ft" / "adapter"),
        "--device", "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai", "-o", str(phi / "onnx-ao"))
    model = phi / "onnx-ao" / "model"
    adapter = model / "adapter_weights.onnx_adapter"
    assert adapter.is_file()
    tuned = _ok(cli, "infer", "-m", str(model), "--adapter", str(adapter), "--prompt", PROMPT,
                "--max_new_tokens", "24")
    base = _ok(cli, "infer", "-m", str(model), "--no-adapter", "--prompt", PROMPT, "--max_new_tokens", "24")
    assert tuned.out.strip() and base.out.strip()
    assert tuned.out != base.out  # the adapter is live on the int4 AWQ weights
    again = _ok(cli, "infer", "-m", str(phi / "onnx-ao"), "--prompt", PROMPT, "--max_new_tokens", "24")
    assert again.out == tuned.out  # -m D works, and the dir's adapter is the default
