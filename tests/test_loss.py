"""The chunked, label-only next-token loss equals transformers' own loss, value and gradient."""

import pytest
import torch

from phitune.finetune.loss import CausalLMLoss


@pytest.mark.parametrize("chunk", [7, 1024])
def test_chunked_loss_equals_transformers_loss(random_phi3, chunk):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(random_phi3), dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 8000, (3, 40))
    labels = ids.clone()
    labels[:, :15] = -100  # prompt tokens carry no label
    labels[1, 30] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]
    reference = model(input_ids=ids, labels=labels).loss
    ours = CausalLMLoss(model, chunk_tokens=chunk)(input_ids=ids, labels=labels)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(reference, trainable), torch.autograd.grad(ours, trainable)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_no_labels_gives_zero_with_a_graph(random_phi3):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(random_phi3), dtype=torch.float32)
    ids = torch.randint(0, 8000, (1, 8))
    loss = CausalLMLoss(model)(input_ids=ids, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0 and loss.requires_grad
