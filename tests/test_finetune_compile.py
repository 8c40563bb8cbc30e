"""torch.compile of the decoder layers: when it is chosen, and that a compiled step computes
the eager step's loss and gradients."""

import pytest
import torch

from phitune import compiling
from phitune.finetune import layer_compile
from phitune.policy import Choice

needs_compiler = pytest.mark.skipif(not compiling.cpu_compiler(),
                                    reason="torch.compile on CPU needs a C++ compiler")


def test_compile_is_off_for_small_models_and_unmeasured_devices():
    assert compiling.choose_compile(None, False, "cpu") == Choice(False, "small model")
    assert not compiling.choose_compile(None, True, "cuda").on
    assert not compiling.choose_compile(False, True, "cpu").on


def test_a_base_kept_4bit_trains_eager_unless_asked(monkeypatch):
    """Memory first: a large model's compiled layers took GBs more than its int4 base saved."""
    monkeypatch.setattr(compiling, "_toolchain_problem", lambda device: None)
    choice = compiling.choose_compile(None, True, "cpu", memory_first=True)
    assert not choice.on and "4-bit" in choice.reason
    assert compiling.choose_compile(True, True, "cpu", memory_first=True).on
    assert compiling.choose_compile(None, True, "cpu", memory_first=False).on


def test_a_missing_compiler_keeps_training_eager_and_says_why(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    choice = compiling.choose_compile(True, False, "cpu")
    assert not choice.on
    assert "no C++ compiler (no-such-compiler-xyz)" in choice.reason


def test_large_models_on_cpu_compile_when_the_toolchain_works(monkeypatch):
    monkeypatch.setattr(compiling, "_toolchain_problem", lambda device: None)
    assert compiling.choose_compile(None, True, "cpu") == \
        Choice(True, "large model on CPU")


def _lora_model(random_phi3):
    from phitune.artifacts import resolve_model
    from phitune.finetune import lora
    from phitune.finetune.base import load_base
    torch.manual_seed(0)
    base = load_base(resolve_model(str(random_phi3), accept=("hf-model",), step="finetune"),
                     "lora", "cpu", torch.float32)
    model = lora.wrap(base, 8, 16, 0.0, lora.target_modules("phi3", None, base))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect worth comparing
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


@needs_compiler
def test_a_compiled_step_matches_the_eager_step(random_phi3):
    from phitune.finetune.loss import CausalLMLoss
    model = _lora_model(random_phi3)
    loss_fn = CausalLMLoss(model)
    ids = torch.randint(0, 1000, (1, 96), generator=torch.Generator().manual_seed(1))

    def step():
        model.zero_grad()
        loss = loss_fn(input_ids=ids, labels=ids.clone())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step()
    assert layer_compile.compile_layers(model)
    torch._dynamo.utils.counters.clear()
    compiled_loss, compiled_grads = step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # not a silent eager fallback
    with layer_compile.eager():  # eval's escape hatch runs the layers as written again
        again_loss, _ = step()
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
    assert again_loss == eager_loss
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    assert all("_orig_mod" not in k for k in model.state_dict())  # adapter names unchanged
