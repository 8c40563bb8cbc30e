"""`phitune finetune`: LoRA / QLoRA on a float or AWQ base, with a validated data pipeline."""

from __future__ import annotations

import click

from phitune import registry
from phitune.finetune.step import FinetuneOptions
from phitune.options import CONTEXT, click_options


@click.command(context_settings=CONTEXT)
@click_options(FinetuneOptions)
def finetune(**kwargs) -> None:
    """Train a LoRA adapter; writes OUTPUT/model (the base) and OUTPUT/adapter (PEFT).

    \b
      phitune finetune --method lora -m models/phi/awq --data_files data/travel.jsonl \\
        --data_name json --text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>" \\
        --max_steps 100 -o models/phi/ft
    """
    registry.run_publishing("finetune", kwargs)


command = finetune  # the name phitune.cli.main looks up for a registered step
