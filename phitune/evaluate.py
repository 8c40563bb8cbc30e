"""Held-out perplexity: the figure every step is judged by."""

from __future__ import annotations

import math


def _token_ids(tokenizer, texts: list[str], max_tokens: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def _windows(ids: list[int], seq_len: int):
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start:start + seq_len + 1]
        if len(window) < 2:
            break
        yield window


def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256, max_tokens: int = 65536,
               device: str = "cpu") -> float:
    """exp(mean next-token loss) over non-overlapping windows of the joined texts."""
    import torch
    total, count = 0.0, 0
    with torch.no_grad():
        for window in _windows(_token_ids(tokenizer, texts, max_tokens), seq_len):
            window = torch.tensor(window, device=device)
            logits = model(window[:-1].unsqueeze(0), use_cache=False).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
            total += loss.item()
            count += len(window) - 1
    return math.exp(total / count)


def onnx_perplexity(model_dir, tokenizer, texts: list[str], seq_len: int = 256,
                    max_tokens: int = 65536, adapter_file=None) -> float:
    """The same figure for an onnxruntime-genai model dir, through onnxruntime on its graph
    (one prompt pass per window, empty KV cache), optionally with an .onnx_adapter fed."""
    import json
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    model_dir = Path(model_dir)
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA defaults are initializers that are also inputs: by design
    session = ort.InferenceSession(str(model_dir / decoder.get("filename", "model.onnx")),
                                   options, providers=["CPUExecutionProvider"])
    feeds_base = {}
    if adapter_file is not None:
        params = ort.AdapterFormat.read_adapter(str(adapter_file)).get_parameters()
        feeds_base = {name: value.numpy() for name, value in params.items()}
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    total, count = 0.0, 0
    for window in _windows(_token_ids(tokenizer, texts, max_tokens), seq_len):
        ids = np.array([window[:-1]], dtype=np.int64)
        feeds = dict(feeds_base, input_ids=ids, attention_mask=np.ones_like(ids))
        for entry in past:
            dtype = np.float16 if "float16" in entry.type else np.float32
            feeds[entry.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]),
                                         dtype=dtype)
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(total / count)
