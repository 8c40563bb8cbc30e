"""`phitune finetune` as a library call: validate data, load the base, train LoRA, publish
`D/model` (a link to the base) and `D/adapter` (a standard PEFT adapter)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from phitune import options as O
from phitune import hidden, policy, registry, sequence_start
from phitune import ui
from phitune.artifacts.kinds import FINETUNE_ADAPTER
from phitune.artifacts.manifest import content_digest
from phitune.artifacts.output import Output
from phitune.artifacts.resolve import resolve_model
from phitune.data.records import split_files
from phitune.errors import Interrupted
from phitune.finetune import report as reporting
from phitune.finetune.options import FinetuneOptions
from phitune.measure import Stopwatch, return_large_frees_to_os


def run(opts: FinetuneOptions) -> tuple[dict, bool]:
    """Fine-tune; returns (manifest, was_up_to_date). Under torchrun every rank trains and
    rank 0 alone writes the output."""
    from phitune import data
    opts = replace(opts, data_files=split_files(opts.data_files))
    O.validate(opts)  # declared ranges and choices, before any data or model loads
    reporting.check(opts.report_to)
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

    from phitune.finetune.loop import World
    from phitune.models import load_tokenizer, resolve_device

    device = resolve_device(opts.device)
    world = World.from_env(device)  # under torchrun on CUDA: also this rank's GPU
    watch = Stopwatch()
    resume = opts.resume and not opts.force  # --force starts over
    checkpoint, resumed = _checkpoint(opts, out, world.main, resume)  # read before any load
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
    cfg = _train_config(opts, None if dtype == torch.float32 else dtype, passes)
    report = _report(opts, checkpoint, resumed, out, world.main)
    before, result, after = _train_between_evals(model, prepared, collate, cfg, device, world,
                                                 checkpoint, resumed, report)
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
        _write_outputs(model, model_ref, work, opts.merge, opts.method)
        report.publish(work)
        metrics.update(watch.metrics())
        manifest = out.publish(work, metrics, history=reporting.history(result, before, after))
    checkpoint.remove()
    world.barrier()
    return manifest


def _train_between_evals(model, prepared, collate, cfg, device: str, world, checkpoint,
                         resumed: int, report):
    """Eval loss before, every --eval_steps and after training, each one reported as it comes;
    returns (before, the training result, after)."""
    from phitune.finetune.loop import eval_loss
    try:
        before = eval_loss(model, prepared.eval, collate, cfg, device)
        if not resumed:
            report.eval(0, before)

        def evaluate(step: int):
            value = eval_loss(model, prepared.eval, collate, cfg, device) if world.main else None
            report.eval(step, value)
            return value
        result = _train(model, prepared.train, collate, cfg, device, world, checkpoint,
                        bool(resumed), report, evaluate)
        after = eval_loss(model, prepared.eval, collate, cfg, device)
        report.eval(result.steps, after)
    finally:
        report.close()
    return before, result, after


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

    weights = _base_weights(opts.base_weights, model_ref, dtype, say and large)
    base = load_base(model_ref, opts.method, device, dtype, weights)
    four_bit = opts.method == "qlora" or (model_ref.kind == "awq-model" and weights == "int4")
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
    compiled = _compile(model, opts.compile, large, device, say, memory_first=four_bit)
    _fuse_dequantize(model, large, device, say)
    return model, passes, choice.on, compiled


def _base_weights(choice: str, model_ref, dtype, say: bool) -> str:
    """int4 or float: how an AWQ base is held (policy.base_weights), said for large models."""
    if model_ref.kind != "awq-model":
        return choice
    packed = policy.base_weights(choice, policy.parameter_count(model_ref.path), dtype)
    if say and choice == "auto":
        ui.info(f"int4 base {'kept packed' if packed.on else 'dequantized once at load'} "
                f"({packed.reason})")
    return "int4" if packed.on else "float"


def _train_config(opts, autocast_dtype, passes: int):
    import torch

    from phitune.finetune.loop import TrainConfig
    return TrainConfig(max_steps=opts.max_steps, num_train_epochs=opts.num_train_epochs,
                       learning_rate=opts.learning_rate,
                       batch_size=opts.per_device_train_batch_size,
                       grad_accum=opts.gradient_accumulation_steps,
                       warmup_steps=opts.warmup_steps, max_grad_norm=opts.max_grad_norm,
                       seed=opts.seed, save_steps=opts.save_steps, autocast_dtype=autocast_dtype,
                       micro_batch_rows=passes, eval_steps=opts.eval_steps,
                       optim_state_dtype=getattr(torch, opts.optim_state_dtype))


def _fuse_dequantize(model, large: bool, device: str, say: bool) -> None:
    """An int4 base of a large model on CPU dequantizes with phitune's C++ kernel (built with
    the compiler torch.compile uses): the torch expression costs about a matmul per matmul."""
    from phitune.compiling import cpu_compiler
    from phitune.finetune import packed_awq
    if not packed_awq.has_packed(model):
        return
    on = packed_awq.use_fused_dequantize(large and device == "cpu" and bool(cpu_compiler()))
    if say and large:
        ui.info("int4 base kept packed; each weight dequantized while its matmul runs"
                + (" (phitune's CPU kernel)" if on else " (torch ops: no C++ kernel here)"))


def _checkpoint(opts, out: Output, say: bool, resume: bool):
    """The checkpoint of an interrupted run with the same key, and the step --resume continues
    from (0: none); says whether --resume uses it (a damaged one is refused with --resume, and
    ignored by a run that starts over)."""
    from phitune.finetune.loop import Checkpoint
    checkpoint = Checkpoint(hidden.checkpoint(out.path), out.key)
    saved = checkpoint.load(damaged_ok=not resume)
    if say and not resume and saved:
        ui.info("a checkpoint of an interrupted run exists: --resume continues from it; "
                "starting over")
    if say and resume and not saved:
        ui.info(f"--resume: no checkpoint of an interrupted run with these options and data "
                f"({checkpoint.file}{' was made with others' if checkpoint.file.is_file() else ' does not exist'}); "
                "starting at step 0")
    if say and resume and saved:
        ui.info(f"--resume: continuing from step {saved['step']}")
    return checkpoint, saved["step"] if resume and saved else 0


def _report(opts, checkpoint, resumed: int, out: Output, say: bool):
    """The loss curve's live writer (event files beside the checkpoint until publishing)."""
    report = reporting.Report(opts.report_to, checkpoint.dir / reporting.RUNS, resumed, say)
    if say and report.writer is not None:
        ui.info(f"loss curves: tensorboard --logdir {report.live_dir} while training, "
                f"{out.path / reporting.RUNS} when done")
    return report


def _train(model, rows, collate, cfg, device: str, world, checkpoint, resume: bool, report,
           evaluate):
    """The training loop with a progress bar; Ctrl-C leaves a checkpoint and one line."""
    from phitune.finetune.loop import train
    with ui.progress("training", 1, "loss", "tok/s") as (bar, task):
        def on_step(step: int, steps: int, loss: float, rate: float) -> None:
            bar.update(task, total=steps, completed=step, loss=f"{loss:.4f}", **{"tok/s": f"{rate:.0f}"})
            report.train(step, loss)
        try:
            return train(model, rows, collate, cfg, device, world, checkpoint, resume=resume,
                         on_step=on_step, evaluate=evaluate)
        except KeyboardInterrupt:
            state = checkpoint.load() if world.main else None
            if state is None:
                raise
            raise Interrupted(f"interrupted after step {state['step']} — no output was "
                              f"published; a checkpoint is in {checkpoint.dir}",
                              "phitune finetune",
                              "run the same command with --resume to continue from it") from None


def _compile(model, requested: bool | None, large: bool, device: str, say: bool,
             memory_first: bool) -> bool:
    from phitune.compiling import choose_compile
    from phitune.finetune import layer_compile
    from phitune.policy import Choice
    choice = choose_compile(requested, large, device, memory_first)
    if choice.on and not layer_compile.compile_layers(model):
        choice = Choice(False, "no decoder layer list found")
    if say and (large or requested):
        ui.info(f"torch.compile {'on' if choice.on else 'off'} ({choice.reason})"
                + ("; the first step compiles" if choice.on else ""))
    return choice.on


def _round(value):
    return None if value is None else round(value, 4)


def _write_outputs(model, model_ref, work: Path, merge: bool, method: str) -> None:
    """adapter/ as PEFT writes it; model/ a link to the base trained on (no gigabyte copy; for
    qlora the float checkpoint that was quantized to nf4 as it loaded); merged/ with --merge:
    base + adapter folded, in float (an AWQ base is dequantized; for qlora the adapter is
    folded into the float base, not into nf4 weights)."""
    model.save_pretrained(str(work / FINETUNE_ADAPTER))
    _point_adapter_at_base(work / FINETUNE_ADAPTER, model_ref.path)
    os.symlink(Path(model_ref.path).resolve(), work / "model", target_is_directory=True)
    if merge:
        from phitune.finetune.packed_awq import dequantize_bases
        from phitune.models import copy_tokenizer_files
        if method == "qlora":
            model = _on_float_base(model_ref, work / FINETUNE_ADAPTER)
        else:
            dequantize_bases(model)  # an int4 base is merged as the float weights it computes
        merged = model.merge_and_unload()
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        merged.save_pretrained(str(work / "merged"))
        copy_tokenizer_files(model_ref.path, work / "merged")


def _on_float_base(model_ref, adapter: Path):
    """The trained adapter on the float checkpoint, as plain PEFT loads it."""
    from peft import PeftModel

    from phitune.models import load_causal_lm_lean
    base = load_causal_lm_lean(model_ref.path, dtype=_float_dtype(model_ref.path))
    return PeftModel.from_pretrained(base, str(adapter))


def _float_dtype(path):
    """The checkpoint's own float dtype (merged/ keeps the base's precision)."""
    import json

    import torch
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else torch.float32


def _point_adapter_at_base(adapter_dir: Path, base: Path) -> None:
    import json
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(Path(base).resolve())
    config_file.write_text(json.dumps(config, indent=2) + "\n")
