"""Next-token loss that never holds a whole batch of logits.

A plain `model(**batch).loss` materialises [tokens, vocab] logits, their fp32 upcast, the
softmax and their gradients: for Phi-3's 32k vocabulary at 1024 tokens that is ~0.5 GB, more
than the activations of the decoder layers. Here the LM head runs only on positions that carry
a label (response tokens: the prompt's logits are never computed), in chunks whose logits are
recomputed in backward instead of kept. Same value as transformers' loss: mean cross-entropy
over shifted labels that are not -100.

A chunk whose logits are small (a 512-token CPU pass: ~50 MB at Phi-3's vocabulary) is kept
instead of recomputed: recomputing would cost an LM-head forward for memory that is not there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from phitune.data.tokens import IGNORE_INDEX
from phitune.nll import head_nll, hidden_nll, parts


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM; forward(batch) → scalar loss. DDP wraps this module, so its
    forward is the one that prepares gradient synchronisation."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024, keep_logits_mb: float = 64):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.keep_logits_mb = keep_logits_mb

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                **inputs) -> torch.Tensor:
        """Mean next-token loss over the labelled positions; `reduction="sum"` gives their sum,
        for micro-batches weighted by their share of a step's labelled tokens."""
        decoder, head, cap = parts(self.model)
        hidden = decoder(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
        targets = labels[:, 1:].reshape(-1)
        keep = targets != IGNORE_INDEX
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
        targets = targets[keep]
        if targets.numel() == 0:
            return hidden.sum() * 0.0  # keeps the graph (and DDP) whole
        if not torch.is_grad_enabled():  # eval: one small chunk of logits at a time
            total = hidden_nll(hidden, targets, head, cap)
        else:
            total = self._train_nll(hidden, targets, head, cap)
        return total if reduction == "sum" else total / targets.numel()

    def _train_nll(self, hidden, targets, head, cap) -> torch.Tensor:
        """The summed loss in chunks of `chunk_tokens`, each chunk's logits recomputed in
        backward when they are large (kept otherwise: see the module's docstring)."""
        total = hidden.new_zeros((), dtype=torch.float32)
        logits_mb = min(targets.numel(), self.chunk_tokens) * head.weight.shape[0] * 4 / 2**20
        recompute = logits_mb > self.keep_logits_mb
        for start in range(0, targets.numel(), self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            if recompute:
                total = total + checkpoint(head_nll, hidden[chunk], targets[chunk], head, cap,
                                           use_reentrant=False)
            else:
                total = total + head_nll(hidden[chunk], targets[chunk], head, cap)
        return total


def labelled_tokens(labels) -> int:
    """Positions that carry a next-token label (the loss's denominator) in one row's labels."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)
