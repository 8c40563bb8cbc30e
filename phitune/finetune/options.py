"""`phitune finetune`'s options, declared once (see phitune/options.py).

Apart from the step so that `phitune finetune --help` reads them without importing what the
step needs to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from phitune import options as O
from phitune.data.records import RECORD_FIELDS, RecordOptions
from phitune.finetune import report as reporting


@dataclass(kw_only=True)
class FinetuneOptions(RecordOptions):
    ORDER: ClassVar[tuple] = (
        "method", "model", "output", *RECORD_FIELDS[:8], "packing", "lora_r", "lora_alpha",
        "lora_dropout", "target_modules", "merge", "max_steps", "num_train_epochs",
        "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
        "warmup_steps", "max_grad_norm")
    HELP: ClassVar[dict] = {
        "data_files": "Training data (json, jsonl, csv, parquet); repeat or comma-separate for "
                      "several.",
        "train_on_prompt": "Also train on the prompt part.",
        "eval_split": "Fraction of records held out for eval loss.",
        "eval_dataset_size": "Number of records held out for eval loss."}

    model: str = O.model("Base model: a float or phitune AWQ checkpoint dir, a .gguf file, a hub "
                         "id, or 'tiny-phi3' / 'smollm2-135m-instruct'.")
    output: str = O.output()
    method: str = O.option("lora", "lora: on a float or AWQ base; qlora: a float base quantized "
                           "to nf4 as it loads (bitsandbytes; CPU or GPU).",
                           choices=("lora", "qlora"))
    packing: bool = O.option(True, "Pack short records into full rows (no compute spent on "
                             "padding).", negatable=True)
    lora_r: int = O.option(64, min=1)
    lora_alpha: float = O.option(16.0, above=0)
    lora_dropout: float = O.option(0.05, min=0, below=1)
    target_modules: str | None = O.option(None, "Modules to adapt (default: every projection).",
                                          metavar="A,B", type=str)
    merge: bool = O.option(False, "Also write merged/: base + adapter in float.", flag=True)
    max_steps: int = O.option(-1, "Optimizer steps (wins over epochs; -1: train "
                               "--num_train_epochs).", min=1, also=(-1,))
    num_train_epochs: float = O.option(1.0, above=0)
    learning_rate: float = O.option(2e-4, above=0)
    per_device_train_batch_size: int = O.option(
        4, "Rows per optimizer step and device. CPU runs them a row at a time (rows under 512 "
        "tokens: up to 512 tokens a pass): same gradient, less memory.", min=1)
    gradient_accumulation_steps: int = O.option(1, min=1)
    warmup_steps: int = O.option(0, min=0)
    max_grad_norm: float = O.option(1.0, min=0)  # 0: no clipping
    gradient_checkpointing: bool | None = O.option(
        None, "Recompute activations in backward: less memory, more time (default: on when a "
        "pass's activations would take over half the free memory; never below 64M parameters).",
        negatable=True)
    compile: bool | None = O.compile("the decoder layers: fused elementwise kernels, a slower "
                                     "first step, more memory", "64M",
                                     ", unless the base is kept 4-bit")
    base_weights: str = O.option(
        "auto", "How an AWQ base is held: int4 (packed, as on disk; each weight dequantized "
        "while its matmul runs: ~4x less memory) or float (dequantized once at load: faster "
        "passes, 4x the memory); auto: float when that base takes at most 1 GB (a small model "
        "is overhead-bound, not memory-bound), else int4. The same function either way.",
        choices=("auto", "int4", "float"))
    optim_state_dtype: str = O.option(
        "float32", "AdamW's moment estimates: bfloat16 halves the optimizer's memory; the update "
        "is still computed in fp32.",
        choices=("float32", "bfloat16"))
    dtype: str = O.dtype("Frozen base dtype (LoRA stays fp32, matmuls autocast); auto: fp32 "
                         "below 64M parameters (an AWQ base counts as float), else bf16 on CUDA "
                         "and bf16-capable CPUs.")
    save_steps: int = O.option(50, "Checkpoint every N steps (and on Ctrl-C) for --resume.",
                               min=1)
    resume: bool = O.option(False, "Continue an interrupted run from its last checkpoint.",
                            flag=True)
    eval_steps: int = O.option(0, "Also measure the eval loss every N steps (default 0: before "
                               "and after training only).", min=0)
    report_to: str = O.option("none", "tensorboard: also write the loss curves as event files "
                              "in OUTPUT/runs (live beside the resume checkpoint while training; "
                              f"needs {reporting.INSTALL}). The manifest keeps them either way.",
                              choices=reporting.REPORTERS)
    device: str = O.device()
    force: bool = O.force()
    extra: dict = field(default_factory=dict)
