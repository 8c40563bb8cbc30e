"""The AWQ search's compiled kernels compute what the eager ones do (quantize/kernels.py)."""

import pytest
import torch

from phitune.compiling import cpu_compiler
from phitune.formats.awq_gemm import quantize_weight
from phitune.quantize import kernels


def _weights(out_f, in_f, g, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen).to(torch.bfloat16)
    s = torch.rand(in_f, generator=gen) * 3 + 0.2
    return w.view(out_f, -1, g), s.view(-1, g)


def test_eager_scaled_fake_quantize_is_the_checkpoint_rounding():
    w, s = _weights(48, 256, 64, 0)
    expected = quantize_weight(w.reshape(48, 256).float() * s.reshape(-1), 4, 64, True).dequantize()
    got = kernels.EAGER.scaled_fake_quantize(w, s, 4, 64, True)
    assert torch.equal(got, (expected / s.reshape(-1)).to(torch.bfloat16).view_as(got))


@pytest.mark.skipif(not cpu_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_kernels_compute_the_eager_results():
    zero_point = True  # quantize's default; each setting compiles its own kernels (~10 s in CI)
    compiled = kernels.kernels(True)
    # rows vary (the dynamic dimension) with no recompile; two widths are two group counts
    for seed, (out_f, in_f) in enumerate([(96, 256), (40, 256), (64, 512)]):
        w, s = _weights(out_f, in_f, 64, seed)
        eager = kernels.EAGER.scaled_fake_quantize(w, s, 4, 64, zero_point)
        assert torch.equal(compiled.scaled_fake_quantize(w, s, 4, 64, zero_point), eager)
        wb = w.float().transpose(0, 1).contiguous()            # [groups, rows, g]
        max_val = wb.abs().amax(-1, keepdim=True) * 0.8
        x = torch.randn(in_f // 64, 64, 200, generator=torch.Generator().manual_seed(seed))
        gram = x @ x.transpose(1, 2) / 200
        expected = kernels.EAGER.clip_error(wb, max_val, gram, 4, 64, zero_point)
        got = compiled.clip_error(wb, max_val, gram, 4, 64, zero_point)
        # the same values; only the final sum may add in another order
        assert torch.allclose(got, expected, rtol=1e-5, atol=0)


def test_quantize_compiles_its_search_from_1b_parameters_on_cpu(monkeypatch):
    from dataclasses import replace

    from phitune import compiling
    from phitune.quantize import step
    from phitune.quantize.options import QuantizeOptions
    monkeypatch.setattr(compiling, "_toolchain_problem", lambda device: None)
    opts = QuantizeOptions(model="m", output="o")
    metrics: dict = {}
    assert not step._compile_choice(opts, 135_000_000, "cpu", metrics)
    assert metrics["compiled"] is False
    assert step._compile_choice(opts, 3_800_000_000, "cpu", metrics)
    assert metrics["compiled"] is True
    assert not step._compile_choice(opts, 3_800_000_000, "cuda", {})  # not measured there
    assert not step._compile_choice(replace(opts, compile=False), 3_800_000_000, "cpu", {})
    assert step._compile_choice(replace(opts, compile=True), 135_000_000, "cpu", {})
