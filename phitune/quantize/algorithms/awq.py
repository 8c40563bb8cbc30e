"""Activation-aware weight quantization (AWQ, arXiv 2306.00978) in plain torch.

Run by quantize/driver.py one decoder layer at a time. Per layer:

1. capture each scale group's input and the grid's references in one hooked float forward;
2. per group, grid-search alpha in s = mean|x|^alpha / mean|w|^(1-alpha), minimising the
   error of the group's output with quantized weights; fold the best s into the producer;
3. per linear, grid-search a weight clipping range minimising the output error;
4. round to group-wise int4 and pack in the AutoAWQ GEMM layout;
5. run the quantized layer: its output is the next layer's input (QuantConfig.propagate).

The grid never writes into a weight: each step's weight is a new tensor made from the
untouched original (on CPU `tensor.cpu()` is the same tensor: AutoAWQ's CPU path writes
into an alias and compounds the scaling that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from phitune.quantize.arch import NO_CLIP, ScaleGroup, linear_names
from phitune.quantize.driver import (QuantConfig, chunks, hidden_states, pack_layer, run_chunked,
                                     run_layer)
from phitune.quantize.kernels import kernels

# Bump when the search's choices change, so outputs made by an older search are not reused
# as up to date (quantize/step.py puts it in the output's key).
SEARCH_VERSION = 5


@torch.no_grad()
def _mse(fn: Callable, x: torch.Tensor, ref: torch.Tensor, chunk_tokens: int) -> float:
    total, count, start = 0.0, 0, 0
    for c in chunks(x, chunk_tokens):
        out = fn(c).float()
        total += (out - ref[start:start + len(c)].float()).pow(2).sum().item()
        count += out.numel()
        start += len(c)
    return total / count


def search_indices(inps: torch.Tensor, cfg: QuantConfig) -> torch.Tensor | None:
    """The sequences the fast scale grid measures its error on: `search_tokens` worth, evenly
    spread over the calibration blocks (whole sequences: attention needs them); None: all."""
    if cfg.search == "exhaustive" or inps.shape[0] * inps.shape[1] <= cfg.search_tokens:
        return None
    n = max(1, cfg.search_tokens // inps.shape[1])
    return torch.linspace(0, inps.shape[0] - 1, n).round().long().unique().to(inps.device)


def _grid_steps(n: int, coarse_to_fine: bool, loss_at: Callable[[int], float]) -> int:
    """The grid step with the least loss: every step, or every fourth one and then the best's
    neighbours two and one steps away (the loss over alpha is smooth: 9 evaluations of 20)."""
    if not coarse_to_fine:
        return min(range(n), key=loss_at)
    best = min(range(0, n, 4), key=loss_at)
    for stride in (2, 1):
        best = min([s for s in (best - stride, best, best + stride) if 0 <= s < n], key=loss_at)
    return best


@torch.no_grad()
def search_scale(group: ScaleGroup, x: torch.Tensor, cfg: QuantConfig,
                 x_search: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Best per-channel scale for a group (over the producer's channels) and its alpha.
    Statistics come from all of `x`; the output error is measured on `x_search` (default x),
    against `reference`, the float output there (computed when not given)."""
    x_mean = group.reduce(x.abs().float().reshape(-1, x.shape[-1]).mean(0))
    weight = torch.cat([fc.weight.float() for fc in group.linears])
    w_abs = weight.view(-1, cfg.group_size).abs()
    w_norm = (w_abs / (w_abs.amax(dim=1, keepdim=True) + 1e-6)).view(weight.shape)
    w_mean = group.reduce(w_norm.mean(0))
    del weight, w_abs, w_norm
    xs = x if x_search is None else x_search

    if reference is None:
        reference = run_chunked(group.inspect, xs, cfg.chunk_tokens)
    originals = [fc.weight.data for fc in group.linears]
    fake_quantized = kernels(cfg.compiled).scaled_fake_quantize
    g = cfg.group_size
    losses: dict[int, float] = {}
    scales: dict[int, torch.Tensor] = {}

    def loss_at(step: int) -> float:
        if step in losses:
            return losses[step]
        alpha = step / cfg.scale_grid
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s_in = group.expand(s).view(-1, g)
        for fc, original in zip(group.linears, originals):
            # a new tensor, never an alias of the original (see the module's docstring)
            fc.weight.data = fake_quantized(original.view(original.shape[0], -1, g), s_in, cfg.bits,
                                            g, cfg.zero_point).view_as(original)
        losses[step] = _mse(group.inspect, xs, reference, cfg.chunk_tokens)
        scales[step] = s
        return losses[step]

    try:
        best = _grid_steps(cfg.scale_grid, cfg.search != "exhaustive", loss_at)
    finally:
        for fc, original in zip(group.linears, originals):
            fc.weight.data = original
    return scales[best], best / cfg.scale_grid


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor, x: torch.Tensor) -> None:
    """Fold s into the producer (÷) and consumers (×); the captured input is ÷ s too."""
    prev = group.prev
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        rows = group.prev_rows or slice(None)
        prev.weight.data[rows] = (prev.weight.data[rows].float() / s.view(-1, 1)).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data[rows] = (prev.bias.data[rows].float() / s).to(prev.bias.dtype)
    else:
        prev.weight.data = fold_into_norm(prev.weight.data, s, group.norm)
    s_in = group.expand(s)
    for fc in group.linears:
        fc.weight.data = (fc.weight.data.float() * s_in).to(fc.weight.dtype)
    x.div_(s_in.to(x.dtype))


def fold_into_norm(weight: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    """A norm's weight after dividing its output by s, for its norm kind (architectures.NORM_KINDS)."""
    w = weight.float()
    if kind == "rms":             # y = w · x / rms(x)
        w = w / s
    elif kind == "rms_one_plus":  # y = (1 + w) · x / rms(x)
        w = (1 + w) / s - 1
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    return w.to(weight.dtype)


@torch.no_grad()
def input_gram(x: torch.Tensor, group_size: int, chunk_tokens: int) -> torch.Tensor:
    """Per weight group k, the Gram matrix of the linear's input over every token,
    G[k] = Σ_t x_tk x_tkᵀ / T ([groups, g, g], fp32): a clip candidate's output error
    mean_t ((Q(w) − w) x_t)² is then dᵀ G d per row, with no pass over the tokens."""
    tokens = x.reshape(-1, x.shape[-1])
    n_groups = tokens.shape[1] // group_size
    gram = torch.zeros(n_groups, group_size, group_size, device=x.device)
    for start in range(0, tokens.shape[0], chunk_tokens):
        xg = tokens[start:start + chunk_tokens].float().view(-1, n_groups, group_size).transpose(0, 1)
        gram.baddbmm_(xg.transpose(1, 2), xg)                      # [groups, g, tokens] @ [groups, tokens, g]
    return gram.div_(tokens.shape[0])


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Per-group max |w| that minimises the linear's output error over every calibration
    token, taken exactly from the input's Gram matrix (`input_gram`): per candidate one
    [groups, rows, g] @ [groups, g, g] product instead of a matmul over the tokens.
    Fast search: every third shrink step, then each group's best one's two neighbours (6 of 10)."""
    g = cfg.group_size
    out_f, in_f = weight.shape
    n_groups = in_f // g
    steps = int(cfg.clip_max_shrink * cfg.clip_grid)
    clip_error = kernels(cfg.compiled).clip_error
    best_max = torch.empty(out_f, n_groups, device=weight.device)
    rows_per_batch = 4096  # bounds the [groups, rows, g] temporaries on wide layers
    for r0 in range(0, out_f, rows_per_batch):
        wb = weight[r0:r0 + rows_per_batch].float()
        rows = wb.shape[0]
        wb = wb.view(rows, n_groups, g).transpose(0, 1).contiguous()  # [groups, rows, g]
        org_max = wb.abs().amax(dim=-1, keepdim=True)

        def error(step: torch.Tensor) -> torch.Tensor:
            """Output error with each group clipped at its own shrink step ([groups, rows, 1])."""
            return clip_error(wb, org_max * (1 - step / cfg.clip_grid), gram, cfg.bits, g,
                              cfg.zero_point)

        fast = cfg.search != "exhaustive"
        best_step = torch.zeros_like(org_max)
        min_err = torch.full_like(org_max, float("inf"))

        def keep_better(step: torch.Tensor) -> None:
            nonlocal min_err, best_step
            err = error(step)
            better = err < min_err
            min_err, best_step = torch.where(better, err, min_err), torch.where(better, step, best_step)

        for i in range(0, steps, 3 if fast else 1):
            keep_better(torch.full_like(org_max, float(i)))
        if fast:
            coarse = best_step.clone()
            for delta in (-1, 1):
                keep_better((coarse + delta).clamp_(0, steps - 1))
        best = org_max * (1 - best_step / cfg.clip_grid)
        best_max[r0:r0 + rows] = best.squeeze(-1).t()
    return best_max


@dataclass
class Capture:
    """What the float layer's forward gives the search, by group name."""

    inputs: dict[str, torch.Tensor]         # the group's input (its first consumer's), every token
    sample_inputs: dict[str, torch.Tensor]  # the same on the grid's sample (search_indices)
    references: dict[str, torch.Tensor]     # the inspected module's output there: the grid's reference
    outputs: torch.Tensor | None            # the float layer's output; None when not needed


class _Caught(Exception):
    """Every group's input is caught: the rest of the layer's forward is not needed."""


@torch.no_grad()
def capture(layer: nn.Module, groups: list[ScaleGroup], inps: torch.Tensor, kwargs: dict,
            cfg: QuantConfig) -> Capture:
    """The float layer's forward, hooked. With cfg.propagate the next layer's input is the
    quantized layer's output, so the float output is not needed: the grid's sample sequences
    run whole (their references are the inspected modules' outputs), the other sequences only
    until the last group's input is caught (on Phi-3 that skips down_proj for 7/8 of the tokens)."""
    index = search_indices(inps, cfg)
    if index is None or not cfg.propagate:
        inputs, refs, outs, _ = _hooked_forward(layer, groups, inps, kwargs, cfg.chunk_tokens)
        if index is None:
            return Capture(inputs, inputs, refs, outs)
        return Capture(inputs, {n: x[index] for n, x in inputs.items()},
                       {n: r[index] for n, r in refs.items()}, outs)
    samples, refs, _, order = _hooked_forward(layer, groups, inps[index], kwargs, cfg.chunk_tokens)
    rest = torch.ones(inps.shape[0], dtype=torch.bool, device=inps.device)
    rest[index] = False
    rest_inputs, *_ = _hooked_forward(layer, groups, inps[rest], kwargs, cfg.chunk_tokens,
                                      stop_after=order[-1])
    inputs = {}
    for name, sample in samples.items():
        whole = sample.new_empty((inps.shape[0], *sample.shape[1:]))
        whole[index], whole[rest] = sample, rest_inputs[name]
        inputs[name] = whole
    return Capture(inputs, samples, refs, None)


def _hooked_forward(layer: nn.Module, groups: list[ScaleGroup], x: torch.Tensor, kwargs: dict,
                    chunk_tokens: int, stop_after: str | None = None):
    """(group inputs, inspected outputs, layer output, group names in the order their inputs
    came), chunk by chunk; with `stop_after`, each chunk's forward ends once that group's input
    is caught (no inspected outputs, no layer output then)."""
    inputs: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    refs: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    order: list[str] = []

    def catch(name: str, args: tuple) -> None:
        inputs[name].append(args[0].detach())
        if name not in order:
            order.append(name)
        if name == stop_after:
            raise _Caught

    hooks = [g.linears[0].register_forward_pre_hook(lambda _m, args, name=g.name: catch(name, args))
             for g in groups]
    if stop_after is None:
        hooks += [g.inspect_module.register_forward_hook(
            lambda _m, _args, out, name=g.name: refs[name].append(hidden_states(out).detach()))
            for g in groups]
    outs = []
    try:
        for c in chunks(x, chunk_tokens):
            try:
                out = layer(c, **kwargs)
            except _Caught:
                continue
            outs.append(hidden_states(out))
    finally:
        for h in hooks:
            h.remove()
    return ({name: torch.cat(parts) for name, parts in inputs.items()},
            {name: torch.cat(parts) for name, parts in refs.items() if parts},
            torch.cat(outs) if outs else None, order)


def quantize_layer(layer: nn.Module, groups: list[ScaleGroup], inps: torch.Tensor, kwargs: dict,
                   cfg: QuantConfig) -> tuple[torch.Tensor, dict]:
    """Quantize one decoder layer in place (weights become their dequantized values).

    Returns the layer's output (the next layer's input: the quantized layer's when
    cfg.propagate, else the float one's) and the packed tensors by linear name within the layer.
    """
    caught = capture(layer, groups, inps, kwargs, cfg)
    best = [(g, *search_scale(g, caught.inputs[g.name], cfg, caught.sample_inputs[g.name],
                              caught.references[g.name]))
            for g in groups]
    feats, outs = caught.inputs, caught.outputs
    del caught
    alphas = {}
    for group, s, alpha in best:
        apply_scale(group, s, feats[group.name])
        alphas[group.name] = alpha
    _clip(layer, groups, feats, cfg)
    del feats
    packed = pack_layer(layer, cfg)
    if cfg.propagate:
        outs = run_layer(layer, inps, kwargs, cfg.chunk_tokens)
    return outs, {"packed": packed, "alphas": alphas}


def _clip(layer: nn.Module, groups: list[ScaleGroup], feats: dict, cfg: QuantConfig) -> None:
    """Clip each linear's weights (but the NO_CLIP ones) to its searched per-group range."""
    names = linear_names(layer)
    for group in groups:
        clipped = [fc for fc in group.linears if names[fc].rsplit(".", 1)[-1] not in NO_CLIP]
        if not clipped:
            continue
        gram = input_gram(feats[group.name], cfg.group_size, cfg.chunk_tokens)
        for fc in clipped:
            max_val = search_clip(fc.weight, gram, cfg)
            w = fc.weight.data.float().view(fc.out_features, -1, cfg.group_size)
            w = torch.clamp(w, -max_val.unsqueeze(-1), max_val.unsqueeze(-1))
            fc.weight.data = w.view(fc.out_features, fc.in_features).to(fc.weight.dtype)
