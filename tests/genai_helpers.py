"""Helpers for the tests that drive onnxruntime-genai models (infer, serve): the LoRA the test
graph carries, adapter files for it, and a plain greedy loop to compare phitune against. The
models themselves are session fixtures in conftest.py (`genai_model`, `lora_model`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LORA = "model.layers.0.attn.o_proj"  # the module the test graph gets a LoRA on
HIDDEN = 256


def link_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard links (onnxruntime refuses external data reached through a symlink)."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.name not in skip:
            os.link(file, dst / file.name)


def write_adapter(path: Path, params: dict[str, np.ndarray]) -> Path:
    import onnxruntime as ort
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    arrays = {k: np.ascontiguousarray(v) for k, v in params.items()}  # alive until export
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))
    return path


def lora_params(rank: int = 4, seed: int = 0, rows: int = HIDDEN, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {LORA + ".lora_A": rng.standard_normal((rows, rank)).astype(dtype),
            LORA + ".lora_B": rng.standard_normal((rank, HIDDEN)).astype(dtype)}


def direct(model_dir: Path, messages=None, text: str | None = None, n: int = 12,
           adapter: Path | None = None) -> tuple[str, list[int]]:
    """A plain onnxruntime-genai greedy loop: the reference `phitune infer` must match."""
    import onnxruntime_genai as og
    model = og.Model(str(model_dir))
    tok = og.Tokenizer(model)
    if text is None:
        text = tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    ids = tok.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), "a")
        gen.set_active_adapter(adapters, "a")
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    eos = {int(t) for t in tok.eos_token_ids}
    stream = tok.create_stream()  # tok.decode() cuts the text at the first invalid UTF-8 byte
    return "".join(stream.decode(t) for t in out if t not in eos), out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
