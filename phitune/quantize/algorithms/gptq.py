"""GPTQ (Frantar et al., arXiv 2210.17323) in plain torch, device-agnostic.

Each linear's weight columns are rounded one at a time, and each column's rounding error is
moved onto the columns not yet rounded, weighted by the inverse Hessian H = Σ x xᵀ of the
linear's calibration inputs: the optimal correction for the output error ‖(Q − W) X‖² (the
OBS update). As in the paper: dampening (1% of H's mean diagonal), the inverse from a
Cholesky factorisation (upper factor of H⁻¹: row i of it is the update direction once
columns < i are fixed), lazy updates a block of 128 columns at a time.

Groups are static, as every reader needs: each group's scale and zero are fixed before any
column is rounded, from the weight as it comes, its range [min, max] shrunk by the factor whose
rounding error, weighted by each column's H_ii, is least. The columns are then rounded in
decreasing H_ii ("act-order": the inputs with the most energy first, while the most columns
are left to absorb their error); the group parameters do not depend on that order, so the
result is the same group-wise asymmetric int4 as RTN and AWQ, written in the same AutoAWQ
GEMM layout (formats/awq_gemm.py) and bit for bit what that layout dequantizes to (scales
rounded to fp16 first, zeros integers in [0, 15]).

The layer runs once, over every calibration token in one chunk, with a pre-hook on each
linear: when the forward reaches a linear, its Hessian comes from the input it is about to
multiply, the linear is quantized there, and the forward continues with the quantized
weight. So every linear's Hessian sees the errors of the linears quantized before it (the
paper's "true sequential" order, for free), and the forward's output is the quantized
layer's: the next layer's input (the driver's propagation) with no second pass.
"""

from __future__ import annotations

import torch
from torch import nn

from phitune.formats.awq_gemm import QuantizedWeight, pack_gemm
from phitune.quantize.arch import linear_names
from phitune.quantize.driver import QuantConfig, hidden_states

# Bump when the rounding's choices change (enters the key as gptq_search).
SEARCH_VERSION = 3
DAMP = 0.01        # × mean(diag H), added to H's diagonal
BLOCK = 128        # columns per lazy update
ACT_ORDER = True   # round columns in decreasing H_ii
SEARCH = True      # search each group's range (weighted MSE) instead of plain min/max


def group_params(w: torch.Tensor, bits: int, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) [rows, 1] of one group's columns [rows, g], as `quantize_weight` makes
    them: the scale rounded to fp16 so the stored checkpoint dequantizes to what was used."""
    max_int = 2**bits - 1
    if zero_point:
        hi, lo = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        scales = ((hi - lo).clamp(min=1e-5) / max_int).half().to(w.dtype)
        zeros = (-torch.round(lo / scales)).clamp(0, max_int)
    else:
        half = 2 ** (bits - 1)
        scales = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / (half - 1)).half().to(w.dtype)
        zeros = torch.full_like(scales, float(half))
    return scales, zeros

SHRINKS = 20       # range shrink candidates per group: 1.00, 0.99, ... 0.81 of [min, max]
SEARCH_ROWS = 256  # rows per chunk of the range search (a chunk stays in cache)


def searched_group_params(w: torch.Tensor, importance: torch.Tensor, bits: int,
                          zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) [..., 1] for groups w [rows, groups, g]: the range [min, max] shrunk by
    the factor (1.00 … 0.81) whose round-to-nearest error Σ importance·(q − w)² is least, per
    row and group (an MSE observer weighted by each column's Hessian diagonal: a column the
    calibration inputs hit harder costs more when clipped). Rows go in chunks that stay in
    the CPU's cache, and the error is computed in units of the step (its square times the
    group's s² afterwards): ~3x less time than whole-tensor passes."""
    scales, zeros = torch.empty_like(w[..., :1]), torch.empty_like(w[..., :1])
    for r0 in range(0, w.shape[0], SEARCH_ROWS):
        rows = slice(r0, r0 + SEARCH_ROWS)
        scales[rows], zeros[rows] = _search_rows(w[rows], importance, bits, zero_point)
    return scales, zeros


def _search_rows(w: torch.Tensor, importance: torch.Tensor, bits: int,
                 zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse to fine, each group on its own path: every fourth shrink step, then the best
    one's neighbours two and one steps away (9 error passes of 20; the error over the shrink
    is smooth, as AWQ's grids are — `_grid_steps` there)."""
    max_int = 2**bits - 1
    half = 2 ** (bits - 1)
    hi, lo = w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True)
    absmax = torch.maximum(hi, -lo)
    steps = torch.empty_like(w)

    def params(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shrink = 1.0 - k / 100
        if zero_point:
            s = ((hi - lo).mul_(shrink).clamp_(min=1e-5) / max_int).half().to(w.dtype)
            return s, (-torch.round(lo * shrink / s)).clamp_(0, max_int)
        s = (absmax * shrink).clamp_(min=1e-5).div_(half - 1).half().to(w.dtype)
        return s, torch.full_like(s, float(half))

    def error(k: torch.Tensor) -> torch.Tensor:
        s, z = params(k)
        torch.div(w, s, out=steps)
        levels = torch.round(steps)
        levels = torch.clamp(levels, -z, max_int - z, out=levels)  # q − z, q in [0, max_int]
        return levels.sub_(steps).square_().mul_(importance).sum(dim=-1, keepdim=True).mul_(s * s)

    best_k = torch.zeros_like(hi)
    best_err = error(best_k)

    def keep_better(candidate: torch.Tensor) -> None:
        nonlocal best_k, best_err
        err = error(candidate)
        best_k = torch.where(err < best_err, candidate, best_k)
        best_err = torch.minimum(err, best_err)

    for k in range(4, SHRINKS, 4):
        keep_better(torch.full_like(hi, float(k)))
    for stride in (2, 1):
        centre = best_k.clone()
        for delta in (-stride, stride):
            keep_better((centre + delta).clamp_(0, SHRINKS - 1))
    return params(best_k)


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor,
                           damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU. Columns no input ever reached (H_ii = 0)
    get H_ii = 1 and a zero weight, as in the paper's code (their value cannot matter).

    Made from one Cholesky and one triangular inverse instead of the paper's three
    factorisations (Cholesky, its inverse, Cholesky again): with J the reversal permutation,
    JHJ = LLᵀ gives H = (JLJ)(JLJ)ᵀ with JLJ upper triangular, so U = (JLJ)⁻¹ = J L⁻¹ J —
    the same factor (a Cholesky factor with a positive diagonal is unique)."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  zero_point: bool = True, damp: float = DAMP, block: int = BLOCK,
                  act_order: bool = ACT_ORDER, search: bool = SEARCH) -> QuantizedWeight:
    """GPTQ-round `weight` [out, in] given H [in, in]; computes in `weight`'s dtype (fp32 or
    fp64), on its device.

    Static groups: every group's scale and zero are fixed before any column is rounded, from
    the weight as it comes (searched, see `searched_group_params`, or its plain min/max), so
    the columns can be rounded in any order and the result is still the group-wise int4 every
    reader handles. `act_order` rounds columns in decreasing H_ii (the inputs with the most
    energy first, while most columns are still free to absorb their error).

    Works on the transpose [in, out]: a weight column is then a contiguous row, and each
    column's update of the block's later columns one in-place outer product (`addr_`); on the
    row-major weight the same updates were strided and ~4x slower on CPU."""
    w = weight.clone()
    u_full = hessian.to(w.dtype)
    rows, cols = w.shape
    diag = torch.diag(u_full).clone()
    w[:, diag == 0] = 0  # inputs no token ever reached: their value cannot matter
    groups = w.reshape(rows, cols // group_size, group_size)
    importance = diag.clamp(min=0).reshape(cols // group_size, group_size)
    if search:
        scales, zeros = searched_group_params(groups, importance, bits, zero_point)
    else:
        scales, zeros = group_params(groups.reshape(-1, group_size), bits, zero_point)
        scales, zeros = scales.reshape(rows, -1, 1), zeros.reshape(rows, -1, 1)
    scales, zeros = scales[..., 0].t().contiguous(), zeros[..., 0].t().contiguous()  # [groups, rows]
    order = (torch.argsort(diag, descending=True, stable=True) if act_order
             else torch.arange(cols, device=w.device))
    wt = w[:, order].t().contiguous()  # [cols, rows], in rounding order
    u = inverse_hessian_factor(u_full[order][:, order], wt.t(), damp)
    col_group = order // group_size
    q_int = torch.empty(cols, rows, dtype=torch.uint8, device=w.device)
    max_int = 2**bits - 1
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1, u1 = wt[b0:b1].clone(), u[b0:b1, b0:b1]
        err1 = torch.zeros_like(w1)
        s1, z1 = scales[col_group[b0:b1]], zeros[col_group[b0:b1]]
        for i in range(b1 - b0):
            col, s, z = w1[i], s1[i], z1[i]
            q = (torch.round(col / s) + z).clamp_(0, max_int)
            q_int[b0 + i] = q.to(torch.uint8)
            err = (col - (q - z) * s).div_(u1[i, i])
            w1[i:].addr_(u1[i, i:], err, alpha=-1)
            err1[i] = err
        wt[b1:].addmm_(u[b0:b1, b1:].t(), err1, alpha=-1)  # the block's errors onto later columns
    q_int[order] = q_int.clone()  # back to the weight's column order
    return QuantizedWeight(q_int.t().contiguous(), scales.t().contiguous().half(),
                           zeros.t().contiguous().to(torch.uint8), group_size)


GRAM_BLOCK = 256  # rows of H per product in `gram`


def gram(tokens: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """H = XᵀX [in, in] in fp32 over `tokens` [T, in], `chunk_tokens` rows at a time (fp32
    temporaries bounded). H is symmetric, so only its upper block triangle is multiplied — each
    block of GRAM_BLOCK rows against the columns from its diagonal on — and the lower triangle
    is copied from it: ~60% of the full product's work on a 1536-wide input, as much as the
    layer's own forward otherwise."""
    n = tokens.shape[1]
    h = torch.zeros(n, n, device=tokens.device)
    for start in range(0, tokens.shape[0], chunk_tokens):
        part = tokens[start:start + chunk_tokens].float()
        for r0 in range(0, n, GRAM_BLOCK):
            h[r0:r0 + GRAM_BLOCK, r0:].addmm_(part[:, r0:r0 + GRAM_BLOCK].t(), part[:, r0:])
    return torch.triu(h).add_(torch.triu(h, diagonal=1).t())


class RoundInForward:
    """Pre-hooks that GPTQ-round each of `linears` the first time the forward reaches it, from
    the input it is given; `packed` collects them by name. Linears fed the same input (a scale
    group's: q/k/v, gate/up on Llama-style layers) share one Hessian and are rounded together,
    as one matrix of their stacked rows (rows are independent in GPTQ: the same result, one
    column loop instead of three)."""

    def __init__(self, linears: dict[nn.Linear, str], cfg: QuantConfig, groups: list = ()):
        self.names, self.cfg = linears, cfg
        self.siblings = {fc: list(g.linears) for g in groups for fc in g.linears}
        self.packed: dict[str, dict[str, torch.Tensor]] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its Hessian)
        self._hooks = []

    def __enter__(self) -> RoundInForward:
        self._hooks = [fc.register_forward_pre_hook(self._round) for fc in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._last = None

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        h = gram(x.reshape(-1, x.shape[-1]), self.cfg.chunk_tokens)
        self._last = (x, h)
        return h

    def _round(self, fc: nn.Module, args: tuple) -> None:
        if self.names[fc] in self.packed:
            return
        cfg = self.cfg
        together = [f for f in self.siblings.get(fc, [fc]) if self.names[f] not in self.packed]
        weight = torch.cat([f.weight.data.float() for f in together])
        qw = gptq_quantize(weight, self.hessian(args[0]), cfg.bits, cfg.group_size, cfg.zero_point)
        r0 = 0
        for f in together:
            rows = slice(r0, r0 + f.out_features)
            # copies, not views: a view into the stacked tensor would be saved with its storage
            part = QuantizedWeight(qw.intweight[rows].clone(), qw.scales[rows].clone(),
                                   qw.zeros[rows].clone(), cfg.group_size)
            self.packed[self.names[f]] = pack_gemm(part)
            f.weight.data = part.dequantize(f.weight.dtype)
            r0 += f.out_features


@torch.no_grad()
def round_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict, cfg: QuantConfig,
                groups: list = ()) -> tuple[torch.Tensor, dict]:
    """GPTQ-round every linear of the layer in one forward over all of `inps` (module
    docstring); (the quantized layer's output, packed tensors by name within the layer)."""
    with RoundInForward(linear_names(layer), cfg, groups) as rounding:
        outs = hidden_states(layer(inps, **kwargs))
    missing = set(linear_names(layer).values()) - set(rounding.packed)
    if missing:  # a linear the forward never reached has no inputs to round from
        raise RuntimeError(f"GPTQ: the layer's forward never reached {sorted(missing)}")
    return outs, rounding.packed


def quantize_layer(layer: nn.Module, groups: list, inps: torch.Tensor, kwargs: dict,
                   cfg: QuantConfig) -> tuple[torch.Tensor, dict]:
    outs, packed = round_layer(layer, inps, kwargs, cfg, groups)
    return outs, {"packed": packed, "alphas": {}}
