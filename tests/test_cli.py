"""The command group: fast help, version, the one-line error format, bugs keep tracebacks."""

import subprocess
import sys
import time

import pytest

from phitune import __version__


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.perf_counter()\n"
            "from phitune.cli.main import main\n"
            "for argv in (['--help'], ['quantize', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.perf_counter() - t)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    flag, seconds = out.stdout.strip().splitlines()[-1].split()
    assert flag == "NOTORCH"
    assert float(seconds) < 0.5
    assert wall < 2.0  # interpreter start included, with margin for a loaded CI machine


def test_version(cli):
    result = cli("--version")
    assert result.code == 0
    assert __version__ in result.out


def test_unknown_option_is_one_line(cli):
    result = cli("quantize", "-m", "tiny-phi3", "-o", "x", "--no-such-flag")
    assert result.code == 2
    assert len(result.error_lines) == 1
    assert "--no-such-flag" in result.error_lines[0]
    assert "Traceback" not in result.err


def test_missing_required_option(cli):
    result = cli("quantize", "-m", "tiny-phi3")
    assert result.code == 2
    assert result.error_lines and "--output" in result.error_lines[0]


def test_bug_keeps_its_traceback(monkeypatch):
    import phitune.quantize.step as step
    from phitune.cli.main import main

    def broken(_opts):
        raise RuntimeError("a bug")
    monkeypatch.setattr(step, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["quantize", "-m", "tiny-phi3", "-o", "unused"])


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "phitune", "--version"], capture_output=True,
                         text=True, check=True)
    assert __version__ in out.stdout
