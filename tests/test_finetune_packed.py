"""LoRA on an AWQ base kept packed int4 (finetune/packed_awq.py): the same function as the
dequantized float base (loss, LoRA gradients), no float weight kept for backward, PEFT's own
LoRA layer and adapter names, checkpointing and torch.compile on top of it."""

import pytest
import torch

from phitune.compiling import cpu_compiler
from phitune.finetune.packed_awq import PackedAwqLinear, dequantize_packed, has_packed
from phitune.formats.awq_gemm import pack_gemm, quantize_weight, unpack_gemm

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def phi3_rtn(random_phi3, tmp_path_factory):
    from phitune.cli.main import main
    out = tmp_path_factory.mktemp("packed") / "rtn"
    try:
        main(["quantize", "-m", str(random_phi3), "-o", str(out), "--algorithm", "rtn",
              "--no-eval"])
    except SystemExit as exc:
        assert exc.code == 0
    return out


needs_compiler = pytest.mark.skipif(not cpu_compiler(), reason="needs a C++ compiler")


@pytest.fixture(params=["torch ops", pytest.param("kernel", marks=needs_compiler)])
def dequantizer(request):
    """Both ways a packed weight is dequantized: the torch expression, phitune's C++ kernel."""
    from phitune.finetune import packed_awq
    assert packed_awq.use_fused_dequantize(request.param == "kernel") is (request.param == "kernel")
    yield request.param
    packed_awq.use_fused_dequantize(False)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_packed_is_the_readers_dequantization_bit_for_bit(zero_point, dtype,
                                                                      dequantizer):
    from phitune.finetune.packed_awq import _weight
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    packed = pack_gemm(quantize_weight(w, 4, 64, zero_point))
    reference = unpack_gemm(**packed).dequantize(dtype).t()
    assert torch.equal(dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"],
                                         dtype), reference)
    assert torch.equal(_weight(packed["qweight"], packed["qzeros"], packed["scales"], dtype),
                       reference)


def _lora(path, packed: bool, dtype, checkpointing=False):
    from phitune.finetune import lora
    from phitune.finetune.packed_awq import load_awq_packed
    from phitune.formats.awq_gemm import load_awq_dequantized
    torch.manual_seed(0)
    base = (load_awq_packed if packed else load_awq_dequantized)(path, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = lora.wrap(base, 8, 16, 0.0, TARGETS)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect worth comparing
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _step(model, dtype, seed=1):
    from phitune.finetune.loss import CausalLMLoss
    ids = torch.randint(0, 8000, (2, 48), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = CausalLMLoss(model)(input_ids=ids, labels=ids.clone())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# Tolerance: fp32 sums the input gradient in another order than nn.Linear (measured ≤ 2e-6
# relative). bf16 on a CPU with native bf16 matmul computes the very same ops (measured:
# equal); on one without (no avx512_bf16) oneDNN emulates it and the two paths' products
# accumulate differently (measured: loss 6e-5, gradients ≤ 7.5e-3 relative in norm, about two
# of bf16's epsilon 2^-8): bf16 is then held to five epsilons. Gradients compare in norm, as
# elementwise tolerances fail on the near-zero entries of any two bf16 summation orders.
TOLERANCE = {torch.float32: dict(loss=1e-7, grad=1e-4),
             torch.bfloat16: dict(loss=1e-3, grad=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", ["tiny_awq", "phi3_rtn"])
def test_loss_and_lora_gradients_equal_the_dequantized_base(base, dtype, request, dequantizer):
    path = request.getfixturevalue(base)
    tol = TOLERANCE[dtype]
    float_loss, float_grads = _step(_lora(path, False, dtype), dtype)
    packed = _lora(path, True, dtype)
    assert has_packed(packed)
    packed_loss, packed_grads = _step(packed, dtype)
    assert packed_loss == pytest.approx(float_loss, rel=tol["loss"])
    assert packed_grads.keys() == float_grads.keys() and len(packed_grads) > 0
    for name, grad in float_grads.items():
        assert grad.abs().sum() > 0, name
        rel = ((packed_grads[name] - grad).norm() / grad.norm()).item()
        assert rel <= tol["grad"], f"{name}: relative error {rel:.1e}"
    assert all(b.grad is None for m in packed.modules() if isinstance(m, PackedAwqLinear)
               for b in m.buffers())


def test_the_float_weight_is_never_kept_for_backward(tiny_awq):
    model = _lora(tiny_awq, True, torch.float32)
    weights = {(m.in_features, m.out_features) for m in model.modules()
               if isinstance(m, PackedAwqLinear)}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.is_floating_point()))
        return t
    ids = torch.randint(0, 8000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    floats = {shape for shape, is_float in saved if is_float}
    kept = weights & (floats | {s[::-1] for s in floats})
    assert not kept, f"a dequantized weight was saved for backward: {kept}"
    packed = {shape for shape, is_float in saved if not is_float}
    assert {(i, o // 8) for i, o in weights} <= packed  # what backward dequantizes again


def test_gradient_checkpointing_gives_the_same_gradients(tiny_awq):
    loss, grads = _step(_lora(tiny_awq, True, torch.float32), torch.float32)
    loss_ckpt, grads_ckpt = _step(_lora(tiny_awq, True, torch.float32, checkpointing=True),
                                  torch.float32)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_adapter_names_match_the_float_path_and_load_with_plain_peft(tiny_awq, tmp_path):
    from peft import PeftModel

    from phitune.formats.awq_gemm import load_awq_dequantized
    packed = _lora(tiny_awq, True, torch.float32)
    packed.save_pretrained(str(tmp_path / "adapter"))
    float_names = {n for n in _lora(tiny_awq, False, torch.float32).state_dict() if "lora_" in n}
    assert {n for n in packed.state_dict() if "lora_" in n} == float_names
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "custom" not in config and "Packed" not in config
    ids = torch.randint(0, 8000, (1, 24), generator=torch.Generator().manual_seed(3))
    plain = PeftModel.from_pretrained(load_awq_dequantized(tiny_awq), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits,
                                   packed.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@needs_compiler
def test_a_compiled_step_on_the_packed_base_matches_the_eager_step(phi3_rtn, dequantizer):
    from phitune.finetune import layer_compile
    torch._dynamo.reset()  # graphs of the other parametrization would be reused: count fresh
    model = _lora(phi3_rtn, True, torch.float32)
    eager_loss, eager_grads = _step(model, torch.float32)
    assert layer_compile.compile_layers(model)
    torch._dynamo.utils.counters.clear()
    compiled_loss, compiled_grads = _step(model, torch.float32)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_finetune_cli_int4_and_float_bases_train_the_same_adapter(tiny_awq, cli, tmp_path):
    import json

    from safetensors.torch import load_file
    from test_finetune import lab
    for weights in ("int4", "float", "auto"):  # auto: tiny-phi3's float base is small: float
        result = cli(*lab(tiny_awq, tmp_path / weights, "--max_steps", "4", "--merge",
                          "--base_weights", weights))
        assert result.code == 0, result.err
        params = json.loads((tmp_path / weights / "phitune.json").read_text())["params"]
        assert params.get("base_weights", "auto") == weights  # the default is left out of the key
    for part in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        a, b, auto = (load_file(str(tmp_path / w / part)) for w in ("int4", "float", "auto"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
            assert torch.equal(auto[key], b[key]), key


def test_auto_base_weights_dequantize_small_bases_once_and_keep_large_ones_packed():
    from phitune.policy import FLOAT_BASE_MAX_MB, base_weights
    smollm2 = 134_515_008  # SmolLM2-135M: 513 MB in fp32
    assert not base_weights("auto", smollm2, torch.float32).on
    phi3_mini = 3_821_079_552
    assert base_weights("auto", phi3_mini, torch.bfloat16).on
    edge = FLOAT_BASE_MAX_MB * 2**20 // 4
    assert not base_weights("auto", edge, torch.float32).on
    assert base_weights("auto", edge + 1, torch.float32).on
    assert base_weights("int4", smollm2, torch.float32).on  # asked: as asked
    assert not base_weights("float", phi3_mini, torch.bfloat16).on
