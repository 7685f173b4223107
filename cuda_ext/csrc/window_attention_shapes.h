// Host-side checks shared by the CPU and CUDA entry points of the windowed cross-attention.
#pragma once

#include <torch/extension.h>

#include "window_attention_index.h"

namespace featup {

// q (B,N,Hq,Wq,d), k (B,N,h,w,d), v (B,C,h,w), rows (Hq,2), cols (Wq,2).
inline AttnGeometry attention_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& rows, const at::Tensor& cols) {
  TORCH_CHECK(q.dim() == 5, "window_attention: q must be (B, N, Hq, Wq, d), got ", q.sizes());
  TORCH_CHECK(k.dim() == 5, "window_attention: k must be (B, N, h, w, d), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "window_attention: v must be (B, C, h, w), got ", v.sizes());
  AttnGeometry g{q.size(0), q.size(1), q.size(2), q.size(3), k.size(2), k.size(3), q.size(4), v.size(1)};
  TORCH_CHECK(k.size(0) == g.B && k.size(1) == g.N && k.size(4) == g.d, "window_attention: k ", k.sizes(),
              " does not match q ", q.sizes(), " (batch, heads and head width must agree)");
  TORCH_CHECK(v.size(0) == g.B && v.size(2) == g.h && v.size(3) == g.w, "window_attention: v ", v.sizes(),
              " does not match k ", k.sizes(), " (batch and key grid must agree)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "window_attention: q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(g.N >= 1 && g.d >= 1, "window_attention: need at least one head of width >= 1, got q ", q.sizes());
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == g.Hq && rows.size(1) == 2 && rows.scalar_type() == at::kLong,
              "window_attention: rows must be int64 (Hq, 2) = (", g.Hq, ", 2), got ", rows.scalar_type(), " ",
              rows.sizes());
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == g.Wq && cols.size(1) == 2 && cols.scalar_type() == at::kLong,
              "window_attention: cols must be int64 (Wq, 2) = (", g.Wq, ", 2), got ", cols.scalar_type(), " ",
              cols.sizes());
  return g;
}

// Every window [start, end) must be non-empty and inside [0, extent). `bounds` is a contiguous CPU tensor.
inline void check_windows(const at::Tensor& bounds, int64_t extent, const char* name, const char* axis) {
  const int64_t* p = bounds.data_ptr<int64_t>();
  for (int64_t i = 0; i < bounds.size(0); ++i) {
    TORCH_CHECK(p[2 * i] >= 0 && p[2 * i] < p[2 * i + 1] && p[2 * i + 1] <= extent, "window_attention: ", name,
                "[", i, "] = [", p[2 * i], ", ", p[2 * i + 1], ") is not a non-empty range of key ", axis,
                " inside [0, ", extent, ")");
  }
}

}  // namespace featup
