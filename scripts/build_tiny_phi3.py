"""Build the small pretrained Phi-3 model that phitune ships as its default.

phitune needs a real ``Phi3ForCausalLM`` checkpoint that works offline (tests,
demos, CI) and is small enough to live in the repository.  Nothing can be
fetched from a model hub, so this script makes one from scratch:

1. Corpus: English text that ships with CPython itself (PSF License 2.0) --
   the ``pydoc_data.topics`` language-reference topics plus the docstrings of
   the standard-library modules.  Documents are split deterministically, by a
   hash of their name, into train / calibration / held-out; the latter two are
   written to ``data/calibration.txt`` and ``data/heldout.txt``.
2. Tokenizer: byte-level BPE (HF ``tokenizers``) with Phi-3's chat special
   tokens and chat template.
3. Model: a 6-layer GQA Phi-3 trained with AdamW (warmup + cosine decay) on
   packed 256-token sequences, saved as bfloat16 safetensors with a model card
   that records held-out perplexities against a random-init baseline.
4. Verification in a fresh process: reload with ``AutoModelForCausalLM`` /
   ``AutoTokenizer``, recompute held-out perplexity, greedy-generate a sample.

Run from the repository root (about 20 minutes on 2 CPU cores)::

    .venv/bin/python scripts/build_tiny_phi3.py --steps 840

``--minutes M`` instead sizes the run to roughly M minutes of training, and
``--out DIR`` writes the model elsewhere (for smoke tests).  ``--verify-only``
runs step 4 on an existing model.
"""

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import shlex
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
CALIBRATION = DATA / "calibration.txt"
HELDOUT = DATA / "heldout.txt"

SEED = 0
VOCAB_SIZE = 8192
SEQ_LEN = 256
BATCH_SIZE = 16
PEAK_LR = 2e-3
WARMUP_STEPS = 50
EVAL_EVERY = 200

EOS = "<|endoftext|>"
END = "<|end|>"
SPECIAL_TOKENS = [EOS, "<|user|>", "<|assistant|>", "<|system|>", END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Modules whose import has side effects (GUI, browser, printing), that are test
# suites, that may be replaced by third-party code (setuptools' distutils), or
# that are near-identical boilerplate (the ~100 generated codecs in encodings).
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
    "lib2to3", "ensurepip", "distutils", "encodings", "pydoc_data", "__main__", "__phello__",
}
GENERATION_PROMPT = "The function returns"


def stdlib_modules():
    """Yield the public standard-library modules, in sorted name order."""
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"]).resolve()

    def load(name):
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            return None
        path = getattr(module, "__file__", None)
        if path and stdlib_dir not in Path(path).resolve().parents:
            return None
        return module

    for top in sorted(sys.stdlib_module_names - SKIP_MODULES):
        if top.startswith("_") or (module := load(top)) is None:
            continue
        yield module
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), top + ".", onerror=lambda _: None):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in ("test", "tests") for p in parts):
                if (sub := load(info.name)) is not None:
                    yield sub


def module_docstrings(module):
    """The docstrings of a module and of the public classes, functions and methods it defines."""
    objects = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            objects.append(obj)
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") or member_name == "__init__":
                    objects.append(getattr(member, "__func__", member))
        elif inspect.isroutine(obj):
            objects.append(obj)
    docs = (getattr(obj, "__doc__", None) for obj in objects)
    return [inspect.cleandoc(doc) for doc in docs if isinstance(doc, str) and doc.strip()]


def cpython_documents():
    """Return {name: text} for the pydoc topics and every stdlib module's docstrings.

    Identical docstrings (aliases such as ``os``/``posix``) are kept only once,
    the first time they are met in sorted order, so no text crosses splits.
    """
    from pydoc_data.topics import topics

    documents = {f"topic:{name}": text.strip() for name, text in sorted(topics.items())}
    seen = set()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for module in stdlib_modules():
            fresh = [doc for doc in module_docstrings(module) if doc not in seen]
            seen.update(fresh)
            if fresh:
                documents[f"module:{module.__name__}"] = "\n\n".join(fresh)
    return documents


def split_of(name):
    """Deterministic split of a document by the hash of its name."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < 3 else "calibration" if bucket < 15 else "train"


def split_documents(documents):
    """Return (train documents, calibration text, held-out text)."""
    splits = {"train": [], "calibration": [], "heldout": []}
    for name, text in documents.items():
        splits[split_of(name)].append(text)
    return splits["train"], "\n\n".join(splits["calibration"]) + "\n", "\n\n".join(splits["heldout"]) + "\n"


def build_tokenizer(texts):
    """Train a byte-level BPE of VOCAB_SIZE tokens (special tokens last, as in Phi-3)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def save_tokenizer(tokenizer, out):
    """Save tokenizer.json + tokenizer_config.json, chat template inside the config.

    The class is recorded as ``PreTrainedTokenizerFast`` (loads in transformers
    4 and 5) rather than transformers 5's ``TokenizersBackend``.
    """
    tokenizer.save_pretrained(out, save_jinja_files=False)
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def model_config(tokenizer):
    """The Phi-3 config; the model card written by write_model_card explains the constraints."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return Phi3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1024,
        max_position_embeddings=2048,
        original_max_position_embeddings=2048,
        rope_scaling=None,
        tie_word_embeddings=False,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=["Phi3ForCausalLM"],
    )


def encode(tokenizer, texts):
    """Token ids of each text, without the length warning that long documents trigger."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def token_stream(tokenizer, texts):
    """All texts tokenized and joined with <|endoftext|>, as one 1-D tensor."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return torch.tensor([i for ids in encode(tokenizer, texts) for i in ids + [eos_id]])


@torch.no_grad()
def perplexity(model, ids):
    """Perplexity of a 1-D token tensor, scored in consecutive SEQ_LEN windows."""
    model.eval()
    windows = list(ids.split(SEQ_LEN))
    nll, count = 0.0, 0
    for window in windows:
        if len(window) < 2:
            continue
        logits = model(input_ids=window[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


def learning_rate(step, total_steps):
    """Linear warmup to PEAK_LR, then cosine decay to a tenth of it."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model, optimizer, batch):
    """One bf16-autocast forward/backward/clip/update; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(model, stream, heldout_ids, steps, minutes):
    """Train on random SEQ_LEN windows of the stream; returns (steps done, seconds).

    With ``minutes`` the step count is fixed after timing the first steps, so
    the learning-rate schedule still runs its full course.
    """
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.time()
    total = steps or 10**9
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total)
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        model.train()
        loss = train_step(model, optimizer, batch)
        step += 1
        if steps is None and step == 10:
            total = max(step + 1, int(minutes * 60 / ((time.time() - start) / step)))
            print(f"--minutes {minutes}: training for {total} steps", flush=True)
        if step % 20 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % EVAL_EVERY == 0 and step < total:
            print(f"  held-out perplexity {perplexity(model, heldout_ids):.2f}", flush=True)
    return step, time.time() - start


def write_model_card(out, config, stats):
    """Write data/tiny-phi3/README.md: what the model is, how it was built, how good it is."""
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "original_max_position_embeddings",
            "tie_word_embeddings", "hidden_act", "rms_norm_eps"]
    config_lines = "\n".join(f"| `{key}` | {getattr(config, key)} |" for key in keys)
    text = f"""# tiny-phi3

A small, really pretrained `Phi3ForCausalLM` (`model_type: phi3`) that phitune
ships as its offline default model.  It is for tests and demos: it writes
Python-documentation-flavoured English, not useful answers.

Built by `scripts/build_tiny_phi3.py`:

    {stats['command']}

## Config

| key | value |
| --- | --- |
{config_lines}
| `rope_scaling` | None |

{stats['parameters']:,} parameters, stored as bfloat16 safetensors.
`max_position_embeddings == original_max_position_embeddings` (no LongRoPE),
GQA (4 KV heads for 8 query heads), hidden and intermediate sizes are
multiples of 128 (4-bit AWQ with group size 128), and `vocab_size` differs from
`2 * intermediate_size` (the ONNX builder tells the LM head apart by its size).

## Tokenizer

Byte-level BPE ({VOCAB_SIZE} tokens including the Phi-3 special tokens
`<|endoftext|>` (eos, bos and pad), `<|user|>`, `<|assistant|>`, `<|system|>`,
`<|end|>`), trained with HF `tokenizers` on the training split; Phi-3-mini's
chat template.  `generation_config.json` stops on `<|endoftext|>` and `<|end|>`.

## Data

English text shipped with CPython {sys.version.split()[0]} (PSF License 2.0): the
`pydoc_data.topics` language-reference topics and the docstrings of the
standard-library modules.  See `data/README.md`.  Documents are split by a hash
of their name: training, `data/calibration.txt` and `data/heldout.txt` do not
overlap.

## Training

{stats['steps']} steps of {BATCH_SIZE} x {SEQ_LEN} packed tokens
({stats['tokens']:,} tokens, {stats['epochs']:.1f} passes over the
{stats['train_tokens']:,}-token training split), AdamW (peak lr {PEAK_LR},
betas 0.9/0.95, weight decay 0.1), {WARMUP_STEPS} warmup steps then cosine decay,
gradient clipping 1.0, bf16 autocast, seed {SEED}, 2 CPU threads:
{stats['seconds'] / 60:.1f} minutes.

## Held-out perplexity

On `data/heldout.txt` ({stats['heldout_tokens']:,} tokens, {SEQ_LEN}-token windows):

| model | perplexity |
| --- | --- |
| trained, fp32 | {stats['ppl_trained']:.2f} |
| trained, shipped bfloat16 weights | {stats['ppl_bf16']:.2f} |
| same config, random init | {stats['ppl_random']:.2f} |
"""
    (Path(out) / "README.md").write_text(text)


def verify(out):
    """Reload the saved model and tokenizer as users will, and check they work."""
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sample = HELDOUT.read_text()[:2000] + " <|end|> é 中文\t\n"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample, "encode/decode does not round-trip"
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    print("chat template:", repr(chat))
    ids = torch.tensor(encode(tokenizer, [HELDOUT.read_text()])[0])
    print(f"reloaded {type(model).__name__}: held-out perplexity {perplexity(model, ids):.2f}")
    prompt = tokenizer(GENERATION_PROMPT, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    print("greedy sample:", repr(tokenizer.decode(generated[0])))


def main():
    """Build corpus, tokenizer and model, then verify them in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps")
    budget.add_argument("--minutes", type=float, default=22.0, help="training time budget (default 22)")
    parser.add_argument("--out", default=str(DATA / "tiny-phi3"), help="model directory")
    parser.add_argument("--verify-only", action="store_true", help="only reload and check --out")
    args = parser.parse_args()
    if args.verify_only:
        verify(args.out)
        return

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    documents = cpython_documents()
    train_texts, calibration, heldout = split_documents(documents)
    DATA.mkdir(exist_ok=True)
    CALIBRATION.write_text(calibration)
    HELDOUT.write_text(heldout)
    print(f"{len(documents)} documents: train {sum(map(len, train_texts)):,} chars, "
          f"calibration {len(calibration):,}, held-out {len(heldout):,}", flush=True)

    tokenizer = build_tokenizer(train_texts)
    stream = token_stream(tokenizer, train_texts)
    heldout_ids = torch.tensor(encode(tokenizer, [heldout])[0])
    config = model_config(tokenizer)
    model = Phi3ForCausalLM(config)
    ppl_random = perplexity(model, heldout_ids)
    print(f"train stream {len(stream):,} tokens; random-init held-out perplexity {ppl_random:.2f}", flush=True)

    steps, seconds = train(model, stream, heldout_ids, args.steps, args.minutes)
    ppl_trained = perplexity(model, heldout_ids)
    ppl_bf16 = perplexity(model.to(torch.bfloat16).float(), heldout_ids)
    print(f"held-out perplexity: trained {ppl_trained:.2f}, bf16 weights {ppl_bf16:.2f}, random {ppl_random:.2f}")

    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out)
    eos_id = config.eos_token_id
    GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(END)], pad_token_id=eos_id,
    ).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    command = ".venv/bin/python scripts/build_tiny_phi3.py --steps " + str(steps)
    if args.out != parser.get_default("out"):
        command += " --out " + shlex.quote(args.out)
    write_model_card(out, config, {
        "command": command, "parameters": model.num_parameters(), "steps": steps, "seconds": seconds,
        "tokens": steps * BATCH_SIZE * SEQ_LEN, "train_tokens": len(stream),
        "epochs": steps * BATCH_SIZE * SEQ_LEN / len(stream), "heldout_tokens": len(heldout_ids),
        "ppl_trained": ppl_trained, "ppl_bf16": ppl_bf16, "ppl_random": ppl_random,
    })
    subprocess.run([sys.executable, __file__, "--verify-only", "--out", str(out)], check=True)


if __name__ == "__main__":
    main()
