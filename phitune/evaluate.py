"""Held-out perplexity: the figure every step is judged by."""

from __future__ import annotations

import math


def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256, max_tokens: int = 65536,
               device: str = "cpu") -> float:
    """exp(mean next-token loss) over non-overlapping windows of the joined texts."""
    import torch
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor(ids[start:start + seq_len + 1], device=device)
            if len(window) < 2:
                break
            logits = model(window[:-1].unsqueeze(0), use_cache=False).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
            total += loss.item()
            count += len(window) - 1
    return math.exp(total / count)
