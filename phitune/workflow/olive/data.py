"""A data config (HuggingfaceContainer over local files, either Olive layout) → finetune's data
options: data_name, data_files, text_cols, text_template, max_seq_len, packing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phitune.workflow.olive.tables import LOCAL_FILE_FORMATS, NO_EQUIVALENT
from phitune.workflow.olive.translation import Translation


def data_options(t: Translation, ref: Any, path: str, datasets: dict) -> dict:
    if isinstance(ref, dict):
        dc, base = ref, path
    else:
        if ref not in datasets:
            t.fail(path, f"names no data config '{ref}'",
                   f"data_configs has: {', '.join(map(str, datasets)) or 'none'}")
        index, dc = datasets[ref]
        base = f"data_configs[{ref}]"
    kind = dc.get("type", "HuggingfaceContainer")
    if kind != "HuggingfaceContainer":
        t.fail(f"{base}.type", f"'{kind}' is not supported",
               "use a HuggingfaceContainer over local json/jsonl/csv/parquet files")
    load, load_path, pre, pre_path = _data_blocks(t, dc, base)
    opts: dict = {}
    _load_options(t, load, load_path, opts)
    _pre_options(t, pre, pre_path, opts)
    if not opts.get("data_files") and not opts.get("data_name"):
        t.fail(base, "names no local data", "add load_dataset_config.params.data_files")
    return opts


def _data_blocks(t: Translation, dc: dict, base: str) -> tuple[dict, str, dict, str]:
    """A data config's loader and pre-processing parameters (and where they are), from
    either Olive layout; every other key is noted or refused."""
    load, load_path, pre, pre_path = {}, "", {}, ""
    for key, value in dc.items():
        kpath = f"{base}.{key}"
        if key in ("name", "type"):
            continue
        if key == "load_dataset_config":
            if value.get("type"):
                t.fail(f"{kpath}.type", f"the custom loader '{value['type']}' (a user "
                       "script) cannot run here", "load local files: data_name json and "
                       "data_files")
            load, load_path = value.get("params") or {}, f"{kpath}.params"
            for k in value:
                if k not in ("params", "type"):
                    t.note(f"{kpath}.{k}")
        elif key == "pre_process_data_config":
            pre, pre_path = value.get("params") or {}, f"{kpath}.params"
            for k in value:
                if k not in ("params", "type"):
                    t.note(f"{kpath}.{k}")
        elif key == "params_config":  # older Olive: one block, components' kwargs inside
            components = value.get("component_kwargs") or {}
            load = {k: v for k, v in value.items() if k != "component_kwargs"}
            load_path = kpath
            if "load_dataset" in components:
                for k in components["load_dataset"]:
                    t.note(f"{kpath}.component_kwargs.load_dataset.{k}")
            pre = components.get("pre_process_data") or {}
            pre_path = f"{kpath}.component_kwargs.pre_process_data"
            for k in components:
                if k not in ("load_dataset", "pre_process_data"):
                    t.note(f"{kpath}.component_kwargs.{k}")
        elif key == "components":
            for k, comp in (value or {}).items():
                if isinstance(comp, dict) and comp.get("type"):
                    t.fail(f"{kpath}.{k}.type", f"the custom component '{comp['type']}' "
                           "(a user script) cannot run here", "remove it")
        elif key in ("user_script", "script_dir"):
            t.note(kpath, "not needed without custom components; not applied")
        else:
            t.note(kpath)
    return load, load_path, pre, pre_path


def _load_options(t: Translation, load: dict, load_path: str, opts: dict) -> None:
    for key, value in load.items():
        kpath = f"{load_path}.{key}"
        if key == "data_name":
            if str(value) not in LOCAL_FILE_FORMATS and not Path(str(value)).exists():
                t.fail(kpath, f"'{value}' is a hub dataset: phitune trains on local "
                       "files", "download it, then use data_name json with data_files, "
                       "or a save_to_disk directory")
            opts["data_name"] = value
        elif key == "data_files":
            if isinstance(value, dict):
                t.fail(kpath, "is not a local path", "write data_files: FILE")
            opts["data_files"] = value
        elif key == "split":
            if value != "train":
                t.note(kpath, f"'{value}': phitune trains on every record of the files "
                       "(hold some out with eval_dataset_size); not applied")
        else:
            t.note(kpath)


def _pre_options(t: Translation, pre: dict, pre_path: str, opts: dict) -> None:
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
                t.note(kpath, f"'{value}' {NO_EQUIVALENT}")
        elif key == "dataset_type" and value == "corpus":
            continue
        elif key == "pad_to_max_len" and value is False:
            continue
        else:
            t.note(kpath)
