"""Shared fixtures: throwaway random models of several shapes (the embedded tokenizer, random
weights); the tiny chain (quantize → finetune → auto-opt of the embedded model) and the
onnxruntime-genai test models, each built once per test run; and a way to run the CLI
in-process and read its exit code and stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import background_demo
from genai_helpers import HIDDEN, LORA, link_dir, lora_params, write_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # benchmarks.shapes
from benchmarks.shapes import BOS_ID, write_bos_tokenizer  # noqa: E402,F401  (Gemma-like tokenizer)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "data" / "tiny-phi3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def build_random_model(path: Path, arch: str = "phi3", hidden: int = 256, layers: int = 2,
                       heads: int = 8, kv_heads: int = 4, intermediate: int = 512, seed: int = 0) -> Path:
    """A random causal LM with the embedded tokenizer; a few MB, built in well under a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
    torch.manual_seed(seed)
    embedded = json.loads((EMBEDDED / "config.json").read_text())
    ids = {k: embedded[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    common = dict(vocab_size=embedded["vocab_size"], **ids, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, tie_word_embeddings=False)
    if arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(original_max_position_embeddings=1024, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return save_with_embedded_tokenizer(model, path)


def save_with_embedded_tokenizer(model, path: Path) -> Path:
    """A random-weight model saved as a checkpoint dir with tiny-phi3's tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (EMBEDDED / name).is_file():
            shutil.copy(EMBEDDED / name, path / name)
    return path


@pytest.fixture(scope="session")
def random_phi3(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("models") / "phi3")


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


# ---------------------------------------------------------------- shared chains, built once per run
# Tests read these outputs and never write into them (a test that needs to change one copies
# it, or builds its own in its tmp_path).

TRAVEL = REPO / "data" / "travel.jsonl"
PHI3_TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def run_main(*args: str) -> None:
    """`phitune ARGS` in-process for a session fixture (the `cli` fixture is per test)."""
    from phitune.cli.main import main
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0, args


@pytest.fixture(scope="session")
def tiny_awq(tmp_path_factory) -> Path:
    """The embedded tiny-phi3 quantized with AWQ (8 calibration blocks of 128 tokens), with
    quantize's perplexity before and after."""
    out = tmp_path_factory.mktemp("chain") / "awq"
    run_main("quantize", "-m", "tiny-phi3", "--calib_samples", "8", "--calib_seq_len", "128",
             "-o", out)
    return out


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_awq) -> Path:
    """LoRA r8 on `tiny_awq`, 10 steps on data/travel.jsonl, 10% held out for its eval loss."""
    out = tiny_awq.parent / "finetuned"
    run_main("finetune", "--method", "lora", "-m", tiny_awq, "--data_files", TRAVEL,
             "--data_name", "json", "--text_template", PHI3_TEMPLATE, "--max_steps", "10",
             "--max_seq_len", "256", "--lora_r", "8", "--eval_split", "0.1", "-o", out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_finetuned(tiny_finetuned) -> Path:
    """`tiny_finetuned` exported fp32 by auto-opt, its adapter as the model's own."""
    out = tiny_finetuned.parent / "onnx-finetuned-fp32"
    run_main("auto-opt", "-m", tiny_finetuned, "--precision", "fp32", "-o", out)
    return out


@pytest.fixture(scope="session")
def genai_model(tmp_path_factory) -> Path:
    """The embedded tiny-phi3 as an fp32 onnxruntime-genai model (~5 s), with the record of
    its sequence start that auto-opt writes (else every Session asks transformers)."""
    from phitune import sequence_start
    root = tmp_path_factory.mktemp("genai")
    out = root / "model"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder",
                    "-i", str(REPO / "data" / "tiny-phi3"), "-o", str(out), "-p", "fp32",
                    "-e", "cpu", "-c", str(root / "cache")], check=True, capture_output=True)
    sequence_start.record(out)
    return out


@pytest.fixture(scope="session")
def lora_model(genai_model, tmp_path_factory) -> Path:
    """A copy whose layer-0 o_proj adds x·A·B, A and B graph inputs with empty defaults
    (the multi-LoRA layout auto-opt writes): without an adapter it is the base model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    out = tmp_path_factory.mktemp("lora") / "model"
    link_dir(genai_model, out, skip=("model.onnx",))
    model = onnx.load(str(genai_model / "model.onnx"), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    base = next(n for n in nodes if n.name == "/model/layers.0/attn/o_proj/MatMul")
    x, y = base.input[0], base.output[0]
    base.output[0] = y + "_base"
    a, b = LORA + ".lora_A", LORA + ".lora_B"
    graph.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [HIDDEN, "rank_o0"]),
                        helper.make_tensor_value_info(b, TensorProto.FLOAT, ["rank_o0", HIDDEN])])
    graph.initializer.extend([numpy_helper.from_array(np.zeros((HIDDEN, 0), np.float32), a),
                              numpy_helper.from_array(np.zeros((0, HIDDEN), np.float32), b)])
    lora = [helper.make_node("MatMul", [x, a], ["lora_xa"], name="lora_A_mm"),
            helper.make_node("MatMul", ["lora_xa", b], ["lora_xab"], name="lora_B_mm"),
            helper.make_node("Add", [y + "_base", "lora_xab"], [y], name="lora_add")]
    at = nodes.index(base) + 1
    del graph.node[:]
    graph.node.extend(nodes[:at] + lora + nodes[at:])
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.fixture(scope="session")
def adapter_file(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("adapters") / "travel.onnx_adapter",
                         lora_params())


def help_run(command: str, modules: tuple[str, ...]):
    """`phitune COMMAND --help` in a fresh interpreter; its last stdout line lists which of
    `modules` the help imported (a command's help must stay light)."""
    import subprocess
    import sys
    code = ("import sys\nfrom phitune.cli.main import main\n"
            f"try: main([{command!r}, '--help'])\nexcept SystemExit: pass\n"
            f"print(sorted(m for m in {modules!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def cli(capsys):
    """Run `phitune ARGS...` in-process; returns exit code, stdout and stderr."""
    from phitune.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return run


# The real-model demo runs in the background beside the rest of the suite (background_demo.py).
def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        background_demo.start(session.items)


def pytest_runtest_setup(item):
    background_demo.give_threads_back_when_done()


def pytest_sessionfinish(session):
    background_demo.finish()
