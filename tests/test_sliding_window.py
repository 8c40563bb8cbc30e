"""A graph with sliding-window layers needs a KV cache of at least its window, however short
the request (issue 27): a Gemma 3 export with a window of 64 failed in `infer` whenever
prompt + --max_new_tokens was shorter ("KV cache capacity (12) must be at least
local_window_size (64)"). The one owner of that floor is `genai_config.min_kv_tokens`; every
place that sizes a cache asks it: infer one-shot and chat (`Session._new_generator`), serve
(`Session.start`), eval's scorer and latency (`evaluate.OnnxScorer`, `onnx_latency`), and
the benchmarks through them.

One family per kind of window: Gemma 3 (its sliding layers always have one) and Qwen2 with
use_sliding_window (every layer windowed). Each answers a one-word prompt with 4 tokens, the
same tokens as PyTorch's greedy decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import EMBEDDED, save_with_embedded_tokenizer, write_bos_tokenizer

WINDOW = 64


def _build(family: str, path: Path) -> Path:
    import transformers as tf
    torch.manual_seed(0)
    embedded = json.loads((EMBEDDED / "config.json").read_text())
    common = dict(vocab_size=embedded["vocab_size"], hidden_size=256, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=1024, sliding_window=WINDOW,
                  **{k: embedded[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"],
            **common))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, max_window_layers=0,
                                                   tie_word_embeddings=False, **common))
    model.config.architectures = [type(model).__name__]
    save_with_embedded_tokenizer(model, path)
    return write_bos_tokenizer(path) if family == "gemma3" else path


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def windowed(request, tmp_path_factory) -> tuple[Path, Path]:
    """(the PyTorch checkpoint, its fp32 auto-opt output's model/)."""
    from phitune.cli.main import main
    root = tmp_path_factory.mktemp(request.param)
    model = _build(request.param, root / "hf")
    try:
        main(["auto-opt", "-m", str(model), "--precision", "fp32", "-o", str(root / "onnx")])
    except SystemExit as exc:
        assert not exc.code
    return model, root / "onnx" / "model"


def _greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_the_graph_records_a_window(windowed):
    from phitune import genai_config
    assert genai_config.min_kv_tokens(windowed[1]) == WINDOW


def test_infer_answers_a_one_word_prompt_with_4_tokens(windowed, cli):
    result = cli("--json", "infer", "-m", str(windowed[1]), "--prompt", "hi",
                 "--max_new_tokens", "4")
    assert result.code == 0, result.err[-2000:]
    assert json.loads(result.out)["tokens"] == 4


def test_one_shot_chat_and_serve_paths_match_pytorch(windowed):
    """Session.generate (one-shot), with keep (a chat's kept cache, two turns) and
    Session.start (serve's decoding) all answer short requests, as PyTorch does."""
    from phitune.infer.session import Sampling, Session
    hf, onnx = windowed
    session = Session(onnx)
    ids = session.prompt_ids("hi")
    want = _greedy(hf, ids, 4)
    sampling = Sampling(max_new_tokens=4)
    got = session.generate(ids, sampling).ids  # both stop at 4 tokens or at an end token
    assert got == want
    assert session.generate(ids, sampling, keep=True).ids == got
    assert session.generate(ids + got, Sampling(max_new_tokens=2), keep=True).tokens >= 1
    decoding = session.start(ids, sampling, None)
    decoding.prefill()
    while not decoding.done:
        decoding.step()
    assert decoding.answer().ids == got


def test_eval_scorer_and_latency_take_short_sequences(windowed):
    from phitune.evaluate import OnnxScorer, onnx_latency
    hf, onnx = windowed
    from transformers import AutoModelForCausalLM
    ids = [5, 17, 42]
    scores = OnnxScorer(onnx).log_probs(ids)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    want = torch.log_softmax(logits, -1)[torch.arange(2), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(scores), want, atol=1e-4)
    figures = onnx_latency(onnx, prefill=2, decode=2, repeats=1)
    assert figures  # timed without "KV cache capacity ... must be at least local_window_size"


def test_serve_loads_ogs_weights_only_for_a_graph_it_cannot_batch(windowed):
    """serve opens the session with its tokenizer alone; a windowed graph's rolling KV cache
    cannot batch, so the scheduler loads og's model then and answers through it."""
    import asyncio
    import threading

    from phitune.infer.session import Sampling, Session
    from phitune.serve.scheduler import Job, Scheduler
    hf, onnx = windowed
    session = Session(onnx, weights=False)
    assert session.model is None
    scheduler = Scheduler(session)
    assert scheduler.model is None and session.model is not None
    ids = session.prompt_ids("hi")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    job = Job(ids, Sampling(max_new_tokens=4), None, [], loop)
    scheduler.start()
    scheduler.submit(job)

    async def drain():
        text = []
        while True:
            kind, payload = await job.events.get()
            if kind != "text":
                return "".join(text)
            text.append(payload)
    got = asyncio.run_coroutine_threadsafe(drain(), loop).result(60)
    scheduler.close(10)
    loop.call_soon_threadsafe(loop.stop)
    stream = session.tokenizer.create_stream()
    want = "".join(stream.decode(t) for t in _greedy(hf, ids, 4) if t not in session.eos_ids)
    assert got == want and job.finish_reason in ("length", "stop")

