"""`phitune run --config olive-config.json`: Olive fine-tuning configs shaped like the Phi-3
cookbook's seeds, pointed at the embedded model and the shipped data, translated to phitune
steps: what maps, what is refused (Azure, unknown passes) and what is named as not applied."""

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_workflow import phitune

REPO = Path(__file__).resolve().parent.parent
TONE = str(REPO / "data" / "tone.jsonl")
TRAVEL = str(REPO / "data" / "travel.jsonl")

# The cookbook's phrase-classification config (LoRA → MergeAdapterWeights → ModelBuilder int4),
# older `config:` wrappers, tiny settings.
LORA_MERGE_MB = {
    "$schema": "https://microsoft.github.io/Olive/schema.json",
    "input_model": {
        "type": "PyTorchModel",
        "config": {"hf_config": {"model_name": "tiny-phi3", "task": "text-generation",
                                 "from_pretrained_args": {"trust_remote_code": True}}},
    },
    "systems": {"local_system": {"type": "LocalSystem", "config": {"accelerators": [
        {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}}},
    "data_configs": [{
        "name": "dataset_default_train",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"params": {"data_name": "json", "data_files": TONE,
                                           "split": "train"}},
        "pre_process_data_config": {"params": {
            "dataset_type": "corpus", "text_cols": ["phrase", "tone"],
            "text_template": "<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>",
            "corpus_strategy": "join", "source_max_len": 128, "pad_to_max_len": False,
            "use_attention_mask": False}},
    }],
    "passes": {
        "lora": {"type": "LoRA", "config": {
            "target_modules": ["o_proj", "qkv_proj"], "lora_r": 8, "lora_alpha": 16,
            "lora_dropout": 0.1, "train_data_config": "dataset_default_train",
            "eval_dataset_size": 0.05,
            "training_args": {"seed": 0, "data_seed": 42, "per_device_train_batch_size": 2,
                              "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
                              "gradient_checkpointing": False, "learning_rate": 0.001,
                              "max_steps": 5, "evaluation_strategy": "steps",
                              "adam_beta2": 0.999, "max_grad_norm": 0.3}}},
        "merge": {"type": "MergeAdapterWeights"},
        "mb": {"type": "ModelBuilder", "config": {"precision": "int4"}},
    },
    "engine": {"log_severity_level": 0, "host": "local_system", "target": "local_system",
               "cache_dir": "cache", "output_dir": "models"},
}

# Olive's phi3 QLoRA example, newer flat shape (HfModel, fields at the pass level) + merge.
QLORA_MERGE = {
    "input_model": {"type": "HfModel", "model_path": "tiny-phi3",
                    "load_kwargs": {"trust_remote_code": True}},
    "data_configs": [{
        "name": "travel",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"params": {"data_name": "json", "data_files": TRAVEL,
                                           "split": "train"}},
        "pre_process_data_config": {"params": {
            "text_template": "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>",
            "source_max_len": 256}},
    }],
    "passes": {
        "qlora": {"type": "QLoRA", "compute_dtype": "bfloat16", "quant_type": "nf4",
                  "double_quant": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                  "train_data_config": "travel", "eval_dataset_size": 16,
                  "training_args": {"per_device_train_batch_size": 4, "max_steps": 5,
                                    "logging_steps": 5, "load_best_model_at_end": True}},
        "merge": {"type": "MergeAdapterWeights"},
    },
    "engine": {"cache_dir": "cache", "output_dir": "models"},
}

# The cookbook's Azure ML variant: registry model, datastore data, AzureML system.
AZURE = copy.deepcopy(LORA_MERGE_MB)
AZURE["azureml_client"] = {"subscription_id": "x", "resource_group": "y", "workspace_name": "z"}
AZURE["input_model"]["config"]["model_path"] = {
    "type": "azureml_registry_model",
    "config": {"name": "microsoft/Phi-3-mini-4k-instruct", "registry_name": "azureml-msr",
               "version": "11"}}
AZURE["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = {
    "type": "azureml_datastore",
    "config": {"azureml_client": AZURE["azureml_client"], "datastore_name": "workspaceblobstore",
               "relative_path": "train.json"}}
AZURE["systems"] = {"aml": {"type": "AzureML", "config": {
    "accelerators": ["gpu"], "hf_token": True, "aml_compute": "gpu-cluster",
    "aml_docker_config": {"base_image": "img", "conda_file_path": "conda.yaml"}}}}
AZURE["engine"].update({"host": "aml", "target": "aml",
                        "execution_providers": ["CUDAExecutionProvider"]})


def write(tmp_path: Path, config: dict, name: str = "olive-config.json") -> Path:
    config = copy.deepcopy(config)
    config["engine"]["cache_dir"] = str(tmp_path / "cache")
    config["engine"]["output_dir"] = str(tmp_path / "models")
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=2))
    return path


def translated(tmp_path, config):
    from phitune.workflow.olive import translate
    return translate(copy.deepcopy(config), tmp_path / "olive-config.json")


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("olive")
    config = write(tmp, LORA_MERGE_MB)
    result = phitune("run", "--config", config)
    assert result.code == 0, result.err[-3000:]
    return tmp, config, result


def test_lora_merge_modelbuilder_runs_end_to_end(lora_run):
    tmp, _config, result = lora_run
    assert [l.split(":")[0] for l in result.lines("running phitune")] == ["lora", "mb"]
    # keys read but not applied are named, never dropped silently
    notes = "\n".join(result.lines("note:"))
    for key in ("adam_beta2", "data_seed", "evaluation_strategy", "trust_remote_code",
                "log_severity_level", "use_attention_mask"):
        assert key in notes
    assert "passes.merge" in notes and "--merge" in notes
    ft = next((tmp / "cache").glob("finetune-*"))
    assert (ft / "merged" / "config.json").is_file()
    manifest = json.loads((ft / "phitune.json").read_text())
    params = manifest["params"]
    assert params["merge"] is True and params["lora_r"] == 8 and params["lora_dropout"] == 0.1
    assert params["target_modules"] == "o_proj,qkv_proj" and params["eval_split"] == 0.05
    assert params["max_grad_norm"] == 0.3 and params["seed"] == 0 and params["max_steps"] == 5
    assert params["max_seq_len"] == 128 and params["text_cols"] == "phrase,tone"
    link = tmp / "models" / "mb"
    assert link.is_symlink()
    onnx = json.loads((link / "phitune.json").read_text())
    assert onnx["artifact"] == "onnx-genai" and onnx["inputs"]["model"].endswith("/merged")
    assert onnx["params"]["precision"] == "int4" and onnx["params"]["device"] == "cpu"
    assert (link / "model" / "genai_config.json").is_file()
    assert not (link / "model" / "adapter_weights.onnx_adapter").exists()  # merged in


def test_olive_run_again_is_cached(lora_run):
    _tmp, config, _ = lora_run
    result = phitune("run", "--config", config)
    assert result.code == 0 and len(result.lines(": cached — ")) == 2
    assert not result.lines("running phitune")


def test_qlora_merge_runs_on_cpu(tmp_path):
    config = write(tmp_path, QLORA_MERGE)
    plan = phitune("run", "--config", config, "--dry-run")
    assert plan.code == 0, plan.err
    assert "--method qlora" in plan.err and "--merge" in plan.err
    assert "--eval_dataset_size 16" in plan.err
    notes = "\n".join(plan.lines("note:"))
    assert "compute_dtype" in notes and "logging_steps" in notes and "quant_type" not in notes
    result = phitune("run", "--config", config)
    assert result.code == 0, result.err[-3000:]
    assert "gemm_4bit" not in result.err and "Traceback" not in result.err
    ft = next((tmp_path / "cache").glob("finetune-*"))
    manifest = json.loads((ft / "phitune.json").read_text())
    assert manifest["params"]["method"] == "qlora" and manifest["metrics"]["device"] == "cpu"
    assert manifest["metrics"]["eval_loss_after"] is not None
    # merged/ is the float base with the adapter folded in: a plain float checkpoint
    merged = json.loads((ft / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged
    from safetensors import safe_open
    with safe_open(str(ft / "merged" / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() in ("F32", "BF16", "F16") for k in f.keys())
        assert any(k.endswith("qkv_proj.weight") for k in f.keys())


def test_azure_config_fails_fast_naming_the_keys(tmp_path):
    config = write(tmp_path, AZURE)
    result = phitune("run", "--config", config)
    assert result.code == 2 and result.seconds < 2
    assert len(result.error_lines) == 1
    line = result.error_lines[0]
    for key in ("systems.aml", "azureml_client", "azureml_registry_model",
                "azureml_datastore", "engine.host"):
        assert key in line
    assert "runs on the local machine" in line and "remove or replace `systems.aml`" in line
    start = time.perf_counter()  # a fresh interpreter too: nothing heavy is imported
    proc = subprocess.run([sys.executable, "-m", "phitune", "run", "--config", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "systems.aml" in proc.stderr
    assert time.perf_counter() - start < 2.0


def test_unknown_pass_type_is_named(tmp_path):
    config = copy.deepcopy(LORA_MERGE_MB)
    config["passes"]["conversion"] = {"type": "OnnxConversion", "config": {"target_opset": 17}}
    result = phitune("run", "--config", write(tmp_path, config))
    assert result.code == 2
    assert "passes.conversion.type" in result.error_lines[0]
    assert "OnnxConversion" in result.error_lines[0]


# ---------------------------------------------------------------- translation only

def test_translation_of_the_seed_shapes(tmp_path):
    workflow, notes = translated(tmp_path, LORA_MERGE_MB)
    lora, mb = workflow["steps"]
    assert lora["type"] == "finetune" and lora["method"] == "lora" and lora["merge"] is True
    assert lora["model"] == "tiny-phi3" and lora["data_files"] == TONE
    assert lora["text_cols"] == ["phrase", "tone"] and "packing" not in lora
    assert mb == {"name": "mb", "type": "auto-opt", "model": "@lora/merged", "precision": "int4",
                  "device": "cpu", "provider": "CPUExecutionProvider"}
    workflow, notes = translated(tmp_path, QLORA_MERGE)
    (qlora,) = workflow["steps"]
    assert qlora["method"] == "qlora" and qlora["eval_dataset_size"] == 16
    config = copy.deepcopy(QLORA_MERGE)
    config["passes"]["qlora"]["training_args"].update(report_to=["tensorboard"], eval_steps=2)
    workflow, notes = translated(tmp_path, config)
    assert workflow["steps"][0]["report_to"] == "tensorboard"
    assert workflow["steps"][0]["eval_steps"] == 2
    config["passes"]["qlora"]["training_args"]["report_to"] = "wandb"
    workflow, notes = translated(tmp_path, config)
    assert "report_to" not in workflow["steps"][0] and any("report_to" in n for n in notes)


def test_awq_lora_builder_extract_chain(tmp_path):
    config = {
        "input_model": {"type": "HfModel", "model_path": "tiny-phi3"},
        "data_configs": [{"name": "d", "type": "HuggingfaceContainer",
                          "load_dataset_config": {"params": {"data_name": "json",
                                                             "data_files": TRAVEL}},
                          "pre_process_data_config": {"params": {
                              "text_template": "{prompt}\n{response}",
                              "corpus_strategy": "line-by-line"}}}],
        "passes": {
            "awq": {"type": "AutoAWQQuantizer", "bits": 4, "group_size": 64, "version": "gemm"},
            "lora": {"type": "LoRA", "train_data_config": "d", "training_args": {"max_steps": 3}},
            "builder": {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 64,
                        "int4_accuracy_level": 4},
            "extract": {"type": "ExtractAdapters", "make_inputs": True},
        },
        "engine": {"execution_providers": ["CUDAExecutionProvider"], "output_dir": "o"},
    }
    workflow, notes = translated(tmp_path, config)
    awq, lora, builder = workflow["steps"]
    assert awq == {"name": "awq", "type": "quantize", "model": "tiny-phi3", "algorithm": "awq",
                   "bits": 4, "group_size": 64}
    assert lora["model"] == "@awq" and lora["packing"] is False and lora["max_steps"] == 3
    assert builder["model"] == "@lora" and builder["block_size"] == 64
    assert builder["accuracy_level"] == 4
    assert builder["device"] == "gpu" and builder["provider"] == "CUDAExecutionProvider"
    assert any("passes.builder" in n and "adapter_weights.onnx_adapter" in n for n in notes)


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["engine"].update(execution_providers=["DmlExecutionProvider"]),
     "engine.execution_providers"),
    (lambda c: c["data_configs"][0]["load_dataset_config"]["params"].update(
        data_name="nampdn-ai/tiny-codes"), "data_name"),
    (lambda c: c["data_configs"][0]["load_dataset_config"].update(type="load_tiny_code_dataset"),
     "load_tiny_code_dataset"),
    (lambda c: c["passes"].pop("lora"), "MergeAdapterWeights"),
    (lambda c: c["passes"]["mb"]["config"].update(precision="int8"), "passes.mb.config.precision"),
    (lambda c: c["passes"]["lora"]["config"].update(train_data_config="nosuch"), "nosuch"),
    (lambda c: c["input_model"].update(type="ONNXModel"), "input_model.type"),
    (lambda c: c.update(pass_flows=[["lora"]]), "pass_flows"),
])
def test_what_cannot_be_translated_is_named(tmp_path, edit, named):
    from phitune.errors import OptionError
    config = copy.deepcopy(LORA_MERGE_MB)
    edit(config)
    with pytest.raises(OptionError) as exc:
        translated(tmp_path, config)
    assert named in exc.value.line()


def test_the_examples_load(monkeypatch):
    monkeypatch.chdir(REPO)
    for name in ("workflow.yaml", "olive-lora.json", "olive-qlora.json", "olive-awq-lora.json"):
        result = phitune("run", "--config", REPO / "examples" / name, "--dry-run")
        assert result.code == 0, (name, result.err)
        assert "nothing was run" in result.err


GPTQ_BUILDER = {
    "input_model": {"type": "HfModel", "model_path": "tiny-phi3"},
    "passes": {
        "gptq": {"type": "GptqQuantizer", "bits": 4, "group_size": 64, "sym": False,
                 "desc_act": False, "damp_percent": 0.01, "true_sequential": True,
                 "data_config": "wikitext"},
        "builder": {"type": "ModelBuilder", "precision": "int4"},
    },
    "engine": {"cache_dir": "cache", "output_dir": "models"},
}


def test_gptq_quantizer_translates_to_quantize_gptq(tmp_path):
    workflow, notes = translated(tmp_path, GPTQ_BUILDER)
    gptq, builder = workflow["steps"]
    assert gptq == {"name": "gptq", "type": "quantize", "model": "tiny-phi3", "algorithm": "gptq",
                    "bits": 4, "group_size": 64, "zero_point": True}
    assert builder["model"] == "@gptq"
    text = "\n".join(notes)
    assert "desc_act" in text and "data_config" in text  # not applied, and said so
    acting = copy.deepcopy(GPTQ_BUILDER)
    acting["passes"]["gptq"]["desc_act"] = True
    assert "desc_act" not in "\n".join(translated(tmp_path / "act", acting)[1])  # what it does
    assert "damp_percent" not in text and "true_sequential" not in text  # what phitune does


@pytest.mark.slow
def test_gptq_quantizer_runs_under_run_config(tmp_path):
    config = copy.deepcopy(GPTQ_BUILDER)
    config["passes"].pop("builder")
    result = phitune("run", "--config", write(tmp_path, config))
    assert result.code == 0, result.err[-3000:]
    out = tmp_path / "models" / "gptq"  # the last step, linked by name
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["meta"]["algorithm"] == "gptq" and qconfig["group_size"] == 64
