"""The chunked, label-only next-token loss equals transformers' own loss, value and gradient."""

import pytest
import torch

from phitune.finetune.loss import CausalLMLoss


@pytest.mark.parametrize("chunk, keep_logits_mb", [(7, 0), (1024, 0), (1024, 64)])
def test_chunked_loss_equals_transformers_loss(random_phi3, chunk, keep_logits_mb):
    """Recomputed chunks (keep_logits_mb=0) and kept ones give the same value and gradient."""
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
    ours = CausalLMLoss(model, chunk, keep_logits_mb)(input_ids=ids, labels=labels)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(reference, trainable), torch.autograd.grad(ours, trainable)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_no_labels_gives_zero_with_a_graph(random_phi3):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(random_phi3), dtype=torch.float32)
    ids = torch.randint(0, 8000, (1, 8))
    loss = CausalLMLoss(model)(input_ids=ids, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0 and loss.requires_grad


def _one_step(model_dir, rows, rows_per_pass, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phitune import data
    from phitune.finetune.loop import Checkpoint, TrainConfig, World, train
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"], lora_dropout=0.0,
                                      init_lora_weights=False))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    cfg = TrainConfig(max_steps=1, batch_size=4, learning_rate=1e-2, micro_batch_rows=rows_per_pass)
    result = train(model, rows, data.collate_packed, cfg, "cpu", World(),
                   Checkpoint(tmp_path / f"ckpt-{rows_per_pass}", "k"), resume=False)
    return result.losses[0], {n: p.detach() - before[n] for n, p in trained.items()}


def test_a_batch_in_passes_trains_like_the_whole_batch(random_phi3, tmp_path):
    """Rows run one pass at a time (finetune's CPU default) must give the whole batch's
    token-mean loss and update, though the rows carry different numbers of labels."""
    from phitune import data
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in [(30, 20), (50, 10), (12, 2), (40, 35), (25, 5), (60, 30), (18, 9), (33, 1)]:
        ids = torch.randint(0, 8000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    rows = data.pack(examples, 64)
    assert len(rows) >= 4
    whole_loss, whole = _one_step(random_phi3, rows, None, tmp_path)
    passes_loss, passes = _one_step(random_phi3, rows, 1, tmp_path)
    assert abs(whole_loss - passes_loss) < 1e-5
    assert all(update.abs().max() > 1e-4 for update in whole.values())
    assert all(torch.allclose(whole[k], passes[k], atol=1e-5) for k in whole)  # ±0.1% of the lr
