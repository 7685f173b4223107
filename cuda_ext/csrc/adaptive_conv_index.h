// Index arithmetic of the adaptive convolution, shared by the CPU and CUDA kernels.
//
// Layouts (all contiguous):
//   input   X  (B, C, Hp, Wp)    with Hp = H + k - 1, Wp = W + k - 1 (already padded)
//   filters K  (B, H, W, k, k)
//   output  Y  (B, C, H, W)      Y[b,c,h,w] = sum_ij K[b,h,w,i,j] * X[b,c,h+i,w+j]
//
// Keeping these helpers in one place means the CPU tests exercise the same arithmetic the GPU uses.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FEATUP_HD __host__ __device__ __forceinline__
#else
#define FEATUP_HD inline
#endif

namespace featup {

struct ConvGeometry {
  int64_t B, C, H, W, k;

  FEATUP_HD int64_t Hp() const { return H + k - 1; }
  FEATUP_HD int64_t Wp() const { return W + k - 1; }
  FEATUP_HD int64_t taps() const { return k * k; }

  // Offset of X[b,c,y,x] in the padded input.
  FEATUP_HD int64_t input_offset(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return ((b * C + c) * Hp() + y) * Wp() + x;
  }
  // Offset of Y[b,c,h,w] in the output (and of the output gradient).
  FEATUP_HD int64_t output_offset(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return ((b * C + c) * H + h) * W + w;
  }
  // Offset of K[b,h,w,i,j] in the filters.
  FEATUP_HD int64_t filter_offset(int64_t b, int64_t h, int64_t w, int64_t i, int64_t j) const {
    return (((b * H + h) * W + w) * k + i) * k + j;
  }
  // Offset of tap t = i*k + j of pixel (b,h,w) in a tap-major filter buffer (B, k*k, H, W):
  // the layout the CPU kernel transposes into so that its inner loop over w is unit-stride.
  FEATUP_HD int64_t tap_major_offset(int64_t b, int64_t t, int64_t h, int64_t w) const {
    return ((b * taps() + t) * H + h) * W + w;
  }
};

// Taps (i along one axis) whose output position p - i lies in [0, n): the output rows/columns that read
// padded input position p. Returns the half-open range [lo, hi) of i; empty when lo >= hi.
FEATUP_HD void taps_reading(int64_t p, int64_t n, int64_t k, int64_t* lo, int64_t* hi) {
  int64_t a = p - (n - 1);
  *lo = a > 0 ? a : 0;
  int64_t b = p + 1;
  *hi = b < k ? b : k;
}

}  // namespace featup
