"""`bench.py sequence-start`: what a missing BOS costs a model trained with one (issue 33).

A Gemma-3-shaped model (random init, the embedded tokenizer made to start every text with
<bos> as Gemma's does: shapes.write_bos_tokenizer) is trained from scratch on the shipped
calibration text, every block started with <bos> as Gemma's pre-training starts its sequences
(phitune's own calibration blocks). Then its held-out perplexity as phitune measures it, with
the rule (windows start with <bos>: `phitune eval` now) and without it (plain-text windows:
what `eval` and `quantize` measured before), on the same text and targets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.harness import CACHE, REPO, phitune_json


def register(sub) -> None:
    p = sub.add_parser("sequence-start", help="perplexity of a BOS-trained Gemma-shaped model "
                       "with and without its <bos>")
    p.add_argument("--steps", type=int, default=200, help="training steps (batch 16)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=128, help="training and perplexity windows")
    p.set_defaults(func=run)


def build(path: Path, layers: int) -> Path:
    """Gemma 3 text, hidden 256, 4 heads / 1 KV head, every 4th layer global (sliding
    window 64 elsewhere), tied embeddings; random init, the <bos> tokenizer."""
    import torch
    import transformers as tf

    from benchmarks.shapes import EMBEDDED, write_bos_tokenizer
    torch.manual_seed(0)
    embedded = json.loads((EMBEDDED / "config.json").read_text())
    kinds = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)]
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=embedded["vocab_size"], hidden_size=256, intermediate_size=1024,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=1024, sliding_window=64, layer_types=kinds,
        tie_word_embeddings=True, eos_token_id=embedded["eos_token_id"],
        pad_token_id=embedded["pad_token_id"]))
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(path)
    return write_bos_tokenizer(path)


def train(path: Path, steps: int, layers: int, seq_len: int) -> dict:
    """Train from scratch on <bos>-started blocks of the calibration text; saves in place."""
    import torch

    from phitune.models import load_causal_lm, load_tokenizer
    from phitune.quantize import calib
    from phitune.quantize.step import default_calib_data
    build(path, layers)
    tokenizer = load_tokenizer(path)
    blocks = calib.token_blocks(calib.read_texts(default_calib_data()), tokenizer, 10**9, seq_len)
    model = load_causal_lm(path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(path)
    return {"train_s": round(time.perf_counter() - start, 1), "blocks": len(blocks),
            "loss_first": round(losses[0], 3), "loss_last": round(sum(losses[-10:]) / 10, 3)}


def run(args) -> None:
    import torch

    from phitune.artifacts import heldout_text
    from phitune.evaluate import perplexity, scored_tokens, token_ids
    from phitune.models import load_causal_lm, load_tokenizer
    from phitune.quantize.calib import read_texts
    from phitune.sequence_start import SequenceStart, of_tokenizer
    path = CACHE / f"bos-gemma-{args.layers}l-{args.steps}s-{args.seq_len}"
    if not (path / "model.safetensors").is_file() or not (path / "trained.json").is_file():
        info = train(path, args.steps, args.layers, args.seq_len)
        (path / "trained.json").write_text(json.dumps(info))
    info = json.loads((path / "trained.json").read_text())
    print(f"Gemma-3-shaped, {args.layers} layers, trained from scratch {args.steps} steps × 16 × "
          f"{args.seq_len} tokens of <bos>-started calibration text: loss {info['loss_first']} → "
          f"{info['loss_last']} in {info['train_s']} s")
    with_rule = phitune_json("eval", "-m", str(path), "--no-latency", "--seq_len", str(args.seq_len))
    tokenizer, texts = load_tokenizer(path), read_texts(heldout_text())
    model = load_causal_lm(path, dtype=torch.float32).eval()
    ids = token_ids(tokenizer, texts)
    plain = SequenceStart()
    without = perplexity(model, tokenizer, texts, args.seq_len, ids=ids, start=plain)
    again = perplexity(model, tokenizer, texts, args.seq_len, ids=ids, start=of_tokenizer(tokenizer))
    print(f"held-out perplexity ({heldout_text().name}, {args.seq_len}-token windows):")
    print(f"  with the rule   ({with_rule['sequence_start']}): {with_rule['ppl']:.3f} over "
          f"{with_rule['n_tokens']} targets  (phitune eval; in-process {again:.3f})")
    print(f"  without (plain text windows, before issue 33): {without:.3f} over "
          f"{scored_tokens(ids, args.seq_len, plain)} targets")
    print(f"  ratio without / with: {without / with_rule['ppl']:.2f}×")
    print("the same targets (text tokens 2..N of each window, by position) with and without "
          "<bos> before the window:")
    for span, with_bos, plain_ppl in by_position(model, ids, tokenizer.bos_token_id, args.seq_len):
        print(f"  text token {span:>6}: {with_bos:9.2f} with <bos>, {plain_ppl:9.2f} without "
              f"({plain_ppl / with_bos:.2f}×)")
    print(f"reproduce: python scripts/bench.py sequence-start --steps {args.steps} "
          f"--layers {args.layers} --seq_len {args.seq_len}  ({REPO.name})")


SPANS = ((1, 2), (2, 3), (3, 5), (5, 9), (9, 17), (17, 33), (33, None))


def by_position(model, ids: list[int], bos: int, seq_len: int):
    """(positions, ppl with <bos>, ppl without) for the same targets: windows of `seq_len`
    text tokens, each token after the first predicted from the window's text before it, with
    and without a <bos> in front; the gap is what the missing <bos> costs at that position."""
    import math

    import torch
    chunks = torch.tensor([ids[i:i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)])

    def nll(rows, skip):
        out = []
        with torch.inference_mode():
            for batch in rows.split(32):
                logits = model(batch[:, :-1], use_cache=False).logits.float()
                scores = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])[..., 0]
                out.append(-scores[:, skip:])
        return torch.cat(out)
    plain = nll(chunks, 0)
    started = nll(torch.cat([torch.full((len(chunks), 1), bos), chunks], 1), 1)
    for a, b in SPANS:
        end = b or seq_len
        label = f"{a + 1}-{end}" if end > a + 1 else str(a + 1)  # the targets' text positions
        yield (label, math.exp(started[:, a - 1:end - 1].mean()),
               math.exp(plain[:, a - 1:end - 1].mean()))
