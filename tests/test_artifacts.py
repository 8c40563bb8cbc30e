"""The artifact convention (design.md): keys, input resolution by kind, atomic publish,
up-to-date skips, and what a killed step leaves behind."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from phitune import artifacts
from phitune.artifacts import MANIFEST, Output, make_key, resolve_model
from phitune.errors import InputError, OutputError


def _output(path, params=None):
    return Output(path, "awq-model", "quantize", {"model": "m"}, params or {"bits": 4})


def test_key_depends_on_inputs_and_params_only():
    assert make_key("s", {"a": 1}, {"b": 2}) == make_key("s", {"a": 1}, {"b": 2})
    assert make_key("s", {"a": 1}, {"b": 2}) != make_key("s", {"a": 1}, {"b": 3})
    assert make_key("s", {"a": 1}, {"b": 2}) != make_key("s", {"a": 2}, {"b": 2})


def test_content_digest_sees_edits(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    before = artifacts.content_digest(tmp_path)
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert artifacts.content_digest(tmp_path) != before


def test_publish_writes_manifest_and_up_to_date(tmp_path):
    out = _output(tmp_path / "o")
    assert not out.up_to_date()
    with out.staging() as work:
        (work / "weights.bin").write_text("w")
        manifest = out.publish(work, {"seconds": 1.0})
    saved = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert saved == manifest
    assert saved["artifact"] == "awq-model" and saved["key"] == out.key
    assert set(saved) >= {"created_by", "created_at", "inputs", "params", "metrics"}
    assert out.up_to_date()
    assert not _output(tmp_path / "o", {"bits": 3}).up_to_date()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp dirs left


def test_failure_leaves_nothing_and_keeps_earlier_output(tmp_path):
    target = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with _output(target).staging() as work:
            (work / "half.bin").write_text("partial")
            raise RuntimeError("step failed")
    assert not target.exists() and list(tmp_path.iterdir()) == []

    good = _output(target)
    with good.staging() as work:
        (work / "good.bin").write_text("good")
        good.publish(work, {})
    with pytest.raises(RuntimeError):
        with _output(target, {"bits": 8}).staging() as work:
            (work / "bad.bin").write_text("partial")
            raise RuntimeError("second run failed")
    assert (target / "good.bin").read_text() == "good"
    assert json.loads((target / MANIFEST).read_text())["key"] == good.key


def test_republish_replaces_old_output_whole(tmp_path):
    target = tmp_path / "o"
    for name in ("first.bin", "second.bin"):
        out = _output(target, {"file": name})
        with out.staging() as work:
            (work / name).write_text(name)
            out.publish(work, {})
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "second.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_output_that_is_a_file_or_foreign_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        _output(tmp_path / "file").check_writable()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a phitune output"):
        _output(tmp_path / "mine").check_writable()
    _output(tmp_path / "new").check_writable()  # a new path is fine


def _staging_child(target: Path, params: str) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from phitune.artifacts import Output\n"
        f"out = Output({str(target)!r}, 'awq-model', 'quantize', {{'model': 'm'}}, {{'p': {params!r}}})\n"
        "with out.staging() as work:\n"
        "    (work / 'weights.bin').write_bytes(b'x' * 4096)\n"
        "    print('HALFWAY', flush=True)\n"
        "    time.sleep(60)\n"
        "    out.publish(work, {})\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _kill_halfway(child: subprocess.Popen) -> None:
    assert child.stdout.readline().strip() == "HALFWAY"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def test_sigkill_halfway_leaves_no_output_that_looks_done(tmp_path):
    target = tmp_path / "o"
    _kill_halfway(_staging_child(target, "a"))
    assert not target.exists()
    stale = list(tmp_path.glob(".o.phitune-tmp-*"))
    assert stale, "the killed run's staging dir should be the only trace"
    out = _output(target)
    with out.staging() as work:  # the next run cleans up after the dead one
        out.publish(work, {})
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_sigkill_halfway_keeps_the_earlier_good_output(tmp_path):
    target = tmp_path / "o"
    good = _output(target)
    with good.staging() as work:
        (work / "good.bin").write_text("good")
        good.publish(work, {})
    _kill_halfway(_staging_child(target, "b"))
    assert (target / "good.bin").read_text() == "good"
    assert json.loads((target / MANIFEST).read_text())["key"] == good.key


# ------------------------------------------------------------------ input resolution

def test_embedded_model_resolves_by_short_name():
    model = resolve_model("tiny-phi3", accept=("hf-model",), step="quantize")
    assert model.path == artifacts.data_dir() / "tiny-phi3"
    assert model.kind == "hf-model"


def test_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(InputError, match="no such model directory: models/phi-awq") as err:
        resolve_model("models/phi-awq", accept=("hf-model",), step="quantize")
    assert "models exists" in err.value.line()
    with pytest.raises(InputError, match="no such model directory"):
        resolve_model("./models/a/b", accept=("hf-model",), step="quantize")


def test_hub_id_offline_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="cannot fetch 'nobody/no-model'"):
        resolve_model("nobody/no-model", accept=("hf-model",), step="quantize")


def test_nested_payload_resolves_from_dir_or_model_subdir(tmp_path, random_phi3):
    import shutil
    root = tmp_path / "ft"
    shutil.copytree(random_phi3, root / "model")
    (root / MANIFEST).write_text(json.dumps({"artifact": "finetuned", "key": "k1"}))
    for spec in (root, root / "model"):
        model = resolve_model(str(spec), accept=("finetuned",), step="auto-opt")
        assert model.path == root / "model" and model.kind == "finetuned"
        assert model.digest == "k1"


def test_wrong_kind_is_refused_with_what_was_found(tmp_path, random_phi3):
    config = json.loads((random_phi3 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="is an AWQ-quantized model; phitune quantize needs a "
                                         "Hugging Face model"):
        resolve_model(str(tmp_path), accept=("hf-model",), step="quantize")


@pytest.mark.parametrize("config, accept, step, fix", [
    ({"model_type": "phi3"}, ("onnx-genai",), "export-adapter", "export it first: phitune auto-opt"),
    ({"model_type": "phi3", "quantization_config": {"quant_method": "awq"}}, ("hf-model",),
     "quantize", "already quantized"),
])
def test_a_model_of_the_wrong_kind_says_how_to_get_the_right_one(tmp_path, config, accept, step, fix):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        resolve_model(str(tmp_path), accept=accept, step=step)
    assert f"phitune {step} needs" in err.value.what and fix in err.value.fix


def test_an_onnx_dir_given_to_a_torch_step_names_its_source(tmp_path):
    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(InputError) as err:
        resolve_model(str(tmp_path), accept=("hf-model",), step="quantize")
    assert "exported from" in err.value.fix


def test_a_finetune_outputs_adapter_is_found_beside_its_model(tmp_path):
    from phitune.artifacts import FINETUNE_ADAPTER, MANIFEST, data_dir, resolve_model
    out = tmp_path / "ft"
    out.mkdir()
    (out / MANIFEST).write_text('{"artifact": "finetuned", "key": "k"}')
    (out / "model").symlink_to(data_dir() / "tiny-phi3", target_is_directory=True)
    for spec in (out, out / "model"):
        ref = resolve_model(str(spec), accept=("finetuned",), step="auto-opt")
        assert ref.adapter == out / FINETUNE_ADAPTER
    assert resolve_model("tiny-phi3", accept=("hf-model",), step="auto-opt").adapter is None
