"""`scripts/bench.py quantize`'s llm-compressor comparison: without its environment, one line that
says how to make it; with a broken one, one line with its error, and the bench goes on."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    """scripts/benchmarks/quantize.py, imported as bench.py imports it."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("benchmarks.quantize")


def _fake_runner(tmp_path: Path, monkeypatch, script: str, eval_ids=(1, 2, 3)) -> Path:
    """An llm-compressor env whose python is the shell `script`, found through $LLMC_VENV, and
    the tokens file the bench hands it; returns the tokens file's path."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\n{script}")
    python.chmod(0o755)
    monkeypatch.setenv("LLMC_VENV", str(tmp_path / "venv"))
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"model_dir": str(tmp_path), "calib": [[1, 2]],
                                  "eval_ids": list(eval_ids) if eval_ids else None}))
    return tokens


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
    tokens = _fake_runner(tmp_path, monkeypatch,
                          "echo 'ModuleNotFoundError: No module named llmcompressor' >&2\nexit 3\n",
                          eval_ids=None)
    assert bench.compare_llmcompressor(tokens, 64, 1.0, 0.5, tmp_path / "out") is None
    out = capsys.readouterr().out
    assert "failed (exit 3)" in out and "No module named llmcompressor" in out


def test_runner_figures_print_side_by_side(tmp_path, monkeypatch, capsys):
    """The runner's JSON line (as measured on SmolLM2, 8x256 tokens, g64) becomes the LLMC lines:
    time in plain-forward units, s/layer, peak RSS, and the gap over phitune's RTN gap."""
    measured = {"seconds": 735.61, "load_s": 1.29, "save_s": 25.38, "total_s": 762.27,
                "peak_rss_mb": 1656.7, "layers": 30, "pin_memory_patched": True, "size_mb": 166.0,
                "versions": {"llmcompressor": "0.14.0.1", "transformers": "5.17.0"},
                "ppl_before": 20.9204, "ppl_after": 23.8994, "ppl_gap": 2.979}
    tokens = _fake_runner(tmp_path, monkeypatch, f"echo 'a log line'\necho '{json.dumps(measured)}'\n")
    assert _bench().compare_llmcompressor(tokens, 64, 19.1, 6.0138, tmp_path / "out") == measured
    out = capsys.readouterr().out
    assert "gap +2.9790" in out and "= 39.91x forward" in out and "24.5 s/layer" in out
    assert "peak RSS 1657 MB" in out and "pin_memory made a no-op" in out and "float 20.920" in out
    assert "LLMC-AWQ gap / RTN gap      0.495" in out and "AWQModifier" in out


def test_gptq_peer_runs_with_its_algorithm_and_compares_with_phitune(tmp_path, monkeypatch, capsys):
    """phitune's GPTQ gets llm-compressor's GPTQModifier: the runner is asked for --algorithm gptq,
    and the comparison line gives phitune's speedup over it and whose gap is smaller."""
    measured = {"algorithm": "gptq", "seconds": 100.0, "load_s": 1.0, "save_s": 9.0, "total_s": 110.0,
                "peak_rss_mb": 1500.0, "layers": 30, "pin_memory_patched": True, "size_mb": 166.0,
                "versions": {"llmcompressor": "0.14.0.1", "transformers": "5.17.0"},
                "ppl_before": 20.92, "ppl_after": 22.12, "ppl_gap": 1.2}
    tokens = _fake_runner(tmp_path, monkeypatch,
                          f"echo \"$@\" > {tmp_path / 'argv'}\necho '{json.dumps(measured)}'\n")
    bench = _bench()
    assert bench.compare_llmcompressor(tokens, 64, 20.0, 6.0, tmp_path / "out", "gptq",
                                       {"seconds": 22.0, "gap": 0.9}) == measured
    argv = (tmp_path / "argv").read_text().split()
    assert argv[0].endswith("llmcompressor_quantize.py") and argv[argv.index("--algorithm") + 1] == "gptq"
    out = capsys.readouterr().out
    assert "LLMC-GPTQ perplexity 22.120  gap +1.2000" in out and "GPTQModifier" in out
    assert "LLMC-GPTQ gap / RTN gap     0.200" in out
    assert "GPTQ vs LLMC-GPTQ           phitune 5.00x faster (22.0 s vs 110.0 s)" in out
    assert "gap +0.9000 vs +1.2000 (0.150x vs 0.200x RTN's): smaller" in out
    bench.compare_llmcompressor(tokens, 64, 20.0, 6.0, tmp_path / "out", "gptq",
                                {"seconds": 220.0, "gap": 1.5})
    out = capsys.readouterr().out
    assert "phitune 2.00x slower (220.0 s vs 110.0 s); gap +1.5000 vs +1.2000" in out and ": larger" in out


def test_every_peer_has_a_runner_recipe():
    """The bench's peers are exactly the algorithms the runner accepts."""
    import ast
    tree = ast.parse((REPO / "scripts" / "llmcompressor_quantize.py").read_text())
    runner = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "ALGORITHMS")
    assert set(_bench().LLMC_PEERS) == set(runner)
