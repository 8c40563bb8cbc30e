"""Chunked next-token NLL (phitune/nll.py) equals the plain whole-window computation: for
perplexity (PyTorch and onnxruntime paths), finetune's eval loss, a PEFT-wrapped model and a
model with logit soft-capping."""

import math

import numpy as np
import pytest
import torch

from phitune import nll
from phitune.evaluate import context_only, perplexity, token_ids, windows
from phitune.models import load_causal_lm, load_tokenizer
from phitune.quantize.calib import read_texts

from conftest import EMBEDDED, REPO

REL = 1e-5


def plain_perplexity(model, rows_all: list[list[int]], skip: int) -> float:
    """The unchunked reference: whole-window logits, one cross-entropy over them."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in rows_all:
            rows = torch.tensor([w])
            logits = model(rows[:, :-1], use_cache=False).logits[:, skip - 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), rows[:, skip:].reshape(-1),
                reduction="sum").item()
            count += rows[:, skip:].numel()
    return math.exp(total / count)


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm(EMBEDDED, dtype=torch.float32).eval(), load_tokenizer(EMBEDDED)


@pytest.fixture(scope="module")
def ids(tiny):
    return token_ids(tiny[1], read_texts(REPO / "data" / "heldout.txt"), 2048)


def test_chunked_perplexity_equals_the_whole_window_one(tiny, ids, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(nll, "CHUNK_LOGITS_MB", 0.5)  # 16 positions a chunk at this vocabulary
    assert nll.chunk_positions(model.config.vocab_size) < 64
    from phitune.sequence_start import of_tokenizer
    start = of_tokenizer(tokenizer)
    chunked = perplexity(model, tokenizer, [], 256, ids=ids, start=start)
    plain = plain_perplexity(model, windows(ids, 256, start), context_only(start))
    assert chunked == pytest.approx(plain, rel=REL)


def test_odd_chunks_and_a_peft_model(tiny):
    from peft import LoraConfig, get_peft_model
    model, _ = tiny
    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(EMBEDDED, dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["qkv_proj"], init_lora_weights=False))
    rows = torch.randint(0, model.config.vocab_size, (3, 41))
    for m in (model, peft.eval()):
        with torch.no_grad():
            total, n = nll.causal_lm_nll(m, rows, skip=2, chunk=7)
            logits = m(input_ids=rows[:, :-1]).logits[:, 1:]
            ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    rows[:, 2:].reshape(-1), reduction="sum")
        assert n == 3 * 39
        assert total == pytest.approx(ref.item(), rel=REL)


def test_soft_capped_logits_are_capped_in_every_chunk(tmp_path):
    """A model whose forward tanh-caps its logits (Gemma 2's final_logit_softcapping): the
    chunks apply the same cap as model(...).logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(config).eval()
    rows = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        total, _ = nll.causal_lm_nll(model, rows, chunk=5)
        logits = model(input_ids=rows[:, :-1]).logits
        assert logits.abs().max() <= 2.0
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), rows[:, 1:].reshape(-1),
                                                reduction="sum")
    assert total == pytest.approx(ref.item(), rel=REL)


def test_onnx_log_probs_in_chunks_equal_the_whole_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((50, 3000)) * 5).astype(np.float32)
    targets = rng.integers(0, 3000, 50)
    full = logits.astype(np.float64)
    full = full - full.max(-1, keepdims=True)
    ref = (full - np.log(np.exp(full).sum(-1, keepdims=True)))[np.arange(50), targets]
    got = nll.log_probs_rows(logits, targets, chunk=7)
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_finetune_eval_loss_is_transformers_loss(tiny):
    from phitune.finetune.loss import CausalLMLoss
    model, _ = tiny
    rows = torch.randint(0, model.config.vocab_size, (2, 33))
    labels = rows.clone()
    labels[:, :10] = -100  # prompt tokens carry no label
    with torch.no_grad():
        ours = CausalLMLoss(model)(input_ids=rows, labels=labels)
        ref = model(input_ids=rows, labels=labels).loss
    assert ours.item() == pytest.approx(ref.item(), rel=REL)
