"""The models benchmarks run on: Phi-3-shaped random-weight checkpoints (cached on disk), random
LoRA adapters, prompts from the shipped data, and the embedded tokenizer made to start every text
with <bos> as Gemma's does (the tests' Gemma-shaped models use it too)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks.harness import REPO

EMBEDDED = REPO / "data" / "tiny-phi3"

# Gemma's tokenizer starts every text with <bos> (its tokenizer.json post-processor says so),
# and so does its instruct chat template ({{ bos_token }}): the embedded tokenizer made to do
# the same, its unused <|system|> token (id 8190) renamed <bos>. Everything else is tiny-phi3's.
BOS_ID = 8190
BOS_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + "
                     "m['content'] + '<|end|>\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def write_bos_tokenizer(path: Path) -> Path:
    """Gemma's start-of-sequence behaviour on the embedded tokenizer, written into `path`."""
    tokenizer = json.loads((EMBEDDED / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["id"] == BOS_ID:
            token["content"] = "<bos>"
    bos, text = {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, text],
        "pair": [bos, text, {"SpecialToken": {"id": "<bos>", "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [BOS_ID], "tokens": ["<bos>"]}}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((EMBEDDED / "tokenizer_config.json").read_text())
    config.update(bos_token="<bos>", chat_template=BOS_CHAT_TEMPLATE,
                  extra_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    model_config = path / "config.json"
    if model_config.is_file():
        model_config.write_text(json.dumps(json.loads(model_config.read_text())
                                        | {"bos_token_id": BOS_ID}, indent=1))
    return path


PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, tie_word_embeddings=False)


def build_phi3_mini_shaped(path: Path, layers: int, device: str = "cpu") -> Path:
    """Phi-3-mini dimensions, random bf16 weights, `layers` decoder layers (cached on disk).
    device="cuda" draws the weights on the GPU (seconds, not minutes, for 32 layers)."""
    if (path / "config.json").is_file():
        return path

    import torch
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 3.8B params: never materialise an fp32 copy
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(Phi3Config(num_hidden_layers=layers, **PHI3_MINI))
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.dtype = "bfloat16"
    model.save_pretrained(path)
    embedded = REPO / "data" / "tiny-phi3"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, path / name)
    return path


# The default decode model: Phi-3-shaped, random weights, ~170M params: its int4 weights (~100 MiB,
# 3× this CPU's L3) come from memory every token, unlike tiny-phi3's. Builder traps avoided: vocab
# != 2 × intermediate (it picks the LM head by output size), max == original max positions (LongRoPE).
INFER_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=8192, max_position_embeddings=4096,
                   original_max_position_embeddings=4096, tie_word_embeddings=False,
                   bos_token_id=8187, eos_token_id=8187, pad_token_id=8187)


LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def build_phi3_shaped(path: Path, layers: int, shape: dict) -> Path:
    """A Phi-3-shaped model of `shape`, random bf16 weights, the embedded tokenizer (cached)."""
    if (path / "config.json").is_file():
        return path

    import torch
    from transformers import Phi3Config, Phi3ForCausalLM
    assert shape["vocab_size"] != 2 * shape["intermediate_size"], "the builder would pick a wrong LM head"
    assert shape["max_position_embeddings"] == shape["original_max_position_embeddings"], "LongRoPE path"
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(num_hidden_layers=layers, **shape)).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    return _publish_with_tokenizer(tmp, path)


def _publish_with_tokenizer(tmp: Path, path: Path) -> Path:
    """Give a bench checkpoint written in `tmp` the embedded tiny-phi3 tokenizer (the Phi-3
    vocabulary), then rename it into place."""
    embedded = REPO / "data" / "tiny-phi3"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, tmp / name)
    tmp.rename(path)
    return path


def random_lora(model_dir: Path, path: Path, rank: int) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False) on every projection."""
    if (path / "adapter_config.json").is_file():
        return path

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    # every projection: Phi-3's fused names, or PEFT's "all-linear" (all but the LM head) elsewhere
    targets = LORA_TARGETS if model.config.model_type == "phi3" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(path)
    return path


def prompt_ids(model_dir: Path, n: int) -> list[int]:
    """The first `n` tokens of travel.jsonl's text, started as the model's sequences start."""
    from phitune.models import load_tokenizer
    from phitune.sequence_start import of_tokenizer
    tokenizer = load_tokenizer(model_dir)
    records = [json.loads(line) for line in open(REPO / "data" / "travel.jsonl") if line.strip()]
    text = "\n".join(f"{r['prompt']} {r['response']}" for r in records)
    ids = of_tokenizer(tokenizer).encode(tokenizer, text)
    if len(ids) < n:
        sys.exit(f"travel.jsonl has only {len(ids)} tokens; --prompt_tokens {n} is too many")
    return ids[:n]


TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def build_phi3_mini_int4(path: Path, layers: int, group_size: int = 128) -> Path:
    """Phi-3-mini dimensions as an int4 AWQ-GEMM checkpoint with random packed weights (cached):
    written tensor by tensor, so no float copy of the base ever exists (a 32-layer float model
    would need 7.6 GB in bf16 just to be quantized). Weights (q - 8) * s with s chosen for a
    std of ~0.02, like the float shapes' init; norms are ones."""
    if (path / "config.json").is_file():
        return path
    import json

    import torch
    from accelerate import init_empty_weights
    from huggingface_hub import save_torch_state_dict
    from transformers import Phi3Config, Phi3ForCausalLM

    from phitune.formats.awq_gemm import PACK, quantization_config
    config = Phi3Config(num_hidden_layers=layers, **PHI3_MINI)
    with init_empty_weights():
        model = Phi3ForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            i, o = module.in_features, module.out_features
            state[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (i, o // PACK),
                                                     generator=g, dtype=torch.int32)
            state[f"{name}.qzeros"] = torch.full((i // group_size, o // PACK), 0x88888888 - 2**32,
                                                 dtype=torch.int32)
            state[f"{name}.scales"] = torch.full((i // group_size, o), 0.02 / 4.6,
                                                 dtype=torch.float16)
    for name, p in model.named_parameters():
        module = name.rpartition(".")[0]
        if f"{module}.qweight" in state:
            continue
        state[name] = torch.ones(p.shape, dtype=torch.float16) if "norm" in name else \
            (torch.randn(p.shape, generator=g) * 0.02).half()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_torch_state_dict(state, str(tmp), max_shard_size="2GB")
    cfg = config.to_dict()
    cfg.update(quantization_config=quantization_config(4, group_size, True), dtype="float16",
               architectures=["Phi3ForCausalLM"])
    cfg.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return _publish_with_tokenizer(tmp, path)
