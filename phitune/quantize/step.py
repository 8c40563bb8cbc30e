"""`phitune quantize` as a library call: validate, load, quantize, save, measure, publish."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from phitune import options as O
from phitune import inputfiles, policy, registry, sequence_start, ui
from phitune.artifacts.embedded import data_dir, heldout_text
from phitune.artifacts.kinds import ResolvedModel
from phitune.artifacts.manifest import content_digest
from phitune.artifacts.output import Output
from phitune.artifacts.resolve import resolve_model
from phitune.errors import DataError, OptionError
from phitune.measure import Stopwatch, dir_size_mb
from phitune.models import architecture
from phitune.policy import QUANTIZE_LEAN_FROM_PARAMS
from phitune.quantize import groups
from phitune.quantize.options import QuantizeOptions  # noqa: F401  (run's argument; re-exported)

if TYPE_CHECKING:  # annotations only: `quantize --help` imports this module
    from phitune.quantize.algorithms import Algorithm

GROUP_SIZES = (32, 64, 128)
EVAL_SEQ_LEN = 256  # ppl_before / ppl_after windows (what `phitune eval` uses by default)


def default_calib_data() -> Path:
    return data_dir() / "calibration.txt"


def _validate(opts: QuantizeOptions, config: dict, where: str) -> None:
    """What the declared ranges cannot say: the group size must divide the model's widths."""
    bad = groups.misfit(config, opts.group_size) if opts.group_size is not None else None
    if bad:
        fits = groups.choose(config, GROUP_SIZES[::-1])[0]
        raise OptionError(f"--group_size {opts.group_size} does not divide the model's "
                          f"{bad[0]} ({bad[1]})", f"{where}/config.json",
                          f"pick a group size that divides it, e.g. {fits or 32}, or leave "
                          "--group_size out to get the largest that fits")


def _group_size(opts: QuantizeOptions, config: dict, where: str) -> tuple[int, str]:
    """--group_size as given, else 128, 64 or 32: the largest dividing every quantized width."""
    if opts.group_size is not None:
        return opts.group_size, "--group_size"
    size, why = groups.choose(config, GROUP_SIZES[::-1])
    if size is None:
        raise OptionError(f"no supported group size fits the model ({why})", f"{where}/config.json",
                          "this model's widths cannot be quantized in the AWQ layout")
    return size, why


@dataclass(frozen=True)
class _Plan:
    """What `run` resolves from the options before anything loads."""

    opts: QuantizeOptions           # with the group size chosen
    model_ref: ResolvedModel
    arch: str
    group_choice: str               # why that group size
    algorithm: Algorithm
    calib_path: Path
    texts: list[str] | None         # calibration text, for a calibrated algorithm
    eval_path: Path


def run(opts: QuantizeOptions) -> tuple[dict, bool]:
    """Quantize `opts.model` into `opts.output`. Returns (manifest, was_up_to_date)."""
    from phitune.models import resolve_device

    O.validate(opts)  # declared ranges and choices, before the model resolves or loads
    plan = _plan(opts)
    opts = plan.opts
    inputs, params = _key(plan)
    calibrated = plan.algorithm.calibrated
    out, done = Output.begin(opts.output, "awq-model", "quantize", inputs, params, opts.force,
                             reads=(*plan.model_ref.paths, plan.calib_path if calibrated else None,
                                    plan.eval_path if opts.eval_data else None))
    if done:
        return done, True

    device = resolve_device(opts.device)
    watch = Stopwatch()
    with out.staging() as work:
        metrics = _quantize(plan, work, device)
        metrics.update(watch.metrics())
        manifest = out.publish(work, metrics)
    return manifest, False


def _plan(opts: QuantizeOptions) -> _Plan:
    """The model, group size, algorithm and data files, each checked."""
    from phitune.quantize import algorithms, calib
    algorithm = algorithms.get(opts.algorithm)  # the data files first: they need no model
    calib_path = Path(opts.calib_data) if opts.calib_data else default_calib_data()
    texts = calib.read_texts(calib_path) if algorithm.calibrated else None
    eval_path = Path(opts.eval_data) if opts.eval_data else heldout_text()
    if opts.eval and opts.eval_data and not eval_path.exists():
        raise OptionError(f"evaluation file not found: {eval_path}", "--eval_data",
                          "pass an existing text file")
    if opts.eval is not False and opts.eval_data:  # None: on for small models
        inputfiles.check_regular(eval_path, "--eval_data", DataError)
    model_ref = resolve_model(opts.model, accept=("hf-model",), step="quantize")
    arch = architecture(model_ref.config, model_ref.path)
    _validate(opts, model_ref.config, str(model_ref.path))
    group_size, group_choice = _group_size(opts, model_ref.config, str(model_ref.path))
    return _Plan(replace(opts, group_size=group_size), model_ref, arch, group_choice, algorithm,
                 calib_path, texts, eval_path)


def _key(plan: _Plan) -> tuple[dict, dict]:
    """(inputs, params) of the output's key: calibration settings count only for an
    algorithm that calibrates, and an algorithm's search version always does."""
    opts, calibrated = plan.opts, plan.algorithm.calibrated
    params = registry.step("quantize").key_params(opts)
    if not calibrated:
        for k in ("calib_samples", "calib_seq_len", "dtype"):
            params.pop(k)
    params.update(plan.algorithm.key_params)  # a new search makes outputs of the old one stale
    params["sequence_start"] = sequence_start.RULE  # what starts calibration and ppl windows
    inputs = {"model": opts.model, "model_digest": plan.model_ref.digest}
    if calibrated:
        inputs["calib_digest"] = content_digest(plan.calib_path)
    return inputs, params


def _quantize(plan: _Plan, work: Path, device: str) -> dict:
    """Load, measure, quantize layer by layer and save into `work`; returns the metrics."""
    from phitune.quantize import calib
    opts = plan.opts
    model, tokenizer, size_before = _load(plan)
    start = sequence_start.of_tokenizer(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    do_eval = opts.eval if opts.eval is not None else n_params < QUANTIZE_LEAN_FROM_PARAMS
    eval_ids = _eval_ids(tokenizer, plan.eval_path) if do_eval else None  # tokenized once, scored twice
    metrics: dict = {"params_m": round(n_params / 1e6, 2), "group_size": opts.group_size,
                     "group_size_choice": plan.group_choice, "sequence_start": start.describe()}
    if do_eval:
        ui.info("measuring held-out perplexity of the float model")
        metrics["ppl_before"] = _ppl(model, eval_ids, start, metrics)
    compute_dtype = policy.calibration_dtype(opts.dtype, n_params, device, model.dtype)
    samples = calib.token_blocks(plan.texts, tokenizer, opts.calib_samples, opts.calib_seq_len,
                                 start) if plan.algorithm.calibrated else None
    compiled = plan.algorithm.searches and _compile_choice(opts, n_params, device, metrics)
    packed, alphas = _quantize_layers(model, plan, samples, device, compute_dtype, compiled)
    _save(model, packed, plan, work)
    del model, packed
    if do_eval:
        _measure_quantized(work, eval_ids, start, metrics)
    if plan.algorithm.calibrated:
        metrics["calib_tokens"] = int(samples.numel())
        metrics["mean_alpha"] = round(sum(a for la in alphas.values() for a in la.values())
                                      / max(1, sum(len(la) for la in alphas.values())), 3)
    metrics.update(size_before_mb=round(size_before, 1), size_mb=round(_weights_mb(work), 1),
                   device=device, compute_dtype=str(compute_dtype).replace("torch.", ""))
    return metrics


def _load(plan: _Plan):
    """(model, tokenizer, weights MB). A small model loads in fp32 whatever its files hold."""
    import torch

    from phitune.models import load_causal_lm, load_tokenizer
    ref = plan.model_ref
    size_before = _weights_mb(ref.path)
    load_dtype = torch.float32 if size_before < 4 * QUANTIZE_LEAN_FROM_PARAMS / 2**20 else None
    ui.info(f"loading {plan.opts.model} ({plan.arch}, {size_before:.0f} MB); group size "
            f"{plan.opts.group_size} ({plan.group_choice})")
    model = load_causal_lm(ref.path, dtype=load_dtype or _config_dtype(ref.config))
    return model, load_tokenizer(ref.path), size_before


def _compile_choice(opts: QuantizeOptions, n_params: int, device: str, metrics: dict) -> bool:
    """Whether the algorithm's search runs compiled kernels (compiling.choose_compile); said and
    kept in the metrics. Below 1B parameters compiling costs what it saves (SmolLM2-135M)."""
    from phitune.compiling import choose_compile
    lean = n_params >= QUANTIZE_LEAN_FROM_PARAMS
    choice = choose_compile(opts.compile, lean, device)
    if lean or opts.compile:
        ui.info(f"torch.compile {'on' if choice.on else 'off'} ({choice.reason})"
                + ("; the first layers compile the search's kernels" if choice.on else ""))
    metrics["compiled"] = choice.on
    return choice.on


def _quantize_layers(model, plan: _Plan, samples, device: str, compute_dtype, compiled: bool):
    """(packed tensors by module name, each layer's chosen alphas), one layer at a time."""
    from phitune.quantize import driver
    from phitune.quantize.driver import QuantConfig
    opts = plan.opts
    cfg = QuantConfig(bits=opts.bits, group_size=opts.group_size, zero_point=opts.zero_point,
                      compiled=compiled)
    alphas: dict[int, dict] = {}
    with ui.progress(f"{opts.algorithm.upper()} layers", model.config.num_hidden_layers) \
            as (bar, task):
        def on_layer(index: int, layer_alphas: dict) -> None:
            alphas[index] = layer_alphas
            bar.advance(task)
        packed = driver.quantize_model(model, plan.arch, cfg, samples, device, compute_dtype,
                                       plan.algorithm, on_layer=on_layer)
    return packed, alphas


def _save(model, packed, plan: _Plan, work: Path) -> None:
    from phitune.formats import awq_gemm as checkpoint
    opts = plan.opts
    qconfig = checkpoint.quantization_config(opts.bits, opts.group_size, opts.zero_point,
                                             opts.algorithm)
    checkpoint.save_awq_checkpoint(model, packed, work, qconfig)
    _copy_tokenizer(plan.model_ref.path, work)


def _measure_quantized(work: Path, eval_ids: list[int], start, metrics: dict) -> None:
    from phitune.formats import awq_gemm as checkpoint
    ui.info("measuring held-out perplexity of the quantized checkpoint")
    quantized = checkpoint.load_awq_dequantized(work)
    metrics["ppl_after"] = _ppl(quantized, eval_ids, start, metrics)
    metrics["ppl_gap"] = round(metrics["ppl_after"] - metrics["ppl_before"], 4)


def _eval_ids(tokenizer, path: Path) -> list[int]:
    from phitune.evaluate import token_ids
    from phitune.quantize import calib
    return token_ids(tokenizer, calib.read_texts(path, "--eval_data"))


def _ppl(model, ids: list[int], start, metrics: dict) -> float:
    """Held-out perplexity on CPU, windows started by `start`; its seconds and tokens add up
    in `metrics`."""
    import time

    from phitune.evaluate import perplexity, scored_tokens
    began = time.perf_counter()
    ppl = perplexity(model, None, [], EVAL_SEQ_LEN, device="cpu", ids=ids, start=start)
    metrics["eval_seconds"] = round(metrics.get("eval_seconds", 0) + time.perf_counter() - began, 1)
    metrics["eval_tokens"] = metrics.get("eval_tokens", 0) + scored_tokens(ids, EVAL_SEQ_LEN, start)
    return round(ppl, 4)


def _weights_mb(path: Path) -> float:
    return sum(dir_size_mb(p) for p in Path(path).glob("*.safetensors")) or dir_size_mb(path)


def _config_dtype(config: dict):
    import torch
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from phitune.models import copy_tokenizer_files
    copy_tokenizer_files(src, dst)
