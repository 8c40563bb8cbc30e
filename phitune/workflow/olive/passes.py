"""The passes, in order, → phitune steps, each reading the previous one's output (`@name`):
LoRA/QLoRA → finetune, MergeAdapterWeights → that finetune's --merge, ModelBuilder → auto-opt,
AutoAWQQuantizer/GptqQuantizer → quantize; ExtractAdapters adds nothing.
"""

from __future__ import annotations

from phitune.workflow.olive.data import data_options
from phitune.workflow.olive.engine import apply_providers
from phitune.workflow.olive.tables import (AWQ_OPTIONS, BUILDER_OPTIONS, CALIBRATION_NOT_APPLIED,
                                           GPTQ_AS_PHITUNE, LORA_KEYS, PASSES, PRECISIONS,
                                           QLORA_AS_PHITUNE, TRAINING_ARGS)
from phitune.workflow.olive.translation import Translation


def passes(t: Translation, model: str, adapter: str | None, datasets: dict,
           engine: dict) -> None:
    passes = t.raw.get("passes")
    if not isinstance(passes, dict) or not passes:
        t.fail("passes", "is missing or empty", "add the passes to run, e.g. LoRA, "
               "MergeAdapterWeights, ModelBuilder")
    current, kind = model, "hf"          # what the next pass reads, and its kind
    last_ft: dict | None = None
    builders = []
    for name, spec in passes.items():
        path = f"passes.{name}"
        if not isinstance(spec, dict) or "type" not in spec:
            t.fail(path, "has no type", f"write {path}.type, e.g. LoRA")
        ptype = spec["type"]
        fields = t.fields(spec, path, skip=("type",))
        if ptype in ("LoRA", "QLoRA"):
            step = _finetune(t, name, ptype, fields, current, datasets)
            if adapter and kind == "hf" and current == model:
                t.note("input_model.adapter_path", "a LoRA pass trains a new adapter; "
                       "the input adapter is not applied")
            current, kind, last_ft = f"@{name}", "finetuned", step
        elif ptype == "MergeAdapterWeights":
            if kind != "finetuned" or last_ft is None:
                t.fail(path, "MergeAdapterWeights needs a LoRA or QLoRA pass before it",
                       "put it right after the LoRA pass")
            last_ft["merge"] = True
            t.note(path, f"MergeAdapterWeights is finetune --merge on step "
                   f"'{last_ft['name']}'; the next pass reads its merged/")
            for key, (_, kpath) in fields.items():
                t.note(kpath)
            current, kind = f"@{last_ft['name']}/merged", "hf"
        elif ptype == "ModelBuilder":
            step = _builder(t, name, fields, current, kind, adapter if current == model
                            else None)
            builders.append(step)
            current, kind = f"@{name}", "onnx"
        elif ptype == "ExtractAdapters":
            if kind != "onnx":
                t.fail(path, "ExtractAdapters needs a ModelBuilder pass before it",
                       "put it after ModelBuilder")
            for key, (value, kpath) in fields.items():
                if key == "make_inputs" and value is not False:
                    continue  # auto-opt's multi-LoRA inputs, adapter file beside the model
                t.note(kpath)
        elif ptype in ("AutoAWQQuantizer", "GptqQuantizer"):
            if kind != "hf":
                t.fail(path, f"{ptype} reads a float Hugging Face model, here "
                       f"it would read {kind} output", "put it before LoRA/ModelBuilder "
                       "or after MergeAdapterWeights")
            if ptype == "AutoAWQQuantizer":
                _awq(t, name, fields, current)
            else:
                _gptq(t, name, fields, current)
            current, kind = f"@{name}", "awq"
        else:
            t.fail(f"{path}.type", f"pass type '{ptype}' is not supported",
                   f"phitune runs {', '.join(PASSES)}")
    apply_providers(t, builders, engine["_eps"])


def _finetune(t: Translation, name: str, ptype: str, fields: dict, current: str,
              datasets: dict) -> dict:
    known = _finetune_options()
    step: dict = {"name": name, "type": "finetune", "model": current,
                  "method": "qlora" if ptype == "QLoRA" else "lora"}
    data = None
    for key, (value, kpath) in fields.items():
        if key == "train_data_config":
            data = data_options(t, value, kpath, datasets)
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
                    t.note(f"{kpath}.{k}")
        elif ptype == "QLoRA" and (key, value) in QLORA_AS_PHITUNE:
            continue
        elif key == "eval_data_config":
            t.note(kpath, "phitune holds eval records out of the training data "
                   "(eval_dataset_size); not applied")
        else:
            t.note(kpath)
    if data is None:
        t.fail(f"passes.{name}", f"{ptype} has no train_data_config",
               "name a data config: \"train_data_config\": \"<data_configs name>\"")
    max_len = data.pop("max_seq_len", None)
    if max_len is not None:
        step["max_seq_len"] = max_len
    step.update({k: v for k, v in data.items()})
    t.steps.append(step)
    return step


def _finetune_options() -> set[str]:
    """finetune's option names: a LoRA key or training arg becomes one only if finetune has it."""
    from phitune import options, registry
    return {f.name for f, _ in options.specs(registry.step("finetune").options())}


def _builder(t: Translation, name: str, fields: dict, current: str, kind: str,
             adapter: str | None) -> dict:
    step: dict = {"name": name, "type": "auto-opt", "model": current}
    precision = "int4"
    for key, (value, kpath) in fields.items():
        if key == "precision":
            if value not in PRECISIONS:
                t.fail(kpath, f"'{value}' is not supported", "use int4, fp16 or fp32")
            precision = value
        elif key in BUILDER_OPTIONS:
            step[BUILDER_OPTIONS[key]] = value
        elif key == "extra_options" and isinstance(value, dict):
            for k in value:
                t.note(f"{kpath}.{k}")
        else:
            t.note(kpath)
    step["precision"] = precision
    if kind == "finetuned":
        t.note(f"passes.{name}", "reads an unmerged LoRA: phitune keeps it as "
               "adapter_weights.onnx_adapter beside a multi-LoRA model (add "
               "MergeAdapterWeights before it to fold it into the weights)")
    if adapter:
        step["adapter_path"] = adapter
    t.steps.append(step)
    return step


def _awq(t: Translation, name: str, fields: dict, current: str) -> None:
    step: dict = {"name": name, "type": "quantize", "model": current, "algorithm": "awq"}
    for key, (value, kpath) in fields.items():
        if key in AWQ_OPTIONS:
            step[AWQ_OPTIONS[key]] = value
        elif key == "version" and str(value).lower() == "gemm":
            continue  # the layout phitune writes
        elif key == "data_config":
            t.note(kpath, CALIBRATION_NOT_APPLIED)
        else:
            t.note(kpath)
    t.steps.append(step)


def _gptq(t: Translation, name: str, fields: dict, current: str) -> None:
    step: dict = {"name": name, "type": "quantize", "model": current, "algorithm": "gptq"}
    for key, (value, kpath) in fields.items():
        if key in ("bits", "group_size"):
            step[key] = value
        elif key == "sym":
            step["zero_point"] = not value
        elif GPTQ_AS_PHITUNE.get(key, object()) == value:
            continue
        elif key == "desc_act":
            t.note(kpath, "phitune's GPTQ always rounds columns in act-order (static groups "
                   "every reader handles); not applied")
        elif key == "data_config":
            t.note(kpath, CALIBRATION_NOT_APPLIED)
        else:
            t.note(kpath)
    t.steps.append(step)
