"""LoRA dropout (phitune/finetune/dropout.py): PEFT's dropout, its mask drawn by the gaps
between drops — the same distribution, the seed followed, compiled and eager alike."""

import pytest
import torch

from phitune.compiling import cpu_compiler
from phitune.finetune import dropout as dropout_module
from phitune.finetune.dropout import LoraDropout


def test_mask_drops_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    dropout = LoraDropout(0.05, site=0).train()
    x = torch.ones(8, 512, 577, requires_grad=True)
    y = dropout(x)
    assert (y == 0).double().mean().item() == pytest.approx(0.05, abs=5e-4)  # ~10 sigma
    assert y.double().mean().item() == pytest.approx(1.0, abs=1e-3)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * dropout.scale)  # backward uses the same mask


@pytest.mark.parametrize("margin", [dropout_module.BATCH_MARGIN, 0.05])
def test_drops_are_independent_bernoulli(monkeypatch, margin):
    """Neighbours drop together at p^2, the first and last positions at p; with a margin too
    small for one batch of gaps, the mask is drawn over many batches and stays the same law."""
    monkeypatch.setattr(dropout_module, "BATCH_MARGIN", margin)
    torch.manual_seed(1)
    p, rows = 0.1, 20_000
    dropped = LoraDropout(p, site=0).train()(torch.ones(rows, 100)) == 0
    assert dropped.double().mean().item() == pytest.approx(p, abs=2e-3)
    pairs = (dropped[:, 1:] & dropped[:, :-1]).double().mean().item()
    assert pairs == pytest.approx(p * p, abs=1e-3)
    for column in (0, -1):
        assert dropped[:, column].double().mean().item() == pytest.approx(p, abs=0.015)


def test_eval_and_zero_probability_are_the_identity():
    x = torch.randn(3, 5)
    assert LoraDropout(0.3, site=0).eval()(x) is x
    assert LoraDropout(0.0, site=0).train()(x) is x


def test_the_seed_decides_the_mask():
    dropout = LoraDropout(0.2, site=0).train()
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    a = dropout(x)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x))
    assert not torch.equal(a, dropout(x))


class _TwoSites(torch.nn.Module):
    """Two projections reading one input, as q and k do."""

    def __init__(self):
        super().__init__()
        self.q, self.k = LoraDropout(0.2, site=0), LoraDropout(0.2, site=1)

    def forward(self, x):
        return self.q(x), self.k(x)


@pytest.mark.skipif(not cpu_compiler(), reason="torch.compile needs a C++ compiler")
def test_compiled_masks_are_the_eager_masks_and_stay_apart_per_site():
    model = _TwoSites().train()
    x = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(3)
    q, k = torch.compile(model)(x)
    assert not torch.equal(q == 0, k == 0)  # not merged into one draw
    (2 * q + 3 * k).sum().backward()
    expected = (q != 0).float() * 2 * model.q.scale + (k != 0).float() * 3 * model.k.scale
    assert torch.allclose(x.grad, expected)  # backward reused forward's masks, no new draw
    torch.manual_seed(3)
    eager_q, eager_k = model(x)
    assert torch.equal(q, eager_q) and torch.equal(k, eager_k)


def test_wrap_swaps_every_lora_dropout(random_phi3):
    from phitune.finetune import lora
    from phitune.models import load_causal_lm
    targets = ["qkv_proj", "o_proj"]
    model = lora.wrap(load_causal_lm(random_phi3, dtype=torch.float32), 4, 8, 0.1, targets)
    swapped = [m for m in model.modules() if isinstance(m, LoraDropout)]
    assert len(swapped) == len(targets) * model.config.num_hidden_layers
    assert {m.site for m in swapped} == {0, 1}  # one site per projection name, every layer alike
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    for rate in (0.0, 0.5):  # none to draw; drops too common for gaps to pay: PEFT's stays
        plain = lora.wrap(load_causal_lm(random_phi3, dtype=torch.float32), 4, 8, rate, targets)
        assert not any(isinstance(m, LoraDropout) for m in plain.modules())


def test_layers_off_the_cpu_keep_peft_dropout(random_phi3):
    """On a GPU dropout is one fused kernel; the gap draw would wait on the device (the meta
    device stands in for one here)."""
    from peft import LoraConfig, get_peft_model
    from phitune.models import load_causal_lm
    model = get_peft_model(load_causal_lm(random_phi3, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                      target_modules=["o_proj"])).to("meta")
    assert dropout_module.use_lora_dropout(model) == 0


def _lora_grads(path, checkpointing: bool) -> dict:
    from phitune.finetune import lora
    from phitune.models import load_causal_lm
    base = load_causal_lm(path, dtype=torch.float32)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(0)
    model = lora.wrap(base, 4, 8, 0.1, ["qkv_proj", "down_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: let A's gradient depend on the masks too
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_layers_redraw_the_same_masks(random_phi3):
    """Gradient checkpointing runs each layer's forward again in backward; the RNG state it
    restores must give the custom op the masks of the first forward."""
    plain, checkpointed = _lora_grads(random_phi3, False), _lora_grads(random_phi3, True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name
