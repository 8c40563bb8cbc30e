"""Held-out perplexity: the figure every step is judged by."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from phitune import genai_config

if TYPE_CHECKING:
    from phitune.sequence_start import SequenceStart


def token_ids(tokenizer, texts: list[str], max_tokens: int = 65536) -> list[int]:
    """The joined texts' token ids (EOS between documents), at most `max_tokens`; no start
    token: each window gets its own (`windows`)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def context_only(start: SequenceStart | None) -> int:
    """How many leading ids of a window are context, never a target: the start tokens, or
    without one the window's first text token."""
    return max(1, len(start.ids)) if start is not None else 1


def windows(ids: list[int], seq_len: int, start: SequenceStart | None = None) -> list[list[int]]:
    """Non-overlapping windows of `seq_len` inputs over the text, each starting as the model's
    sequences start (`start`, e.g. BOS then text). With a start every text token is a target
    once; without one, each window's first token is also the previous window's last target
    (the very first text token is never scored)."""
    head = list(start.ids) if start is not None else []
    if not head:
        return [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)
                if len(ids[i:i + seq_len + 1]) >= 2]
    step = seq_len + 1 - len(head)
    if step < 1:
        raise ValueError(f"a window of {seq_len} tokens has no room after the start {head}")
    return [head + ids[i:i + step] for i in range(0, len(ids), step)]


def scored_tokens(ids: list[int], seq_len: int, start: SequenceStart | None = None) -> int:
    """Targets `perplexity` averages over for these ids."""
    skip = context_only(start)
    return sum(len(w) - skip for w in windows(ids, seq_len, start))


def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256, max_tokens: int = 65536,
               device: str = "cpu", ids: list[int] | None = None,
               batch_tokens: int = 2048, start: SequenceStart | None = None) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the joined texts, each
    started as the model's sequences start (`start`; default: asked of `tokenizer`).

    `ids` (from `token_ids`) skips the tokenization when one text scores several models.
    Equal-length windows run `batch_tokens` at a time under inference_mode, so scoring costs
    about one plain forward over the same tokens (a window at a time cost several); the LM
    head runs a chunk of positions at a time (`phitune.nll`): memory does not grow with the
    vocabulary beyond one chunk's logits."""
    import torch

    from phitune.nll import causal_lm_nll
    start = _start_of(tokenizer, start)
    if ids is None:
        ids = token_ids(tokenizer, texts, max_tokens)
    rows_all, skip = windows(ids, seq_len, start), context_only(start)
    total, count = 0.0, 0
    per_batch = max(1, batch_tokens // seq_len)
    with torch.inference_mode():
        for first in range(0, len(rows_all), per_batch):
            batch = rows_all[first:first + per_batch]
            for length in sorted({len(w) for w in batch}):  # the last window may be short
                rows = torch.tensor([w for w in batch if len(w) == length], device=device)
                nll, n = causal_lm_nll(model, rows, skip)
                total += nll
                count += n
    return math.exp(total / count)


def _start_of(tokenizer, start: SequenceStart | None) -> SequenceStart:
    if start is not None:
        return start
    if tokenizer is None:
        raise ValueError("perplexity over given ids needs their sequence start (start=...)")
    from phitune.sequence_start import of_tokenizer
    return of_tokenizer(tokenizer)


def onnx_perplexity(model_dir, tokenizer, texts: list[str], seq_len: int = 256,
                    max_tokens: int = 65536, adapter_file=None,
                    start: SequenceStart | None = None) -> float:
    """The same figure for an onnxruntime-genai model dir, through onnxruntime on its graph
    (one prompt pass per window, empty KV cache), optionally with an .onnx_adapter fed.
    `start` defaults to the dir's own rule (`sequence_start.of_model_dir`)."""
    if start is None:
        from phitune.sequence_start import of_model_dir
        start = of_model_dir(model_dir, tokenizer)
    scorer = OnnxScorer(model_dir, adapter_file)
    skip = context_only(start)
    total, count = 0.0, 0
    for window in windows(token_ids(tokenizer, texts, max_tokens), seq_len, start):
        total -= scorer.log_probs(window)[skip - 1:].sum()
        count += len(window) - skip
    return math.exp(total / count)


# ---------------------------------------------------------------- per-token scores, latency
# (used by `phitune eval`; `perplexity` and `onnx_perplexity` above are what the steps report)

def mean_nll(scores) -> tuple[float, int]:
    """(mean negative log-likelihood, tokens) over (sum of -log p, count) pairs."""
    total = sum(s for s, _ in scores)
    count = sum(n for _, n in scores)
    return total / max(count, 1), count


class OnnxScorer:
    """One onnxruntime session on an onnxruntime-genai model's graph, for next-token
    log-probabilities of whole sequences (one prompt pass each, empty KV cache), with an
    optional .onnx_adapter fed as the LoRA inputs (what `onnx_perplexity` sums over windows)."""

    def __init__(self, model_dir, adapter_file=None):
        from pathlib import Path

        import onnxruntime as ort
        model_dir = Path(model_dir)
        self.decoder = genai_config.decoder(model_dir)
        self.min_kv = genai_config.min_kv_tokens(model_dir)  # the graph's window, if any
        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA defaults are initializers that are also inputs
        self.session = ort.InferenceSession(
            str(model_dir / genai_config.decoder_file(model_dir)), options,
            providers=["CPUExecutionProvider"])
        self.feeds = {}
        if adapter_file is not None:
            # .numpy() views the adapter's own buffers: keep the adapter alive with them
            self._adapter = ort.AdapterFormat.read_adapter(str(adapter_file))
            self._params = self._adapter.get_parameters()
            self.feeds = {name: value.numpy() for name, value in self._params.items()}
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]

    def log_probs(self, ids):
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids)-1, as a float64 numpy array."""
        import numpy as np

        from phitune.nll import log_probs_rows
        ids = list(ids)
        x = np.array([ids[:-1]], dtype=np.int64)
        feeds = dict(self.feeds, input_ids=x, attention_mask=np.ones_like(x))
        # An empty cache, except that a sliding-window graph (Gemma 3) refuses a KV buffer
        # smaller than its window: there it is a zero buffer of that room, which the graph
        # reads as empty (the attention mask says nothing is cached; logits as PyTorch's).
        room = max(x.shape[1], self.min_kv) if self.min_kv else 0
        for entry in self.past:
            dtype = np.float16 if "float16" in entry.type else np.float32
            feeds[entry.name] = np.zeros((1, self.decoder["num_key_value_heads"], room,
                                          self.decoder["head_size"]), dtype=dtype)
        logits = self.session.run(["logits"], feeds)[0][0]  # the graph's: the whole window
        return log_probs_rows(logits, np.array(ids[1:]))


def onnx_labels_nll(scorer: OnnxScorer, examples, ignore_index: int = -100) -> tuple[float, int]:
    """Mean loss over the labelled tokens of tokenized examples ({input_ids, labels}, labels
    not shifted, as for a Hugging Face causal LM), one example per pass."""
    import numpy as np
    scores = []
    for ex in examples:
        labels = np.array(ex["labels"][1:])
        keep = labels != ignore_index
        if not keep.any():
            continue
        lp = scorer.log_probs(ex["input_ids"])
        scores.append((-float(lp[keep].sum()), int(keep.sum())))
    return mean_nll(scores)


def torch_latency(model, vocab_size: int, prefill: int = 128, decode: int = 16, repeats: int = 3,
                  device: str = "cpu", start: SequenceStart | None = None) -> dict:
    """Mean milliseconds of a `prefill`-token prompt pass (started as the model's sequences
    start) and of a 1-token decode step with a KV cache (after one untimed warm-up pass)."""
    import time

    import torch
    ids = torch.tensor([latency_prompt(prefill, vocab_size, start)], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    prefill_s, decode_s = [], []
    with torch.no_grad():
        for r in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            sync()
            if r:
                prefill_s.append(time.perf_counter() - t0)
        past = out.past_key_values
        for i in range(decode):
            token = torch.tensor([[_latency_token(prefill + i, vocab_size)]], device=device)
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            sync()
            decode_s.append(time.perf_counter() - t0)
            past = out.past_key_values
    return _latency(prefill_s, decode_s, prefill, decode)


def onnx_latency(model_dir, adapter_file=None, prefill: int = 128, decode: int = 16,
                 repeats: int = 3, start: SequenceStart | None = None) -> dict:
    """The same figures through onnxruntime-genai's generator: `append_tokens` of the prompt,
    then `append_tokens` of one token at a time (each one forward pass with the KV cache)."""
    import time
    from pathlib import Path

    import onnxruntime_genai as og
    vocab = genai_config.vocab_size(Path(model_dir))
    model = og.Model(str(model_dir))
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "eval")
    ids = latency_prompt(prefill, vocab, start)
    prefill_s, decode_s = [], []
    for r in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=genai_config.kv_tokens(Path(model_dir),
                                                                    prefill + decode + 2),
                                  do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "eval")
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        if r:
            prefill_s.append(time.perf_counter() - t0)
    for i in range(decode):
        token = _latency_token(prefill + i, vocab)
        t0 = time.perf_counter()
        generator.append_tokens([token])
        decode_s.append(time.perf_counter() - t0)
    return _latency(prefill_s, decode_s, prefill, decode)


def latency_prompt(prefill: int, vocab_size: int, start: SequenceStart | None = None) -> list[int]:
    """`prefill` ids: the model's sequence start, then the fixed timing stream."""
    head = list(start.ids) if start is not None else []
    return (head + [_latency_token(i, vocab_size) for i in range(prefill)])[:prefill]


def _latency_token(i: int, vocab_size: int) -> int:
    """A fixed token stream for timing (what the tokens are does not change the compute)."""
    return (7 + 31 * i) % min(vocab_size, 4096)


def _latency(prefill_s: list[float], decode_s: list[float], prefill: int, decode: int) -> dict:
    return {"latency_ms": round(1000 * sum(decode_s) / len(decode_s), 3),
            "prefill_ms": round(1000 * sum(prefill_s) / len(prefill_s), 3),
            "prefill_tokens": prefill, "decode_tokens": decode}
