"""CUDA-path logic shown on a CPU machine (issue 32): what finetune does with CUDA's generators,
NCCL's tensors and this rank's GPU, with torch's CUDA calls replaced by recorders; and
scripts/cuda_check.sh saying in one line that there is no CUDA here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from phitune.finetune import loop

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as if one GPU were in use: its generator state is a recorded byte tensor."""
    calls = {"set_rng": [], "set_device": []}
    saved = [torch.tensor([7, 7, 7], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in saved])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls["set_rng"].append(states))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls["set_device"].append(index))
    return calls


def test_checkpoint_keeps_the_cuda_generator_for_resume(fake_cuda, tmp_path):
    """A resumed CUDA run draws LoRA dropout from the GPU's generator: the checkpoint keeps it
    and --resume puts it back, beside the CPU's."""
    checkpoint = loop.Checkpoint(tmp_path / "ckpt", "key")
    checkpoint.save({"step": 1, "rng": loop.rng_state()})
    expected = torch.get_rng_state()
    torch.rand(3)  # move the CPU generator on
    loop.set_rng_state(checkpoint.load()["rng"])
    assert torch.equal(torch.get_rng_state(), expected)
    assert len(fake_cuda["set_rng"]) == 1
    assert torch.equal(fake_cuda["set_rng"][0][0], torch.tensor([7, 7, 7], dtype=torch.uint8))


def test_a_checkpoint_without_cuda_state_still_resumes(tmp_path):
    """Checkpoints written before the CUDA generator was kept held the CPU state as a tensor."""
    expected = torch.get_rng_state()
    torch.rand(3)
    loop.set_rng_state(expected.clone())
    assert torch.equal(torch.get_rng_state(), expected)
    assert "cuda" not in loop.rng_state() or torch.cuda.is_initialized()


def test_nccl_reduces_the_step_loss_on_the_gpu(monkeypatch):
    """NCCL reduces CUDA tensors only: the step loss crosses ranks on the GPU there, on the
    CPU under gloo."""
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    assert loop._collective_device() == "cuda"
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert loop._collective_device() == "cpu"
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: seen.append(t.device.type))
    assert loop._mean_over_ranks(3.0, loop.World(0, 2)) == 1.5
    assert seen == ["cpu"]


def test_each_rank_takes_its_own_gpu_before_nccl_starts(fake_cuda, monkeypatch):
    """Under torchrun on CUDA, rank N's process sets GPU LOCAL_RANK before the process group
    exists (else NCCL and every later .to('cuda') take GPU 0 on every rank)."""
    import torch.distributed as dist
    order = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend: order.append(("init", backend, list(fake_cuda["set_device"]))))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    world = loop.World.from_env("cuda")
    assert world.rank == 1 and world.size == 2
    assert order == [("init", "nccl", [1])]


def test_cuda_check_without_cuda_says_so_in_one_line_and_runs_nothing(tmp_path):
    """On a machine without CUDA the check exits 0 after one line (the GPU run is elsewhere)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    done = subprocess.run(["bash", str(REPO / "scripts" / "cuda_check.sh")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA device" in done.stdout
    assert done.stderr == ""


def test_install_on_a_gpu_machine_keeps_only_the_cuda_onnxruntime(tmp_path):
    """scripts/install.sh where nvidia-smi works: after the editable install (which brings the
    CPU onnxruntime and onnxruntime-genai as base dependencies) the CPU builds are removed and
    the CUDA builds reinstalled at the resolved versions, so no CPU file hides the CUDA one.
    Run with a recording `python` and a working `nvidia-smi` on PATH: nothing is installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in "-m pip show onnxruntime-gpu") echo "Version: 1.31.1";; '
        '"-m pip show onnxruntime-genai-cuda") echo "Version: 0.18.0";; esac\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VIRTUAL_ENV": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    install = next(i for i, c in enumerate(calls) if "install" in c and "-e .[cuda]" in c)
    remove = next(i for i, c in enumerate(calls) if c.startswith("-m pip uninstall"))
    again = next(i for i, c in enumerate(calls) if "--force-reinstall" in c)
    assert install < remove < again
    assert "onnxruntime onnxruntime-genai" in calls[remove]
    assert "onnxruntime-gpu==1.31.1" in calls[again] and "onnxruntime-genai-cuda==0.18.0" in calls[again]


def test_cuda_fp32_export_with_adapters_is_refused_before_the_build(cli, tmp_path):
    """The builder's CUDA fp32 graph computes q/k/v inside one Attention op: a LoRA on them
    could not attach, which the build would find only after spending its time."""
    result = cli("auto-opt", "-m", "tiny-phi3", "--device", "gpu", "--precision", "fp32",
                 "-o", str(tmp_path / "o"))
    assert result.code == 2
    assert "--precision fp32 on --device gpu" in result.error_lines[0]
    assert "fp16" in result.error_lines[0]
    assert not (tmp_path / "o").exists()


def test_gpu_memory_poll_reports_the_peak_above_the_baseline(tmp_path, monkeypatch):
    """cuda_check's nvidia-smi poll (peak GPU memory of a path whose work runs in children,
    onnxruntime's included): the highest reading while the path ran, less the reading before."""
    import time

    from cuda_check import SmiPoll
    reading = tmp_path / "used"
    reading.write_text("1000\n")
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat {reading}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with SmiPoll() as poll:
        reading.write_text("1800\n")
        time.sleep(1.3)
        reading.write_text("1100\n")
        time.sleep(0.7)
    assert poll.peak == 800
