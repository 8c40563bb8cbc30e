"""The layer-by-layer driver every quantization algorithm runs under.

Calibration text runs through the model one decoder layer at a time, so memory holds one
layer's activations, never all of them: the inputs of layer 0 are caught once, then each
layer moves to the compute device, the algorithm quantizes it in place (its weights become
their dequantized values) and returns its output, which is the next layer's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from phitune.formats.awq_gemm import pack_gemm, quantize_weight
from phitune.measure import release_memory
from phitune.models import decoder_layers
from phitune.quantize.arch import linear_names, scale_groups


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    scale_grid: int = 20
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    chunk_tokens: int = 8192        # tokens per forward chunk (bounds activation memory)
    # "fast": the scale grid's output error on `search_tokens` (whole sequences spread over the
    # calibration set; the activation statistics still use every token), alphas and clip steps
    # coarse to fine (awq._grid_steps, awq.search_clip). "exhaustive": every alpha on every
    # token, every clip step. The clip error is exact over every token either way (awq.input_gram).
    search: str = "fast"
    search_tokens: int = 2048
    # Feed the next layer the quantized layer's output instead of the float one (one more
    # forward per layer), so each layer's search sees the errors of the layers before it:
    # SmolLM2-135M g64, AWQ gap / RTN gap 0.65 → 0.56 (held-out licence text, 512-token windows);
    # tiny-phi3 0.18 (gap 0.136 vs RTN 0.771).
    propagate: bool = True
    # The search's fake-quantization and clip error as torch.compile'd kernels (quantize/kernels.py):
    # the same results, faster on large models, a few seconds of compiling first.
    compiled: bool = False


Packed = dict[str, dict[str, torch.Tensor]]  # full linear name -> qweight/qzeros/scales


class _Stop(Exception):
    pass


def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, dtype: torch.dtype,
                         device: str) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first decoder layer, and per layer the kwargs the model
    passes it (rotary embeddings, mask: they differ between sliding-window and global layers).
    One forward in which every layer but the last is skipped and the last stops the run."""
    layers = decoder_layers(model)
    caught: list[dict] = [{} for _ in layers]

    def catch(index):
        def hook(_module, args, kwargs):
            if index == 0:
                caught[0]["hidden"] = args[0] if args else kwargs["hidden_states"]
            caught[index]["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(catch(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    for layer in layers[:-1]:  # skipped: their inputs are all we need
        layer.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]
    # The modules around the layers (embedding, rotary tables) run on the compute device.
    around = [m for m in _layers_parent(model, layers).children() if m is not layers]
    try:
        for m in around:
            m.to(device)
        with torch.no_grad():
            model(samples.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers[:-1]:
            del layer.forward
        for m in around:
            m.to("cpu")
    memo: dict = {}
    per_layer = [{k: to_device(v, dtype, device, memo) for k, v in c["kwargs"].items()
                  if k not in ("past_key_values", "past_key_value", "use_cache")} for c in caught]
    for kwargs in per_layer:
        kwargs["use_cache"] = False
    return caught[0]["hidden"].to(device=device, dtype=dtype), per_layer


def capture_layer0_inputs(model: nn.Module, samples: torch.Tensor, dtype: torch.dtype,
                          device: str) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's input and kwargs (see capture_layer_inputs)."""
    hidden, per_layer = capture_layer_inputs(model, samples, dtype, device)
    return hidden, per_layer[0]


def _layers_parent(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    return next(m for m in model.modules() if any(c is layers for c in m.children()))


def to_device(value, dtype, device, memo: dict | None = None):
    """A layer kwarg on `device`; floating tensors (also inside tuples) in `dtype`. `memo`
    converts a tensor shared by several layers' kwargs once."""
    if isinstance(value, torch.Tensor):
        if memo is not None and id(value) in memo:
            return memo[id(value)][1]
        moved = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        if memo is not None:
            memo[id(value)] = (value, moved)  # keeps `value` alive so its id is not reused
        return moved
    if isinstance(value, tuple):
        return tuple(to_device(v, dtype, device, memo) for v in value)
    return value


def chunks(x: torch.Tensor, chunk_tokens: int) -> Iterator[torch.Tensor]:
    per_chunk = max(1, chunk_tokens // x.shape[1])
    for start in range(0, x.shape[0], per_chunk):
        yield x[start:start + per_chunk]


@torch.no_grad()
def run_chunked(fn: Callable, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    return torch.cat([fn(c) for c in chunks(x, chunk_tokens)])


def hidden_states(out) -> torch.Tensor:
    """A module's output hidden states: decoder layers and attention return a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict, chunk_tokens: int) -> torch.Tensor:
    """The layer's output hidden states."""
    return run_chunked(lambda c: hidden_states(layer(c, **kwargs)), x, chunk_tokens)


def pack_layer(layer: nn.Module, cfg: QuantConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Round every linear of the layer to the nearest int4 level, pack it, and leave the
    dequantized values as its weight. Returns packed tensors by name within the layer."""
    packed = {}
    for fc, name in linear_names(layer).items():
        qw = quantize_weight(fc.weight.data, cfg.bits, cfg.group_size, cfg.zero_point)
        packed[name] = pack_gemm(qw)
        fc.weight.data = qw.dequantize(fc.weight.dtype)
    return packed


def quantize_model(model: nn.Module, arch: str, cfg: QuantConfig, samples: torch.Tensor | None,
                   device: str, compute_dtype: torch.dtype, algorithm,
                   on_layer: Callable[[int, dict], None] | None = None) -> Packed:
    """Quantize every decoder layer with `algorithm` (an entry of quantize.algorithms);
    returns packed tensors by full module name. Layers move to `device` one at a time.

    A finished layer's quantized linears give up their float weights (empty tensors remain):
    the checkpoint is written from the packed tensors, and the dequantized copies were 7.6 of
    the 18 GB peak on the Phi-3-mini shape. The model is then only good for its other tensors."""
    layers = decoder_layers(model)
    inps, layer_kwargs = None, [{} for _ in layers]
    if algorithm.calibrated:
        inps, layer_kwargs = capture_layer_inputs(model, samples, compute_dtype, device)
    prefix_of = {layer: name for name, layer in model.named_modules()}
    packed: Packed = {}
    for index, layer in enumerate(layers):
        storage_dtype = next(layer.parameters()).dtype
        layer.to(device=device, dtype=compute_dtype)
        kwargs = layer_kwargs[index]
        groups = scale_groups(arch, layer, model.config, kwargs) if algorithm.calibrated else []
        outs, result = algorithm.quantize_layer(layer, groups, inps, kwargs, cfg)
        layer.to(device="cpu", dtype=storage_dtype)
        prefix = prefix_of[layer] + "."
        packed.update({prefix + name: {k: v.cpu() for k, v in t.items()}
                       for name, t in result["packed"].items()})
        for name in result["packed"]:
            layer.get_submodule(name).weight = nn.Parameter(
                torch.empty(0, dtype=storage_dtype), requires_grad=False)
        del result["packed"]
        release_memory()  # glibc keeps freed temporaries in its heap, fragmented: hand them back
        inps = outs
        if on_layer:
            on_layer(index, result["alphas"])
    return packed
