"""The command group: fast help, version, the one-line error format, bugs keep tracebacks."""

import json
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


# ---------------------------------------------------------------- global options anywhere

def _fail_fast(tmp_path) -> dict[str, list[str]]:
    """A cheap command line per subcommand: a one-line error (or, for cache ls, a result)
    before any model loads, so only the parsing of the global flags is under test."""
    nowhere = str(tmp_path / "nowhere")
    return {
        "quantize": ["quantize", "-m", nowhere, "-o", str(tmp_path / "q")],
        "finetune": ["finetune", "-m", nowhere, "--data_files", str(tmp_path / "none.jsonl"),
                     "-o", str(tmp_path / "ft")],
        "infer": ["infer", "-m", nowhere, "--prompt", "hi"],
        "auto-opt": ["auto-opt", "-m", nowhere, "-o", str(tmp_path / "onnx")],
        "export-adapter": ["export-adapter", "-a", nowhere, "--base", nowhere,
                           "-o", str(tmp_path / "a.onnx_adapter")],
        "run": ["run", "--config", str(tmp_path / "none.yaml")],
        "cache": ["cache", "ls", "--cache_dir", str(tmp_path / "cache")],
        "eval": ["eval", "-m", nowhere],
        "serve": ["serve", "-m", nowhere],
    }


def test_every_subcommand_has_a_global_flag_case(tmp_path):
    from phitune.cli.main import COMMANDS
    assert set(_fail_fast(tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("flag", ["--json", "-v", "--verbose"])
@pytest.mark.parametrize("command", sorted(["quantize", "finetune", "infer", "auto-opt",
                                            "export-adapter", "run", "cache", "eval", "serve"]))
def test_global_flags_after_the_subcommand(command, flag, cli, tmp_path):
    from phitune import ui
    try:
        result = cli(*_fail_fast(tmp_path)[command], flag)
        assert "No such option" not in result.err and "unexpected extra" not in result.err
        assert result.code in (0, 2), result.err
        if result.code == 2:
            assert len(result.error_lines) == 1 and "Traceback" not in result.err
        # the flag reached the group: the run was configured with it
        assert ui.json_mode() is (flag == "--json")
        assert ui.verbose() is (flag != "--json")
        if command == "cache" and flag == "--json":
            assert json.loads(result.out)["entries"] == []
    finally:
        ui.configure(guard_stdout=False)


def test_version_after_the_subcommand(cli, tmp_path):
    result = cli("infer", "-m", str(tmp_path), "--version")
    assert result.code == 0 and __version__ in result.out


def test_global_flags_in_option_values_or_after_double_dash_stay_put():
    from phitune.cli.main import hoist_global_flags as hoist
    assert hoist(["infer", "-m", "D", "--prompt", "hi", "--json", "-v"]) == \
        ["--json", "-v", "infer", "-m", "D", "--prompt", "hi"]
    assert hoist(["infer", "-m", "D", "--prompt", "--json"]) == \
        ["infer", "-m", "D", "--prompt", "--json"]
    assert hoist(["infer", "-m", "D", "--", "--json"]) == ["infer", "-m", "D", "--", "--json"]
    assert hoist(["cache", "clean", "--cache_dir", "-v", "--all", "--json"]) == \
        ["--json", "cache", "clean", "--cache_dir", "-v", "--all"]
    assert hoist(["-v", "quantize", "-m", "x"]) == ["-v", "quantize", "-m", "x"]


def test_run_config_takes_global_flags_after_it(cli, tmp_path):
    """The flags apply to the steps a workflow runs: --json prints the run's summary."""
    config = tmp_path / "wf.yaml"
    config.write_text("output_dir: out\ncache_dir: cache\nsteps:\n"
                      "  - {name: quantize, model: tiny-phi3, algorithm: rtn, eval: false}\n")
    result = cli("run", "--config", str(config), "--dry-run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["dry_run"] is True


def test_global_flag_as_a_workflow_step_option_says_where_it_goes(cli, tmp_path):
    config = tmp_path / "wf.yaml"
    config.write_text("output_dir: out\nsteps:\n  - {name: quantize, model: tiny-phi3, json: true}\n")
    result = cli("run", "--config", str(config), "--dry-run")
    assert result.code == 2 and len(result.error_lines) == 1
    assert "global option" in result.error_lines[0]
    assert f"phitune run --config {config} --json" in result.error_lines[0]


# What a command needs to run, never to explain itself: the runtimes, and the modules holding the
# steps' and commands' work (their options live apart: registry.StepDef.options_module,
# infer/options.py, serve/options.py, export/options.py).
HEAVY = ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "peft", "starlette",
         "uvicorn", "phitune.artifacts", "phitune.models", "phitune.quantize.step",
         "phitune.finetune.step", "phitune.export.step", "phitune.export.export_adapter",
         "phitune.eval.step", "phitune.eval.torch_model", "phitune.eval.onnx_model",
         "phitune.infer.chat", "phitune.infer.session", "phitune.serve.app",
         "phitune.serve.server", "phitune.workflow.run", "phitune.workflow.plan")


@pytest.mark.parametrize("command", sorted(["quantize", "finetune", "infer", "auto-opt",
                                            "export-adapter", "run", "cache", "eval", "serve"]))
def test_help_imports_no_runtime_and_no_step(command):
    from conftest import help_run
    result = help_run(command, HEAVY)
    assert result.returncode == 0, result.stderr
    assert "Usage: phitune" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout.splitlines()[-1]
