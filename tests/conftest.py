"""Shared fixtures: throwaway random models of several shapes (the embedded tokenizer, random
weights), and a way to run the CLI in-process and read its exit code and stderr."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import background_demo

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
