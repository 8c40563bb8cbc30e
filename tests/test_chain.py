"""The lab's four commands, chained by path on the embedded model, as users type them."""

import json
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


def test_qlora_on_cpu_then_auto_opt_and_infer_on_the_float_base(cli, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ft = tmp_path / "ft"
    _ok(cli, "finetune", "--method", "qlora", "-m", "tiny-phi3", "--data_files",
        str(REPO / "data" / "travel.jsonl"), "--data_name", "json", "--text_template", TEMPLATE,
        "--max_steps", "15", "--max_seq_len", "256", "--lora_r", "8", "--learning_rate", "2e-3",
        "--eval_split", "0.1", "--device", "cpu", "-o", str(ft))
    metrics = json.loads((ft / "phitune.json").read_text())["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert (ft / "model").resolve() == (REPO / "data" / "tiny-phi3").resolve()

    # plain PEFT on the float base: the adapter loads and changes what the model says
    tok = AutoTokenizer.from_pretrained(str(ft / "model"))
    ids = tok(f"<|user|>\n{PROMPT}<|end|>\n<|assistant|>\n", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(str(ft / "model"), dtype=torch.float32)
    plain = base.generate(**ids, max_new_tokens=12, do_sample=False)
    tuned = PeftModel.from_pretrained(base, str(ft / "adapter")).generate(
        **ids, max_new_tokens=12, do_sample=False)
    assert not torch.equal(plain, tuned)

    _ok(cli, "auto-opt", "-m", str(ft / "model"), "--adapter_path", str(ft / "adapter"),
        "--device", "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai",
        "-o", str(tmp_path / "onnx"))
    adapter = tmp_path / "onnx" / "model" / "adapter_weights.onnx_adapter"
    assert adapter.is_file()
    answer = _ok(cli, "infer", "-m", str(tmp_path / "onnx"), "--adapter", str(adapter),
                 "--prompt", PROMPT, "--max_new_tokens", "24")
    without = _ok(cli, "infer", "-m", str(tmp_path / "onnx"), "--no-adapter", "--prompt", PROMPT,
                  "--max_new_tokens", "24")
    assert answer.out.strip() and answer.out != without.out
