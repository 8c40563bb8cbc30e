"""errors.first_line: the one reader of a library message's first line for an `error:` line."""

from __future__ import annotations

from phitune.errors import first_line


def test_first_non_blank_line_cut_to_the_limit():
    assert first_line(ValueError("\n  \nfirst line\nsecond")) == "first line"
    assert first_line(ValueError("x" * 300), 160) == "x" * 160
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError(""), 120, "") == ""


def test_sentence_mode_joins_lines_and_cuts_at_a_word():
    hub = OSError("Repository Not Found for url:\nhttps://x/y. Please make sure it exists.")
    assert first_line(hub, 240, "unknown error", sentence=True) == \
        "Repository Not Found for url: https://x/y"
    long = first_line(OSError("word " * 80), 240, sentence=True)
    assert long.endswith(" …") and len(long) <= 242 and "wor …" not in long
    assert first_line(OSError("."), 240, "unknown error", sentence=True) == "unknown error"
