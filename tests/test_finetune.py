"""`phitune finetune` on the embedded model's AWQ checkpoint, on CPU: the lab command, plain-PEFT
loading, determinism, interruption and resume, data parallel, and every bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phitune.compiling import cpu_compiler

REPO = Path(__file__).resolve().parent.parent
TRAVEL = str(REPO / "data" / "travel.jsonl")
TEMPLATE = r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
FAST = ["--max_seq_len", "256", "--lora_r", "8", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "4"]


def lab(base, out, *extra):
    return ["finetune", "--method", "lora", "-m", str(base), "--data_files", TRAVEL,
            "--data_name", "json", "--text_template", TEMPLATE, *FAST, "-o", str(out), *extra]


@pytest.fixture(scope="module")
def awq_base(tiny_awq):
    return tiny_awq


@pytest.fixture(scope="module")
def trained(awq_base, tmp_path_factory):
    from phitune.cli.main import main
    out = tmp_path_factory.mktemp("ft") / "ft"
    try:
        main(lab(awq_base, out, "--max_steps", "30", "--eval_split", "0.1"))
    except SystemExit as exc:
        assert exc.code == 0
    return out


def _manifest(path):
    return json.loads((Path(path) / "phitune.json").read_text())


def test_lab_command_trains_on_the_awq_base(trained, awq_base):
    m = _manifest(trained)
    assert m["artifact"] == "finetuned"
    assert (trained / "model").resolve() == awq_base.resolve()
    assert (trained / "adapter" / "adapter_config.json").is_file()
    metrics = m["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    for key in ("tokens_seen", "tokens_per_s", "seconds", "peak_rss_mb"):
        assert metrics[key] > 0


def test_adapter_loads_with_plain_peft_and_changes_generation(trained):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from phitune.formats.awq_gemm import load_awq_dequantized
    tok = AutoTokenizer.from_pretrained(str(trained / "model"))
    prompt = tok("<|user|>\nwhat is the best thing to see in chicago<|end|>\n<|assistant|>\n",
                 return_tensors="pt")
    base = load_awq_dequantized(trained / "model")
    plain = base.generate(**prompt, max_new_tokens=12, do_sample=False)
    model = PeftModel.from_pretrained(base, str(trained / "adapter"))
    tuned = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert not torch.equal(plain, tuned)
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_lora_weights_get_gradient_through_the_quantized_base(awq_base):
    from phitune.finetune import lora
    from phitune.finetune.base import load_base
    from phitune.artifacts import resolve_model
    base = load_base(resolve_model(str(awq_base), ("awq-model",), "finetune"), "lora", "cpu",
                     torch.float32)
    model = lora.wrap(base, 4, 8, 0.0, ["qkv_proj", "down_proj"])
    model.train()
    ids = torch.randint(0, 1000, (1, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    # lora_B starts at zero, so the gradient reaches lora_B first: it must not be zero
    # (gptqmodel's CPU AWQ kernel, latched in inference mode, gives exactly zero here).
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 2 * model.config.num_hidden_layers
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# --compile too: inductor draws dropout masks with its own RNG, which must also follow the seed.
@pytest.mark.parametrize("compiled", ["--no-compile", pytest.param("--compile", marks=pytest.mark.skipif(
    not cpu_compiler(), reason="torch.compile needs a C++ compiler"))])
def test_same_seed_gives_identical_adapters(awq_base, cli, tmp_path, compiled):
    for name in ("a", "b"):
        result = cli(*lab(awq_base, tmp_path / name, "--max_steps", "3", "--seed", "7", compiled))
        assert result.code == 0
        assert _manifest(tmp_path / name)["metrics"]["compiled"] is (compiled == "--compile")
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_then_resume_finishes_like_an_uninterrupted_run(awq_base, cli, tmp_path):
    out = tmp_path / "ft"
    steps = ["--max_steps", "12", "--save_steps", "3"]
    child = subprocess.Popen([sys.executable, "-m", "phitune", *lab(awq_base, out, *steps)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / ".ft.phitune-ckpt" / "state.pt"
    # Interrupt once training is under way (a periodic checkpoint exists): the first Ctrl-C
    # finishes the current step, checkpoints it and exits 130.
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists(), "an interrupted run must not leave an output that looks done"
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 3 <= step < 12

    resumed = cli(*lab(awq_base, out, "--max_steps", "12", "--save_steps", "100"), "--resume")
    assert resumed.code == 0, resumed.err
    assert _manifest(out)["metrics"]["resumed_from_step"] == step
    assert not ckpt.parent.exists()

    straight = tmp_path / "straight"
    assert cli(*lab(awq_base, straight, "--max_steps", "12")).code == 0
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_data_parallel_under_a_launcher(launcher, awq_base, tmp_path):
    exe = shutil.which(launcher, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{launcher} not installed")
    # accelerate's --cpu flag runs a single process; --multi_gpu is its torch.distributed
    # launcher, which phitune runs on gloo when there is no GPU.
    launch = [exe, "--nproc_per_node", "2"] if launcher == "torchrun" else \
        [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, "-m", "phitune", "--json",
                           *lab(awq_base, out, "--max_steps", "20", "--per_device_train_batch_size", "2",
                                "--eval_split", "0.1")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    metrics = _manifest(out)["metrics"]
    assert metrics["world_size"] == 2
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "model", "phitune.json"]
    assert len(list(tmp_path.glob(".ddp*"))) == 0
    assert len(summaries) <= 1  # one summary, from rank 0


def test_qlora_base_is_nf4_and_lora_gets_gradient_on_cpu():
    from bitsandbytes.nn import Linear4bit

    from phitune.artifacts import resolve_model
    from phitune.finetune import lora
    from phitune.finetune.base import load_base
    base = load_base(resolve_model("tiny-phi3", ("hf-model",), "finetune"), "qlora", "cpu",
                     torch.float32)
    quantized = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 4 * base.config.num_hidden_layers  # every projection, not the head
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)
    model = lora.wrap(base, 4, 8, 0.0, ["qkv_proj", "down_proj"])
    model.train()
    ids = torch.randint(0, 1000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 2 * model.config.num_hidden_layers
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_on_an_awq_base_is_refused_in_one_line(awq_base, cli, tmp_path):
    result = cli(*lab(awq_base, tmp_path / "q", "--max_steps", "1"), "--method", "qlora")
    assert result.code == 2
    assert len(result.error_lines) == 1 and "AWQ" in result.error_lines[0]
    assert "--method lora" in result.error_lines[0]
    assert not (tmp_path / "q").exists()


def test_bitsandbytes_import_asks_no_hub_and_says_nothing():
    # A fresh interpreter without HF_HUB_OFFLINE: bitsandbytes would ask the hub for a kernel
    # and warn when it cannot; phitune imports it with neither.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
            "from phitune.finetune.nf4 import quiet_bitsandbytes; quiet_bitsandbytes()\n"
            "import bitsandbytes; assert 'kernels' not in sys.modules, 'kernels imported'\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other warnings show')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit" not in proc.stderr and "kernels-community" not in proc.stderr
    assert "other warnings show" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_cuda(cli, tmp_path):
    result = cli(*lab("tiny-phi3", tmp_path / "q", "--max_steps", "5"), "--method", "qlora")
    assert result.code == 0, result.err


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD = {
    "missing file": (lambda t: ["--data_files", str(t / "nope.jsonl")], "not found"),
    "malformed line": (lambda t: ["--data_files", _write(t, "bad.jsonl",
                                                         '{"prompt": "a", "response": "b"}\n{oops\n')],
                       "bad.jsonl:2"),
    "unknown column": (lambda t: ["--data_files", _write(t, "cols.jsonl",
                                                         '{"question": "a", "answer": "b"}\n')],
                       "'prompt'"),
    "empty dataset": (lambda t: ["--data_files", _write(t, "empty.jsonl", "\n")], "no records"),
    "all records too long": (lambda t: ["--data_files", TRAVEL, "--max_seq_len", "8",
                                        "--overflow", "drop"], "longer than 8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_line_exit_2_fast(case, cli, tmp_path):
    make, message = BAD[case]
    start = time.perf_counter()
    args = ["finetune", "-m", "tiny-phi3", "--data_name", "json", "--text_template", TEMPLATE,
            "--max_steps", "1", "-o", str(tmp_path / "out"), *FAST, *make(tmp_path)]
    result = cli(*args)
    elapsed = time.perf_counter() - start
    assert result.code == 2, result.err
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.err
    assert not (tmp_path / "out").exists()
    if case != "all records too long":  # that one needs the tokenizer, so it loads transformers
        assert elapsed < 2


def test_merge_writes_a_float_model_equal_to_base_plus_adapter(awq_base, cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.formats.awq_gemm import load_awq_dequantized
    out = tmp_path / "ft"
    assert cli(*lab(awq_base, out, "--max_steps", "3", "--merge")).code == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    with_adapter = PeftModel.from_pretrained(load_awq_dequantized(awq_base), str(out / "adapter"))
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)
