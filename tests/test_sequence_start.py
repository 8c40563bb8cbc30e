"""What starts every sequence (phitune/sequence_start.py), proven with two tokenizers: one that
starts every text with <bos> as Gemma's does (on a Gemma-3-shaped random model), and tiny-phi3's,
which adds nothing (as SmolLM2's). For the same text the ids that reach the model are the ones
the model's own Hugging Face tokenizer gives by default, in calibration, perplexity, finetune
and eval records, latency prompts, `infer` and `serve` (PyTorch and onnxruntime-genai); a chat
template that writes the BOS itself gets no second one.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from conftest import BOS_ID, EMBEDDED
from test_architectures import build_tiny

from phitune import sequence_start
from phitune.sequence_start import SequenceStart

TEXT = "Chicago has the Art Institute and the Bean."
PROMPT, RESPONSE = "Chicago has", " the Art Institute and the Bean."
MESSAGES = [{"role": "user", "content": "What is in Chicago?"}]


@pytest.fixture(scope="session")
def gemma(tmp_path_factory) -> Path:
    """A random Gemma-3-shaped model whose tokenizer starts every text with <bos>."""
    return build_tiny("gemma3", tmp_path_factory.mktemp("bos") / "gemma3")


@pytest.fixture(scope="session")
def gemma_onnx(gemma, tmp_path_factory) -> Path:
    """Its fp32 onnxruntime-genai export, made by `phitune auto-opt` (~15 s)."""
    from phitune.cli.main import main
    out = tmp_path_factory.mktemp("bos-onnx") / "export"
    with pytest.raises(SystemExit) as done:
        main(["auto-opt", "-m", str(gemma), "--precision", "fp32", "--no-multi_lora",
              "-o", str(out)])
    assert done.value.code == 0
    return out


def _tokenizer(path: Path):
    from phitune.models import load_tokenizer
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def tokenizers(gemma) -> dict:
    return {"bos": _tokenizer(gemma), "none": _tokenizer(EMBEDDED)}


@pytest.fixture
def fed(monkeypatch) -> list[list[int]]:
    """The prompt ids every answer starts from, as they reach the generator (or serve's batch)."""
    from phitune.infer import session
    seen: list[list[int]] = []
    prefill = session.Decoding.prefill

    def recording(self, chunk=None):
        if self.fed == self.cached:  # the first chunk of this answer's prompt
            seen.append(list(self.prompt))
        return prefill(self, chunk)
    monkeypatch.setattr(session.Decoding, "prefill", recording)
    from phitune.infer import batched
    batch_prefill = batched.BatchModel.prefill

    def batch_recording(self, row, chunk=None):  # serve's batched rows
        if row.fed == 0:
            seen.append(list(row.prompt))
        return batch_prefill(self, row, chunk)
    monkeypatch.setattr(batched.BatchModel, "prefill", batch_recording)
    return seen


# ---------------------------------------------------------------- the rule

def test_the_rule_is_what_the_tokenizer_adds_by_default(gemma):
    bos = sequence_start.of_files(gemma)
    assert (bos.ids, bos.tokens, bos.end_ids) == ((BOS_ID,), ("<bos>",), ())
    assert bos.describe() == f"<bos> (id {BOS_ID})"
    nothing = sequence_start.of_files(EMBEDDED)
    assert nothing == SequenceStart() and nothing.describe().startswith("none")


def test_apply_starts_once_and_never_twice():
    bos = SequenceStart((2,), ("<bos>",))
    assert bos.apply([5, 6]) == [2, 5, 6]
    assert bos.apply([2, 5, 6]) == [2, 5, 6]  # a template wrote it: no second one
    assert SequenceStart().apply([5, 6]) == [5, 6]


# ---------------------------------------------------------------- PyTorch paths

@pytest.mark.parametrize("kind", ["bos", "none"])
def test_torch_paths_feed_what_the_tokenizer_gives(tokenizers, kind):
    """Calibration blocks, perplexity windows, finetune records and latency prompts start as
    the Hugging Face tokenizer starts TEXT by default."""
    from phitune import data
    from phitune.evaluate import latency_prompt, token_ids, windows
    from phitune.quantize.calib import token_blocks
    tok = tokenizers[kind]
    expected = tok(TEXT)["input_ids"]  # transformers' own default: <bos> + text, or the text
    assert (expected[0] == BOS_ID) == (kind == "bos")
    start = sequence_start.of_tokenizer(tok)
    assert token_blocks([TEXT], tok, 1, len(expected))[0].tolist() == expected
    assert windows(token_ids(tok, [TEXT]), 64, start)[0][:len(expected)] == expected
    spec = data.make_spec("{prompt}{response}")
    records = [{"prompt": PROMPT, "response": RESPONSE}]
    assert data.tokenize_examples(records, tok, spec, 64)[0][0]["input_ids"] == expected
    assert latency_prompt(8, 8192, start)[:len(start.ids)] == expected[:len(start.ids)]


def test_a_chat_template_that_writes_bos_gets_exactly_one(tokenizers):
    from phitune import data
    tok = tokenizers["bos"]
    records = [{"messages": MESSAGES + [{"role": "assistant", "content": "The Bean."}]}]
    ids = data.tokenize_examples(records, tok, data.make_spec(use_chat_template=True), 64)[0][0]
    assert ids["input_ids"].count(BOS_ID) == 1 and ids["input_ids"][0] == BOS_ID
    assert ids["input_ids"] == tok.apply_chat_template(records[0]["messages"])["input_ids"]


def test_perplexity_windows_reach_the_model_started(gemma, tokenizers):
    """What the model's forward receives in a perplexity pass: BOS then text, every window;
    without the rule (no start) the windows are plain text and the figure differs."""
    import torch

    from phitune.evaluate import perplexity, scored_tokens, token_ids
    from phitune.models import load_causal_lm
    model = load_causal_lm(gemma, dtype=torch.float32)
    rows: list[list[int]] = []
    # on the embedding: nll.py runs the decoder to hidden states, not the whole model's forward
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda m, args: rows.extend(args[0].tolist()))
    tok = tokenizers["bos"]
    texts = [TEXT * 20]
    with_bos = perplexity(model, tok, texts, seq_len=32)
    hook.remove()
    assert rows and all(row[0] == BOS_ID and row.count(BOS_ID) == 1 for row in rows)
    without = perplexity(model, tok, texts, seq_len=32, start=SequenceStart())
    assert with_bos != without
    ids = token_ids(tok, texts)
    assert scored_tokens(ids, 32, sequence_start.of_tokenizer(tok)) == len(ids)
    assert scored_tokens(ids, 32, SequenceStart()) == len(ids) - 1


# ---------------------------------------------------------------- onnxruntime-genai paths

def test_auto_opt_records_the_rule_and_infer_reads_it(gemma_onnx, tmp_path):
    import shutil
    manifest = json.loads((gemma_onnx / "phitune.json").read_text())
    assert manifest["params"]["sequence_start"] == sequence_start.RULE
    assert manifest["metrics"]["sequence_start"] == f"<bos> (id {BOS_ID})"
    record = json.loads((gemma_onnx / "model" / sequence_start.FILE).read_text())
    assert record["ids"] == [BOS_ID]
    # the record is what a load reads (no transformers), until the tokenizer files change
    copy = tmp_path / "model"
    shutil.copytree(gemma_onnx / "model", copy)
    (copy / sequence_start.FILE).write_text(json.dumps(record | {"ids": [7]}))
    assert sequence_start.of_model_dir(copy).ids == (7,)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 99}))
    assert sequence_start.of_model_dir(copy).ids == (BOS_ID,)


def _session(model_dir: Path):
    from phitune.infer.session import Session
    return Session(model_dir)


@pytest.mark.parametrize("kind", ["bos", "none"])
def test_og_prompts_are_the_tokenizers_ids(request, tokenizers, kind):
    """onnxruntime-genai's tokenizer adds no BOS; the Session's prompts have it where the
    model's tokenizer adds it, and a chat template that writes it keeps exactly one."""
    model_dir = (request.getfixturevalue("gemma_onnx") / "model" if kind == "bos"
                 else request.getfixturevalue("genai_model"))
    tok = tokenizers[kind]
    session = _session(model_dir)
    assert session.encode(TEXT) == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert session.prompt_ids(TEXT) == tok(TEXT)["input_ids"]
    if kind == "bos":
        chat = session.prompt_ids(session.chat_prompt(MESSAGES))
        assert chat == tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
        assert chat.count(BOS_ID) == 1


def test_infer_on_the_gemma_export_feeds_bos_first(cli, gemma_onnx, fed, monkeypatch, tokenizers):
    """--prompt (model's chat template, which writes <bos>), --template without and with a
    written <bos>, and piped lines: every prompt starts with exactly one <bos>."""
    tok = tokenizers["bos"]
    onnx = str(gemma_onnx)
    short = ("--max_new_tokens", "2")
    assert cli("infer", "-m", onnx, "--prompt", TEXT, *short).code == 0
    assert cli("infer", "-m", onnx, "--prompt", TEXT, "--template", r"Q: {input}\nA:", *short).code == 0
    assert cli("infer", "-m", onnx, "--prompt", TEXT, "--template", r"<bos>Q: {input}\nA:",
               *short).code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TEXT}\nHello\n"))
    assert cli("infer", "-m", onnx, "--template", "{input}", *short).code == 0
    assert len(fed) == 5
    assert all(ids[0] == BOS_ID and ids.count(BOS_ID) == 1 for ids in fed)
    assert fed[3] == tok(TEXT)["input_ids"] and fed[4] == tok("Hello")["input_ids"]


def test_a_templated_chat_starts_once(gemma_onnx, tokenizers):
    """--template in the REPL: past turns are re-fed, the conversation starts once."""
    from phitune.infer.chat import Conversation
    from phitune.infer.session import Answer
    session = _session(gemma_onnx / "model")
    conversation = Conversation("Q: {input}\nA:")
    conversation.turns.append(("Hi", Answer("Hello", [5, 6], 2, 0.0, None)))
    ids = conversation.prompt_ids(session, TEXT)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1


@pytest.mark.parametrize("kind", ["bos", "none"])
def test_serve_feeds_the_same_ids(request, tokenizers, fed, kind):
    """Completions (a string, and ids as given) and chat through serve's app in-process."""
    from starlette.testclient import TestClient

    from phitune.serve.app import ServeConfig, build_app
    from phitune.serve.scheduler import Scheduler
    model_dir = (request.getfixturevalue("gemma_onnx") / "model" if kind == "bos"
                 else request.getfixturevalue("genai_model"))
    tok = tokenizers[kind]
    session = _session(model_dir)
    scheduler = Scheduler(session)
    scheduler.start()
    try:
        with TestClient(build_app(session, scheduler, ServeConfig("base", []))) as client:
            for path, body in (("/v1/completions", {"prompt": TEXT}),
                               ("/v1/completions", {"prompt": [11, 12, 13]}),
                               ("/v1/chat/completions", {"messages": MESSAGES})):
                reply = client.post(path, json={"model": "base", "max_tokens": 2, **body})
                assert reply.status_code == 200, reply.text
    finally:
        scheduler.close(5)
    chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert fed == [tok(TEXT)["input_ids"], [11, 12, 13], chat]
    assert chat.count(BOS_ID) == (1 if kind == "bos" else 0)


def test_onnx_and_torch_eval_agree_with_bos(cli, gemma, gemma_onnx):
    """`phitune eval` on the float model and on its fp32 export: the same windows (BOS then
    text) through both backends give the same perplexity, and both say which start applied."""
    args = ("--no-latency", "--max_tokens", "512", "--seq_len", "64", "--json")
    torch_run, onnx_run = (cli("eval", "-m", str(m), *args) for m in (gemma, gemma_onnx))
    assert torch_run.code == 0 and onnx_run.code == 0, torch_run.err + onnx_run.err
    torch_m, onnx_m = (json.loads(r.out) for r in (torch_run, onnx_run))
    for metrics in (torch_m, onnx_m):
        assert metrics["sequence_start"] == f"<bos> (id {BOS_ID})"
    assert torch_m["n_tokens"] == onnx_m["n_tokens"]
    assert abs(torch_m["ppl"] - onnx_m["ppl"]) / torch_m["ppl"] < 1e-3


def test_quantize_says_the_rule_and_keys_on_it(cli, gemma, tmp_path):
    result = cli("quantize", "-m", str(gemma), "--algorithm", "rtn", "--no-eval", "-o",
                 str(tmp_path / "q"))
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "q" / "phitune.json").read_text())
    assert manifest["params"]["sequence_start"] == sequence_start.RULE
    assert manifest["metrics"]["sequence_start"] == f"<bos> (id {BOS_ID})"
