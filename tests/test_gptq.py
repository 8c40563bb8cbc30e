"""GPTQ's rounding against the direct definition, and its checkpoints through every reader:
transformers (gptqmodel, no phitune code), onnxruntime-genai's builder (MatMulNBits keeps the
values bit for bit), finetune → auto-opt → infer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from phitune.formats.awq_gemm import fake_quantize, quantize_weight
from phitune.quantize.algorithms import gptq
from phitune.quantize.driver import QuantConfig

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def _correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as real activations have: where
    GPTQ's error feedback has something to work with."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) @ (torch.eye(width) + mix)
    x[:, :3] *= 20
    return x


def obs_reference(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  act_order: bool, search: bool) -> torch.Tensor:
    """GPTQ by its definition (OBS, one column at a time, no Cholesky, no blocks): round
    column i, then move its error onto the columns F not yet rounded through the explicit
    inverse of H restricted to F: w_F -= (w_i - q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_i,F.
    Returns the integer levels. Static groups: each group's scale and zero are fixed first,
    from the weight as given; with `act_order` the columns go in decreasing H_ii."""
    w, h = w.clone(), h.clone()
    rows, cols = w.shape
    groups = w.reshape(rows, -1, group_size)
    if search:
        importance = torch.diag(h).reshape(-1, group_size)
        s, z = gptq.searched_group_params(groups, importance, bits, True)
    else:
        s, z = gptq.group_params(groups.reshape(-1, group_size), bits, True)
        s, z = s.reshape(rows, -1, 1), z.reshape(rows, -1, 1)
    s, z = s[..., 0], z[..., 0]  # [rows, groups]
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order \
        else torch.arange(cols)
    h.diagonal().add_(gptq.DAMP * torch.diag(h).mean())
    w, h = w[:, order], h[order][:, order]
    q_int = torch.empty_like(w)
    for i in range(cols):
        g = int(order[i]) // group_size
        q = (torch.round(w[:, i] / s[:, g]) + z[:, g]).clamp(0, 2**bits - 1)
        q_int[:, order[i]] = q
        inv = torch.linalg.inv(h[i:, i:])  # columns i.. are the ones not yet fixed
        err = (w[:, i] - (q - z[:, g]) * s[:, g]) / inv[0, 0]
        w[:, i:] -= err.unsqueeze(1) * inv[0].unsqueeze(0)
    return q_int


@pytest.mark.parametrize("act_order,search", [(False, False), (True, False), (True, True)])
def test_gptq_equals_the_direct_obs_reference(act_order, search):
    torch.manual_seed(0)
    w = torch.randn(12, 64, dtype=torch.float64)
    x = _correlated_inputs(256, 64)
    x[:, 40] *= 30  # a large input late in the weight's order: act-order moves it first
    h = x.t() @ x
    ours = gptq.gptq_quantize(w, h, bits=4, group_size=16, block=32,  # 2 lazy blocks, 4 groups
                              act_order=act_order, search=search)
    ref = obs_reference(w, h, 4, 16, act_order, search)
    assert torch.equal(ours.intweight.to(torch.float64), ref)


def test_identity_hessian_is_round_to_nearest():
    """Uncorrelated inputs of equal size: no error has anywhere better to go, so GPTQ's levels,
    scales and zeros with the plain group ranges are RTN's bit for bit (the same group
    parameters, the same rounding; act-order keeps the order of equal H_ii)."""
    w = torch.randn(32, 256)
    ours = gptq.gptq_quantize(w, torch.eye(256), bits=4, group_size=64, search=False)
    rtn = quantize_weight(w, 4, 64, True)
    for field in ("intweight", "scales", "zeros"):
        assert torch.equal(getattr(ours, field), getattr(rtn, field)), field


def test_searched_ranges_never_round_worse_than_min_max():
    """The range search keeps the plain [min, max] as a candidate: per row and group, its
    weighted round-to-nearest error is at most min/max's, and below it somewhere."""
    torch.manual_seed(3)
    w = torch.randn(64, 4, 32) * torch.rand(64, 4, 1) ** 3  # groups with outliers
    importance = torch.rand(4, 32)

    def error(s, z):
        q = (torch.round(w / s) + z).clamp(0, 15)
        return (((q - z) * s - w) ** 2 * importance).sum(-1)

    plain_s, plain_z = gptq.group_params(w.reshape(-1, 32), 4, True)
    plain = error(plain_s.reshape(64, 4, 1), plain_z.reshape(64, 4, 1))
    searched = error(*gptq.searched_group_params(w, importance, 4, True))
    assert (searched <= plain + 1e-6).all() and (searched < plain - 1e-6).any()


def test_gram_from_the_upper_blocks_is_the_whole_product():
    """H is multiplied only on and above its diagonal blocks and mirrored: the same XᵀX, exactly
    symmetric, over widths that are and are not multiples of the block and several chunks."""
    torch.manual_seed(4)
    for width in (64, gptq.GRAM_BLOCK + 40, 2 * gptq.GRAM_BLOCK):
        x = _correlated_inputs(300, width, seed=width).float()
        h = gptq.gram(x, chunk_tokens=128)
        assert torch.equal(h, h.t())
        torch.testing.assert_close(h, x.t() @ x, rtol=1e-5, atol=1e-3)


def test_gptq_output_error_is_below_rtns():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    x = _correlated_inputs(2048, 256).float()
    ours = gptq.gptq_quantize(w, x.t() @ x, bits=4, group_size=64).dequantize()
    err = lambda v: (x @ (v - w).t()).pow(2).mean().item()  # noqa: E731
    assert err(ours) < 0.7 * err(fake_quantize(w, 4, 64, True))


def test_siblings_rounded_together_equal_each_rounded_alone():
    """q/k/v share an input: rounding their stacked rows once is rounding each alone."""
    x = _correlated_inputs(512, 128).float()
    h = x.t() @ x
    a, b = torch.randn(16, 128), torch.randn(8, 128)
    together = gptq.gptq_quantize(torch.cat([a, b]), h, 4, 32)
    alone = [gptq.gptq_quantize(m, h, 4, 32) for m in (a, b)]
    assert torch.equal(together.intweight, torch.cat([q.intweight for q in alone]))


def test_round_layer_quantizes_each_linear_in_forward_order_from_its_inputs():
    """The in-forward rounding: each linear's Hessian is the input it receives, which for the
    second linear is the first one's quantized output."""
    torch.manual_seed(2)
    layer = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=False))
    x = _correlated_inputs(128, 64).float().view(2, 64, 64)
    w0, w1 = layer[0].weight.detach().clone(), layer[1].weight.detach().clone()
    cfg = QuantConfig(group_size=32)
    with gptq.RoundInForward({layer[0]: "0", layer[1]: "1"}, cfg) as rounding:
        out = layer(x)
    flat = x.reshape(-1, 64)
    q0 = gptq.gptq_quantize(w0, flat.t() @ flat, 4, 32).dequantize()
    mid = flat @ q0.t()
    q1 = gptq.gptq_quantize(w1, mid.t() @ mid, 4, 32).dequantize()
    assert torch.allclose(layer[0].weight, q0) and torch.allclose(layer[1].weight, q1, atol=1e-6)
    assert torch.allclose(out.reshape(-1, 32), mid @ q1.t(), atol=1e-5)
    assert set(rounding.packed) == {"0", "1"}


# ------------------------------------------------------------------ the checkpoint's readers


@pytest.fixture(scope="module")
def gptq_out(tmp_path_factory):
    from phitune.cli.main import main
    root = tmp_path_factory.mktemp("gptq")
    for args in (["quantize", "-m", "tiny-phi3", "--algorithm", "gptq", "--calib_samples", "16",
                  "--calib_seq_len", "128", "--no-eval", "-o", str(root / "gptq")],
                 ["auto-opt", "-m", str(root / "gptq"), "-o", str(root / "onnx")]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0, args
    return root


def test_quantization_config_says_gptq_made_the_values(gptq_out):
    config = json.loads((gptq_out / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm"  # the layout
    assert config["meta"]["algorithm"] == "gptq"
    manifest = json.loads((gptq_out / "gptq" / "phitune.json").read_text())
    assert manifest["params"]["algorithm"] == "gptq" and "gptq_search" in manifest["params"]


@pytest.mark.slow
def test_transformers_reads_it_with_no_phitune_code(gptq_out):
    """AutoModelForCausalLM (through gptqmodel's AWQ kernel) gives the logits of phitune's own
    dequantized reference."""
    from transformers import AutoModelForCausalLM

    from phitune.formats.awq_gemm import load_awq_dequantized
    path = gptq_out / "gptq"
    ids = torch.tensor([[8188, 464, 1102, 318, 257, 8191, 8189, 100, 200, 300]])
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16, device_map="cpu")
    assert "Awq" in type(theirs.model.layers[0].mlp.down_proj).__name__
    ours = load_awq_dequantized(path, torch.float32)
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # fp16 kernel vs fp32 reference


@pytest.mark.slow
def test_int4_graph_holds_gptqs_values_bit_for_bit(gptq_out):
    from test_export import _matmulnbits_weight

    from phitune.formats.awq_gemm import load_awq_dequantized
    reference = load_awq_dequantized(gptq_out / "gptq")
    for name, module in (("o_proj", reference.model.layers[1].self_attn.o_proj),
                         ("down_proj", reference.model.layers[0].mlp.down_proj)):
        part = "attn" if name == "o_proj" else "mlp"
        layer = 1 if name == "o_proj" else 0
        onnx_w = _matmulnbits_weight(gptq_out / "onnx" / "model" / "model.onnx",
                                     f"/model/layers.{layer}/{part}/{name}/MatMulNBits")
        assert np.array_equal(onnx_w, module.weight.detach().numpy()), name


@pytest.mark.slow
def test_finetune_then_auto_opt_then_infer(gptq_out, cli):
    ft, onnx = gptq_out / "ft", gptq_out / "ft-onnx"
    for args in (("finetune", "--method", "lora", "-m", str(gptq_out / "gptq"), "--data_files",
                  str(REPO / "data" / "travel.jsonl"), "--data_name", "json", "--text_template",
                  TEMPLATE, "--max_steps", "3", "--max_seq_len", "128", "--lora_r", "4",
                  "-o", str(ft)),
                 ("auto-opt", "-m", str(ft / "model"), "--adapter_path", str(ft / "adapter"),
                  "-o", str(onnx))):
        result = cli(*args)
        assert result.code == 0, result.err[-2000:]
    result = cli("infer", "-m", str(onnx / "model"), "--prompt", "what to see in chicago",
                 "--max_new_tokens", "8")
    assert result.code == 0 and result.out.strip()


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "llama"])
@pytest.mark.parametrize("algorithm", ["gptq", "awq_gptq"])
def test_every_family_quantizes_and_reads_back(tmp_path, cli, family, algorithm):
    """Each family's layer (split q/k/v and gate/up, Gemma's extra norms) goes through the
    in-forward rounding: every linear packed, phitune's reader gives back what was measured."""
    from conftest import build_random_model
    from test_architectures import build_tiny

    from phitune.formats.awq_gemm import load_awq_dequantized
    model = (build_random_model(tmp_path / "m", arch="llama") if family == "llama"
             else build_tiny(family, tmp_path / "m"))
    result = cli("--json", "quantize", "-m", str(model), "--algorithm", algorithm,
                 "--calib_samples", "4", "--calib_seq_len", "64", "-o", str(tmp_path / "q"))
    assert result.code == 0, result.err[-2000:]
    metrics = json.loads(result.out)
    assert metrics["ppl_after"] == pytest.approx(
        metrics["ppl_before"] + metrics["ppl_gap"], abs=1e-3)
    load_awq_dequantized(tmp_path / "q")  # every linear's three tensors present
