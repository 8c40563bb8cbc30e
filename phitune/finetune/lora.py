"""LoRA configuration: which modules, what rank, and wrapping a base with PEFT."""

from __future__ import annotations

import warnings

from phitune.architectures import BY_MODEL_TYPE
from phitune.errors import OptionError


def target_modules(model_type: str, requested: str | None, model) -> list[str] | str:
    """The user's comma list, checked against the model; else the family default; else every
    linear but the LM head (PEFT's 'all-linear'). Family defaults: phitune/architectures.py."""
    record = BY_MODEL_TYPE.get(model_type)
    default = list(record.lora_targets) if record else None
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise OptionError(f"--target_modules names {', '.join(missing)}, which the model does "
                              f"not have", "--target_modules",
                              f"use module names such as {', '.join(default or ['o_proj'])}")
        return names
    return default or "all-linear"


def wrap(model, r: int, alpha: float, dropout: float, targets):
    from peft import LoraConfig, get_peft_model
    if r < 1:
        raise OptionError(f"--lora_r must be ≥ 1 (got {r})", "--lora_r", "use e.g. 16 or 64")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    from phitune.finetune.dropout import use_lora_dropout
    from phitune.finetune.packed_awq import has_packed, register_with_peft
    if not has_packed(model):
        model = get_peft_model(model, config)
    else:
        register_with_peft(config)  # not saved in adapter_config.json: the adapter is plain LoRA
        with warnings.catch_warnings():  # PEFT warns about any layer type it does not ship
            warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
            model = get_peft_model(model, config)
    use_lora_dropout(model)
    return model
