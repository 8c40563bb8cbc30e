"""`phitune run --config` on phitune's own format, `phitune cache`, and the Makefile example.

One 3-step workflow (quantize rtn → finetune 5 steps → auto-opt int4) on the embedded model is
run once and then re-run, edited, forced and dry-run; the tests below share it, in file order.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TRAVEL = str(REPO / "data" / "travel.jsonl")
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


class Result:
    def __init__(self, code, out, err, seconds):
        self.code, self.out, self.err, self.seconds = code, out, err, seconds

    @property
    def error_lines(self):
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def lines(self, text):
        return [line for line in self.err.splitlines() if text in line]


def phitune(*args) -> Result:
    """`phitune ARGS` in-process (usable from module-scoped fixtures, unlike capsys)."""
    from phitune.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue(), time.perf_counter() - start)


def steps(**edits):
    base = [
        {"name": "quantize", "model": "tiny-phi3", "algorithm": "rtn", "eval": False},
        {"name": "finetune", "model": "@quantize", "data_files": TRAVEL, "data_name": "json",
         "text_template": TEMPLATE, "max_steps": 5, "max_seq_len": 128, "lora_r": 8,
         "per_device_train_batch_size": 2, "learning_rate": 1e-3},
        {"name": "onnx", "type": "auto-opt", "model": "@finetune"},
    ]
    for step in base:
        step.update(edits.get(step["name"], {}))
    return base


def write(root: Path, name: str, steps_, **top) -> Path:
    config = {"output_dir": str(root / "out"), "cache_dir": str(root / "cache"), "steps": steps_}
    config.update(top)
    path = root / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cache_entries(root: Path) -> set[str]:
    cache = root / "cache"
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")} if cache.exists() else set()


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    config = write(root, "wf.yaml", steps())
    result = phitune("run", "--config", config)
    assert result.code == 0, result.err[-3000:]
    return root, config, result


def test_three_steps_run_end_to_end_and_link_the_final_output(first):
    root, _config, result = first
    assert len(result.lines("running phitune")) == 3
    entries = cache_entries(root)
    assert sorted(e.split("-")[0] for e in entries) == ["auto", "finetune", "quantize"]
    by_type = {json.loads((root / "cache" / e / "phitune.json").read_text())["artifact"]: e
               for e in entries}
    assert set(by_type) == {"awq-model", "finetuned", "onnx-genai"}
    # output_dir holds a link (not a copy) to the final output only
    link = root / "out" / "onnx"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (root / "cache" / by_type["onnx-genai"]).resolve()
    assert (link / "model" / "genai_config.json").is_file()
    assert (link / "model" / "adapter_weights.onnx_adapter").is_file()
    assert sorted(p.name for p in (root / "out").iterdir()) == ["onnx", "phitune-workflow.json"]
    # finetune's model/ links to the quantize entry it trained on
    ft = root / "cache" / by_type["finetuned"]
    assert (ft / "model").resolve() == (root / "cache" / by_type["awq-model"]).resolve()


def test_second_identical_run_is_all_cached(first):
    root, config, _ = first
    before = cache_entries(root)
    result = phitune("run", "--config", config)
    assert result.code == 0, result.err[-2000:]
    assert len(result.lines(": cached — ")) == 3
    assert not result.lines("running phitune")
    assert cache_entries(root) == before
    assert result.seconds < 5


def test_spelling_an_option_at_its_default_or_hyphenated_keeps_the_cache(first):
    root, _config, _ = first
    same = write(root, "same.yaml", steps(finetune={"lora-alpha": 16.0, "overflow": "truncate",
                                                    "max-seq-len": 128}))
    result = phitune("run", "--config", same, "--dry-run")
    assert result.code == 0, result.err
    assert len(result.lines(" cached ")) == 3


def test_editing_one_step_reruns_it_and_the_steps_after_it(first):
    root, _config, _ = first
    before = cache_entries(root)
    quantize = next(e for e in before if e.startswith("quantize"))
    q_mtime = (root / "cache" / quantize / "phitune.json").stat().st_mtime
    edited = write(root, "edited.yaml", steps(finetune={"lora_dropout": 0.1}))
    result = phitune("run", "--config", edited)
    assert result.code == 0, result.err[-2000:]
    assert [l.split(":")[0] for l in result.lines("running phitune")] == ["finetune", "onnx"]
    assert [l.split(":")[0] for l in result.lines(": cached — ")] == ["quantize"]
    new = cache_entries(root) - before
    assert sorted(e.split("-")[0] for e in new) == ["auto", "finetune"]
    assert (root / "cache" / quantize / "phitune.json").stat().st_mtime == q_mtime
    assert (root / "out" / "onnx").resolve().name in new


def test_dry_run_runs_nothing_and_shows_the_plan(first):
    root, config, _ = first
    before = cache_entries(root)
    link = os.readlink(root / "out" / "onnx")
    changed = write(root, "changed.yaml", steps(quantize={"group_size": 64}))
    result = phitune("run", "--config", changed, "--dry-run")
    assert result.code == 0, result.err
    assert len(result.lines("would run (")) == 3
    assert "phitune quantize --model tiny-phi3 --algorithm rtn" in result.err
    assert "nothing was run" in result.err
    assert cache_entries(root) == before and os.readlink(root / "out" / "onnx") == link
    forced = phitune("run", "--config", config, "--dry-run", "--force", "finetune")
    assert forced.code == 0, forced.err
    assert len(forced.lines(" cached ")) == 1
    assert forced.lines("would run (forced)") and forced.lines("forced: reads 'finetune'")
    assert cache_entries(root) == before


def test_force_reruns_the_step_in_place(first):
    root, config, _ = first
    before = cache_entries(root)
    onnx = (root / "cache" / next(e for e in before if e.startswith("auto-opt")))
    result = phitune("run", "--config", config, "--force", "onnx")
    assert result.code == 0, result.err[-2000:]
    assert [l.split(":")[0] for l in result.lines("running phitune")] == ["onnx"]
    assert len(result.lines(": cached — ")) == 2
    assert cache_entries(root) == before  # same key, same entry, rebuilt
    assert (root / "out" / "onnx").resolve().name.startswith("auto-opt")
    assert (root / "out" / "onnx" / "model" / "genai_config.json").is_file()
    del onnx
    bad = phitune("run", "--config", config, "--force", "nosuch")
    assert bad.code == 2 and "nosuch" in bad.error_lines[0]


def test_json_summary(first):
    _root, config, _ = first
    result = phitune("--json", "run", "--config", config)
    assert result.code == 0
    summary = json.loads(result.out)
    assert [s["action"] for s in summary["steps"]] == ["cached"] * 3
    assert summary["outputs"] == {"onnx": str(Path(summary["output_dir"]) / "onnx")}


def test_cache_ls_and_clean_unused(first):
    root, config, _ = first
    cache = root / "cache"
    listing = phitune("--json", "cache", "ls", "--cache_dir", cache)
    assert listing.code == 0, listing.err
    rows = {r["entry"]: r for r in json.loads(listing.out)["entries"]}
    assert len(rows) == 5  # the original three + the edited finetune and onnx
    used = {name for name, r in rows.items() if r["used_by"]}
    assert len(used) == 3  # the last run of out/ is the original workflow
    by_config = phitune("cache", "ls", "--config", config)
    assert by_config.code == 0 and "5 entries" in by_config.err
    dry = phitune("cache", "clean", "--cache_dir", cache, "--unused", "--dry-run")
    assert dry.code == 0 and len(dry.lines(f"would remove {cache}")) == 2
    assert len(cache_entries(root)) == 5
    done = phitune("cache", "clean", "--cache_dir", cache, "--unused")
    assert done.code == 0 and len(done.lines(f"removed {cache}")) == 2
    assert cache_entries(root) == used
    again = phitune("run", "--config", config, "--dry-run")
    assert len(again.lines(" cached ")) == 3
    # an old quantize entry that a kept finetune links into is kept
    quantize = next(cache / e for e in used if e.startswith("quantize"))
    old = time.time() - 3 * 86400
    os.utime(quantize, (old, old))
    kept = phitune("cache", "clean", "--cache_dir", cache, "--older-than", "1d")
    assert kept.code == 0 and kept.lines("kept ") and quantize.is_dir()
    assert phitune("cache", "clean", "--cache_dir", cache).code == 2
    assert phitune("cache", "clean", "--cache_dir", cache, "--older-than", "soon").code == 2


def test_eval_step_figures_are_cached_and_bounds_checked_every_run(first):
    root, _config, _ = first

    def config(bound):
        eval_step = {"name": "check", "type": "eval", "model": "@quantize", "latency": False,
                     "max_tokens": 256, "seq_len": 128, "max_ppl": bound}
        return write(root, f"eval-{bound}.yaml", steps()[:1] + [eval_step],
                     output_dir=str(root / "eval-out"))
    ok = phitune("run", "--config", config(1e6))
    assert ok.code == 0, ok.err[-2000:]
    assert [l.split(":")[0] for l in ok.lines("running phitune")] == ["check"]
    assert ok.lines("check: constraints met")
    figures = json.loads((root / "eval-out" / "check" / "phitune.json").read_text())["metrics"]
    assert figures["ppl"] > 1 and figures["kind"] == "awq-model"
    assert (root / "eval-out" / "quantize").is_symlink()  # an eval leaves what it reads final
    tight = phitune("run", "--config", config(1.0))  # same figures, a bound they miss
    assert tight.code == 3, tight.err[-2000:]
    assert not tight.lines("running phitune") and len(tight.lines(": cached — ")) == 2
    assert "ppl" in tight.error_lines[0] and "cached figures" in tight.error_lines[0]


def _bad(tmp_path, steps_, **top):
    config = write(tmp_path, "bad.yaml", steps_, **top)
    result = phitune("run", "--config", config)
    assert result.code == 2, result.err
    assert len(result.error_lines) == 1 and "Traceback" not in result.err
    assert not (tmp_path / "cache").exists()
    return result.error_lines[0]


def test_unknown_option_is_named_with_its_step(tmp_path):
    line = _bad(tmp_path, steps(finetune={"lora_rank": 8}))
    assert "step 'finetune'" in line and "lora_rank" in line


def test_unknown_step_type_is_named(tmp_path):
    line = _bad(tmp_path, steps() + [{"name": "deploy", "model": "@onnx"}])
    assert "deploy" in line and "unknown step type" in line


def test_bad_refs_are_named(tmp_path):
    assert "@quantise" in _bad(tmp_path, steps(finetune={"model": "@quantise"}))
    later = _bad(tmp_path, steps(quantize={"model": "@onnx"}))
    assert "@onnx" in later and "later step" in later


def test_bad_values_and_workflow_owned_options(tmp_path):
    assert "--algorithm" in _bad(tmp_path, steps(quantize={"algorithm": "hqq"}))
    assert "output" in _bad(tmp_path, steps(onnx={"output": "x"}))
    assert "nosuch.jsonl" in _bad(tmp_path, steps(finetune={"data_files": "nosuch.jsonl"}))
    assert "frobnicate" in _bad(tmp_path, steps(), frobnicate=1)
    (tmp_path / "broken.yaml").write_text("steps: [\n")
    broken = phitune("run", "--config", tmp_path / "broken.yaml")
    assert broken.code == 2 and "YAML" in broken.error_lines[0]


# ---------------------------------------------------------------- the Makefile example

def test_makefile_second_make_does_no_work(tmp_path):
    out = tmp_path / "out"
    make = ["make", "-f", str(REPO / "examples" / "Makefile"), f"OUT={out}",
            f"PHITUNE={sys.executable} -m phitune", "ALGORITHM=rtn", "QUANTIZE_ARGS=--no-eval",
            "MAX_STEPS=3", "FINETUNE_ARGS=--max_seq_len 128 --lora_r 8 --per_device_train_batch_size 2"]
    first = subprocess.run(make, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    manifests = [out / d / "phitune.json" for d in ("awq", "ft", "onnx-ao")]
    mtimes = [m.stat().st_mtime_ns for m in manifests]
    assert subprocess.run(make + ["-q"], cwd=REPO).returncode == 0
    start = time.perf_counter()
    second = subprocess.run(make, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0 and "Nothing to be done" in second.stdout
    assert time.perf_counter() - start < 1.5
    assert [m.stat().st_mtime_ns for m in manifests] == mtimes
    # a changed option re-makes that step and the ones after it, not the ones before
    plan = subprocess.run(make + ["-n", "MAX_STEPS=4"], cwd=REPO, capture_output=True, text=True)
    assert "finetune" in plan.stdout and "auto-opt" in plan.stdout
    assert "phitune quantize" not in plan.stdout
    assert subprocess.run(make + ["-q", "MAX_STEPS=4"], cwd=REPO).returncode == 1
