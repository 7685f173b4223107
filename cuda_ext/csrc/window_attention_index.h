// Index arithmetic of the windowed cross-attention, shared by the CPU and CUDA kernels.
//
// Layouts (all contiguous):
//   q    (B, N, Hq, Wq, d)   queries per head
//   k    (B, N, h, w, d)     keys per head
//   v    (B, C, h, w)        values; the kernels also use a channels-last copy vt (B, h, w, C)
//   out  (B, C, Hq, Wq)      out[b,c,i,j] = sum over the window of (i, j) of A[b,i,j,y,x] v[b,c,y,x]
//   rows (Hq, 2), cols (Wq, 2): half-open [start, end) key rows / columns seen by query row i / column j.
//
// Keeping these helpers in one place means the CPU tests exercise the arithmetic the GPU uses.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FEATUP_WA_HD __host__ __device__ __forceinline__
#else
#define FEATUP_WA_HD inline
#endif

namespace featup {

struct AttnGeometry {
  int64_t B, N, Hq, Wq, h, w, d, C;

  FEATUP_WA_HD int64_t q_offset(int64_t b, int64_t n, int64_t i, int64_t j, int64_t e) const {
    return (((b * N + n) * Hq + i) * Wq + j) * d + e;
  }
  FEATUP_WA_HD int64_t k_offset(int64_t b, int64_t n, int64_t y, int64_t x, int64_t e) const {
    return (((b * N + n) * h + y) * w + x) * d + e;
  }
  FEATUP_WA_HD int64_t v_offset(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return ((b * C + c) * h + y) * w + x;
  }
  // Channels-last values (B, h, w, C): a key's channels are contiguous.
  FEATUP_WA_HD int64_t vt_offset(int64_t b, int64_t y, int64_t x, int64_t c) const {
    return ((b * h + y) * w + x) * C + c;
  }
  FEATUP_WA_HD int64_t out_offset(int64_t b, int64_t c, int64_t i, int64_t j) const {
    return ((b * C + c) * Hq + i) * Wq + j;
  }
  // Channels-last output gradient (B, Hq, Wq, C), as the CUDA backward reads it.
  FEATUP_WA_HD int64_t out_t_offset(int64_t b, int64_t i, int64_t j, int64_t c) const {
    return ((b * Hq + i) * Wq + j) * C + c;
  }
};

// A rectangle of keys [y0, y1) x [x0, x1), enumerated row-major: flat index t <-> (y0 + t / width, x0 + t % width).
struct KeyWindow {
  int64_t y0, y1, x0, x1;

  FEATUP_WA_HD int64_t height() const { return y1 - y0; }
  FEATUP_WA_HD int64_t width() const { return x1 - x0; }
  FEATUP_WA_HD int64_t size() const { return height() * width(); }
  FEATUP_WA_HD int64_t key_y(int64_t t) const { return y0 + t / width(); }
  FEATUP_WA_HD int64_t key_x(int64_t t) const { return x0 + t % width(); }
};

// The window of query (i, j) from the per-row and per-column bounds ((n, 2) int64 arrays).
FEATUP_WA_HD KeyWindow query_window(const int64_t* rows, const int64_t* cols, int64_t i, int64_t j) {
  return KeyWindow{rows[2 * i], rows[2 * i + 1], cols[2 * j], cols[2 * j + 1]};
}

// Whether position p lies in window idx of a (n, 2) bounds array.
FEATUP_WA_HD bool window_contains(const int64_t* bounds, int64_t idx, int64_t p) {
  return p >= bounds[2 * idx] && p < bounds[2 * idx + 1];
}

// The smallest column range holding the windows of query columns [j0, j1): the keys a block of queries of
// one row shares (columns outside a query's own window are masked for it).
FEATUP_WA_HD void column_union(const int64_t* cols, int64_t j0, int64_t j1, int64_t* x0, int64_t* x1) {
  int64_t lo = cols[2 * j0], hi = cols[2 * j0 + 1];
  for (int64_t j = j0 + 1; j < j1; ++j) {
    lo = cols[2 * j] < lo ? cols[2 * j] : lo;
    hi = cols[2 * j + 1] > hi ? cols[2 * j + 1] : hi;
  }
  *x0 = lo;
  *x1 = hi;
}

// The key rows a run of query rows [i0, i1) reads: where the CPU backward's per-task key gradients live.
FEATUP_WA_HD void row_union(const int64_t* rows, int64_t i0, int64_t i1, int64_t* y0, int64_t* y1) {
  column_union(rows, i0, i1, y0, y1);
}

}  // namespace featup
