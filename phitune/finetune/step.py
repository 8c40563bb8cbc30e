"""`phitune finetune` as a library call: validate data, load the base, train LoRA, publish
`D/model` (a link to the base) and `D/adapter` (a standard PEFT adapter)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from phitune import options as O
from phitune import hidden, policy, registry, sequence_start
from phitune import ui
from phitune.artifacts import FINETUNE_ADAPTER, Output, content_digest, resolve_model
from phitune.data.records import split_files
from phitune.errors import Interrupted, OptionError
from phitune.finetune.options import FinetuneOptions
from phitune.measure import Stopwatch, return_large_frees_to_os


def _check(opts: FinetuneOptions) -> None:
    if opts.method not in ("lora", "qlora"):
        raise OptionError(f"unknown --method {opts.method}", "--method", "use lora or qlora")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps"):
        if getattr(opts, name) < 1:
            raise OptionError(f"--{name} must be ≥ 1", f"--{name}", "pass a positive integer")
    if opts.learning_rate <= 0:
        raise OptionError("--learning_rate must be positive", "--learning_rate", "e.g. 2e-4")
    if opts.max_steps == 0 or opts.max_steps < -1:
        raise OptionError(f"--max_steps {opts.max_steps} trains nothing", "--max_steps",
                          "pass a positive number of steps, or -1 (the default) to train "
                          "--num_train_epochs")
    if opts.max_steps <= 0 and opts.num_train_epochs <= 0:
        raise OptionError("nothing to train: --max_steps and --num_train_epochs are both ≤ 0",
                          "--max_steps", "pass --max_steps N or --num_train_epochs N")
    if not 0 <= opts.lora_dropout < 1:
        raise OptionError("--lora_dropout must be in [0, 1)", "--lora_dropout", "e.g. 0.05")


def run(opts: FinetuneOptions) -> tuple[dict, bool]:
    """Fine-tune; returns (manifest, was_up_to_date). Under torchrun every rank trains and
    rank 0 alone writes the output."""
    from phitune import data
    opts = replace(opts, data_files=split_files(opts.data_files))
    _check(opts)
    O.validate(opts)  # declared ranges and choices, before any data or model loads
    spec = data.make_spec(opts.text_template, opts.text_cols, opts.use_chat_template)
    data.validate_options(opts.max_seq_len, opts.overflow, opts.eval_split, opts.eval_dataset_size)
    records = data.load_and_validate(list(opts.data_files), opts.data_name, spec,
                                     train_on_prompt=opts.train_on_prompt)
    model_ref = resolve_model(opts.model, accept=("hf-model", "awq-model"), step="finetune")

    params = registry.step("finetune").key_params(opts)
    params["sequence_start"] = sequence_start.RULE  # what starts (and ends) each record
    data_paths = [Path(opts.data_name)] if opts.data_name and Path(opts.data_name).is_dir() \
        else [Path(f) for f in opts.data_files]
    inputs = {"model": opts.model, "model_digest": model_ref.digest,
              "data": [str(p) for p in data_paths],
              "data_digest": [content_digest(p) for p in data_paths]}
    out, done = Output.begin(opts.output, "finetuned", "finetune", inputs, params, opts.force,
                             reads=(*model_ref.paths, *data_paths, *map(Path, opts.data_files)))
    if done:
        return done, True
    return _train_and_publish(opts, model_ref, spec, records, out), False


def _train_and_publish(opts, model_ref, spec, records, out: Output) -> dict:
    import torch

    from phitune.finetune.loop import TrainConfig, World, eval_loss
    from phitune.models import load_tokenizer, resolve_device

    device = resolve_device(opts.device)
    world = World.from_env(device)
    if world.size > 1 and device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    watch = Stopwatch()
    tokenizer = load_tokenizer(model_ref.path)
    prepared = _prepare(opts, records, tokenizer, spec, world.main)

    dtype = policy.train_dtype(model_ref.path, device, opts.dtype)
    large = policy.speed_first(model_ref.path)
    if large or opts.gradient_checkpointing:  # a pass's freed activations go back to the OS at once
        return_large_frees_to_os()  # (not for small models: it cost tiny-phi3 35% of its speed)
    torch.manual_seed(opts.seed)
    model, passes, checkpointing, compiled = _lora_model(opts, model_ref, device, dtype, large,
                                                         world.main)

    collate = _collate(model, tokenizer, opts.packing)
    cfg = TrainConfig(max_steps=opts.max_steps, num_train_epochs=opts.num_train_epochs,
                      learning_rate=opts.learning_rate, batch_size=opts.per_device_train_batch_size,
                      grad_accum=opts.gradient_accumulation_steps, warmup_steps=opts.warmup_steps,
                      max_grad_norm=opts.max_grad_norm, seed=opts.seed, save_steps=opts.save_steps,
                      autocast_dtype=None if dtype == torch.float32 else dtype,
                      micro_batch_rows=passes)
    checkpoint = _checkpoint(opts, out, world.main)
    before = eval_loss(model, prepared.eval, collate, cfg, device)
    result = _train(model, prepared.train, collate, cfg, device, world, checkpoint, opts.resume)
    after = eval_loss(model, prepared.eval, collate, cfg, device)
    if not world.main:
        world.barrier()
        return {}

    metrics = {
        "steps": result.steps, "resumed_from_step": result.resumed_from,
        "train_loss_first": round(result.losses[0], 4),
        "train_loss_last": round(sum(result.losses[-5:]) / len(result.losses[-5:]), 4),
        "eval_loss_before": _round(before), "eval_loss_after": _round(after),
        "tokens_seen": result.tokens,
        "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9) if not result.resumed_from
                              else 0.0, 1),
        "train_seconds": round(result.seconds, 2),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "world_size": world.size, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "gradient_checkpointing": checkpointing, "rows_per_pass": cfg.micro_batch_rows,
        "compiled": compiled,
        **{f"data_{k}": v for k, v in prepared.stats.items()},
    }
    with out.staging() as work:
        _write_outputs(model, model_ref, work, opts.merge)
        metrics.update(watch.metrics())
        manifest = out.publish(work, metrics)
    checkpoint.remove()
    world.barrier()
    return manifest


def _prepare(opts, records, tokenizer, spec, say: bool):
    """Tokenized, split (and packed) records; their figures said once."""
    from phitune import data
    prepared = data.prepare(records, tokenizer, spec, opts.max_seq_len, opts.overflow,
                            opts.train_on_prompt, opts.eval_split, opts.eval_dataset_size,
                            opts.seed, packing=opts.packing)
    if say:
        for line in data.describe(prepared.stats):
            ui.info(line)
    return prepared


def _collate(model, tokenizer, packing: bool):
    from phitune import data
    mask_dtype = next(p for p in model.parameters()).dtype
    if packing:
        return lambda rows: data.collate_packed(rows, dtype=mask_dtype)
    return lambda rows: data.pad_batch(rows, data.pad_id_of(tokenizer))


def _lora_model(opts, model_ref, device: str, dtype, large: bool, say: bool):
    """The frozen base with LoRA around its targets, checkpointed and compiled as chosen;
    returns (model, rows per pass, checkpointing on, compiled)."""
    from phitune.finetune import lora, memory
    from phitune.finetune.base import load_base
    from phitune.models import quiet_gptqmodel

    base = load_base(model_ref, opts.method, device, dtype)
    passes = memory.rows_per_pass(device, opts.max_seq_len)
    pass_rows = min(passes or opts.per_device_train_batch_size, opts.per_device_train_batch_size)
    choice = memory.choose_checkpointing(opts.gradient_checkpointing, large, base.config,
                                         pass_rows * opts.max_seq_len, dtype.itemsize, device)
    if say and large:
        ui.info(f"gradient checkpointing {'on' if choice.on else 'off'} ({choice.reason})")
    if choice.on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    targets = lora.target_modules(base.config.model_type, opts.target_modules, base)
    quiet_gptqmodel()  # peft imports it when installed: no banner, no environment edits
    model = lora.wrap(base, opts.lora_r, opts.lora_alpha, opts.lora_dropout, targets)
    model.train()  # before any forward: some quantized kernels latch inference-only paths
    compiled = _compile(model, opts.compile, large, device, say)
    return model, passes, choice.on, compiled


def _checkpoint(opts, out: Output, say: bool):
    """The checkpoint of an interrupted run with the same key; says whether --resume uses it."""
    from phitune.finetune.loop import Checkpoint
    checkpoint = Checkpoint(hidden.checkpoint(out.path), out.key)
    saved = checkpoint.load()
    if say and not opts.resume and saved:
        ui.info("a checkpoint of an interrupted run exists: --resume continues from it; "
                "starting over")
    if say and opts.resume and not saved:
        ui.info(f"--resume: no checkpoint of an interrupted run with these options and data "
                f"({checkpoint.file}{' was made with others' if checkpoint.file.is_file() else ' does not exist'}); "
                "starting at step 0")
    if say and opts.resume and saved:
        ui.info(f"--resume: continuing from step {saved['step']}")
    return checkpoint


def _train(model, rows, collate, cfg, device: str, world, checkpoint, resume: bool):
    """The training loop with a progress bar; Ctrl-C leaves a checkpoint and one line."""
    from phitune.finetune.loop import train
    with ui.progress("training", 1, "loss", "tok/s") as (bar, task):
        def on_step(step: int, steps: int, loss: float, rate: float) -> None:
            bar.update(task, total=steps, completed=step, loss=f"{loss:.4f}", **{"tok/s": f"{rate:.0f}"})
        try:
            return train(model, rows, collate, cfg, device, world, checkpoint, resume=resume,
                         on_step=on_step)
        except KeyboardInterrupt:
            state = checkpoint.load() if world.main else None
            if state is None:
                raise
            raise Interrupted(f"interrupted after step {state['step']} — no output was "
                              f"published; a checkpoint is in {checkpoint.dir}",
                              "phitune finetune",
                              "run the same command with --resume to continue from it") from None


def _compile(model, requested: bool | None, large: bool, device: str, say: bool) -> bool:
    from phitune.compiling import choose_compile
    from phitune.finetune import layer_compile
    from phitune.policy import Choice
    choice = choose_compile(requested, large, device)
    if choice.on and not layer_compile.compile_layers(model):
        choice = Choice(False, "no decoder layer list found")
    if say and (large or requested):
        ui.info(f"torch.compile {'on' if choice.on else 'off'} ({choice.reason})"
                + ("; the first step compiles" if choice.on else ""))
    return choice.on


def _round(value):
    return None if value is None else round(value, 4)


def _write_outputs(model, model_ref, work: Path, merge: bool) -> None:
    """adapter/ as PEFT writes it; model/ a link to the base trained on (no gigabyte copy);
    merged/ with --merge: base + adapter folded, in float (an AWQ base is dequantized)."""
    model.save_pretrained(str(work / FINETUNE_ADAPTER))
    _point_adapter_at_base(work / FINETUNE_ADAPTER, model_ref.path)
    os.symlink(Path(model_ref.path).resolve(), work / "model", target_is_directory=True)
    if merge:
        from phitune.models import copy_tokenizer_files
        merged = model.merge_and_unload()
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        merged.save_pretrained(str(work / "merged"))
        copy_tokenizer_files(model_ref.path, work / "merged")


def _point_adapter_at_base(adapter_dir: Path, base: Path) -> None:
    import json
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(Path(base).resolve())
    config_file.write_text(json.dumps(config, indent=2) + "\n")
