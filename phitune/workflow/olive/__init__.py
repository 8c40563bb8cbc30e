"""An Olive workflow config → phitune workflow steps, the local parts.

Olive's fine-tuning configs (the Phi-3 cookbook's olive-config.json and its kin) chain passes
over one input model. Each pass becomes a phitune step with the CLI's option names, reading
the previous one's output:

    input_model  HfModel / PyTorchModel: model_path, or hf_config.model_name  → the first -m
    data_configs HuggingfaceContainer: load_dataset_config.params.{data_name, data_files, split},
                 pre_process_data_config.params.{text_cols, text_template, source_max_len,
                 corpus_strategy}  (and the older params_config.component_kwargs shape)
    passes       AutoAWQQuantizer → quantize --algorithm awq (bits, group_size, zero_point)
                 GptqQuantizer    → quantize --algorithm gptq (bits, group_size, sym → no
                                    zero point); desc_act false is noted, not applied:
                                    phitune's GPTQ always rounds in act-order
                 LoRA / QLoRA     → finetune --method lora|qlora (lora_r, lora_alpha,
                                    lora_dropout, target_modules, eval_dataset_size, the data
                                    config, training_args that finetune has as options)
                 MergeAdapterWeights → --merge on that finetune; the next pass reads D/merged
                 ModelBuilder     → auto-opt (precision, int4_block_size, int4_accuracy_level)
                 ExtractAdapters  → nothing to add: auto-opt always gives LoRA inputs and
                                    writes the adapter beside the model
    engine       output_dir, cache_dir, execution_providers (→ auto-opt --device/--provider);
                 also read from systems.<host>.accelerators

What cannot run here stops the translation with one line naming every such key: AzureML (or
other non-local) systems, azureml_client, Azure ML models and datastores. Unknown pass types
and unusable values stop it too, named by their key path. Keys that are read but have no
phitune equivalent (adam_beta2, logging_steps, trust_remote_code...) are listed by name as
notes before the run: never silently dropped. Options the file leaves out take phitune's
defaults (not Hugging Face Trainer's).
"""

from __future__ import annotations

from pathlib import Path

from phitune.workflow.olive.engine import engine as read_engine
from phitune.workflow.olive.input_model import input_model
from phitune.workflow.olive.passes import passes
from phitune.workflow.olive.remote import refuse_remote
from phitune.workflow.olive.tables import ENGINE_KEYS
from phitune.workflow.olive.translation import Translation

# Top-level keys read elsewhere (ENGINE_KEYS too: newer Olive puts the engine's at the top)
READ = ("input_model", "data_configs", "passes", "engine", "systems", "$schema", "workflow_host")


def translate(raw: dict, source: Path) -> tuple[dict, list[str]]:
    """Returns (a phitune workflow mapping, note lines naming the keys not applied)."""
    refuse_remote(raw, source)
    t = Translation(raw, source)
    engine = read_engine(t)
    model, adapter = input_model(t)
    datasets = {dc.get("name"): (i, dc) for i, dc in enumerate(raw.get("data_configs") or [])
                if isinstance(dc, dict)}
    if raw.get("data_configs") is not None and not isinstance(raw.get("data_configs"), list):
        t.fail("data_configs", "is not a list", "write data_configs as a list of mappings")
    passes(t, model, adapter, datasets, engine)
    for key in raw:
        if key in READ or key in ENGINE_KEYS:
            continue
        if key == "pass_flows":
            t.fail("pass_flows", "is not supported", "list the passes to run, in order, "
                   "under `passes`")
        if key in ("evaluators", "auto_optimizer_config", "workflow_id"):
            t.note(key)
        else:
            t.note(key, "unknown key, not applied")
    workflow = {"steps": t.steps}
    if engine.get("output_dir"):
        workflow["output_dir"] = str(engine["output_dir"])
    if engine.get("cache_dir"):
        workflow["cache_dir"] = str(engine["cache_dir"])
    return workflow, t.note_lines()
