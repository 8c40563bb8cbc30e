"""LoRA on an AWQ base that stays int4 in memory.

Each quantized linear keeps the checkpoint's qweight/qzeros/scales (AutoAWQ GEMM layout,
phitune/formats/awq_gemm.py) as read. Its float weight exists only while its matmul runs: the
forward dequantizes, multiplies and drops it; the backward dequantizes it again for the input's
gradient (what LoRA upstream needs). Nothing but the packed tensors is saved for backward (the
base gets no gradient, so not even the input is needed). The weight is dequantized exactly as
`load_awq_dequantized` does it ((q - z) * s in fp32, then rounded to the compute dtype), so
the function trained on is the one the float path trains on.

Phi-3-mini: the base weights take 1.9 GB packed instead of 7.6 GB in bf16 (15.2 GB in fp32).
Large models on CPU dequantize with phitune's C++ kernel (awq_kernel.py) into one buffer that
all layers share; elsewhere a torch expression does it into fresh memory. The products are
custom ops, so torch.compile'd layers call them as they are.

PEFT wraps these modules through `LoraConfig._register_custom_module` with its own
`lora.Linear`, so the adapter's module names and saved tensors are those of the float path.
"""

from __future__ import annotations

import torch
from torch import nn

from phitune.formats.awq_gemm import AWQ_ORDER, PACK

# Right shifts that take column c of a packed int32 word to its low nibble (AWQ order).
_SHIFTS = tuple(4 * AWQ_ORDER.index(c) for c in range(PACK))


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """The float weight [in, out] of a GEMM-packed linear, bit for bit
    `unpack_gemm(...).dequantize(dtype).t()`."""
    in_f, words = qweight.shape
    groups, out_f = scales.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(-1) >> shifts) & 0xF            # [in, out/8, 8] in column order
    z = (qzeros.unsqueeze(-1) >> shifts) & 0xF              # [groups, out/8, 8]
    w = (q.view(groups, in_f // groups, out_f).float() - z.view(groups, 1, out_f).float()) \
        * scales.view(groups, 1, out_f).float()
    return w.view(in_f, out_f).to(dtype)


_kernel = {"module": None}
_workspace: dict = {}


def use_fused_dequantize(on: bool) -> bool:
    """Dequantize on CPU with phitune's C++ kernel into one reused buffer (built at first use,
    awq_kernel.py); off, or where it cannot be built, with the torch expression into fresh
    memory. Returns whether the kernel is in use."""
    from phitune.finetune import awq_kernel
    _kernel["module"] = awq_kernel.load() if on else None
    return _kernel["module"] is not None


def _weight(qweight, qzeros, scales, dtype) -> torch.Tensor:
    """The float weight [in, out], valid until the next call: the kernel writes it into a
    buffer shared by every layer (one weight at a time exists in float; the buffer's pages stay
    mapped, where a fresh 100 MB tensor per matmul costs page faults)."""
    kernel = _kernel["module"]
    if kernel is None or qweight.device.type != "cpu" or dtype not in _KERNEL_DTYPES:
        return dequantize_packed(qweight, qzeros, scales, dtype)
    in_f, out_f = qweight.shape[0], scales.shape[1]
    buffer = _workspace.get(dtype)
    if buffer is None or buffer.numel() < in_f * out_f:
        buffer = _workspace[dtype] = torch.empty(in_f * out_f, dtype=dtype)
    w = buffer[:in_f * out_f].view(in_f, out_f)
    kernel.dequantize_into(qweight, qzeros, scales, w)
    return w


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Custom ops, not an autograd.Function: torch.compile keeps them opaque (one call into the
# kernel and the matmul) instead of tracing the unpacking into a slow scalar loop, and the
# shared buffer never outlives the op that filled it.
@torch.library.custom_op("phitune::packed_mm", mutates_args=())
def packed_mm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
              scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ W, W [in, out] dequantized for this product only."""
    return x.to(dtype) @ _weight(qweight, qzeros, scales, dtype)


@packed_mm.register_fake
def _(x, qweight, qzeros, scales, dtype):
    return x.new_empty((*x.shape[:-1], scales.shape[1]), dtype=dtype)


@torch.library.custom_op("phitune::packed_mm_t", mutates_args=())
def packed_mm_t(grad: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad @ W.T: the input's gradient, W dequantized again (never saved from forward)."""
    return grad.to(dtype) @ _weight(qweight, qzeros, scales, dtype).t()


@packed_mm_t.register_fake
def _(grad, qweight, qzeros, scales, dtype):
    return grad.new_empty((*grad.shape[:-1], qweight.shape[0]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, qweight, qzeros, scales, dtype = inputs
    ctx.save_for_backward(qweight, qzeros, scales)  # the packed tensors only: no input, no W
    ctx.dtype, ctx.x_dtype = dtype, x.dtype


def _backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    qweight, qzeros, scales = ctx.saved_tensors
    return packed_mm_t(grad, qweight, qzeros, scales, ctx.dtype).to(ctx.x_dtype), \
        None, None, None, None


packed_mm.register_autograd(_backward, setup_context=_setup_context)


class PackedAwqLinear(nn.Module):
    """A frozen AWQ-GEMM linear computing in `compute_dtype` (the dtype finetune's policy
    picked). `in_features`/`out_features` and `compute_dtype` are what PEFT reads to size and
    place the LoRA weights; the packed tensors are buffers (frozen by construction)."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features = qweight.shape[0]
        self.out_features = scales.shape[1]
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_mm(x, self.qweight, self.qzeros, self.scales, self.compute_dtype)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> nn.Linear:
        """This layer as a plain float nn.Linear (for merging an adapter into the base)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        w = dequantize_packed(self.qweight, self.qzeros, self.scales, self.compute_dtype)
        linear.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.in_features // self.scales.shape[0]}, "
                f"compute_dtype={self.compute_dtype}")


def has_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedAwqLinear) for m in model.modules())


def register_with_peft(config) -> None:
    """Let PEFT's LoRA wrap PackedAwqLinear with its own lora.Linear (its forward calls the
    base layer and adds the adapter; nothing in training touches the base's weight)."""
    from peft.tuners.lora.layer import Linear
    config._register_custom_module({PackedAwqLinear: Linear})


def load_awq_packed(path, dtype: torch.dtype) -> nn.Module:
    """An AWQ checkpoint whose quantized linears stay packed (PackedAwqLinear computing in
    `dtype`); every other tensor (embedding, norms, LM head) in `dtype`, as the float path."""
    from phitune.formats.awq_gemm import read_awq_checkpoint
    from phitune.models import model_from_state
    config, state, quant = read_awq_checkpoint(path, dtype)

    def swap(model: nn.Module) -> None:
        for name, tensors in quant.items():
            parent, _, child = name.rpartition(".")
            bias = state.pop(f"{name}.bias", None)
            setattr(model.get_submodule(parent), child,
                    PackedAwqLinear(tensors["qweight"], tensors["qzeros"],
                                    tensors["scales"], bias, dtype))
    return model_from_state(config, state, dtype, str(path), prepare=swap)


def dequantize_bases(model: nn.Module) -> None:
    """Give every LoRA layer on a packed base the float nn.Linear it computes, so PEFT can
    merge the adapter into it (merge_and_unload reads base_layer.weight)."""
    from peft.tuners.lora.layer import LoraLayer
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, PackedAwqLinear):
            module.base_layer = module.base_layer.dequantized()
