"""Hostile input: damaged files, full and read-only disks, outputs over inputs, a killed parent.

Every case asserts the exit code, one `error:` line naming the file (or the output), and that
nothing was published and no input was lost (inputs checksummed before and after). The good
chain — the suite's shared AWQ checkpoint of tiny-phi3, 5 LoRA steps, auto-opt — is built once
for the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EMBEDDED, REPO

pytestmark = pytest.mark.slow

TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
PHITUNE = [sys.executable, "-m", "phitune"]


# ---------------------------------------------------------------- helpers

def tree_sum(path: Path) -> str:
    """sha256 over a file or a directory's files (links by target, not followed)."""
    path = Path(path)
    h = hashlib.sha256()
    items = [path] if not path.is_dir() else sorted(path.rglob("*"))
    for item in items:
        h.update(str(item.relative_to(path) if item != path else item.name).encode())
        if item.is_symlink():
            h.update(os.readlink(item).encode())
        elif item.is_file():
            h.update(item.read_bytes())
    return h.hexdigest()


def run_main(*args: str) -> int:
    from phitune.cli.main import main
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def one_error(result, *words: str) -> str:
    """The single `error:` line, which must name every word; no traceback."""
    assert "Traceback" not in result.err, result.err
    lines = result.error_lines
    assert len(lines) == 1, result.err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def siblings(path: Path) -> list[str]:
    """Leftovers of an output path: it, or hidden temp files/dirs named after it."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p.name for p in path.parent.iterdir() if path.name in p.name)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_awq):
    """awq: the suite's shared AWQ checkpoint (conftest); ft (5 LoRA steps at the default rank,
    whose adapter the disk-full cases size their disks by), onnx (auto-opt): built once."""
    root = tmp_path_factory.mktemp("chain")
    data = root / "data" / "travel.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": f"where to go in city {i}?",
                                        "response": f"the old town of city {i}"}) + "\n"
                            for i in range(24)))
    assert run_main("finetune", "-m", str(tiny_awq), "--data_files", str(data),
                    "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "5",
                    "-o", str(root / "ft")) == 0
    assert run_main("auto-opt", "-m", str(root / "ft"), "-o", str(root / "onnx")) == 0
    return {"root": root, "data": data, "awq": tiny_awq, "ft": root / "ft",
            "onnx": root / "onnx"}


@pytest.fixture
def sums(chain):
    """Checksums of the chain before a test; asserts after it that no input changed."""
    before = {k: tree_sum(chain[k]) for k in ("data", "awq", "ft", "onnx")}
    yield before
    after = {k: tree_sum(chain[k]) for k in before}
    assert after == before, "an input of the chain changed"


def damaged_copy(src: Path, dst: Path, file: str, keep: int | None) -> Path:
    """A copy of model dir `src` whose `file` is cut to `keep` bytes (0: empty)."""
    shutil.copytree(src, dst, symlinks=True)
    target = dst / file
    data = target.read_bytes()
    target.write_bytes(data[:keep])
    return dst


def tmpfs(path: Path, size: str, read_only: bool = False) -> Path:
    """A small tmpfs at `path` (root only); skips where mounting is not permitted."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (disk-full / read-only cases)")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here ({done.stderr.strip()[:80]})")
    return path


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["umount", str(path)], capture_output=True)


# ---------------------------------------------------------------- damaged weights

def _cut_float_model(tmp_path, keep):
    return damaged_copy(EMBEDDED, tmp_path / "bad", "model.safetensors", keep)


@pytest.mark.parametrize("keep", [0, 5, 10_000_000], ids=["empty", "header-cut", "data-cut"])
@pytest.mark.parametrize("command", ["quantize", "auto-opt", "eval", "finetune"])
def test_damaged_float_weights_refused(cli, tmp_path, chain, command, keep):
    bad = _cut_float_model(tmp_path, keep)
    before = tree_sum(bad)
    out = tmp_path / "out"
    args = {"quantize": ["quantize", "-m", str(bad), "--algorithm", "rtn", "-o", str(out)],
            "auto-opt": ["auto-opt", "-m", str(bad), "-o", str(out)],
            "eval": ["eval", "-m", str(bad), "--no-latency"],
            "finetune": ["finetune", "-m", str(bad), "--data_files", str(chain["data"]),
                         "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "1",
                         "-o", str(out)]}[command]
    result = cli(*args)
    assert result.code == 2
    one_error(result, "model.safetensors", "damaged", "re-download")
    assert not out.exists() and siblings(out) == []
    assert tree_sum(bad) == before


@pytest.mark.parametrize("command", ["finetune", "auto-opt", "eval"])
def test_truncated_awq_base_refused(cli, tmp_path, chain, sums, command):
    """An AWQ base cut to 5 of 11.5 MB used to train (first loss 9.01 vs 7.71) and publish."""
    bad = damaged_copy(chain["awq"], tmp_path / "awq", "model.safetensors", 5_000_000)
    out = tmp_path / "out"
    args = {"finetune": ["finetune", "-m", str(bad), "--data_files", str(chain["data"]),
                         "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "1",
                         "-o", str(out)],
            "auto-opt": ["auto-opt", "-m", str(bad), "-o", str(out)],
            "eval": ["eval", "-m", str(bad), "--no-latency"]}[command]
    result = cli(*args)
    assert result.code == 2
    one_error(result, str(bad / "model.safetensors"), "truncated")
    assert not out.exists() and siblings(out) == []


def test_read_safetensors_checks_every_read(tmp_path):
    """A file cut between the header check and a tensor's read: an error, never zeros."""
    from safetensors.torch import save_file

    import torch
    from phitune.errors import InputError
    from phitune.models import read_safetensors
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(file))
    tensors = read_safetensors(file)
    name, first = next(tensors)
    assert torch.equal(first, torch.ones(1000))
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(InputError, match="read 3900 of 4000 bytes"):
        next(tensors)


def test_header_not_covering_the_file_refused(tmp_path):
    """Bytes after the last tensor (a wrong header) are refused like missing ones."""
    from safetensors.torch import save_file

    import torch
    from phitune.errors import InputError
    from phitune.models import check_safetensors
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10)}, str(file))
    with open(file, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(InputError, match="cover 40 of its 48"):
        check_safetensors(file)
    file.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all}")
    with pytest.raises(InputError, match="not valid JSON"):
        check_safetensors(file)


@pytest.mark.parametrize("json_flag", [False, True])
def test_truncated_adapter_refused(cli, tmp_path, chain, sums, json_flag):
    adapter = damaged_copy(chain["ft"] / "adapter", tmp_path / "adapter",
                           "adapter_model.safetensors", 100_000)
    out = tmp_path / "x.onnx_adapter"
    result = cli(*(["--json"] if json_flag else []), "export-adapter", "-a", str(adapter),
                 "--base", str(chain["onnx"]), "-o", str(out))
    assert result.code == 2
    one_error(result, "adapter_model.safetensors", "truncated")
    assert result.out.strip() == "" and not out.exists() and siblings(out) == []


def test_truncated_adapter_refused_by_eval(cli, tmp_path, chain, sums):
    adapter = damaged_copy(chain["ft"] / "adapter", tmp_path / "adapter",
                           "adapter_model.safetensors", 100_000)
    result = cli("eval", "-m", str(chain["awq"]), "--adapter", str(adapter), "--no-latency")
    assert result.code == 2
    one_error(result, "adapter_model.safetensors", "damaged")


@pytest.mark.parametrize("command", ["infer", "export-adapter", "eval"])
def test_empty_onnx_graph_blamed_on_the_graph(cli, tmp_path, chain, sums, command):
    """A zero-byte model.onnx was blamed on the adapter (infer) or missing LoRA inputs."""
    onnx = tmp_path / "onnx"
    shutil.copytree(chain["onnx"], onnx)
    (onnx / "model" / "model.onnx").write_bytes(b"")
    out = tmp_path / "x.onnx_adapter"
    args = {"infer": ["infer", "-m", str(onnx), "--prompt", "hi", "--max_new_tokens", "2"],
            "export-adapter": ["export-adapter", "-a", str(chain["ft"] / "adapter"),
                               "--base", str(onnx), "-o", str(out)],
            "eval": ["eval", "-m", str(onnx), "--no-latency"]}[command]
    result = cli(*args)
    assert result.code == 2
    line = one_error(result, "model.onnx", "damaged")
    assert "adapter" not in line.split(" — ")[0]
    assert not out.exists()


def test_truncated_onnx_weights_refused(cli, tmp_path, chain, sums):
    onnx = tmp_path / "onnx"
    shutil.copytree(chain["onnx"], onnx)
    data = onnx / "model" / "model.onnx.data"
    os.truncate(data, data.stat().st_size // 2)
    result = cli("infer", "-m", str(onnx), "--prompt", "hi", "--max_new_tokens", "2")
    assert result.code == 2
    one_error(result, "model.onnx.data", "truncated")


# ---------------------------------------------------------------- outputs over inputs

def _overlap_cases(chain, tmp_path):
    c, d = chain, str(chain["data"])
    ft = ["--data_files", d, "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "1"]
    calib = tmp_path / "calib" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("some calibration text. " * 200)
    return {
        # the reported data loss: -o equal to -m with --force
        "auto-opt -o = -m --force": ["auto-opt", "-m", str(c["awq"]), "-o", str(c["awq"]), "--force"],
        "finetune -o inside -m": ["finetune", "-m", str(c["awq"]), *ft, "-o", str(c["awq"] / "ft")],
        "finetune -o = -m --force": ["finetune", "-m", str(c["awq"]), *ft, "-o", str(c["awq"]),
                                     "--force"],
        "finetune -o contains data": ["finetune", "-m", str(c["awq"]), *ft, "-o",
                                      str(c["data"].parent), "--force"],
        "auto-opt -o inside D/model's base": ["auto-opt", "-m", str(c["ft"]), "-o",
                                              str(c["ft"] / "model" / "onnx")],
        "auto-opt -o = -m (finetune D) --force": ["auto-opt", "-m", str(c["ft"]), "-o",
                                                  str(c["ft"]), "--force"],
        "auto-opt -o = adapter": ["auto-opt", "-m", str(c["awq"]), "--adapter_path",
                                  str(c["ft"] / "adapter"), "-o", str(c["ft"] / "adapter"),
                                  "--force"],
        "quantize -o contains calibration": ["quantize", "-m", "tiny-phi3", "--calib_data",
                                             str(calib), "-o", str(calib.parent), "--force"],
        "export-adapter -o inside adapter": ["export-adapter", "-a", str(c["ft"] / "adapter"),
                                             "--base", str(c["onnx"]), "-o",
                                             str(c["ft"] / "adapter" / "x.onnx_adapter")],
    }


def test_output_over_an_input_refused_even_with_force(cli, tmp_path, chain, sums):
    for name, args in _overlap_cases(chain, tmp_path).items():
        calib = tmp_path / "calib"
        calib_sum = tree_sum(calib)
        result = cli(*args)
        assert result.code == 2, name
        line = one_error(result, "the input")
        assert "--force does not override" in line, name
        assert tree_sum(calib) == calib_sum, name
    assert not (chain["awq"] / "ft").exists()


# ---------------------------------------------------------------- disks

def test_disk_full_quantize(cli, tmp_path, mounts):
    disk = tmpfs(tmp_path / "disk", "8m")
    mounts.append(disk)
    out = disk / "q"
    result = cli("quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "--no-eval", "-o", str(out))
    assert result.code == 2
    one_error(result, "no space left", str(out), "free space")
    assert os.listdir(disk) == []  # the staging dir went too


def test_disk_full_export_adapter(cli, tmp_path, chain, sums, mounts):
    disk = tmpfs(tmp_path / "disk", "8m")
    mounts.append(disk)
    (disk / "fill").write_bytes(b"\0" * 7 * 2**20)
    out = disk / "x.onnx_adapter"
    result = cli("export-adapter", "-a", str(chain["ft"] / "adapter"), "--base",
                 str(chain["onnx"]), "-o", str(out))
    assert result.code == 2
    one_error(result, "no space left", str(out))
    assert os.listdir(disk) == ["fill"]


def test_disk_full_auto_opt_adapter_write(cli, tmp_path, chain, sums, mounts):
    """16 MB holds the built graph (~13 MB) but not the adapter beside it (~8 MB)."""
    disk = tmpfs(tmp_path / "disk", "16m")
    mounts.append(disk)
    out = disk / "onnx"
    result = cli("auto-opt", "-m", str(chain["ft"]), "-o", str(out))
    assert result.code == 2
    one_error(result, "no space left", str(out))
    assert os.listdir(disk) == []


@pytest.mark.parametrize("command", ["export-adapter", "quantize", "auto-opt"])
def test_read_only_output(cli, tmp_path, chain, sums, mounts, command):
    disk = tmpfs(tmp_path / "ro", "1m", read_only=True)
    mounts.append(disk)
    args = {"export-adapter": ["export-adapter", "-a", str(chain["ft"] / "adapter"), "--base",
                               str(chain["onnx"]), "-o", str(disk / "x.onnx_adapter")],
            "quantize": ["quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "-o",
                         str(disk / "q")],
            "auto-opt": ["auto-opt", "-m", str(chain["ft"]), "-o", str(disk / "o")]}[command]
    result = cli(*args)
    assert result.code == 2
    one_error(result, "read-only", str(disk), "writable")


def test_oserror_mapping_names_output_and_cleans_up(tmp_path, monkeypatch):
    """ENOSPC/EROFS/EACCES from any writer inside staging → one OutputError naming -o, the
    staging dir removed, and a failing cleanup raising nothing more."""
    import errno

    from phitune import oserrors
    from phitune.artifacts import Output
    from phitune.errors import OutputError
    for code, words in ((errno.ENOSPC, "no space"), (errno.EROFS, "read-only"),
                        (errno.EACCES, "permission denied")):
        out = Output(tmp_path / f"o{code}", "awq-model", "quantize", {}, {})
        with pytest.raises(OutputError, match=words) as caught:
            with out.staging() as work:
                raise OSError(code, os.strerror(code), str(work / "model.safetensors"))
        assert caught.value.where.endswith("model.safetensors")
        assert siblings(out.path) == []
    # a library that kept only the message (safetensors, onnxruntime)
    error = oserrors.translate(RuntimeError('Failed to write :7869880 bytes to "x"'), "OUT")
    assert isinstance(error, OutputError) and error.where == "OUT"
    assert oserrors.translate(ValueError("a bug")) is None
    oserrors.quietly(os.unlink, tmp_path / "absent")  # no second error


# ---------------------------------------------------------------- the builder child

def _builder_child(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"onnxruntime_genai.models.builder" in cmdline:
            return int(entry.name)
    return None


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent can reap it


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_does_not_orphan_the_builder(tmp_path, chain, sums):
    out = tmp_path / "onnx"
    proc = subprocess.Popen([*PHITUNE, "auto-opt", "-m", str(chain["ft"]), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.time() + 120
        child = None
        while child is None and time.time() < deadline and proc.poll() is None:
            child = _builder_child(proc.pid)
            time.sleep(0.1)
        assert child is not None, "the builder never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while _running(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the builder outlived its parent"
    finally:
        proc.kill()
    assert not out.exists()


def test_recovery_keeps_a_temp_dir_a_live_process_works_in(tmp_path):
    """A dead run's temp dir with a process still inside it (cwd) is not removed under it."""
    from phitune.artifacts.output import recover as _recover
    out = tmp_path / "o"
    dead = _dead_pid()
    stale = tmp_path / f".o.phitune-tmp-{dead}"
    (stale / "scratch").mkdir(parents=True)
    worker = subprocess.Popen(["sleep", "30"], cwd=stale / "scratch")
    try:
        _recover(out)
        assert stale.is_dir()
    finally:
        worker.kill()
        worker.wait()
    _recover(out)
    assert not stale.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- up to date

def test_up_to_date_checks_published_sizes(cli, tmp_path):
    out = tmp_path / "q"
    args = ("--json", "quantize", "-m", "tiny-phi3", "--algorithm", "rtn", "--no-eval",
            "-o", str(out))
    assert cli(*args).code == 0
    manifest = json.loads((out / "phitune.json").read_text())
    assert manifest["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    again = cli(*args)
    assert json.loads(again.out)["up_to_date"] is True
    os.truncate(out / "model.safetensors", 1000)
    redo = cli(*args)
    assert redo.code == 0 and json.loads(redo.out)["up_to_date"] is False
    assert "changed since it was published" in redo.err
    from phitune.models import check_weight_files
    check_weight_files(out)  # whole again


# ---------------------------------------------------------------- misleading messages

def test_export_adapter_advice_names_base_option(cli, chain, sums, tmp_path):
    result = cli("export-adapter", "-a", str(chain["ft"] / "adapter"), "--base",
                 str(chain["awq"]), "-o", str(tmp_path / "x.onnx_adapter"))
    assert result.code == 2
    line = one_error(result, "--base D")
    assert " -m D" not in line


def test_unknown_command_did_you_mean(cli):
    result = cli("quantise", "-m", "tiny-phi3")
    assert result.code == 2
    line = one_error(result, "no such command 'quantise'", "did you mean 'quantize'?")
    assert "phitune phitune" not in line


def test_use_chat_template_misfit_names_the_way_out(cli, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello"}\n')
    result = cli("finetune", "-m", "tiny-phi3", "--data_files", str(data), "--data_name", "json",
                 "--use_chat_template", "--max_steps", "1", "-o", str(tmp_path / "o"))
    assert result.code == 2
    one_error(result, "--text_cols")


def test_cache_ls_on_a_file(cli, tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    for sub in ("ls", "clean"):
        result = cli("cache", sub, "--cache_dir", str(file), *(["--all"] if sub == "clean" else []))
        assert result.code == 2
        one_error(result, str(file), "not a cache directory")
    assert file.read_text() == "x"


def test_max_steps_zero_refused(cli, chain, tmp_path):
    result = cli("finetune", "-m", "tiny-phi3", "--data_files", str(chain["data"]),
                 "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "0",
                 "-o", str(tmp_path / "o"))
    assert result.code == 2
    one_error(result, "--max_steps 0")


def test_resume_without_checkpoint_says_so(cli, chain, tmp_path):
    result = cli("finetune", "-m", "tiny-phi3", "--data_files", str(chain["data"]),
                 "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "1",
                 "--resume", "-o", str(tmp_path / "o"))
    assert result.code == 0
    assert "--resume: no checkpoint" in result.err and "starting at step 0" in result.err


def test_ctrl_c_names_resume(tmp_path, chain):
    out = tmp_path / "o"
    ckpt = tmp_path / ".o.phitune-ckpt" / "state.pt"
    proc = subprocess.Popen([*PHITUNE, "finetune", "-m", "tiny-phi3", "--data_files",
                             str(chain["data"]), "--data_name", "json", "--text_template",
                             TEMPLATE, "--max_steps", "500", "--save_steps", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 180
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert ckpt.exists(), "no checkpoint was written"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--resume" in lines[0] and "no output was published" in lines[0]
    assert not out.exists()


def test_hub_error_is_whole(cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("quantize", "-m", "nobody-here/no-such-model-xyz", "-o", "unused")
    assert result.code == 2
    line = one_error(result, "nobody-here/no-such-model-xyz")
    reason = line.split("(", 1)[1].split(") — ", 1)[0]
    assert reason.endswith(("disabled", "…")) or reason[-1].isalnum(), reason


def test_infer_with_closed_stdin(cli, chain, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    result = cli("infer", "-m", str(chain["onnx"]))
    assert result.code == 2
    one_error(result, "stdin is closed", "--prompt")


def test_no_gptqmodel_banner_or_env(tmp_path, chain, sums):
    """finetune and eval on an AWQ base print no other library's banner and leave the
    environment alone, whether or not gptqmodel (the dev extra) is installed."""
    script = (
        "import json, os, sys\n"
        "from phitune.cli.main import main\n"
        "watched = ('PYTORCH_ALLOC_CONF', 'CUDA_DEVICE_ORDER')\n"
        "before = {k: os.environ.get(k) for k in watched}\n"
        "for args in sys.argv[1:3]:\n"
        "    try:\n"
        "        main(json.loads(args))\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print('ENV', [k for k in watched if os.environ.get(k) != before[k]], file=sys.stderr)\n")
    ft = json.dumps(["finetune", "-m", str(chain["awq"]), "--data_files", str(chain["data"]),
                    "--data_name", "json", "--text_template", TEMPLATE, "--max_steps", "1",
                    "-o", str(tmp_path / "ft")])
    ev = json.dumps(["eval", "-m", str(tmp_path / "ft"), "--no-latency", "--max_tokens", "256"])
    done = subprocess.run([sys.executable, "-c", script, ft, ev], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GPT-QModel" not in done.stderr and "Auto setting" not in done.stderr, done.stderr
    assert "ENV []" in done.stderr, done.stderr
