"""finetune's memory plan: passes of ~512 tokens on CPU, and checkpointing only when a pass's
activations would not fit."""

from types import SimpleNamespace

import pytest

from phitune.finetune import memory

PHI3_MINI = SimpleNamespace(hidden_size=3072, intermediate_size=8192, num_hidden_layers=8)


def test_cpu_runs_a_batch_in_passes_of_about_512_tokens():
    assert memory.rows_per_pass("cpu", 512) == 1
    assert memory.rows_per_pass("cpu", 2048) == 1
    assert memory.rows_per_pass("cpu", 128) == 4
    assert memory.rows_per_pass("cuda", 512) is None


def test_activation_estimate_matches_the_measured_phi3_mini_shape():
    # bench finetune, 8 layers, 512 bf16 tokens a pass: 4116 MB without checkpointing,
    # 3295 MB with it; the difference is the activations one pass keeps.
    assert 0.9 * 821 < memory.activation_mb(PHI3_MINI, 512, 2) < 1.1 * 821
    gpt2_like = SimpleNamespace(hidden_size=768, intermediate_size=None, num_hidden_layers=12)
    assert memory.activation_mb(gpt2_like, 512, 4) == 512 * 12 * (16 + 6 * 4) * 768 * 4 / 2**20


@pytest.mark.parametrize("free_mb, expected", [(64_000, False), (1_000, True)])
def test_checkpointing_is_on_only_when_the_activations_would_not_fit(monkeypatch, free_mb, expected):
    monkeypatch.setattr(memory, "available_memory_mb", lambda device: free_mb)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    choice = memory.choose_checkpointing(None, True, PHI3_MINI, 512, 2, "cpu")
    assert choice.on is expected
    assert "GB of activations" in choice.reason


def test_checkpointing_shares_free_memory_among_local_processes(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_mb", lambda device: 2_400)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert not memory.choose_checkpointing(None, True, PHI3_MINI, 512, 2, "cpu").on
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.choose_checkpointing(None, True, PHI3_MINI, 512, 2, "cpu").on


def test_the_users_choice_and_small_models_need_no_estimate(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_mb", lambda device: pytest.fail("not needed"))
    assert memory.choose_checkpointing(True, False, PHI3_MINI, 512, 2, "cpu").on
    assert not memory.choose_checkpointing(False, True, PHI3_MINI, 512, 2, "cpu").on
    assert not memory.choose_checkpointing(None, False, PHI3_MINI, 512, 2, "cpu").on
