"""`phitune infer`: one-shot, stdin and REPL modes against a direct onnxruntime-genai loop,
adapters by name, and check_fits refusing adapters that do not fit the graph."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import help_run
from genai_helpers import HIDDEN, LORA, direct, link_dir, lora_params, user, write_adapter

from phitune.errors import InputError

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fixtures and helpers

class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------- one-shot

def test_prompt_prints_only_the_greedy_answer(cli, genai_model):
    expected, tokens = direct(genai_model, user("What is a list?"), n=12)
    assert len(tokens) == 12 and expected.strip()  # no early end-of-sequence: a real answer
    first = cli("infer", "-m", str(genai_model), "--prompt", "What is a list?",
                "--max_new_tokens", "12")
    second = cli("infer", "-m", str(genai_model), "--prompt", "What is a list?",
                 "--max-new-tokens", "12")
    assert first.code == 0, first.err
    assert first.out == expected + ("" if expected.endswith("\n") else "\n")
    assert second.out == first.out  # greedy is deterministic
    assert first.err.strip() == ""  # nothing else, anywhere


def test_json_summary_and_token_count(cli, genai_model):
    for n in (1, 7):
        result = cli("--json", "infer", "-m", str(genai_model), "--prompt", "Hello",
                     "--max_new_tokens", str(n))
        assert result.code == 0, result.err
        summary = json.loads(result.out)
        assert set(summary) == {"text", "tokens", "ttft_s", "tok_per_s"}
        assert summary["tokens"] == n
        assert summary["text"] == direct(genai_model, user("Hello"), n=n)[0]
        assert summary["ttft_s"] > 0
        assert (summary["tok_per_s"] is None) == (n == 1)


def test_stats_go_to_stderr(cli, genai_model):
    result = cli("infer", "-m", str(genai_model), "--prompt", "Hi", "--max_new_tokens", "5",
                 "--stats")
    assert result.code == 0
    assert "time to first token" in result.err and "tok/s" in result.err
    assert "time to first token" not in result.out
    assert "5 tokens" in result.err


def test_template_with_shell_escapes(cli, genai_model):
    template = r"<|user|>\n{input}<|end|>\n<|assistant|>\n"
    result = cli("infer", "-m", str(genai_model), "--template", template, "--prompt", "Hi there",
                 "--max_new_tokens", "8")
    assert result.code == 0, result.err
    expected, _ = direct(genai_model, text="<|user|>\nHi there<|end|>\n<|assistant|>\n", n=8)
    assert result.out.rstrip("\n") == expected.rstrip("\n")
    other = cli("infer", "-m", str(genai_model), "--template", "Q: {input}\nA:", "--prompt",
                "Hi there", "--max_new_tokens", "8")
    assert other.out != result.out  # the template is really used


def test_seeded_sampling_repeats(cli, genai_model):
    def sample(seed: int) -> str:
        result = cli("infer", "-m", str(genai_model), "--prompt", "Hi", "--temperature", "1.5",
                     "--seed", str(seed), "--max_new_tokens", "24")
        assert result.code == 0, result.err
        return result.out
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != direct(genai_model, user("Hi"), n=24)[0] + "\n"  # not greedy


# ---------------------------------------------------------------- stdin and the REPL

def test_stdin_lines_are_independent_prompts(cli, genai_model, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is a list?\n\nHello\n"))
    result = cli("--json", "infer", "-m", str(genai_model), "--max_new_tokens", "6")
    assert result.code == 0, result.err
    answers = [json.loads(line)["text"] for line in result.out.splitlines()]
    expected = [direct(genai_model, user("What is a list?"), n=6)[0],
                direct(genai_model, user("Hello"), n=6)[0]]
    assert answers == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is a list?\nHello\n"))
    plain = cli("infer", "-m", str(genai_model), "--max_new_tokens", "6")
    assert plain.out == "".join(a if a.endswith("\n") else a + "\n" for a in expected)


def test_repl_keeps_the_conversation_and_resets(cli, genai_model, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeTerminal("Hello\nAnd then?\n/reset\nHello\n/quit\n"))
    result = cli("--json", "infer", "-m", str(genai_model), "--max_new_tokens", "6")
    assert result.code == 0, result.err
    first, second, third = [json.loads(line)["text"] for line in result.out.splitlines()]
    assert first == third == direct(genai_model, user("Hello"), n=6)[0]
    history = user("Hello") + [{"role": "assistant", "content": first}] + user("And then?")
    assert second == direct(genai_model, history, n=6)[0]
    assert second != direct(genai_model, user("And then?"), n=6)[0]


def test_repl_switches_adapters_by_name(cli, lora_model, adapter_file, monkeypatch):
    lines = "Hello\n/adapter nope\n/adapter none\n/reset\nHello\n/adapter travel\n/reset\nHello\n"
    monkeypatch.setattr(sys, "stdin", FakeTerminal(lines))  # ends with EOF: Ctrl-D
    result = cli("--json", "infer", "-m", str(lora_model), "--adapter", str(adapter_file),
                 "--max_new_tokens", "8")
    assert result.code == 0, result.err
    tuned, base, tuned_again = [json.loads(line)["text"] for line in result.out.splitlines()]
    assert tuned == tuned_again == direct(lora_model, user("Hello"), n=8, adapter=adapter_file)[0]
    assert base == direct(lora_model, user("Hello"), n=8)[0]
    assert tuned != base
    # the REPL goes on after a bad /adapter (no newline after the prompt: no terminal echo here)
    assert "error: no adapter named 'nope' (loaded: travel) — /adapter" in result.err


def test_repl_ctrl_c_at_the_prompt_exits_cleanly(cli, genai_model, monkeypatch):
    class Interrupted(FakeTerminal):
        def readline(self, *args):
            raise KeyboardInterrupt
    monkeypatch.setattr(sys, "stdin", Interrupted())
    result = cli("infer", "-m", str(genai_model))
    assert result.code == 0
    assert result.out == ""  # answers only; the newline goes where the prompt went
    assert result.err.endswith(">>> \n")
    assert not result.error_lines


def test_ctrl_c_during_generation_ends_only_that_answer(genai_model):
    from phitune.infer.session import Sampling, Session
    session = Session(genai_model)
    ids = session.encode(session.chat_prompt(user("Hello")))
    pieces = []

    def interrupt_after_two(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise KeyboardInterrupt
    answer = session.generate(ids, Sampling(max_new_tokens=20), interrupt_after_two,
                              interruptible=True)
    assert answer.interrupted and answer.tokens == 2
    with pytest.raises(KeyboardInterrupt):
        session.generate(ids, Sampling(max_new_tokens=20), lambda p: (_ for _ in ()).throw(
            KeyboardInterrupt()))


def _turns(session, texts, max_new_tokens=8, keep=True):
    """A chat through Session.generate: each answer and the ids it was given."""
    from phitune.infer.session import Sampling
    messages, answers = [], []
    for text in texts:
        messages += user(text)
        ids = session.encode(session.chat_prompt(messages))
        answer = session.generate(ids, Sampling(max_new_tokens=max_new_tokens), keep=keep)
        answers.append((answer, session._kept and session._kept.capacity))
        messages.append({"role": "assistant", "content": answer.text})
    return answers


def test_a_chat_prefills_only_the_new_turn_and_answers_as_a_fresh_prefill(genai_model,
                                                                         monkeypatch):
    from phitune.infer import session as session_module
    from phitune.infer.session import Session
    monkeypatch.setattr(session_module, "CHAT_CACHE_TOKENS", 16)  # regrowth happens too
    texts = ["Hello", "And then?", "Tell me more", "Why?", "Go on", "OK"]
    kept = _turns(Session(genai_model), texts)
    fresh = [answer for answer, _ in _turns(Session(genai_model), texts, keep=False)]
    assert [a.ids for a, _ in kept] == [a.ids for a in fresh]
    assert all(a.cached_tokens == 0 for a in fresh)
    reused = 0
    for (before, capacity), (answer, _) in zip(kept, kept[1:]):
        if answer.prompt_tokens + 8 > capacity:  # outgrew the cache: one fresh prefill
            assert answer.cached_tokens == 0
            continue
        # all of the last prompt is reused, and the last answer where re-encoding keeps it
        assert before.prompt_tokens - 1 <= answer.cached_tokens < answer.prompt_tokens
        reused += 1
    assert reused >= 3


def test_a_kept_cache_is_not_shared_across_adapters(lora_model, adapter_file):
    from phitune.infer.adapters import Adapter
    from phitune.infer.session import Sampling, Session
    session = Session(lora_model, [Adapter(adapter_file, "travel")], active="travel")
    ids = session.encode(session.chat_prompt(user("Hello")))
    tuned = session.generate(ids, Sampling(max_new_tokens=8), keep=True)
    assert session.chat_ready(Sampling(max_new_tokens=8))
    session.activate(None)
    assert not session.chat_ready(Sampling(max_new_tokens=8))
    base = session.generate(ids, Sampling(max_new_tokens=8), keep=True)
    assert base.cached_tokens == 0  # a fresh generator, not the adapter's KV cache
    assert base.ids == direct(lora_model, user("Hello"), n=8)[1] != tuned.ids
    again = session.generate(ids, Sampling(max_new_tokens=8), keep=True)
    assert again.cached_tokens == len(ids) - 1 and again.ids == base.ids


def test_a_cache_prepared_before_the_first_turn_serves_it(genai_model):
    from phitune.infer.session import Sampling, Session
    session = Session(genai_model)
    sampling = Sampling(max_new_tokens=8)
    assert not session.chat_ready(sampling)
    session.prepare_chat(sampling)
    prepared = session._kept.generator
    assert session.chat_ready(sampling) and not session.chat_ready(Sampling(top_k=5))
    answer = session.generate(session.encode(session.chat_prompt(user("Hello"))), sampling,
                              keep=True)
    assert session._kept.generator is prepared and answer.cached_tokens == 0
    assert answer.ids == direct(genai_model, user("Hello"), n=8)[1]


@pytest.mark.parametrize("needed, context, capacity", [
    (100, 4096, 1024), (3000, 131072, 6000), (10000, 131072, 14096), (3000, 4096, 4096)])
def test_a_chat_cache_doubles_in_bounded_steps(needed, context, capacity):
    from phitune.infer.session import _capacity
    assert _capacity(needed, context) == capacity


def test_a_chat_outgrowing_its_cache_starts_a_larger_one(genai_model, monkeypatch):
    from phitune.infer import session as session_module
    from phitune.infer.session import Sampling, Session
    monkeypatch.setattr(session_module, "CHAT_CACHE_TOKENS", 16)
    session = Session(genai_model)
    short = session.encode(session.chat_prompt(user("Hi")))
    session.generate(short, Sampling(max_new_tokens=2), keep=True)
    capacity = session._kept.capacity
    long = session.encode(session.chat_prompt(user("Hi " + "tell me a long story " * 20)))
    assert len(long) + 2 > capacity
    answer = session.generate(long, Sampling(max_new_tokens=2), keep=True)
    assert answer.cached_tokens == 0 and session._kept.capacity == 2 * (len(long) + 2)
    assert answer.ids == direct(genai_model, user("Hi " + "tell me a long story " * 20), n=2)[1]


# ---------------------------------------------------------------- adapters

def test_adapter_in_the_model_dir_is_the_default(cli, lora_model, adapter_file, tmp_path):
    model = tmp_path / "model"
    link_dir(lora_model, model)
    os.link(adapter_file, model / "adapter_weights.onnx_adapter")
    tuned = cli("infer", "-m", str(model), "--prompt", "Hello", "--max_new_tokens", "8")
    base = cli("infer", "-m", str(model), "--prompt", "Hello", "--max_new_tokens", "8",
               "--no-adapter")
    assert tuned.code == base.code == 0, tuned.err + base.err
    assert tuned.out == direct(lora_model, user("Hello"), n=8, adapter=adapter_file)[0] + "\n"
    assert base.out == direct(lora_model, user("Hello"), n=8)[0] + "\n"


def test_adapter_name_picks_among_several(cli, lora_model, adapter_file, tmp_path):
    other = write_adapter(tmp_path / "x.onnx_adapter", lora_params(rank=8, seed=5))
    args = ("infer", "-m", str(lora_model), "--prompt", "Hello", "--max_new_tokens", "8",
            "--adapter", str(adapter_file), "--adapter", f"{other}=tone")
    first = cli(*args)
    tone = cli(*args, "--adapter_name", "tone")
    assert first.code == tone.code == 0, first.err + tone.err
    assert first.out == direct(lora_model, user("Hello"), n=8, adapter=adapter_file)[0] + "\n"
    assert tone.out == direct(lora_model, user("Hello"), n=8, adapter=other)[0] + "\n"
    assert tone.out != first.out


def test_unknown_adapter_name_lists_the_loaded_ones(cli, lora_model, adapter_file):
    result = cli("infer", "-m", str(lora_model), "--adapter", f"{adapter_file}=travel",
                 "--adapter_name", "tone", "--prompt", "Hi")
    assert result.code == 2
    assert len(result.error_lines) == 1
    assert "'tone'" in result.error_lines[0] and "loaded: travel" in result.error_lines[0]
    assert result.out == ""


def test_check_fits_accepts_a_matching_adapter_of_any_rank(lora_model, tmp_path):
    from phitune.infer.adapters import check_fits
    for rank in (1, 16):
        check_fits(lora_model, write_adapter(tmp_path / f"r{rank}.onnx_adapter",
                                             lora_params(rank=rank)))


@pytest.mark.parametrize("params, message", [
    ({LORA + ".lora_A": np.ones((HIDDEN, 4), np.float32),
      "model.layers.9.mlp.down_proj.lora_A": np.ones((HIDDEN, 4), np.float32)},
     "the model has no input model.layers.9.mlp.down_proj.lora_A"),
    (lora_params(rows=128), f"{LORA}.lora_A has shape [128, 4], the model takes [256, rank_o0]"),
    (lora_params(dtype=np.float16), f"{LORA}.lora_A is float16, the model takes float"),
    ({LORA + ".lora_A": np.ones((HIDDEN, 4), np.float32),
      LORA + ".lora_B": np.ones((8, HIDDEN), np.float32)},
     f"dim 'rank_o0' is 4 in {LORA}.lora_A but 8 in {LORA}.lora_B"),
    ({LORA + ".lora_A": np.ones((HIDDEN,), np.float32)}, f"{LORA}.lora_A has shape [256]"),
], ids=["unknown-name", "static-dim", "dtype", "rank-disagrees", "rank-count"])
def test_check_fits_refuses(lora_model, tmp_path, params, message):
    from phitune.infer.adapters import check_fits
    bad = write_adapter(tmp_path / "bad.onnx_adapter", params)
    with pytest.raises(InputError) as info:
        check_fits(lora_model, bad)
    assert message in info.value.what
    assert info.value.where == str(bad)


def test_check_fits_refuses_a_file_that_is_not_an_adapter(lora_model, tmp_path):
    from phitune.infer.adapters import check_fits
    corrupt = tmp_path / "corrupt.onnx_adapter"
    corrupt.write_bytes(b"\x00not an adapter" * 20)
    with pytest.raises(InputError, match="not an onnxruntime adapter file"):
        check_fits(lora_model, corrupt)
    with pytest.raises(InputError, match="no such adapter file"):
        check_fits(lora_model, tmp_path / "missing.onnx_adapter")


def test_adapter_that_does_not_fit_is_refused_before_generating(cli, genai_model, lora_model,
                                                                adapter_file, tmp_path):
    on_base = cli("infer", "-m", str(genai_model), "--adapter", str(adapter_file),
                  "--prompt", "Hi")  # a graph without LoRA inputs
    assert on_base.code == 2 and on_base.out == ""
    assert len(on_base.error_lines) == 1
    assert f"the model has no input {LORA}.lora_A and 1 more" in on_base.error_lines[0]
    wide = write_adapter(tmp_path / "wide.onnx_adapter", lora_params(rows=128))
    result = cli("infer", "-m", str(lora_model), "--adapter", str(wide), "--prompt", "Hi")
    assert result.code == 2 and result.out == "" and "Traceback" not in result.err
    assert "has shape [128, 4], the model takes [256, rank_o0]" in result.error_lines[0]


def test_an_auto_opt_output_resolves_by_either_path(cli, genai_model, tmp_path):
    out = tmp_path / "onnx"
    link_dir(genai_model, out / "model")
    (out / "phitune.json").write_text(json.dumps({"artifact": "onnx-genai", "key": "k"}))
    expected = direct(genai_model, user("Hi"), n=4)[0] + "\n"
    for spec in (out, out / "model"):
        result = cli("infer", "-m", str(spec), "--prompt", "Hi", "--max_new_tokens", "4")
        assert result.code == 0, result.err
        assert result.out == expected


# ---------------------------------------------------------------- user errors

def test_template_without_input_is_an_option_error(cli, genai_model):
    result = cli("infer", "-m", str(genai_model), "--template", r"<|user|>\nhello", "--prompt", "x")
    assert result.code == 2
    assert result.error_lines == [result.error_lines[0]]
    assert "{input}" in result.error_lines[0] and "--template" in result.error_lines[0]


def test_a_model_that_is_not_onnxruntime_genai_is_refused(cli, tmp_path):
    hf = cli("infer", "-m", str(REPO / "data" / "tiny-phi3"), "--prompt", "x")
    assert hf.code == 2 and len(hf.error_lines) == 1
    assert "needs an onnxruntime-genai model" in hf.error_lines[0]
    assert "phitune auto-opt" in hf.error_lines[0]
    (tmp_path / "notes.txt").write_text("x")
    other = cli("infer", "-m", str(tmp_path), "--prompt", "x")
    assert other.code == 2 and len(other.error_lines) == 1 and "Traceback" not in other.err


def test_a_prompt_longer_than_the_context_is_refused(cli, genai_model):
    result = cli("infer", "-m", str(genai_model), "--prompt", "hi " * 2100)
    assert result.code == 2 and result.out == ""
    assert "the model's context holds 2048" in result.error_lines[0]


def test_greedy_temperature_with_top_p_is_refused(cli, genai_model):
    result = cli("infer", "-m", str(genai_model), "--temperature", "0", "--top_p", "0.9",
                 "--prompt", "x")
    assert result.code == 2
    assert "--temperature 0" in result.error_lines[0]


def test_infer_help_imports_no_runtime():
    out = help_run("infer", ("torch", "onnxruntime", "onnxruntime_genai", "onnx"))
    assert out.returncode == 0, out.stderr
    assert "--max_new_tokens" in out.stdout  # help belongs on stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_command_line_reexecutes_with_huge_pages_and_answers_the_same(genai_model):
    """The real process entry (not the in-process `cli`): it replaces itself with the same
    command line plus glibc's huge-page tunable, and still reads the prompts piped to it."""
    from phitune import hugepages
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"COLUMNS": "200"}
    if hugepages.environ(env, hugepages.thp_mode(), hugepages.glibc_version()) is None:
        pytest.skip(f"nothing to ask for here: THP mode {hugepages.thp_mode()}, "
                    f"glibc {hugepages.glibc_version()}")

    def run(extra: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "phitune", "-v", "--json", "infer", "-m",
                               str(genai_model), "--max_new_tokens", "6"],
                              input="What is a list?\nHello\n", env=env | extra,
                              capture_output=True, text=True)
    on, off = run({}), run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "glibc.malloc.hugetlb=1" in on.stderr and "glibc.malloc.hugetlb=0" in off.stderr
    texts = [json.loads(line)["text"] for line in on.stdout.splitlines()]
    assert texts == [json.loads(line)["text"] for line in off.stdout.splitlines()]
    assert len(texts) == 2
