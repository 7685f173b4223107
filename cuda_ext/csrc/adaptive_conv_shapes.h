// Host-side shape and device checks shared by the CPU and CUDA entry points: one place says what the op accepts.
#pragma once

#include <ATen/ATen.h>

#include "adaptive_conv_index.h"

namespace featup {

// Both operands on one device: a kernel reads both through raw pointers of the current device.
inline void check_same_device(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                              const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), "adaptive_conv ", op, ": ", a_name, " and ", b_name,
              " must be on one device, got ", a.device(), " and ", b.device(), "; move one with .to(",
              a.device(), ")");
}

// Y = adaptive_conv(X, K): X (B,C,H+k-1,W+k-1), K (B,H,W,k,k).
inline ConvGeometry forward_geometry(const at::Tensor& input, const at::Tensor& filters) {
  check_same_device("forward", "input", input, "filters", filters);
  TORCH_CHECK(input.dim() == 4, "adaptive_conv: input must be (B,C,H+k-1,W+k-1), got ", input.sizes());
  TORCH_CHECK(filters.dim() == 5, "adaptive_conv: filters must be (B,H,W,k,k), got ", filters.sizes());
  const int64_t k = filters.size(3);
  TORCH_CHECK(filters.size(4) == k && k % 2 == 1, "adaptive_conv: filters must be square with an odd size, got ",
              filters.sizes());
  ConvGeometry g{input.size(0), input.size(1), filters.size(1), filters.size(2), k};
  TORCH_CHECK(filters.size(0) == g.B && input.size(2) == g.Hp() && input.size(3) == g.Wp(),
              "adaptive_conv: input ", input.sizes(), " does not match filters ", filters.sizes(),
              " (expected input (B, C, H+k-1, W+k-1))");
  TORCH_CHECK(input.scalar_type() == filters.scalar_type(), "adaptive_conv: dtypes differ: input ",
              input.scalar_type(), " filters ", filters.scalar_type());
  return g;
}

// dX given dY (B,C,H,W) and K (B,H,W,k,k).
inline ConvGeometry grad_input_geometry(const at::Tensor& grad_out, const at::Tensor& filters) {
  check_same_device("grad_input", "grad_output", grad_out, "filters", filters);
  TORCH_CHECK(grad_out.dim() == 4 && filters.dim() == 5, "adaptive_conv grad_input: bad ranks ", grad_out.sizes(),
              " ", filters.sizes());
  const int64_t k = filters.size(3);
  ConvGeometry g{grad_out.size(0), grad_out.size(1), grad_out.size(2), grad_out.size(3), k};
  TORCH_CHECK(filters.size(0) == g.B && filters.size(1) == g.H && filters.size(2) == g.W && filters.size(4) == k,
              "adaptive_conv grad_input: grad_output ", grad_out.sizes(), " does not match filters ", filters.sizes());
  return g;
}

// dK given dY (B,C,H,W) and X (B,C,H+k-1,W+k-1); k is implied by the sizes.
inline ConvGeometry grad_filters_geometry(const at::Tensor& grad_out, const at::Tensor& input) {
  check_same_device("grad_filters", "grad_output", grad_out, "input", input);
  TORCH_CHECK(grad_out.dim() == 4 && input.dim() == 4, "adaptive_conv grad_filters: bad ranks ", grad_out.sizes(),
              " ", input.sizes());
  const int64_t k = input.size(2) - grad_out.size(2) + 1;
  ConvGeometry g{grad_out.size(0), grad_out.size(1), grad_out.size(2), grad_out.size(3), k};
  TORCH_CHECK(k >= 1 && input.size(0) == g.B && input.size(1) == g.C && input.size(3) == g.Wp(),
              "adaptive_conv grad_filters: grad_output ", grad_out.sizes(), " does not match input ", input.sizes());
  return g;
}

}  // namespace featup
