"""The parts of AWQ that must hold whatever the model: folding scales preserves the layer's
function (GQA included), and the scale and clip searches beat plain rounding."""

import pytest
import torch
from torch import nn

from phitune.models import load_causal_lm
from phitune.quantize import awq
from phitune.quantize.arch import linear_names, scale_groups
from phitune.quantize.awq import QuantConfig
from phitune.quantize.pack import fake_quantize


def _layer_and_inputs(path, arch):
    model = load_causal_lm(path)
    samples = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = awq.capture_layer0_inputs(model, samples, torch.float32, "cpu")
    layer = model.model.layers[0]
    return model, layer, hidden, kwargs


@pytest.mark.parametrize("fixture,arch", [("random_phi3", "Phi3ForCausalLM"),
                                          ("random_llama", "LlamaForCausalLM")])
def test_folding_any_scale_preserves_the_layer(request, fixture, arch):
    model, layer, hidden, kwargs = _layer_and_inputs(request.getfixturevalue(fixture), arch)
    with torch.no_grad():
        before = layer(hidden, **kwargs)
        groups = scale_groups(arch, layer, model.config, kwargs)
        feats, _ = awq._capture_group_inputs(layer, groups, hidden, kwargs, 4096)
        g = torch.Generator().manual_seed(1)
        for group in groups:
            n = group.in_features // group.kv_repeat
            awq.apply_scale(group, torch.rand(n, generator=g) * 3 + 0.2, feats[group.name])
        after = layer(hidden, **kwargs)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)


def test_scale_search_beats_rtn_on_outlier_channels():
    torch.manual_seed(0)
    fc = nn.Linear(256, 128, bias=False)
    x = torch.randn(4, 64, 256)
    x[..., :4] *= 30  # a few salient input channels, as in real LLM activations
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.ones(256))
    from phitune.quantize.arch import ScaleGroup
    group = ScaleGroup("g", norm, [fc], fc)
    cfg = QuantConfig(group_size=128)
    with torch.no_grad():
        reference = fc(x)
        rtn = nn.functional.linear(x, fake_quantize(fc.weight, 4, 128, True))
        s, alpha = awq.search_scale(group, x, cfg)
        awq.apply_scale(group, s, x)
        scaled = nn.functional.linear(x, fake_quantize(fc.weight, 4, 128, True))
    rtn_err = (rtn - reference).pow(2).mean()
    awq_err = (scaled - reference).pow(2).mean()
    assert alpha > 0
    assert awq_err < 0.7 * rtn_err


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    w[:, 7] *= 8
    x = torch.randn(512, 256)
    cfg = QuantConfig(group_size=128)
    max_val = awq.search_clip(w, x, cfg)
    clipped = torch.clamp(w.view(128, 2, 128), -max_val.unsqueeze(-1), max_val.unsqueeze(-1)).view(128, 256)
    ref = x @ w.t()
    err_clip = (x @ fake_quantize(clipped, 4, 128, True).t() - ref).pow(2).mean()
    err_plain = (x @ fake_quantize(w, 4, 128, True).t() - ref).pow(2).mean()
    assert err_clip <= err_plain


def test_quantize_layer_leaves_dequantized_weights(random_phi3):
    model, layer, hidden, kwargs = _layer_and_inputs(random_phi3, "Phi3ForCausalLM")
    groups = scale_groups("Phi3ForCausalLM", layer, model.config, kwargs)
    _, result = awq.quantize_layer(layer, groups, hidden, kwargs, QuantConfig())
    from phitune.quantize.pack import unpack_gemm
    for fc, name in linear_names(layer).items():
        assert torch.equal(unpack_gemm(**result["packed"][name]).dequantize(), fc.weight.data)
