"""`finetune --report_to tensorboard` and the manifest's per-step history: event files read back
with tensorboard's own reader, a resumed run's curve without duplicates, the missing package
refused in one line before any work."""

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def _finetune(out, *extra):
    return ["finetune", "-m", "tiny-phi3", "--data_files", str(REPO / "data" / "travel.jsonl"),
            "--data_name", "json", "--text_template", TEMPLATE, "--max_seq_len", "256",
            "--lora_r", "8", "--learning_rate", "1e-3", "--max_steps", "4", "--eval_split", "0.1",
            "-o", str(out), *extra]


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}


def test_event_files_and_history_hold_every_step(cli, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "ft"
    result = cli(*_finetune(out, "--report_to", "tensorboard", "--eval_steps", "2"))
    assert result.code == 0, result.err[-2000:]
    assert "tensorboard --logdir" in result.err
    manifest = json.loads((out / "phitune.json").read_text())
    history = manifest["history"]
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    assert [s for s, _ in train] == [1, 2, 3, 4]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert evals[0][1] == manifest["metrics"]["eval_loss_before"]
    assert evals[-1][1] == manifest["metrics"]["eval_loss_after"]
    assert evals[-1][1] < evals[0][1]
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert not (tmp_path / ".ft.phitune-ckpt").exists()  # moved into the output
    assert any(f.startswith("runs/") for f in manifest["files"])
    scalars = _scalars(out / "runs")  # what `tensorboard --logdir ft` reads
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["eval/loss"]] == [0, 2, 4]
    for (_, logged), (_, kept) in zip(scalars["train/loss"] + scalars["eval/loss"], train + evals):
        assert logged == pytest.approx(kept, abs=1e-4)

    # evaluating between steps draws no random numbers: the adapter is the same without it
    plain = tmp_path / "plain"
    assert cli(*_finetune(plain)).code == 0
    assert not (plain / "runs").exists()
    assert [r for r in json.loads((plain / "phitune.json").read_text())["history"]
            if "loss" in r] == [{"step": s, "loss": v} for s, v in train]
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_a_resumed_curve_replaces_what_followed_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from phitune.finetune.report import Report
    first = Report("tensorboard", tmp_path / "runs", 0, True)
    for step in range(1, 6):  # an interrupted run logged steps 1-5, its checkpoint is at 3
        first.train(step, 10.0 + step)
    first.close()
    resumed = Report("tensorboard", tmp_path / "runs", 3, True)
    for step in range(4, 7):
        resumed.train(step, 20.0 + step)
    resumed.close()
    assert _scalars(tmp_path / "runs")["train/loss"] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    Report("tensorboard", tmp_path / "runs", 0, True).close()  # starting over: a new curve
    assert "train/loss" not in _scalars(tmp_path / "runs")


def test_without_tensorboard_the_flag_says_how_to_install_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    result = cli(*_finetune(tmp_path / "ft", "--report_to", "tensorboard"))
    assert result.code == 2 and "records" not in result.err  # refused before the data loads
    assert len(result.error_lines) == 1
    assert "pip install 'phitune[tensorboard]'" in result.error_lines[0]
    assert not (tmp_path / "ft").exists()
