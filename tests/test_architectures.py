"""The architecture table (phitune/architectures.py) proven per family on random tiny models:
Qwen2 (listed before, untested), and Qwen3 and Gemma 3 text, added through their records only.

- folding any AWQ scale into any scale group leaves each decoder layer's function unchanged
  (fp64, to 1e-5), which checks the groups' module names and Gemma's (1 + w) norm kind;
- the chain as users type it: quantize (AWQ and RTN) → finetune → auto-opt → infer;
- the fp32 ONNX graph the builder writes matches PyTorch's logits over greedy decoding;
- an architecture the table does not know is refused in one line naming the supported ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EMBEDDED, REPO, save_with_embedded_tokenizer, write_bos_tokenizer

FAMILIES = ("qwen2", "qwen3", "gemma3")
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
FOLD_TOL = 1e-5
ONNX_TOL = 1e-4   # fp32 graph vs PyTorch, max |logit difference| over greedy decoding (as test_export)


def build_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """A random 2-layer model of `family` (hidden 128, Gemma 256; 4 heads / 2 KV heads) with tiny-phi3's
    tokenizer (Gemma's: made to start every text with <bos>, as Gemma's does), its norms' weights
    random too (so a wrongly folded norm shows)."""
    import transformers as tf
    torch.manual_seed(seed)
    embedded = json.loads((EMBEDDED / "config.json").read_text())
    common = dict(vocab_size=embedded["vocab_size"], hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=1024,
                  **{k: embedded[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=False, **common))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(tie_word_embeddings=False, **common))
    else:  # one sliding-window layer and one global one, tied embeddings as Gemma 3 ships.
        # A window shorter than test_export's prompt, so the ONNX test crosses it at once.
        # Hidden 256, not 128: the builder scales embeddings by round(√hidden, 2), which for 128
        # (11.31 for 11.3137) alone moves logits by 1.1e-4 here, more than ONNX_TOL; 256's is exact.
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            tie_word_embeddings=True, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], **(common | {"hidden_size": 256})))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (0 if family == "gemma3" else 1))
    model.config.architectures = [type(model).__name__]
    save_with_embedded_tokenizer(model, path)
    return write_bos_tokenizer(path) if family == "gemma3" else path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


def _fold_error(path: Path, wrong_norm: str | None = None) -> float:
    """Largest relative change of any decoder layer's output after folding a random scale
    into each of its scale groups (fp64). `wrong_norm` forces a norm kind (negative control)."""
    from phitune.models import load_causal_lm
    from phitune.quantize.algorithms.awq import apply_scale
    from phitune.quantize.arch import scale_groups
    from phitune.quantize.driver import capture_layer_inputs, run_layer
    model = load_causal_lm(path, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    hidden, per_layer = capture_layer_inputs(model, samples, torch.float64, "cpu")
    worst = 0.0
    for layer, kwargs in zip(model.model.layers, per_layer):
        before = run_layer(layer, hidden, kwargs, 4096)
        for group in scale_groups(model.config.architectures[0], layer, model.config, kwargs):
            if wrong_norm and not isinstance(group.prev, torch.nn.Linear):
                group.norm = wrong_norm
            n = group.prev_rows.stop - group.prev_rows.start if group.prev_rows else \
                group.in_features // group.kv_repeat if group.kv_repeat > 1 else group.in_features
            s = (torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.2)
            apply_scale(group, s, torch.ones(group.in_features, dtype=torch.float64))
        after = run_layer(layer, hidden, kwargs, 4096)
        worst = max(worst, ((after - before).abs().max() / before.abs().max()).item())
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_any_scale_preserves_every_layer(tiny_models, family):
    assert _fold_error(tiny_models[family]) < FOLD_TOL


def test_gemma_folded_as_a_plain_rms_norm_would_change_the_layer(tiny_models):
    """The negative control: the norm kind is what keeps Gemma's layers unchanged."""
    assert _fold_error(tiny_models["gemma3"], wrong_norm="rms") > 1e-2


def test_unknown_architecture_is_refused_in_one_line(tiny_models, cli, tmp_path):
    model = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models["qwen2"], model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    result = cli("quantize", "-m", str(model), "--algorithm", "rtn", "--no-eval", "-o", str(tmp_path / "q"))
    assert result.code == 2
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    assert "GPT2LMHeadModel" in line
    for cls in ("Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        assert cls in line


def _ok(cli, *args):
    result = cli(*args)
    assert result.code == 0, result.err[-2000:]
    return result


@pytest.fixture(scope="session")
def finetuned(tiny_models, tmp_path_factory):
    """family → a directory holding its RTN and AWQ models and a LoRA trained on the AWQ one
    (a few steps), made as users type it; built once per family, on first use."""
    from phitune.cli.main import main
    made: dict[str, Path] = {}

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        assert exit_info.value.code == 0, args

    def get(family: str) -> Path:
        if family not in made:
            model, out = tiny_models[family], tmp_path_factory.mktemp(f"chain-{family}")
            run("quantize", "-m", str(model), "--algorithm", "rtn", "--no-eval", "-o", str(out / "rtn"))
            run("quantize", "-m", str(model), "--algorithm", "awq", "--calib_samples", "4",
                "--calib_seq_len", "64", "--no-eval", "-o", str(out / "awq"))
            run("finetune", "--method", "lora", "-m", str(out / "awq"), "--data_files",
                str(REPO / "data" / "travel.jsonl"), "--data_name", "json", "--text_template", TEMPLATE,
                "--max_steps", "4", "--max_seq_len", "128", "--lora_r", "4", "--learning_rate", "5e-2",
                "-o", str(out / "ft"))
            made[family] = out
        return made[family]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_awq_and_rtn_then_finetune(finetuned, family):
    from phitune.formats.awq_gemm import load_awq_dequantized
    out = finetuned(family)
    for algorithm in ("rtn", "awq"):
        config = json.loads((out / algorithm / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "awq"
        load_awq_dequantized(out / algorithm)  # every tensor there, in the GEMM layout
    assert (out / "ft" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_opt_int4_with_adapter_then_infer(finetuned, family, cli):
    out = finetuned(family)
    _ok(cli, "auto-opt", "-m", str(out / "ft" / "model"), "--adapter_path",
        str(out / "ft" / "adapter"), "-o", str(out / "onnx"))
    onnx = out / "onnx" / "model"
    args = ("--prompt", "what is the best thing to see in chicago", "--max_new_tokens", "12")
    tuned = _ok(cli, "infer", "-m", str(onnx), "--adapter", str(onnx / "adapter_weights.onnx_adapter"), *args)
    base = _ok(cli, "infer", "-m", str(onnx), "--no-adapter", *args)
    assert tuned.out.strip() and base.out.strip()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_onnx_matches_pytorch(tiny_models, family, cli, tmp_path):
    from test_export import greedy_max_diff
    from transformers import AutoModelForCausalLM
    model = tiny_models[family]
    _ok(cli, "auto-opt", "-m", str(model), "--precision", "fp32", "-o", str(tmp_path / "onnx"))
    reference = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    assert greedy_max_diff(tmp_path / "onnx" / "model", reference, steps=10) <= ONNX_TOL


def _gemma3_config(tiny_models, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the tiny Gemma 3's config.json (all the builder settings read), edited."""
    path = tmp_path / name
    path.mkdir()
    config = json.loads((tiny_models["gemma3"] / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_gemma3_builder_settings_read_either_config_layout(tiny_models, tmp_path):
    """Hub checkpoints keep transformers 4's layout (rope_theta, rope_local_base_freq,
    sliding_window_pattern); the settings resolve through transformers to the same values."""
    from phitune.export.builder import config_settings

    def legacy(config):
        del config["rope_parameters"], config["layer_types"]
        config.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None, sliding_window_pattern=2)
    settings = config_settings(tiny_models["gemma3"])
    assert settings == {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                        "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert config_settings(_gemma3_config(tiny_models, tmp_path, "legacy", legacy)) == settings
    assert config_settings(tiny_models["qwen3"]) == {}  # the builder reads it as it is


def test_gemma3_with_global_rope_scaling_is_refused_in_one_line(tiny_models, cli, tmp_path):
    """The builder would give the sliding layers the global layers' linear RoPE factor (as the
    4B+ Gemma 3 checkpoints set it): refused before it runs, not built wrong."""
    def scaled(config):
        config["rope_parameters"]["full_attention"] |= {"rope_type": "linear", "factor": 8.0}
    model = _gemma3_config(tiny_models, tmp_path, "scaled", scaled)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["gemma3"] / name, model / name)
    result = cli("auto-opt", "-m", str(model), "--precision", "fp32", "-o", str(tmp_path / "onnx"))
    assert result.code == 2
    assert len(result.error_lines) == 1, result.err
    assert "rope_type='linear'" in result.error_lines[0] and "sliding" in result.error_lines[0]
    assert not (tmp_path / "onnx").exists()
