"""Next-token negative log-likelihood that never holds a window's logits at once.

A window's logits are [positions, vocab]: at a 262k vocabulary (Gemma 3) 256 positions are
268 MB in fp32, and a log-softmax over them makes two or three more such tensors — the
perplexity passes of a 268M-parameter model peaked at 6.5 GB that way. Here the model runs to
its last hidden states and the LM head runs on a chunk of positions at a time, sized so one
chunk's logits stay within `CHUNK_LOGITS_MB` whatever the vocabulary: memory is the
decoder's activations plus one chunk. The LM head's total work is what a plain forward does.

Every perplexity and loss figure goes through here: quantize's `--eval`, `phitune eval` (the
PyTorch runtime through `causal_lm_nll`, the onnxruntime one through `log_probs_rows`, whose
graph returns the whole window's logits: only the softmax is chunked there), and finetune's
loss (`head_nll`).
"""

from __future__ import annotations

import torch
from torch import nn

# One chunk's fp32 logits: 256 positions at a 262k vocabulary, 2048 at Phi-3's 32k. The LM
# head re-reads its whole weight for every chunk, so small chunks make it a bandwidth-bound
# matmul: a sweep on 2 cores at 262k (`bench.py eval` and a head-only micro-benchmark) had 64
# positions well above the 1.5x-a-forward budget and 256-512 within it; the logits, their
# log-softmax and the decoder's activations stay far below a whole window's (BENCHMARKS.md).
CHUNK_LOGITS_MB = 256.0


def chunk_positions(vocab_size: int, budget_mb: float | None = None) -> int:
    """Positions whose fp32 logits fit `budget_mb` (at least one)."""
    budget_mb = CHUNK_LOGITS_MB if budget_mb is None else budget_mb
    return max(1, int(budget_mb * 2**20 // (4 * max(1, vocab_size))))


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(decoder, LM head, final logit soft-cap or None) of a (PEFT-wrapped) causal LM: what
    `model(...).logits` computes, in two steps (the cap: Gemma 2's tanh soft-capping)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    cap = getattr(getattr(config, "get_text_config", lambda: config)(), "final_logit_softcapping",
                  None)
    return lm.get_decoder(), lm.get_output_embeddings(), cap


def _logits(hidden: torch.Tensor, head: nn.Module, cap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
             cap: float | None = None) -> torch.Tensor:
    """Summed -log p(target) over rows of `hidden` [n, H] (one chunk: the logits of all n rows
    exist at once; fp32 whatever the model's dtype, as transformers' loss)."""
    return nn.functional.cross_entropy(_logits(hidden, head, cap), targets, reduction="sum")


def hidden_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
               cap: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Summed -log p(target) over rows of `hidden` [n, H], `chunk` rows at a time (default:
    `chunk_positions` of the head's vocabulary); a 0-dim fp32 tensor."""
    chunk = chunk or chunk_positions(head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        total = total + head_nll(hidden[start:start + chunk], targets[start:start + chunk],
                                 head, cap)
    return total


def causal_lm_nll(model: nn.Module, rows: torch.Tensor, skip: int = 1,
                  chunk: int | None = None) -> tuple[float, int]:
    """(summed next-token -log p, targets) over equal-length windows `rows` [B, T]: inputs
    rows[:, :-1], targets rows[:, skip:] (the first `skip` ids are context only)."""
    decoder, head, cap = parts(model)
    hidden = decoder(input_ids=rows[:, :-1], use_cache=False).last_hidden_state
    hidden = hidden[:, skip - 1:].reshape(-1, hidden.shape[-1])
    targets = rows[:, skip:].reshape(-1)
    return hidden_nll(hidden, targets, head, cap, chunk).item(), targets.numel()


def log_probs_rows(logits, targets, chunk: int | None = None):
    """log p(targets[t]) from numpy logits [T, V], in float64, `chunk` positions at a time
    (a float64 log-softmax of a whole 262k-vocabulary window was 4 copies of 0.5 GB)."""
    import numpy as np
    chunk = chunk or chunk_positions(logits.shape[-1])
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), chunk):
        part = logits[start:start + chunk].astype(np.float64)
        part -= part.max(axis=-1, keepdims=True)
        picked = part[np.arange(len(part)), targets[start:start + chunk]]
        out[start:start + chunk] = picked - np.log(np.exp(part).sum(axis=-1))
    return out
