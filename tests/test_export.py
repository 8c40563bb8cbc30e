"""`phitune auto-opt` and `phitune export-adapter` on the embedded model, CPU: fp32 parity with
PyTorch/PEFT over greedy decoding (no adapter, the adapter given to auto-opt, a second adapter of
another rank on a subset of modules), AWQ weights kept in int4, and every refusal."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-phi3"
PROMPT = [8188, 464, 1102, 318, 257, 8191, 8189]  # <|user|> ... <|end|><|assistant|>
TOL = 1e-4


def _ok(cli, *args):
    result = cli(*args)
    assert result.code == 0, result.err[-2000:]
    return result


def make_adapter(base: Path, out: Path, targets: list[str], rank: int, seed: int) -> Path:
    """A PEFT adapter with random, non-zero A and B (as after training), saved the PEFT way."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(str(out))
    return out


def greedy_max_diff(model_dir: Path, torch_model, adapter_file: Path | None = None,
                    steps: int = 20) -> float:
    """Largest |logit difference| over `steps` greedy tokens; asserts the same tokens."""
    import onnxruntime_genai as og
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps + 1, do_sample=False)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "test")
        generator.set_active_adapter(adapters, "test")
    generator.append_tokens(PROMPT)
    sequence, worst = list(PROMPT), 0.0
    for step in range(steps):
        onnx_logits = np.array(generator.get_logits())[0, -1]
        with torch.no_grad():
            ref = torch_model(torch.tensor([sequence])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(onnx_logits - ref).max()))
        token = int(ref.argmax())
        assert int(onnx_logits.argmax()) == token, f"greedy token {step} differs"
        generator.append_tokens([token])
        sequence.append(token)
    return worst


def _peft(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def adapters(work):
    full = make_adapter(TINY, work / "adapter-r8", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                        rank=8, seed=1)
    subset = make_adapter(TINY, work / "adapter-r4", ["qkv_proj", "down_proj"], rank=4, seed=2)
    return full, subset


@pytest.fixture(scope="module")
def fp32_export(work, adapters):
    from phitune.cli.main import main
    out = work / "onnx-fp32"
    with pytest.raises(SystemExit) as exit_info:
        main(["auto-opt", "-m", "tiny-phi3", "--adapter_path", str(adapters[0]), "--precision", "fp32",
              "--device", "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai", "-o", str(out)])
    assert exit_info.value.code == 0
    return out


def test_auto_opt_writes_the_genai_layout(fp32_export):
    model = fp32_export / "model"
    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
                 "adapter_weights.onnx_adapter"):
        assert (model / name).is_file(), name
    manifest = json.loads((fp32_export / "phitune.json").read_text())
    assert manifest["artifact"] == "onnx-genai"
    assert manifest["metrics"]["lora_slots"] == 6 * 5
    assert manifest["metrics"]["adapter_ranks"] == [8]


def test_no_adapter_is_the_base_model(fp32_export):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    assert greedy_max_diff(fp32_export / "model", base) <= TOL


def test_adapter_from_auto_opt_matches_peft(fp32_export, adapters):
    model = fp32_export / "model"
    assert greedy_max_diff(model, _peft(TINY, adapters[0]), model / "adapter_weights.onnx_adapter") <= TOL


def test_second_adapter_other_rank_subset_via_export_adapter(fp32_export, adapters, cli, work):
    out = work / "subset.onnx_adapter"
    _ok(cli, "export-adapter", "-a", str(adapters[1]), "--base", str(fp32_export), "-o", str(out))
    assert greedy_max_diff(fp32_export / "model", _peft(TINY, adapters[1]), out) <= TOL


def test_llama_adapter_on_split_modules_lands_in_packed_slots(random_llama, cli, work):
    """q_proj and v_proj adapters share the graph's packed qkv MatMul; up_proj alone its slot."""
    adapter = make_adapter(random_llama, work / "llama-adapter", ["q_proj", "v_proj", "up_proj"],
                           rank=4, seed=3)
    out = work / "llama-onnx"
    _ok(cli, "auto-opt", "-m", str(random_llama), "--precision", "fp32", "--adapter_path", str(adapter),
        "-o", str(out))
    model = out / "model"
    assert greedy_max_diff(model, _peft(random_llama, adapter), model / "adapter_weights.onnx_adapter",
                           steps=10) <= TOL


# ------------------------------------------------------------------ int4


@pytest.fixture(scope="module")
def awq_export(work, tiny_awq):
    """The shared AWQ checkpoint (conftest) and its int4 export, no adapter."""
    from phitune.cli.main import main
    with pytest.raises(SystemExit) as exit_info:
        main(["auto-opt", "-m", str(tiny_awq), "-o", str(work / "onnx-awq")])
    assert exit_info.value.code == 0
    return tiny_awq, work / "onnx-awq"


def _matmulnbits_weight(model_file: Path, node_name: str) -> np.ndarray:
    """Dequantize one MatMulNBits node: B [N, blocks, bs/2] nibbles (low = even k), scales
    [N*blocks], zero points two per byte (low nibble = even block)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(model_file))
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
    q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.float32)
    blocks = k // bs
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks).astype(np.float32)
    zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1)
    zeros = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    return ((q.reshape(n, blocks, bs) - zeros[..., None]) * scales[..., None]).reshape(n, k)


def test_int4_graph_holds_awqs_weights_not_a_requantization(awq_export):
    from phitune.formats.awq_gemm import load_awq_dequantized
    awq, onnx_dir = awq_export
    reference = load_awq_dequantized(awq)
    onnx_w = _matmulnbits_weight(onnx_dir / "model" / "model.onnx", "/model/layers.2/attn/o_proj/MatMulNBits")
    torch_w = reference.model.layers[2].self_attn.o_proj.weight.detach().numpy()
    assert np.array_equal(onnx_w, torch_w)


def test_int4_perplexity_is_within_1_percent_of_the_pytorch_awq_model(awq_export):
    from phitune.evaluate import onnx_perplexity, perplexity
    from phitune.models import load_tokenizer
    from phitune.quantize.calib import read_texts
    from phitune.formats.awq_gemm import load_awq_dequantized
    awq, onnx_dir = awq_export
    tokenizer = load_tokenizer(TINY)
    texts = read_texts(REPO / "data" / "heldout.txt")
    onnx_ppl = onnx_perplexity(onnx_dir / "model", tokenizer, texts, max_tokens=8192)
    torch_ppl = perplexity(load_awq_dequantized(awq), tokenizer, texts, max_tokens=8192)
    assert abs(onnx_ppl - torch_ppl) / torch_ppl < 0.01, (onnx_ppl, torch_ppl)


def test_float_input_rounds_to_int4_within_2_percent_of_float(cli, work):
    from phitune.evaluate import onnx_perplexity, perplexity
    from phitune.models import load_causal_lm, load_tokenizer
    from phitune.quantize.calib import read_texts
    out = work / "onnx-rtn"
    _ok(cli, "auto-opt", "-m", "tiny-phi3", "-o", str(out))
    manifest = json.loads((out / "phitune.json").read_text())
    assert manifest["metrics"]["int4_source"].startswith("round-to-nearest")
    tokenizer = load_tokenizer(TINY)
    texts = read_texts(REPO / "data" / "heldout.txt")
    int4 = onnx_perplexity(out / "model", tokenizer, texts, max_tokens=8192)
    fp = perplexity(load_causal_lm(TINY, dtype=torch.float32), tokenizer, texts, max_tokens=8192)
    assert abs(int4 - fp) / fp < 0.02, (int4, fp)


def test_adapter_on_int4_base_changes_the_output(awq_export, adapters, cli, work):
    from phitune.evaluate import onnx_perplexity
    from phitune.models import load_tokenizer
    _, onnx_dir = awq_export
    out = work / "awq-full.onnx_adapter"
    _ok(cli, "export-adapter", "-a", str(adapters[0]), "--base", str(onnx_dir / "model"), "-o", str(out))
    tokenizer = load_tokenizer(TINY)
    texts = ["The quick brown fox jumps over the lazy dog. " * 20]
    base = onnx_perplexity(onnx_dir / "model", tokenizer, texts)
    with_adapter = onnx_perplexity(onnx_dir / "model", tokenizer, texts, adapter_file=out)
    assert abs(base - with_adapter) > 1e-3 * base


def test_second_run_is_up_to_date(fp32_export, adapters, cli):
    result = _ok(cli, "auto-opt", "-m", "tiny-phi3", "--adapter_path", str(adapters[0]), "--precision",
                 "fp32", "--device", "cpu", "--provider", "CPUExecutionProvider", "-o", str(fp32_export))
    assert "up to date" in result.err


# ------------------------------------------------------------------ refusals


def test_device_and_provider_must_agree(cli, tmp_path):
    result = cli("auto-opt", "-m", "tiny-phi3", "--device", "cpu", "--provider", "CUDAExecutionProvider",
                 "-o", str(tmp_path / "o"))
    assert result.code == 2
    assert "--provider CUDAExecutionProvider runs on gpu, but --device is cpu" in result.error_lines[0]
    assert not (tmp_path / "o").exists()


def test_adapter_of_another_base_is_refused_before_the_build(random_phi3, work, cli, tmp_path):
    import time
    adapter = make_adapter(random_phi3, work / "other-base", ["gate_up_proj"], rank=4, seed=4)
    start = time.perf_counter()
    result = cli("auto-opt", "-m", "tiny-phi3", "--adapter_path", str(adapter), "-o", str(tmp_path / "o"))
    assert result.code == 2
    assert "mlp.gate_up_proj is 256→1024 in the adapter but 256→2048 in the model" in result.error_lines[0]
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "o").exists()


def test_export_adapter_refuses_misfits(fp32_export, random_phi3, work, cli, tmp_path):
    other = make_adapter(random_phi3, work / "other-base-2", ["down_proj"], rank=4, seed=5)
    out = tmp_path / "x.onnx_adapter"
    result = cli("export-adapter", "-a", str(other), "--base", str(fp32_export), "-o", str(out))
    assert result.code == 2 and "in the model" in result.error_lines[0]
    assert not out.exists()


def test_export_adapter_refuses_overwrite_and_bad_names(fp32_export, adapters, cli, tmp_path):
    existing = tmp_path / "a.onnx_adapter"
    existing.write_bytes(b"keep")
    result = cli("export-adapter", "-a", str(adapters[0]), "--base", str(fp32_export), "-o", str(existing))
    assert result.code == 2 and "already exists" in result.error_lines[0]
    assert existing.read_bytes() == b"keep"
    result = cli("export-adapter", "-a", str(adapters[0]), "--base", str(fp32_export), "-o", str(tmp_path / "a.bin"))
    assert result.code == 2 and ".onnx_adapter" in result.error_lines[0]


def test_dora_adapter_is_refused(adapters, fp32_export, cli, tmp_path):
    import shutil
    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    result = cli("export-adapter", "-a", str(dora), "--base", str(fp32_export), "-o", str(tmp_path / "d.onnx_adapter"))
    assert result.code == 2 and "DoRA" in result.error_lines[0]


def test_base_without_lora_inputs_is_refused(cli, adapters, work, tmp_path):
    out = work / "plain"
    _ok(cli, "auto-opt", "-m", "tiny-phi3", "--precision", "fp32", "--no-multi_lora", "-o", str(out))
    result = cli("export-adapter", "-a", str(adapters[0]), "--base", str(out), "-o", str(tmp_path / "a.onnx_adapter"))
    assert result.code == 2 and "has no LoRA inputs" in result.error_lines[0]


def test_onnx_model_is_not_an_auto_opt_input(fp32_export, cli, tmp_path):
    result = cli("auto-opt", "-m", str(fp32_export), "-o", str(tmp_path / "o"))
    assert result.code == 2 and "onnxruntime-genai model" in result.error_lines[0]


def test_relative_paths_as_in_the_lab(awq_export, adapters, cli, tmp_path, monkeypatch):
    """The lab's commands pass relative -m/--adapter_path/-o: the builder subprocess runs in a
    scratch dir, so every path it gets must be absolute."""
    awq, _ = awq_export
    monkeypatch.chdir(tmp_path)
    shutil.copytree(awq, tmp_path / "awq")
    shutil.copytree(adapters[0], tmp_path / "adapter")
    _ok(cli, "auto-opt", "-m", "awq", "--adapter_path", "adapter", "-o", "models/onnx-ao")
    assert (tmp_path / "models" / "onnx-ao" / "model" / "model.onnx").is_file()
    assert (tmp_path / "models" / "onnx-ao" / "model" / "adapter_weights.onnx_adapter").is_file()
