"""scripts/bench.py quantize's llm-compressor comparison: without its environment, one line that
says how to make it; with a broken one, one line with its error, and the bench goes on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("phitune_bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_absent_env_is_one_line_saying_how_to_make_it(tmp_path, monkeypatch, capsys):
    bench = _bench()
    monkeypatch.setenv("LLMC_VENV", str(tmp_path / "no-such-venv"))
    assert bench.llmcompressor_python() == tmp_path / "no-such-venv" / "bin" / "python"
    assert bench.compare_llmcompressor(tmp_path / "tokens.json", 64, 1.0, 0.5, tmp_path / "out") is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "not installed" in lines[0] and "bash scripts/llmcompressor_env.sh" in lines[0]
    assert str(tmp_path / "no-such-venv") in lines[0]


def test_relative_env_path_is_the_repos(monkeypatch):
    bench = _bench()
    monkeypatch.delenv("LLMC_VENV", raising=False)
    assert bench.llmcompressor_python() == REPO / ".venv-llmcompressor" / "bin" / "python"
    monkeypatch.setenv("LLMC_VENV", "elsewhere")
    assert bench.llmcompressor_python() == REPO / "elsewhere" / "bin" / "python"


def test_broken_env_reports_its_error_and_returns(tmp_path, monkeypatch, capsys):
    bench = _bench()
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named llmcompressor' >&2\nexit 3\n")
    python.chmod(0o755)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"model_dir": str(tmp_path), "calib": [[1, 2]], "eval_ids": None}))
    monkeypatch.setenv("LLMC_VENV", str(tmp_path / "venv"))
    assert bench.compare_llmcompressor(tokens, 64, 1.0, 0.5, tmp_path / "out") is None
    out = capsys.readouterr().out
    assert "failed (exit 3)" in out and "No module named llmcompressor" in out
