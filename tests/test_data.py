"""The fine-tuning data pipeline: reading and validating data with file:line errors,
templates, response-only loss masks, packing with a block-diagonal causal mask (checked
against a real Phi-3 forward), overflow, splits, and the shipped sample data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phitune import data as D
from phitune.errors import DataError, OptionError

REPO = Path(__file__).resolve().parent.parent
TRAVEL = REPO / "data" / "travel.jsonl"
TONE = REPO / "data" / "tone.jsonl"
LAB_TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
PHI3_CHAT = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer with Phi-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = [line for path in (TRAVEL, TONE) for line in path.read_text().splitlines()][:300]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = PHI3_CHAT
    return tokenizer


@pytest.fixture(scope="module")
def phi3(tok):
    """A tiny random Phi3ForCausalLM on the test tokenizer's vocabulary, in float32."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, original_max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id)
    return Phi3ForCausalLM(config).eval()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def qa(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}?", "response": f"Answer number {i}."}
            for i in range(start, start + n)]


def trained_text(tok, labels) -> str:
    return tok.decode([t for t in labels if t != D.IGNORE_INDEX])


def trained_segments(tok, labels) -> list[str]:
    """The runs of consecutive trained tokens, decoded."""
    runs, current = [], []
    for t in labels + [D.IGNORE_INDEX]:
        if t != D.IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


LAB = D.make_spec(LAB_TEMPLATE)


# ---------------------------------------------------------------- options and templates

def test_template_escapes_become_newlines_and_tabs():
    spec = D.make_spec(r"Q:\t{prompt}\nA: {response}\\n")
    assert spec.template == "Q:\t{prompt}\nA: {response}\\n"  # \\n stays a backslash and n
    text, spans = D.render(D.Record({"prompt": "p", "response": "r"}, "x:1"), spec)
    assert text == "Q:\tp\nA: r\\n"
    assert text[spans[0][0]:] == "r\\n"  # the response part starts at the last placeholder
    assert LAB.template == "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
    assert LAB.columns == ("prompt", "response")


def test_text_cols_without_template_join_with_newlines():
    spec = D.make_spec(text_cols="title,body")
    text, spans = D.render(D.Record({"title": "T", "body": "B"}, "x:1"), spec)
    assert text == "T\nB" and text[spans[0][0]:] == "B"
    with_template = D.make_spec("{title}: {body}", text_cols=["title", "body"])
    assert D.render(D.Record({"title": "T", "body": "B"}, "x:1"), with_template)[0] == "T: B"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(text_template="{prompt}", use_chat_template=True), "both given"),
    (dict(), "no text format"),
    (dict(text_template="no placeholders here"), "no {column} placeholder"),
    (dict(text_template="{} and {0}"), "positional"),
    (dict(text_template="{prompt} {answer}", text_cols="prompt,response"), "{answer}"),
    (dict(text_template="{prompt"), "not a valid template"),
    (dict(use_chat_template=True, text_cols="a,b,c,d"), "at most 3 columns"),
])
def test_option_misuse_is_an_option_error(kwargs, needle):
    with pytest.raises(OptionError) as err:
        D.make_spec(**kwargs)
    assert needle in err.value.what
    assert err.value.line().count(" — ") == 2  # what — where — what to do


def test_numeric_options_are_checked():
    """Ranges are declared on RecordOptions' fields (phitune.options checks them);
    validate_options keeps what no single field can say."""
    from phitune import options as O
    for kwargs in (dict(max_seq_len=1), dict(overflow="wrap"), dict(eval_split=1.0),
                   dict(eval_dataset_size=0)):
        with pytest.raises(OptionError):
            O.validate(D.RecordOptions(**kwargs))
    for kwargs in (dict(overflow="wrap"), dict(eval_split=0.1, eval_dataset_size=3)):
        with pytest.raises(OptionError):
            D.validate_options(**kwargs)
    D.validate_options(max_seq_len=64, overflow="drop", eval_dataset_size=5)


# ---------------------------------------------------------------- validation errors

def test_missing_file_names_it_and_suggests_a_near_miss(tmp_path):
    jsonl(tmp_path / "travel.jsonl", qa(2))
    with pytest.raises(DataError) as err:
        D.load_and_validate([str(tmp_path / "travle.jsonl")], "json", LAB)
    assert "travle.jsonl" in err.value.what and err.value.where == "--data_files"
    assert "travel.jsonl" in err.value.fix


def test_malformed_json_line_reports_file_and_line(tmp_path):
    path = write(tmp_path / "x.jsonl", json.dumps(qa(1)[0]) + "\n\n" +
                 '{"prompt": "a", "response": }\n' + json.dumps(qa(1)[0]) + "\n")
    with pytest.raises(DataError) as err:
        D.load_records([path], "json")
    assert err.value.where == f"{path}:3"
    assert f"{path}:3" in err.value.line() and "line 3" in err.value.what


def test_json_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "x.jsonl", json.dumps(qa(1)[0]) + '\n["a", "b"]\n')
    with pytest.raises(DataError) as err:
        D.load_records([path], "json")
    assert err.value.where == f"{path}:2" and "list" in err.value.what


def test_unreadable_csv_and_parquet(tmp_path):
    bad_quote = write(tmp_path / "q.csv", 'prompt,response\na,b\nc,"unterminated\nd,e\n')
    with pytest.raises(DataError) as err:
        D.load_records([bad_quote], "csv")
    assert err.value.where == f"{bad_quote}:3" and "cannot be read as CSV" in err.value.what
    extra = write(tmp_path / "f.csv", "prompt,response\na,b\nc,d,e\n")
    with pytest.raises(DataError) as err:
        D.load_records([extra], "csv")
    assert err.value.where == f"{extra}:3" and "3 fields" in err.value.what
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"prompt,response\nok,fine\n\xff\xfe,\x80\n")
    with pytest.raises(DataError) as err:
        D.load_records([binary], "csv")
    assert err.value.where == f"{binary}:3" and "UTF-8" in err.value.what
    parquet = write(tmp_path / "x.parquet", "this is not parquet")
    with pytest.raises(DataError) as err:
        D.load_records([parquet], "parquet")
    assert "cannot be read as parquet" in err.value.what and err.value.where == str(parquet)


def test_placeholder_for_a_column_no_record_has(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", qa(3))
    spec = D.make_spec(r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{respons}<|end|>")
    with pytest.raises(DataError) as err:
        D.load_and_validate([path], "json", spec)
    assert "'respons'" in err.value.what and "columns: prompt, response" in err.value.what
    assert "response" in err.value.fix and str(path) in err.value.where


def test_empty_dataset(tmp_path):
    path = write(tmp_path / "x.jsonl", "\n  \n")
    with pytest.raises(DataError) as err:
        D.load_and_validate([path], "json", LAB)
    assert "no records" in err.value.what and str(path) in err.value.where
    header_only = write(tmp_path / "x.csv", "prompt,response\n")
    with pytest.raises(DataError):
        D.load_and_validate([header_only], "csv", LAB)


def test_records_missing_a_needed_column_report_first_line_and_count(tmp_path):
    rows = qa(6)
    del rows[2]["response"]
    rows[4]["response"] = None
    path = jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError) as err:
        D.load_and_validate([path], "json", LAB)
    assert err.value.where == f"{path}:3"
    assert "2 of 6 records" in err.value.what and "'response'" in err.value.what


def test_unknown_data_name_and_format_mismatch(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", qa(2))
    with pytest.raises(DataError) as err:
        D.load_records([path], "some-org/some-dataset")
    assert "unknown --data_name" in err.value.what and "json, csv, parquet" in err.value.fix
    with pytest.raises(OptionError):
        D.load_records([path], "csv")  # a .jsonl file named as csv
    with pytest.raises(OptionError):
        D.load_records([], "json")  # no --data_files


# ---------------------------------------------------------------- formats

def test_csv_parquet_json_array_and_several_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    csv_path = write(tmp_path / "a.csv", 'prompt,response\nWhere?,"Here, there"\n'
                     '"Two\nlines?",Yes\n')
    pq_path = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(qa(2, start=10)), pq_path)
    arr = write(tmp_path / "c.json", '[\n  {"prompt": "p1", "response": "r1"},\n\n'
                '  {"prompt": "p2",\n   "response": "r2"}\n]\n')
    records = D.load_and_validate([csv_path], "csv", LAB)
    assert [r["response"] for r in records] == ["Here, there", "Yes"]
    assert [r.source for r in records] == [f"{csv_path}:2", f"{csv_path}:3"]
    assert records[1]["prompt"] == "Two\nlines?"
    records = D.load_and_validate([pq_path], None, LAB)  # format from the suffix
    assert records[1] == {"prompt": "Question 11?", "response": "Answer number 11."}
    assert records[1].source == f"{pq_path}:row 2"
    records = D.load_and_validate([arr], "json", LAB)
    assert [r.source for r in records] == [f"{arr}:2", f"{arr}:4"]
    one, two = jsonl(tmp_path / "1.jsonl", qa(2)), jsonl(tmp_path / "2.jsonl", qa(3, start=2))
    records = D.load_and_validate([one, two], "json", LAB)
    assert [r["prompt"] for r in records] == [f"Question {i}?" for i in range(5)]
    assert records[2].source == f"{two}:1"
    assert len(D.load_records([str(tmp_path / "[12].jsonl")], "json")) == 5  # a glob


def test_saved_dataset_directory(tmp_path):
    import datasets
    datasets.Dataset.from_list(qa(4)).save_to_disk(str(tmp_path / "ds"))
    records = D.load_and_validate(None, str(tmp_path / "ds"), LAB)
    assert len(records) == 4 and records[0]["prompt"] == "Question 0?"
    assert records[3].source.endswith("ds[row 4]")


# ---------------------------------------------------------------- masks

def test_response_only_loss_covers_exactly_the_response(tok):
    records = D.load_records([TRAVEL], "json")[:20]
    examples, counts = D.tokenize_examples(records, tok, LAB, max_seq_len=512)
    assert counts == D.Overflow() and len(examples) == 20
    for rec, ex in zip(records, examples):
        text, _ = D.render(rec, LAB)
        assert ex["input_ids"] == tok(text)["input_ids"]  # one tokenization of the whole text
        assert trained_text(tok, ex["labels"]) == rec["response"] + "<|end|>"
        assert trained_segments(tok, ex["labels"]) == [rec["response"] + "<|end|>"]
        assert all(lab in (D.IGNORE_INDEX, tid) for lab, tid in zip(ex["labels"], ex["input_ids"]))


def test_train_on_prompt_trains_everything_but_the_first_token(tok):
    records = D.load_records([TONE], "json")[:5]
    spec = D.make_spec(r"<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>")
    examples, _ = D.tokenize_examples(records, tok, spec, 256, train_on_prompt=True)
    for ex in examples:
        assert ex["labels"][0] == D.IGNORE_INDEX  # nothing in the example predicts it
        assert ex["labels"][1:] == ex["input_ids"][1:]


def test_chat_template_trains_only_assistant_turns(tok, tmp_path):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What to see in Chicago?"},
            {"role": "assistant", "content": "The Art Institute."},
            {"role": "user", "content": "And to eat?"},
            {"role": "assistant", "content": "Deep-dish pizza."}]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": conv}, {"messages": conv[:3]}])
    spec = D.make_spec(use_chat_template=True)
    records = D.load_and_validate([path], "json", spec)
    examples, _ = D.tokenize_examples(records, tok, spec, 256)
    assert trained_segments(tok, examples[0]["labels"]) == ["The Art Institute.<|end|>",
                                                            "Deep-dish pizza.<|end|>"]
    assert trained_segments(tok, examples[1]["labels"]) == ["The Art Institute.<|end|>"]
    full = tok.apply_chat_template(conv, tokenize=False)
    assert tok.decode(examples[0]["input_ids"]) == full
    everything, _ = D.tokenize_examples(records, tok, spec, 256, train_on_prompt=True)
    assert everything[0]["labels"][1:] == everything[0]["input_ids"][1:]


def test_chat_records_are_validated(tmp_path):
    spec = D.make_spec(use_chat_template=True)
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = jsonl(tmp_path / "c.jsonl", [{"messages": good}, {"messages": [{"role": "user"}]},
                                         {"messages": "not a list"}])
    with pytest.raises(DataError) as err:
        D.load_and_validate([path], "json", spec)
    assert err.value.where == f"{path}:2" and "2 of 3 records" in err.value.what
    no_reply = jsonl(tmp_path / "u.jsonl", [{"messages": good[:1]}])
    with pytest.raises(DataError) as err:
        D.load_and_validate([no_reply], "json", spec)
    assert "assistant" in err.value.what
    assert D.load_and_validate([no_reply], "json", spec, train_on_prompt=True)
    with pytest.raises(DataError) as err:
        D.load_and_validate([no_reply], "json", D.make_spec(use_chat_template=True,
                                                            text_cols="conversation"))
    assert "'conversation'" in err.value.what and "messages" in err.value.what


def test_chat_template_renders_prompt_response_columns(tok, tmp_path):
    """--use_chat_template on column data: the known pairs by default, or named columns; the
    text is the model's template over a user and an assistant turn, loss on the reply only."""
    rows = [{"prompt": "What to see in Chicago?", "response": "The Art Institute."}]
    path = jsonl(tmp_path / "pr.jsonl", rows)
    expected = tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]},
                                        {"role": "assistant", "content": rows[0]["response"]}],
                                       tokenize=False)
    for spec in (D.make_spec(use_chat_template=True),
                 D.make_spec(use_chat_template=True, text_cols="prompt,response")):
        records = D.load_and_validate([path], "json", spec)
        examples, _ = D.tokenize_examples(records, tok, spec, 256)
        assert tok.decode(examples[0]["input_ids"]) == expected
        assert trained_segments(tok, examples[0]["labels"]) == ["The Art Institute.<|end|>"]
    qa = jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A.", "id": 1}])
    spec = D.make_spec(use_chat_template=True)
    text, _ = D.render(D.load_and_validate([qa], "json", spec)[0], spec, tok)
    assert "Q?" in text and "A." in text
    system = D.make_spec(use_chat_template=True, text_cols="sys,q,a")
    conv = D.conversation(D.Record({"sys": "Be brief.", "q": "Q?", "a": "A."}, "x:1"), system)
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]


def test_chat_template_column_data_errors_name_the_way_out(tmp_path):
    odd = jsonl(tmp_path / "odd.jsonl", [{"ask": "Q?", "reply": "A."}])
    with pytest.raises(DataError) as err:
        D.load_and_validate([odd], "json", D.make_spec(use_chat_template=True))
    assert "prompt/response" in err.value.what and "ask, reply" in err.value.what
    assert "--text_cols PROMPT,RESPONSE" in err.value.fix and err.value.where == f"{odd}:1"
    named = D.make_spec(use_chat_template=True, text_cols="ask,reply")
    assert D.load_and_validate([odd], "json", named)
    numeric = jsonl(tmp_path / "num.jsonl", [{"ask": "Q?", "reply": 3}])
    with pytest.raises(DataError) as err:
        D.load_and_validate([numeric], "json", named)
    assert "non-text value" in err.value.what


def test_chat_template_on_a_model_without_one_is_one_line(tok):
    import copy
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    spec = D.make_spec(use_chat_template=True)
    record = D.Record({"prompt": "Q?", "response": "A."}, "x:1")
    with pytest.raises(OptionError) as err:
        D.render(record, spec, plain)
    assert "no chat template" in err.value.what or "has none" in err.value.what


# ---------------------------------------------------------------- overflow

def test_truncate_and_drop_count_long_records(tok):
    short = [D.Record({"prompt": "Hi?", "response": "Yes."}, f"x:{i}") for i in range(3)]
    long = [D.Record({"prompt": "Hi?", "response": "word " * 60}, f"y:{i}") for i in range(2)]
    examples, counts = D.tokenize_examples(short + long, tok, LAB, 24, overflow="truncate")
    assert counts.n_truncated == 2 and counts.n_dropped == 0 and len(examples) == 5
    assert max(len(e["input_ids"]) for e in examples) == 24
    examples, counts = D.tokenize_examples(short + long, tok, LAB, 24, overflow="drop")
    assert counts.n_dropped == 2 and counts.n_truncated == 0 and len(examples) == 3
    with pytest.raises(DataError) as err:
        D.tokenize_examples(long, tok, LAB, 24, overflow="drop")
    assert "2 dropped" in err.value.what
    long_prompt = [D.Record({"prompt": "why " * 60, "response": "Because."}, "z:1")]
    examples, counts = D.tokenize_examples(long_prompt + short, tok, LAB, 24)
    assert counts.n_truncated == 1 and counts.n_no_target == 1 and len(examples) == 3


# ---------------------------------------------------------------- packing and masks

def test_pack_fills_rows_with_whole_examples(tok):
    records = D.load_records([TONE], "json")[:40]
    spec = D.make_spec(r"<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>")
    examples, _ = D.tokenize_examples(records, tok, spec, 96)
    rows = D.pack(examples, 96, pad_id=tok.pad_token_id)
    assert all(len(r[k]) == 96 for r in rows for k in ("input_ids", "labels", "position_ids",
                                                       "seq_ids"))
    assert len(rows) < len(examples)
    seen = []
    for row in rows:
        offset = 0
        for k, n in enumerate(row["lengths"]):
            assert row["seq_ids"][offset:offset + n] == [k] * n
            assert row["position_ids"][offset:offset + n] == list(range(n))
            seen.append((row["input_ids"][offset:offset + n], row["labels"][offset:offset + n]))
            offset += n
        assert row["seq_ids"][offset:] == [-1] * (96 - offset)
        assert row["labels"][offset:] == [D.IGNORE_INDEX] * (96 - offset)
    assert sorted(seen) == sorted((e["input_ids"], e["labels"]) for e in examples)


def test_block_causal_mask_values():
    import torch
    mask = D.block_causal_mask(torch.tensor([[0, 0, 0, 1, 1, -1]]))
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], expected)
    additive = D.additive_mask(mask, torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and additive[0, 0, 0, 0] == 0
    assert additive[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(tok, phi3, attn):
    """Each example inside a packed row gives the logits it gives alone, and the packed loss
    is the unpacked (padded-batch) loss: no attention or target crosses examples."""
    import torch
    phi3.set_attn_implementation(attn)
    records = D.load_records([TRAVEL], "json")[:6]
    examples, _ = D.tokenize_examples(records, tok, LAB, 256, train_on_prompt=True)
    rows = D.pack(examples, 256, pad_id=tok.pad_token_id)
    assert any(len(r["lengths"]) > 1 for r in rows)
    batch = D.collate_packed(rows, dtype=torch.float32)
    assert batch["attention_mask"].shape == (len(rows), 1, 256, 256)
    with torch.no_grad():
        packed = phi3(**batch)
        padded = phi3(**D.pad_batch(examples, tok.pad_token_id))
        for r, row in enumerate(rows):
            offset = 0
            for n in row["lengths"]:
                ids = torch.tensor([row["input_ids"][offset:offset + n]])
                alone = phi3(input_ids=ids).logits[0]
                diff = (packed.logits[r, offset:offset + n] - alone).abs().max().item()
                assert diff < 1e-4, diff
                offset += n
    assert abs(packed.loss.item() - padded.loss.item()) < 1e-4


def test_position_ids_alone_give_the_same_logits(tok, phi3):
    """mask='none' (for flash attention): transformers infers the packing from position_ids."""
    import torch
    phi3.set_attn_implementation("sdpa")
    examples, _ = D.tokenize_examples(D.load_records([TONE], "json")[:5], tok,
                                      D.make_spec("{phrase} => {tone}"), 64)
    rows = D.pack(examples, 64)
    with torch.no_grad():
        with_mask = phi3(**D.collate_packed(rows)).logits
        without = phi3(**D.collate_packed(rows, mask="none")).logits
    real = torch.tensor([r["seq_ids"] for r in rows]) >= 0
    assert (with_mask - without).abs()[real].max().item() < 1e-4


def test_pad_batch_shapes(tok):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": [8], "labels": [-100]}]
    batch = D.pad_batch(examples, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


# ---------------------------------------------------------------- split and statistics

def test_split_is_deterministic_and_disjoint():
    records = [D.Record({"i": i}, f"x:{i}") for i in range(100)]
    train, held = D.split_records(records, eval_split=0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(r["i"] for r in train + held) == list(range(100))
    assert D.split_records(records, eval_split=0.1, seed=3) == (train, held)
    assert D.split_records(records, eval_split=0.1, seed=4)[1] != held
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # file order kept
    assert len(D.split_records(records, eval_dataset_size=7)[1]) == 7
    assert D.split_records(records) == (records, [])
    with pytest.raises(OptionError):
        D.split_records(records, eval_dataset_size=100)
    with pytest.raises(OptionError):
        D.split_records(records, eval_split=0)


def test_prepare_statistics(tok):
    records = D.load_and_validate([TRAVEL], "json", LAB)
    prepared = D.prepare(records, tok, LAB, max_seq_len=512, eval_split=0.1, seed=1)
    s = prepared.stats
    assert s["n_records"] == len(records) == s["n_train"] + s["n_eval"] and s["n_eval"] == 25
    assert s["n_tokens"] == sum(x >= 0 for r in prepared.train for x in r["seq_ids"])
    assert 0 < s["n_trained_tokens"] < s["n_tokens"]
    assert s["n_trained_tokens"] == sum(x != D.IGNORE_INDEX for r in prepared.train
                                        for x in r["labels"])
    assert s["n_rows"] == len(prepared.train) and len(prepared.eval) == s["n_eval_rows"] > 0
    assert s["padding_fraction"] == pytest.approx(1 - s["n_tokens"] / (s["n_rows"] * 512),
                                                  abs=1e-4)
    assert s["padding_fraction"] < 0.1  # examples average ~105 tokens here
    assert json.loads(json.dumps(s)) == s  # manifest-ready
    assert any("packed rows" in line for line in D.describe(s))
    unpacked = D.prepare(records, tok, LAB, max_seq_len=512, packing=False)
    assert len(unpacked.train) == len(records) and unpacked.stats["padding_fraction"] is None


# ---------------------------------------------------------------- shipped data

def test_shipped_datasets_validate():
    travel = D.load_and_validate([TRAVEL], "json", LAB)
    assert 200 <= len(travel) <= 300
    assert sum("chicago" in r["prompt"].lower() for r in travel) >= 5
    assert any(r["prompt"].lower().startswith("what is the best thing to see in chicago")
               for r in travel)
    tone_spec = D.make_spec(r"<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>")
    tone = D.load_and_validate([TONE], "json", tone_spec)
    assert len(tone) == 200
    counts = {t: sum(r["tone"] == t for r in tone) for t in ("Sad", "Joy", "Fear", "Surprise")}
    assert counts == {"Sad": 50, "Joy": 50, "Fear": 50, "Surprise": 50}
    assert len({r["phrase"] for r in tone}) == 200 and len({r["prompt"] for r in travel}) == len(
        travel)


def test_validation_imports_neither_torch_nor_transformers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(qa(3)), tmp_path / "x.parquet")
    write(tmp_path / "x.csv", "prompt,response\na,b\n")
    script = textwrap.dedent(f"""
        import sys, time
        t = time.perf_counter()
        from phitune import data as D
        from phitune.errors import DataError
        lab = D.make_spec({LAB_TEMPLATE!r})
        D.load_and_validate([{str(TRAVEL)!r}], "json", lab)
        D.load_and_validate([{str(TONE)!r}], "json", D.make_spec("{{phrase}} => {{tone}}"))
        D.load_and_validate([{str(tmp_path / 'x.csv')!r}], "csv", lab)
        D.load_and_validate([{str(tmp_path / 'x.parquet')!r}], "parquet", lab)
        try:
            D.load_and_validate([{str(tmp_path / 'missing.jsonl')!r}], "json", lab)
        except DataError:
            pass
        took = time.perf_counter() - t
        print(took, "torch" in sys.modules, "transformers" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    took, torch_loaded, transformers_loaded = out.stdout.split()
    assert torch_loaded == "False" and transformers_loaded == "False"
    assert float(took) < 2.0, took
