"""`phitune finetune`: LoRA / QLoRA on a float or AWQ base, with a validated data pipeline."""

from __future__ import annotations

from phitune import options, registry


@options.command("finetune", registry.step("finetune").options)
def finetune(**kwargs) -> None:
    """Train a LoRA adapter; writes OUTPUT/model (the base) and OUTPUT/adapter (PEFT).

    \b
      phitune finetune --method lora -m models/phi/awq --data_files data/travel.jsonl \\
        --data_name json --text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>" \\
        --max_steps 100 -o models/phi/ft
    """
    registry.run_publishing("finetune", kwargs)


command = finetune  # the name phitune.cli.main looks up for a registered step
