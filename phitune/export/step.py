"""`phitune auto-opt`: a Hugging Face / AWQ / finetuned model → an onnxruntime-genai dir.

    1. feed the builder what it reads cheaply: an AWQ checkpoint as is (its int4 weights are
       kept), a float one as is for fp32/fp16, or rounded to int4 in the AWQ layout first;
    2. run the builder (GroupQueryAttention, fused rotary, SkipSimplifiedLayerNorm, MatMulNBits);
    3. add multi-LoRA inputs beside every projection;
    4. convert the PEFT adapter, if any, into `adapter_weights.onnx_adapter`.
The adapter is checked against the base before the build, so a mismatch costs nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

from phitune import registry, sequence_start, ui
from phitune.artifacts.kinds import check_files_regular, hf_kind
from phitune.artifacts.manifest import content_digest
from phitune.artifacts.output import Output
from phitune.artifacts.resolve import resolve_model
from phitune.errors import InputError, OptionError
from phitune.export.options import BLOCK_SIZES, PROVIDERS, AutoOptOptions
from phitune.genai_config import ADAPTER_FILE
from phitune.measure import Stopwatch, current_rss_mb, dir_size_mb, release_memory
from phitune.models import architecture
from phitune.quantize import groups

FLOAT_BLOCK_SIZE = 32  # closest to float among the fast ones (tiny-phi3 ppl +0.1% vs +0.9% at 128)


def validate(opts: AutoOptOptions) -> AutoOptOptions:
    """Device and provider must agree; fill the defaults that depend on them."""
    if opts.provider is not None:
        wanted = PROVIDERS.get(opts.provider)
        if wanted is None:
            raise OptionError(f"unknown execution provider '{opts.provider}'", "--provider",
                              f"use one of {', '.join(PROVIDERS)}")
        if wanted != opts.target:
            raise OptionError(f"--provider {opts.provider} runs on {wanted}, but --device is "
                              f"{opts.target}", "phitune auto-opt",
                              f"pass --device {wanted}, or drop --provider")
    precision = opts.precision or "int4"
    if opts.target == "gpu" and precision == "fp32" and opts.multi_lora:
        # onnxruntime-genai 0.18's builder has no GroupQueryAttention for CUDA in fp32: it
        # writes a packed Attention op holding q/k/v inside it, with no projection MatMul for
        # a LoRA branch (found building tiny-phi3's adapter for CUDA, issue 32).
        raise OptionError("--precision fp32 on --device gpu leaves no q/k/v projection for "
                          "LoRA: the builder packs them into its CUDA fp32 Attention op",
                          "phitune auto-opt", "use --precision fp16 or int4 for CUDA, or "
                          "--no-multi_lora for a base model without adapters")
    if opts.accuracy_level is not None and precision != "int4":
        raise OptionError("--accuracy_level applies to int4 only", "phitune auto-opt",
                          "drop --accuracy_level or use --precision int4")
    if opts.adapter_path and not opts.multi_lora:
        raise OptionError("--adapter_path needs the multi-LoRA inputs", "--no-multi_lora",
                          "drop --no-multi_lora")
    return AutoOptOptions(**(asdict(opts) | {"precision": precision,
                                             "provider": opts.provider or _provider_of(opts.target)}))


def _provider_of(target: str) -> str:
    return next(p for p, d in PROVIDERS.items() if d == target)


def _adapter_dir(opts: AutoOptOptions, model_ref) -> Path | None:
    if opts.adapter_path:
        path = Path(opts.adapter_path).expanduser()
        if not path.is_dir():
            raise InputError(f"no such adapter directory: {opts.adapter_path}", "--adapter_path",
                             "pass the adapter/ dir written by phitune finetune")
        check_files_regular(path)
        return path
    if model_ref.adapter is not None and model_ref.adapter.is_dir():  # -m D of a finetune
        return model_ref.adapter                                      # output: it comes along
    return None


def run(opts: AutoOptOptions) -> tuple[dict, bool]:
    """Export `opts.model` into `opts.output`. Returns (manifest, was_up_to_date)."""
    from phitune.export import adapter as adapter_mod
    from phitune.export.slots import predicted_layout

    opts = validate(opts)
    model_ref = resolve_model(opts.model, accept=("hf-model", "awq-model", "finetuned"),
                              step="auto-opt")
    config = model_ref.config
    base_kind = hf_kind(config)
    arch = architecture(config, model_ref.path)
    block_size, block_choice = _block_size(opts, config, base_kind, str(model_ref.path))
    opts = replace(opts, block_size=block_size)
    adapter_dir = _adapter_dir(opts, model_ref)
    if adapter_dir is not None:  # refuse a misfit now, not after a build
        adapter_mod.slot_tensors(adapter_mod.read_peft_adapter(adapter_dir),
                                 *predicted_layout(config), where=str(adapter_dir))

    params = registry.step("auto-opt").key_params(opts)
    params["sequence_start"] = sequence_start.RULE  # outputs without its record are stale
    if opts.precision == "int4":
        params["lm_head"] = LM_HEAD_QUANT  # in the key: exports with an int4 head are stale
    inputs = {"model": opts.model, "model_digest": model_ref.digest}
    if adapter_dir is not None:
        inputs |= {"adapter": str(adapter_dir), "adapter_digest": content_digest(adapter_dir)}
    out, done = Output.begin(opts.output, "onnx-genai", "auto-opt", inputs, params, opts.force,
                             reads=(*model_ref.paths, adapter_dir))
    if done:
        return done, True

    return _build_and_publish(opts, out, model_ref, base_kind, arch, block_choice,
                              adapter_dir), False


def _build_and_publish(opts: AutoOptOptions, out: Output, model_ref, base_kind: str, arch: str,
                       block_choice: str, adapter_dir: Path | None) -> dict:
    """Build the ONNX model into the output's staging dir, add LoRA inputs and the adapter,
    then publish; returns the manifest."""
    from phitune.export import adapter as adapter_mod
    from phitune.export.builder import run_builder
    from phitune.export.lora_graph import add_lora_inputs

    config = model_ref.config
    watch = Stopwatch()
    with out.staging() as work:
        scratch = work / ".scratch"
        scratch.mkdir()
        source = _builder_input(model_ref.path, base_kind, config, opts, scratch)
        model_dir = work / "model"
        ui.info(f"building {opts.precision} ONNX for {opts.target} ({arch}) with the "
                "onnxruntime-genai model builder")
        extra = {}
        if opts.precision == "int4":
            extra["block_size"] = str(opts.block_size)
            extra |= _lm_head_options(config)
            if opts.accuracy_level is not None:
                extra["accuracy_level"] = str(opts.accuracy_level)
        release_memory()
        rss_at_build = current_rss_mb()
        builder_peak = run_builder(source, model_dir, opts.precision, opts.target, scratch, extra)
        start = sequence_start.record(model_dir)  # og's tokenizer adds no BOS: infer reads this
        metrics: dict = {"precision": opts.precision, "device": opts.target,
                         **({"block_size": opts.block_size, "block_size_choice": block_choice}
                            if opts.precision == "int4" else {}),
                         "int4_source": _int4_source(base_kind, opts.precision),
                         **({"lm_head": f"{LM_HEAD_QUANT} (builder RTN)"}
                            if opts.precision == "int4" else {}),
                         "builder_peak_rss_mb": round(builder_peak, 1),
                         "sequence_start": start.describe()}
        if opts.multi_lora:
            slots = add_lora_inputs(model_dir / "model.onnx", config)
            metrics["lora_slots"] = len(slots)
        if adapter_dir is not None:
            ui.info(f"converting the adapter {adapter_dir} → model/{ADAPTER_FILE}")
            metrics |= adapter_mod.convert(adapter_dir, model_dir, model_dir / ADAPTER_FILE)
        shutil.rmtree(scratch)
        metrics["size_mb"] = round(dir_size_mb(model_dir), 1)
        metrics |= watch.metrics()
        # The builder runs beside this process: count both at once.
        metrics["peak_rss_mb"] = round(max(metrics["peak_rss_mb"], rss_at_build + builder_peak), 1)
        manifest = out.publish(work, metrics)
    return manifest


def _block_size(opts: AutoOptOptions, config: dict, base_kind: str,
                where: str) -> tuple[int, str]:
    """--block_size as given, else what fits the model: an AWQ base's own group size (its layers
    keep it; the LM head follows), a float base's 32, or the largest smaller size that divides
    every width it rounds (SmolLM2-135M's hidden 576 takes 64 or 32, not 128)."""
    if opts.precision != "int4":  # float weights: no blocks
        return opts.block_size or FLOAT_BLOCK_SIZE, "unused (float export)"
    awq_group = (config.get("quantization_config") or {}).get("group_size") \
        if base_kind == "awq-model" else None
    # An AWQ base's layers are already packed: only the LM head (in-features hidden) is rounded.
    widths = {"hidden_size": config["hidden_size"]} if awq_group else config
    if opts.block_size is not None:
        bad = groups.misfit(widths, opts.block_size)
        if bad:
            raise OptionError(f"--block_size {opts.block_size} does not divide the model's "
                              f"{bad[0]} ({bad[1]})", f"{where}/config.json",
                              "pick one that divides it, or leave --block_size out to get one "
                              "that fits")
        return opts.block_size, "--block_size"
    if awq_group in BLOCK_SIZES:
        return awq_group, "default: the AWQ group size"
    preferred = FLOAT_BLOCK_SIZE
    size, why = groups.choose(widths, tuple(b for b in BLOCK_SIZES[::-1] if b <= preferred))
    if size is None:
        raise OptionError(f"no int4 block size fits the model ({why})", f"{where}/config.json",
                          "export it with --precision fp16 or fp32")
    return size, why


# The LM head of an int4 export: the builder rounds it itself (RTN), as AWQ leaves it float.
# int4 there cost SmolLM2-135M (tied embeddings) 8.6% held-out perplexity over PyTorch AWQ;
# int8 costs 0.1% (BENCHMARKS.md, auto-opt).
LM_HEAD_QUANT = "int8"


def _lm_head_options(config: dict) -> dict[str, str]:
    options = {"matmul_mixed_precision": f"last_matmul:{LM_HEAD_QUANT}"}
    if config.get("tie_word_embeddings"):
        # og 0.18 shares a tied head with the embedding only when both are int4 (its
        # GatherBlockQuantized); asked to share an int8 head it writes a graph that does not
        # load. Unshared, the embedding stays a float Gather, as an untied model's does.
        options["shared_embeddings"] = "false"
    return options


def _int4_source(base_kind: str, precision: str) -> str | None:
    if precision != "int4":
        return None
    return "awq checkpoint" if base_kind == "awq-model" else "round-to-nearest (phitune)"


def _builder_input(path: Path, base_kind: str, config: dict, opts: AutoOptOptions,
                   scratch: Path) -> Path:
    """The checkpoint the builder should read for this base kind and precision."""
    import torch

    from phitune.export import convert
    if base_kind == "awq-model":
        if opts.precision == "int4":
            return path.resolve()  # the builder keeps AWQ's int4 weights
        ui.info("dequantizing the AWQ weights for a float export")
        dtype = torch.float16 if opts.precision == "fp16" else torch.float32
        convert.awq_to_float(path, scratch / "float", config, dtype)
        return scratch / "float"
    if base_kind != "hf-model":
        raise InputError(f"{opts.model} is a {base_kind}; auto-opt reads float or AWQ checkpoints",
                         "-m", "pass a float or phitune AWQ checkpoint")
    if opts.precision == "int4":
        ui.info(f"rounding weights to int4 (block {opts.block_size}) tensor by tensor")
        convert.float_to_int4(path.resolve(), scratch / "int4", config, opts.block_size)
        return scratch / "int4"
    return path.resolve()
