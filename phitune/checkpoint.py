"""One rule after (or before) every load: the checkpoint supplies every parameter of the model
its config describes, at the shape the model has. A parameter the checkpoint lacks would
otherwise keep its random initialisation — transformers' `from_pretrained` and a GGUF
conversion fill it in silently, and the model builder reads through the same loader — and
a model of random weights trains, quantizes and exports "successfully".

`check_supplied(dir, config, found)` compares the safetensors headers (names and shapes, no tensor data) with
the parameters of the config's model built on the meta device; an AWQ checkpoint's quantized
layers are checked as their qweight/qzeros/scales (AutoAWQ GEMM shapes). `check_loading_info`
does the same for a model transformers loaded itself (`output_loading_info=True`), where no
header is at hand (a .gguf file, .bin checkpoints). Both refuse in one line naming the first
offending tensors and how many there are.
"""

from __future__ import annotations

from pathlib import Path

from phitune.errors import InputError

_REDO = "re-download it, or re-run the phitune step that wrote it"
_SHOWN = 3


def expected_parameters(directory: Path | str) -> tuple[dict[str, tuple], dict[str, set]]:
    """(name → shape of every parameter and persistent buffer, name → names tied to it) of
    the model `directory`'s config describes, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model's config ({str(exc).strip()[:160]})",
                         str(directory), "check that the directory holds a complete checkpoint"
                         ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the float model's shapes; AWQ's are derived below
    with torch.device("meta"):  # shapes only; no accelerate import (seconds) for that
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    by_tensor: dict[int, set] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), set()).add(name)
    tied = {name: names - {name} for names in by_tensor.values() for name in names}
    return shapes, tied


def check_supplied(directory: Path | str, config: dict, found: dict[str, tuple]) -> None:
    """Refuse a safetensors checkpoint that lacks a parameter of its model or holds one at
    another shape; `found` is name → shape from its safetensors headers
    (`models.header_shapes`). A dir without safetensors (.bin) is checked when it loads instead."""
    if not found:
        return
    expected, tied = expected_parameters(directory)
    group = (config.get("quantization_config") or {}).get("group_size") or 0
    problems: list[str] = []
    for name, shape in expected.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and f"{module}.qweight" in found and len(shape) == 2:
            problems += _awq_problems(module, shape, group, found)
        elif name not in found:
            if not any(other in found for other in tied.get(name, ())):
                problems.append(f"{name} (missing)")
        elif found[name] != shape:
            problems.append(f"{name} ({_shape(found[name])}, the model has {_shape(shape)})")
    refuse(problems, len(expected), directory)


def _awq_problems(module: str, shape: tuple, group: int, found: dict) -> list[str]:
    out_f, in_f = shape
    groups = in_f // group if group else None
    want = {"qweight": (in_f, out_f // 8), "qzeros": (groups, out_f // 8),
            "scales": (groups, out_f)}
    problems = []
    for leaf, need in want.items():
        got = found.get(f"{module}.{leaf}")
        if got is None:
            problems.append(f"{module}.{leaf} (missing)")
        elif need[0] is None and got[1:] != need[1:] or need[0] is not None and got != need:
            problems.append(f"{module}.{leaf} ({_shape(got)}, the model needs "
                            f"{_shape(tuple(n if n is not None else got[0] for n in need))})")
    return problems


def check_loading_info(info: dict, total: int, where: Path | str) -> None:
    """The same rule for a model transformers loaded (`output_loading_info=True`)."""
    problems = [f"{name} (missing)" for name in sorted(info.get("missing_keys") or ())]
    problems += [f"{item[0]} ({_shape(item[1])}, the model has {_shape(item[2])})"
                 if isinstance(item, (tuple, list)) and len(item) == 3 else f"{item} (shape)"
                 for item in info.get("mismatched_keys") or ()]
    refuse(problems, total, where)


def refuse(problems: list[str], total: int, where: Path | str) -> None:
    if not problems:
        return
    more = f" and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise InputError(f"the checkpoint does not supply {len(problems)} of the model's {total} "
                     f"tensors: {', '.join(problems[:_SHOWN])}{more}", str(where), _REDO)


def _shape(shape) -> str:
    return "×".join(map(str, shape)) or "scalar"
