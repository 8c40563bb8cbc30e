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
                                    zero point); desc_act (act-order) is noted, not applied:
                                    phitune's GPTQ rounds columns in order
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
from typing import Any

from phitune.errors import OptionError
from phitune.export.options import PROVIDERS  # Olive names the execution providers as auto-opt does

PASSES = ("AutoAWQQuantizer", "GptqQuantizer", "LoRA", "QLoRA", "MergeAdapterWeights", "ModelBuilder",
          "ExtractAdapters")
MODEL_TYPES = ("HfModel", "HFModel", "PyTorchModel", "PytorchModel")
AZURE_TYPES = ("AzureML", "azureml_model", "azureml_registry_model", "azureml_datastore",
               "azureml_job_output")
NOT_LOCAL_SYSTEMS = ("AzureML", "Docker", "DockerSystem", "PythonEnvironment", "IsolatedORT")
LOCAL_FILE_FORMATS = ("json", "csv", "parquet")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
TRAINING_ARGS = ("max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "warmup_steps", "max_grad_norm", "seed",
                 "gradient_checkpointing", "save_steps", "eval_steps")
ENGINE_KEYS = ("cache_dir", "output_dir", "host", "target", "execution_providers",
               "search_strategy", "log_severity_level", "ort_log_severity_level",
               "ort_py_log_severity_level", "log_to_file", "evaluator", "evaluate_input_model",
               "clean_cache", "clean_evaluation_cache", "packaging_config", "output_name",
               "plot_pareto_frontier", "no_artifacts")
NO_EQUIVALENT = "no phitune equivalent, not applied"


def translate(raw: dict, source: Path) -> tuple[dict, list[str]]:
    """Returns (a phitune workflow mapping, note lines naming the keys not applied)."""
    _refuse_remote(raw, source)
    return _Translator(raw, source).run()


# ---------------------------------------------------------------- what cannot run here

def _refuse_remote(raw: dict, source: Path) -> None:
    """One line naming every key that needs Azure ML or another system than this machine."""
    found: list[str] = []
    fixes: list[str] = []
    systems = raw.get("systems") if isinstance(raw.get("systems"), dict) else {}
    remote = set()
    for name, system in systems.items():
        kind = system.get("type") if isinstance(system, dict) else None
        if kind in NOT_LOCAL_SYSTEMS:
            remote.add(name)
            found.append(f"systems.{name} (type {kind})")
            fixes.append(f"remove or replace `systems.{name}`")
    engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
    for key in ("host", "target"):
        for where, value in ((f"engine.{key}", engine.get(key)), (key, raw.get(key))):
            if isinstance(value, str) and value in remote:
                found.append(f"{where} '{value}'")
    host = raw.get("workflow_host")
    if host is not None and not (isinstance(host, str) and host in systems and host not in remote):
        found.append("workflow_host")
        fixes.append("remove `workflow_host`")
    if "azureml_client" in raw:
        found.append("azureml_client")
        fixes.append("remove `azureml_client`")
    for path, kind in _azure_resources(raw, ""):
        if not path.startswith("systems."):
            found.append(f"{path} (type {kind})")
            fixes.append("use a local directory or hub id as model_path" if "model" in path
                         else "point data_files at a local file" if "data" in path
                         else f"replace `{path}` with a local path")
    if found:
        fixes = list(dict.fromkeys(fixes)) or ["remove them"]
        raise OptionError(f"this Olive config needs Azure ML or another remote system: "
                          f"{', '.join(dict.fromkeys(found))}", str(source),
                          "phitune runs on the local machine; " + "; ".join(fixes))


def _azure_resources(node: Any, path: str):
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and kind in AZURE_TYPES:
            yield path, kind
            return
        for key, value in node.items():
            yield from _azure_resources(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            name = value.get("name") if isinstance(value, dict) else None
            yield from _azure_resources(value, f"{path}[{name if name else i}]")


# ---------------------------------------------------------------- the translation

class _Translator:
    def __init__(self, raw: dict, source: Path):
        self.raw = raw
        self.source = source
        self.notes: list[tuple[str, str]] = []   # (key path, why)
        self.steps: list[dict] = []

    # ---- helpers
    def note(self, path: str, why: str = NO_EQUIVALENT) -> None:
        self.notes.append((path, why))

    def fail(self, path: str, what: str, fix: str) -> None:
        raise OptionError(f"{path}: {what}", str(self.source), fix)

    def run(self) -> tuple[dict, list[str]]:
        raw = self.raw
        engine = self._engine()
        model, adapter = self._input_model()
        datasets = {dc.get("name"): (i, dc) for i, dc in enumerate(raw.get("data_configs") or [])
                    if isinstance(dc, dict)}
        if raw.get("data_configs") is not None and not isinstance(raw.get("data_configs"), list):
            self.fail("data_configs", "is not a list", "write data_configs as a list of mappings")
        self._passes(model, adapter, datasets, engine)
        for key in raw:
            if key in ("input_model", "data_configs", "passes", "engine", "systems", "$schema",
                       "workflow_host") or key in ENGINE_KEYS:
                continue
            if key == "pass_flows":
                self.fail("pass_flows", "is not supported", "list the passes to run, in order, "
                          "under `passes`")
            if key in ("evaluators", "auto_optimizer_config", "workflow_id"):
                self.note(key)
            else:
                self.note(key, "unknown key, not applied")
        workflow = {"steps": self.steps}
        if engine.get("output_dir"):
            workflow["output_dir"] = str(engine["output_dir"])
        if engine.get("cache_dir"):
            workflow["cache_dir"] = str(engine["cache_dir"])
        return workflow, self._note_lines()

    def _note_lines(self) -> list[str]:
        """Notes grouped by parent key and reason: `passes.lora.training_args: a, b — why`."""
        groups: dict[tuple[str, str], list[str]] = {}
        for path, why in self.notes:
            parent, _, leaf = path.rpartition(".")
            groups.setdefault((parent, why), []).append(leaf)
        return [f"{parent}: {', '.join(leaves)} — {why}" if len(leaves) > 1 and parent
                else f"{parent + '.' if parent else ''}{leaves[0]} — {why}"
                for (parent, why), leaves in groups.items()]

    # ---- engine and systems
    def _engine(self) -> dict:
        raw = self.raw
        engine = raw.get("engine") or {}
        if not isinstance(engine, dict):
            self.fail("engine", "is not a mapping", "write engine as a mapping")
        merged = {k: raw[k] for k in ENGINE_KEYS if k in raw}  # newer Olive: at the top level
        merged.update(engine)
        prefix = {k: ("engine" if k in engine else "") for k in merged}
        for key, value in merged.items():
            path = f"{prefix[key]}.{key}" if prefix[key] else key
            if key in ("cache_dir", "output_dir", "execution_providers", "host", "target"):
                continue
            if key == "search_strategy" and not value:
                continue  # no search: what phitune does
            if key in ("evaluator", "evaluate_input_model"):
                self.note(path, "not applied (add a phitune eval step to measure)")
            elif key in ENGINE_KEYS:
                self.note(path)
            else:
                self.note(path, "unknown key, not applied")
        merged["_eps"] = self._providers(merged, prefix)
        return merged

    def _providers(self, engine: dict, prefix: dict) -> list[tuple[str, str]]:
        """[(execution provider, key path)] from the engine, or the host/target system."""
        eps = engine.get("execution_providers")
        if eps:
            path = f"{prefix['execution_providers'] + '.' if prefix['execution_providers'] else ''}" \
                   "execution_providers"
            eps = [eps] if isinstance(eps, str) else eps
            return [(str(ep), path) for ep in eps]
        systems = self.raw.get("systems") or {}
        found = []
        for name in dict.fromkeys([engine.get("target"), engine.get("host")]):
            system = systems.get(name) if isinstance(name, str) else None
            if not isinstance(system, dict):
                continue
            config = {**(system.get("config") or {}), **{k: v for k, v in system.items()
                                                        if k not in ("type", "config")}}
            base = f"systems.{name}" + (".config" if "config" in system else "")
            for key in config:
                if key != "accelerators":
                    self.note(f"{base}.{key}")
            for i, acc in enumerate(config.get("accelerators") or []):
                acc = {"device": acc} if isinstance(acc, str) else acc
                for ep in acc.get("execution_providers") or []:
                    found.append((str(ep), f"{base}.accelerators[{i}].execution_providers"))
                if not acc.get("execution_providers") and acc.get("device"):
                    device = str(acc["device"]).lower()
                    ep = "CUDAExecutionProvider" if device == "gpu" else "CPUExecutionProvider"
                    found.append((ep, f"{base}.accelerators[{i}].device"))
        return found

    # ---- input model
    def _input_model(self) -> tuple[str, str | None]:
        im = self.raw.get("input_model")
        if not isinstance(im, dict):
            self.fail("input_model", "is missing or not a mapping",
                      'add "input_model": {"type": "HfModel", "model_path": "tiny-phi3"}')
        kind = im.get("type")
        if kind not in MODEL_TYPES:
            self.fail("input_model.type", f"'{kind}' is not supported: phitune starts from a "
                      "Hugging Face checkpoint", "use HfModel (or PyTorchModel with hf_config)")
        fields = self._fields(im, "input_model", skip=("type",))
        model = None
        adapter = None
        for key, (value, path) in fields.items():
            if key == "model_path":
                if isinstance(value, dict):
                    inner = value.get("config", value)
                    value = inner.get("path") if isinstance(inner, dict) else None
                    if not isinstance(value, str):
                        self.fail(path, "names no local path", "write model_path: DIR or a hub id")
                model = value
            elif key == "hf_config" and isinstance(value, dict):
                for k, v in value.items():
                    if k == "model_name":
                        model = model or v
                    elif k in ("from_pretrained_args", "model_loading_args"):
                        self._load_args(v, f"{path}.{k}")
                    elif k == "task":
                        self._task(v, f"{path}.task")
                    else:
                        self.note(f"{path}.{k}")
            elif key in ("load_kwargs", "model_loading_args", "from_pretrained_args"):
                self._load_args(value, path)
            elif key == "task":
                self._task(value, path)
            elif key == "adapter_path":
                adapter = value
            elif key in ("model_script", "script_dir", "io_config", "dummy_inputs_func",
                         "model_file_format", "model_attributes", "model_loader"):
                self.note(path, "not needed: phitune reads the checkpoint itself; not applied")
            else:
                self.note(path, "unknown key, not applied")
        if not model:
            self.fail("input_model", "names no model (model_path or hf_config.model_name)",
                      'add "model_path": "tiny-phi3" (a directory, a hub id or the embedded model)')
        return str(model), adapter

    def _fields(self, node: dict, path: str, skip: tuple = ()) -> dict[str, tuple[Any, str]]:
        """Olive's `config: {...}` wrapper (older files) and flat fields (newer) alike."""
        out = {}
        config = node.get("config")
        if isinstance(config, dict):
            for k, v in config.items():
                out[k] = (v, f"{path}.config.{k}")
        for k, v in node.items():
            if k not in skip and k != "config":
                out[k] = (v, f"{path}.{k}")
        return out

    def _load_args(self, args: Any, path: str) -> None:
        if not isinstance(args, dict):
            return self.note(path)
        for k in args:
            if k == "trust_remote_code":
                self.note(f"{path}.{k}", "not needed: phitune loads Phi-3 and Llama-style models "
                          "with transformers' own code; not applied")
            else:
                self.note(f"{path}.{k}")

    def _task(self, task: Any, path: str) -> None:
        if task not in ("text-generation", "text-generation-with-past", "causal-lm"):
            self.note(path, f"'{task}': phitune builds causal LMs (text-generation); not applied")

    # ---- data
    def _data(self, ref: Any, path: str, datasets: dict) -> dict:
        if isinstance(ref, dict):
            dc, base = ref, path
        else:
            if ref not in datasets:
                self.fail(path, f"names no data config '{ref}'",
                          f"data_configs has: {', '.join(map(str, datasets)) or 'none'}")
            index, dc = datasets[ref]
            base = f"data_configs[{ref}]"
        kind = dc.get("type", "HuggingfaceContainer")
        if kind != "HuggingfaceContainer":
            self.fail(f"{base}.type", f"'{kind}' is not supported",
                      "use a HuggingfaceContainer over local json/jsonl/csv/parquet files")
        load, load_path, pre, pre_path = self._data_blocks(dc, base)
        opts: dict = {}
        self._load_options(load, load_path, opts)
        self._pre_options(pre, pre_path, opts)
        if not opts.get("data_files") and not opts.get("data_name"):
            self.fail(base, "names no local data", "add load_dataset_config.params.data_files")
        return opts

    def _data_blocks(self, dc: dict, base: str) -> tuple[dict, str, dict, str]:
        """A data config's loader and pre-processing parameters (and where they are), from
        either Olive layout; every other key is noted or refused."""
        load, load_path, pre, pre_path = {}, "", {}, ""
        for key, value in dc.items():
            kpath = f"{base}.{key}"
            if key in ("name", "type"):
                continue
            if key == "load_dataset_config":
                if value.get("type"):
                    self.fail(f"{kpath}.type", f"the custom loader '{value['type']}' (a user "
                              "script) cannot run here", "load local files: data_name json and "
                              "data_files")
                load, load_path = value.get("params") or {}, f"{kpath}.params"
                for k in value:
                    if k not in ("params", "type"):
                        self.note(f"{kpath}.{k}")
            elif key == "pre_process_data_config":
                pre, pre_path = value.get("params") or {}, f"{kpath}.params"
                for k in value:
                    if k not in ("params", "type"):
                        self.note(f"{kpath}.{k}")
            elif key == "params_config":  # older Olive: one block, components' kwargs inside
                components = value.get("component_kwargs") or {}
                load = {k: v for k, v in value.items() if k != "component_kwargs"}
                load_path = kpath
                if "load_dataset" in components:
                    for k in components["load_dataset"]:
                        self.note(f"{kpath}.component_kwargs.load_dataset.{k}")
                pre = components.get("pre_process_data") or {}
                pre_path = f"{kpath}.component_kwargs.pre_process_data"
                for k in components:
                    if k not in ("load_dataset", "pre_process_data"):
                        self.note(f"{kpath}.component_kwargs.{k}")
            elif key == "components":
                for k, comp in (value or {}).items():
                    if isinstance(comp, dict) and comp.get("type"):
                        self.fail(f"{kpath}.{k}.type", f"the custom component '{comp['type']}' "
                                  "(a user script) cannot run here", "remove it")
            elif key in ("user_script", "script_dir"):
                self.note(kpath, "not needed without custom components; not applied")
            else:
                self.note(kpath)
        return load, load_path, pre, pre_path

    def _load_options(self, load: dict, load_path: str, opts: dict) -> None:
        for key, value in load.items():
            kpath = f"{load_path}.{key}"
            if key == "data_name":
                if str(value) not in LOCAL_FILE_FORMATS and not Path(str(value)).exists():
                    self.fail(kpath, f"'{value}' is a hub dataset: phitune trains on local "
                              "files", "download it, then use data_name json with data_files, "
                              "or a save_to_disk directory")
                opts["data_name"] = value
            elif key == "data_files":
                if isinstance(value, dict):
                    self.fail(kpath, "is not a local path", "write data_files: FILE")
                opts["data_files"] = value
            elif key == "split":
                if value != "train":
                    self.note(kpath, f"'{value}': phitune trains on every record of the files "
                              "(hold some out with eval_dataset_size); not applied")
            else:
                self.note(kpath)

    def _pre_options(self, pre: dict, pre_path: str, opts: dict) -> None:
        for key, value in pre.items():
            kpath = f"{pre_path}.{key}"
            if key in ("text_cols", "text_template"):
                opts[key] = value
            elif key == "source_max_len":
                opts["max_seq_len"] = value
            elif key == "corpus_strategy":
                if value == "line-by-line":
                    opts["packing"] = False
                elif value != "join":
                    self.note(kpath, f"'{value}' {NO_EQUIVALENT}")
            elif key == "dataset_type" and value == "corpus":
                continue
            elif key == "pad_to_max_len" and value is False:
                continue
            else:
                self.note(kpath)

    # ---- passes
    def _passes(self, model: str, adapter: str | None, datasets: dict, engine: dict) -> None:
        passes = self.raw.get("passes")
        if not isinstance(passes, dict) or not passes:
            self.fail("passes", "is missing or empty", "add the passes to run, e.g. LoRA, "
                      "MergeAdapterWeights, ModelBuilder")
        current, kind = model, "hf"          # what the next pass reads, and its kind
        last_ft: dict | None = None
        builders = []
        for name, spec in passes.items():
            path = f"passes.{name}"
            if not isinstance(spec, dict) or "type" not in spec:
                self.fail(path, "has no type", f"write {path}.type, e.g. LoRA")
            ptype = spec["type"]
            fields = self._fields(spec, path, skip=("type",))
            if ptype in ("LoRA", "QLoRA"):
                step = self._finetune(name, ptype, fields, current, datasets)
                if adapter and kind == "hf" and current == model:
                    self.note("input_model.adapter_path", "a LoRA pass trains a new adapter; "
                              "the input adapter is not applied")
                current, kind, last_ft = f"@{name}", "finetuned", step
            elif ptype == "MergeAdapterWeights":
                if kind != "finetuned" or last_ft is None:
                    self.fail(path, "MergeAdapterWeights needs a LoRA or QLoRA pass before it",
                              "put it right after the LoRA pass")
                last_ft["merge"] = True
                self.note(path, f"MergeAdapterWeights is finetune --merge on step "
                          f"'{last_ft['name']}'; the next pass reads its merged/")
                for key, (_, kpath) in fields.items():
                    self.note(kpath)
                current, kind = f"@{last_ft['name']}/merged", "hf"
            elif ptype == "ModelBuilder":
                step = self._builder(name, fields, current, kind, adapter if current == model
                                     else None)
                builders.append(step)
                current, kind = f"@{name}", "onnx"
            elif ptype == "ExtractAdapters":
                if kind != "onnx":
                    self.fail(path, "ExtractAdapters needs a ModelBuilder pass before it",
                              "put it after ModelBuilder")
                for key, (value, kpath) in fields.items():
                    if key == "make_inputs" and value is not False:
                        continue  # auto-opt's multi-LoRA inputs, adapter file beside the model
                    self.note(kpath)
            elif ptype in ("AutoAWQQuantizer", "GptqQuantizer"):
                if kind != "hf":
                    self.fail(path, f"{ptype} reads a float Hugging Face model, here "
                              f"it would read {kind} output", "put it before LoRA/ModelBuilder "
                              "or after MergeAdapterWeights")
                if ptype == "AutoAWQQuantizer":
                    self._awq(name, fields, current)
                else:
                    self._gptq(name, fields, current)
                current, kind = f"@{name}", "awq"
            else:
                self.fail(f"{path}.type", f"pass type '{ptype}' is not supported",
                          f"phitune runs {', '.join(PASSES)}")
        self._apply_providers(builders, engine["_eps"])

    def _finetune(self, name: str, ptype: str, fields: dict, current: str,
                  datasets: dict) -> dict:
        from phitune import options, registry
        known = {f.name for f, _ in options.specs(registry.step("finetune").options())}
        step: dict = {"name": name, "type": "finetune", "model": current,
                      "method": "qlora" if ptype == "QLoRA" else "lora"}
        data = None
        for key, (value, kpath) in fields.items():
            if key == "train_data_config":
                data = self._data(value, kpath, datasets)
            elif key in LORA_KEYS and key in known:
                step[key] = value
            elif key == "eval_dataset_size":
                if isinstance(value, float) and 0 < value < 1:
                    step["eval_split"] = value
                else:
                    step["eval_dataset_size"] = int(value)
            elif key == "training_args" and isinstance(value, dict):
                for k, v in value.items():
                    if k in TRAINING_ARGS and k in known:
                        step[k] = v
                    elif k == "report_to" and v in ("tensorboard", ["tensorboard"]):
                        step["report_to"] = "tensorboard"  # event files in the step's runs/
                    else:
                        self.note(f"{kpath}.{k}")
            elif ptype == "QLoRA" and (key, value) in (("quant_type", "nf4"), ("double_quant", True)):
                continue  # what phitune's qlora does
            elif key == "eval_data_config":
                self.note(kpath, "phitune holds eval records out of the training data "
                          "(eval_dataset_size); not applied")
            else:
                self.note(kpath)
        if data is None:
            self.fail(f"passes.{name}", f"{ptype} has no train_data_config",
                      "name a data config: \"train_data_config\": \"<data_configs name>\"")
        max_len = data.pop("max_seq_len", None)
        if max_len is not None:
            step["max_seq_len"] = max_len
        step.update({k: v for k, v in data.items()})
        self.steps.append(step)
        return step

    def _builder(self, name: str, fields: dict, current: str, kind: str,
                 adapter: str | None) -> dict:
        step: dict = {"name": name, "type": "auto-opt", "model": current}
        precision = "int4"
        for key, (value, kpath) in fields.items():
            if key == "precision":
                if value not in ("int4", "fp16", "fp32"):
                    self.fail(kpath, f"'{value}' is not supported", "use int4, fp16 or fp32")
                precision = value
            elif key == "int4_block_size":
                step["block_size"] = value
            elif key == "int4_accuracy_level":
                step["accuracy_level"] = value
            elif key == "extra_options" and isinstance(value, dict):
                for k in value:
                    self.note(f"{kpath}.{k}")
            else:
                self.note(kpath)
        step["precision"] = precision
        if kind == "finetuned":
            self.note(f"passes.{name}", "reads an unmerged LoRA: phitune keeps it as "
                      "adapter_weights.onnx_adapter beside a multi-LoRA model (add "
                      "MergeAdapterWeights before it to fold it into the weights)")
        if adapter:
            step["adapter_path"] = adapter
        self.steps.append(step)
        return step

    def _awq(self, name: str, fields: dict, current: str) -> None:
        step: dict = {"name": name, "type": "quantize", "model": current, "algorithm": "awq"}
        names = {"bits": "bits", "w_bit": "bits", "group_size": "group_size",
                 "q_group_size": "group_size", "zero_point": "zero_point"}
        for key, (value, kpath) in fields.items():
            if key in names:
                step[names[key]] = value
            elif key == "version" and str(value).lower() == "gemm":
                continue  # the layout phitune writes
            elif key == "data_config":
                self.note(kpath, self.CALIBRATION_NOT_APPLIED)
            else:
                self.note(kpath)
        self.steps.append(step)

    # An Olive quantizer's data_config, for AWQ and GPTQ alike
    CALIBRATION_NOT_APPLIED = ("phitune calibrates on its shipped text (calib_data in a phitune "
                               "workflow); not applied")
    # GptqQuantizer settings that are what phitune's GPTQ does anyway (not noted as dropped)
    GPTQ_AS_PHITUNE = {"damp_percent": 0.01, "true_sequential": True, "static_groups": False,
                       "desc_act": False, "lm_head": False}

    def _gptq(self, name: str, fields: dict, current: str) -> None:
        step: dict = {"name": name, "type": "quantize", "model": current, "algorithm": "gptq"}
        for key, (value, kpath) in fields.items():
            if key in ("bits", "group_size"):
                step[key] = value
            elif key == "sym":
                step["zero_point"] = not value
            elif self.GPTQ_AS_PHITUNE.get(key, object()) == value:
                continue
            elif key == "desc_act":
                self.note(kpath, "phitune's GPTQ rounds columns in order (no act-order: static "
                          "groups every reader handles); not applied")
            elif key == "data_config":
                self.note(kpath, self.CALIBRATION_NOT_APPLIED)
            else:
                self.note(kpath)
        self.steps.append(step)

    def _apply_providers(self, builders: list[dict], eps: list[tuple[str, str]]) -> None:
        if not eps:
            return
        if not builders:
            for _, path in dict.fromkeys(eps):
                self.note(path, "no ModelBuilder pass to apply it to; not applied")
            return
        ep, path = eps[0]
        if ep not in PROVIDERS:
            self.fail(path, f"{ep} is not supported", "phitune auto-opt targets "
                      f"{' or '.join(PROVIDERS)}")
        for step in builders:
            step["device"] = PROVIDERS[ep]
            step["provider"] = ep
        for other, opath in eps[1:]:
            self.note(opath, f"{other}: phitune builds for the first provider ({ep}); not applied")
