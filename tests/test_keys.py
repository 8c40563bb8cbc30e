"""Outputs made before stay up to date: each step's key, pinned.

Each step runs in-process up to `Output.begin`, which is replaced by a spy that records the
(step, inputs, params) the key is made of and stops the step there (nothing loads or trains).
The key is computed with the tool version pinned, so a release bump does not change it; any
other change to what enters a key (a renamed option, one more or one fewer param, an input
digested differently) fails here, and must be deliberate: it makes every earlier output stale.
"""

from __future__ import annotations

import pytest

from phitune import artifacts
from phitune.artifacts import Output, manifest
from phitune.artifacts.manifest import make_key


class _Stop(Exception):
    pass


@pytest.fixture
def keyed(monkeypatch, tmp_path):
    """Runs a step up to its key; returns (params' names, the key with the version pinned)."""
    monkeypatch.setattr(manifest, "__version__", "pinned")
    monkeypatch.chdir(artifacts.data_dir().parent)  # relative data paths enter finetune's key
    seen = {}

    def spy(cls, path, artifact, step, inputs, params, force, reads=()):
        seen.update(step=step, inputs=inputs, params=params)
        raise _Stop

    monkeypatch.setattr(Output, "begin", classmethod(spy))

    def run(run_step, opts):
        with pytest.raises(_Stop):
            run_step(opts)
        return sorted(seen["params"]), make_key(seen["step"], seen["inputs"], seen["params"])
    return run


def test_quantize_key(keyed, tmp_path):
    from phitune.quantize.step import QuantizeOptions, run
    names, key = keyed(run, QuantizeOptions(model="tiny-phi3", output=str(tmp_path / "q")))
    assert names == QUANTIZE_PARAMS
    assert key == QUANTIZE_KEY


def test_finetune_key(keyed, tmp_path):
    from phitune.finetune.step import FinetuneOptions, run
    names, key = keyed(run, FinetuneOptions(model="tiny-phi3", output=str(tmp_path / "f"),
                                            data_files=["data/travel.jsonl"], max_steps=2,
                                            use_chat_template=True))
    assert names == FINETUNE_PARAMS
    assert key == FINETUNE_KEY


def test_auto_opt_key(keyed, tmp_path):
    from phitune.export.step import AutoOptOptions, run
    names, key = keyed(run, AutoOptOptions(model="tiny-phi3", output=str(tmp_path / "o")))
    assert names == AUTO_OPT_PARAMS
    assert key == AUTO_OPT_KEY


QUANTIZE_PARAMS = [
    "algorithm",
    "awq_search",
    "bits",
    "calib_samples",
    "calib_seq_len",
    "dtype",
    "eval",
    "group_size",
    "sequence_start",
    "zero_point",
]
QUANTIZE_KEY = "80c14916ae01135d2c45b72164959ca61e6301bf462eb27567e3a187558255b3"
FINETUNE_PARAMS = [
    "compile",
    "dtype",
    "eval_dataset_size",
    "eval_split",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "learning_rate",
    "lora_alpha",
    "lora_dropout",
    "lora_r",
    "max_grad_norm",
    "max_seq_len",
    "max_steps",
    "merge",
    "method",
    "num_train_epochs",
    "overflow",
    "packing",
    "per_device_train_batch_size",
    "seed",
    "sequence_start",
    "target_modules",
    "text_cols",
    "text_template",
    "train_on_prompt",
    "use_chat_template",
    "warmup_steps",
]
FINETUNE_KEY = "c0d20c4cde66bf060fea9991a4ce06dac408612992caf4d55800519e0a44b336"
AUTO_OPT_PARAMS = [
    "accuracy_level",
    "block_size",
    "device",
    "lm_head",
    "multi_lora",
    "precision",
    "provider",
    "sequence_start",
]
AUTO_OPT_KEY = "0ef3a74f557616af01bfad1013fa47dbcd9811cc1913e38312ab647f8964e043"


def test_workflow_entry_keys(monkeypatch, tmp_path):
    """`run --config` keys each step's cache entry on its own split of the options."""
    from phitune.workflow.plan import compute_keys, load_workflow
    monkeypatch.setattr(manifest, "__version__", "pinned")
    travel = artifacts.data_dir() / "travel.jsonl"
    (tmp_path / "wf.yaml").write_text(
        "output_dir: out\nsteps:\n"
        "  - {name: q, type: quantize, model: tiny-phi3, algorithm: rtn, device: cpu}\n"
        f"  - {{name: f, type: finetune, model: '@q', data_files: '{travel}', max_steps: 2,\n"
        "      use_chat_template: true, resume: true, save_steps: 1, device: cpu}\n"
        "  - {name: o, type: auto-opt, model: '@f', use_ort_genai: true}\n"
        "  - {name: e, type: eval, model: '@o', max_ppl: 1000}\n")
    wf = load_workflow(tmp_path / "wf.yaml")
    compute_keys(wf)
    assert {s.name: s.key[:16] for s in wf.steps} == WORKFLOW_KEYS


WORKFLOW_KEYS = {"q": "f9e2c67e04fa6d6d", "f": "6e42307c0c689d6c", "o": "fff2941e43a922bc",
                 "e": "e18eac765bb248ca"}
