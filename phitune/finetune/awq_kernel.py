"""A CPU kernel that dequantizes an AutoAWQ-GEMM int4 weight into a float buffer in one pass,
built at first use with the C++ compiler torch.compile also needs (cached by torch in
~/.cache/torch_extensions; ~25 s to build once on 2 cores).

Why not a torch expression: unpacking 8 nibbles per int32 word to their columns either reads
and writes the weight several times (eager) or, compiled by inductor, becomes a scalar loop
(a variable shift per element defeats its vectorizer). Measured on the Phi-3-mini qkv_proj
(3072 x 9216), fp32, 2 cores: this kernel 15 ms into a reused buffer; inductor 150-300 ms
into fresh memory (of which ~80 ms are page faults); the 512-token matmul it feeds ~200 ms.
The values are bit for bit those of `awq_gemm.unpack_gemm(...).dequantize(dtype)`:
(q - z) * s in fp32, then rounded to the buffer's dtype.
"""

from __future__ import annotations

from functools import lru_cache

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

template <typename T>
static void run(const int32_t* qw, const int32_t* qz, const at::Half* sc, T* out,
                int64_t in_f, int64_t words, int64_t gs) {
  const int64_t out_f = words * 8;
  static const int col[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // nibble i holds column col[i]
  at::parallel_for(0, in_f / gs, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> s(out_f), z(out_f);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t j = 0; j < words; ++j) {
        uint32_t zw = (uint32_t)qz[g * words + j];
        for (int i = 0; i < 8; ++i) {
          int64_t c = 8 * j + col[i];
          s[c] = (float)sc[g * out_f + c];
          z[c] = (float)((zw >> (4 * i)) & 15u);
        }
      }
      for (int64_t r = g * gs; r < (g + 1) * gs; ++r) {
        const int32_t* row = qw + r * words;
        T* o = out + r * out_f;
        for (int64_t j = 0; j < words; ++j) {
          uint32_t w = (uint32_t)row[j];
          float v[8];
          for (int i = 0; i < 8; ++i) v[col[i]] = (float)((w >> (4 * i)) & 15u);
          for (int k = 0; k < 8; ++k) o[8 * j + k] = (T)((v[k] - z[8 * j + k]) * s[8 * j + k]);
        }
      }
    }
  });
}

void dequantize_into(torch::Tensor qweight, torch::Tensor qzeros, torch::Tensor scales,
                     torch::Tensor out) {
  TORCH_CHECK(qweight.is_contiguous() && qzeros.is_contiguous() && scales.is_contiguous()
              && out.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "fp16 scales expected");
  int64_t in_f = qweight.size(0), words = qweight.size(1), gs = in_f / scales.size(0);
  const int32_t* qw = qweight.data_ptr<int32_t>();
  const int32_t* qz = qzeros.data_ptr<int32_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  switch (out.scalar_type()) {
    case at::kFloat: run<float>(qw, qz, sc, out.data_ptr<float>(), in_f, words, gs); break;
    case at::kBFloat16: run<at::BFloat16>(qw, qz, sc, out.data_ptr<at::BFloat16>(), in_f, words, gs); break;
    case at::kHalf: run<at::Half>(qw, qz, sc, out.data_ptr<at::Half>(), in_f, words, gs); break;
    default: TORCH_CHECK(false, "fp32, bf16 or fp16 output expected");
  }
}
"""


@lru_cache(maxsize=1)
def load():
    """The compiled kernel module, or None where it cannot be built (no compiler, a failed
    build): callers then dequantize with torch ops."""
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline("phitune_awq_dequantize", cpp_sources=_SOURCE,
                           functions=["dequantize_into"], extra_cflags=["-O3", "-march=native"])
    except Exception:  # noqa: BLE001 - any build failure means: use the torch expression
        return None
