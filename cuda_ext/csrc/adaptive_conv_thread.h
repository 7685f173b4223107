// One thread's share of the adaptive-conv CUDA kernels, written as host-and-device code.
//
// A block of BLOCK_THREADS threads covers one tile (tile_shape) of a plane for one channel group; thread
// tid = ly * LANES_X + lx owns the p adjacent pixels (row0 + ly, col0 + lx*p + q), q < p. Per channel the block
// stages the tile's patch (the tile plus a k-1 halo) in shared memory, and each thread reads every patch row it
// needs once (p + k - 1 values) and uses it for all p pixels from registers.
//
// A thread program is a sequence of phases separated by block barriers: phase n of any thread runs after phase
// n-1 of every thread of the block. The CUDA kernels run the phases with __syncthreads() in between; the host
// replay (adaptive_conv_replay.cpp) runs them thread by thread, so GPU-less tests check the tiling, staging and
// index arithmetic of exactly this code.
//
// Templated k (taps or filter-gradient sums in registers): the patch is double-buffered; while a thread computes
// channel c from one buffer it loads its share of channel c+1 into registers and then stores it into the other
// buffer: one barrier per channel. Runtime k: one buffer, stage then compute, two barriers per channel; the
// filter gradient sums CHUNK taps at a time in registers over the channel group, so each tap is written once per
// group (no atomic per multiply-add).
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "adaptive_conv_index.h"
#include "adaptive_conv_launch.h"

#if defined(__CUDACC__)
#define FEATUP_UNROLL _Pragma("unroll")
#else
#define FEATUP_UNROLL
#endif

namespace featup {

// The filter gradient of one tap: stored by its only writer, or added (atomically on a GPU) when several
// channel groups meet in a zeroed buffer.
FEATUP_HD void write_tap(float* dst, float v, bool atomic) {
#if defined(__CUDA_ARCH__)
  if (atomic) {
    atomicAdd(dst, v);
    return;
  }
#else
  if (atomic) {
    *dst += v;
    return;
  }
#endif
  *dst = v;
}

// Where one block works: batch element, tile origin and channel range.
struct BlockWork {
  int64_t b, row0, col0, c_begin, c_end;

  FEATUP_HD BlockWork(const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int64_t C)
      : b(m.batch(bz)), row0(m.row0(bx)), col0(m.col0(bx)), c_begin(m.channel_begin(by)),
        c_end(m.channel_end(by, C)) {}
  FEATUP_HD int64_t channels() const { return c_end > c_begin ? c_end - c_begin : 0; }
};

// A (B, C, rows, cols) operand read one channel plane at a time: the padded input X or the output gradient G.
template <typename scalar_t>
struct Planes {
  const scalar_t* data;
  ConvGeometry g;
  bool padded;  // X (B, C, Hp, Wp) rather than G (B, C, H, W)

  FEATUP_HD int64_t rows() const { return padded ? g.Hp() : g.H; }
  FEATUP_HD int64_t cols() const { return padded ? g.Wp() : g.W; }
  FEATUP_HD const scalar_t* plane(int64_t b, int64_t c) const {
    return data + (padded ? g.input_offset(b, c, 0, 0) : g.output_offset(b, c, 0, 0));
  }
  // Offset of (y, x) within a plane.
  FEATUP_HD int64_t offset(int64_t y, int64_t x) const {
    return padded ? g.input_offset(0, 0, y, x) : g.output_offset(0, 0, y, x);
  }
  // Element (y, x) of plane (b, c) as float, zero outside the plane.
  FEATUP_HD float at(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return y >= 0 && y < rows() && x >= 0 && x < cols() ? static_cast<float>(plane(b, c)[offset(y, x)]) : 0.f;
  }
};

// This thread's share of staging a templated kernel's patch: patch column tid % PATCH_W, patch rows
// tid / PATCH_W + s * ROWS_PER_PASS (s < PASSES), read from the plane at origin + (row, column), zero outside it.
// Consecutive threads read consecutive columns of a row (coalesced); the offsets advance by a fixed step.
template <typename scalar_t, int KT>
struct PatchStager {
  static constexpr int PATCH_W = tile_shape(KT).patch_w, PATCH_H = tile_shape(KT).patch_h;
  static constexpr int ROW_STRIDE = tile_shape(KT).row_stride;
  static constexpr int ROWS_PER_PASS = BLOCK_THREADS / PATCH_W;
  static constexpr int PASSES = (PATCH_H + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
  static_assert(ROWS_PER_PASS >= 1, "a templated patch row must fit in one block of threads");

  int64_t first;   // in-plane offset of element 0
  int64_t step;    // in-plane offset between consecutive elements
  int slot;        // shared-memory word of element 0 within a buffer
  int count;       // elements inside the patch: s < count
  int s_lo, s_hi;  // elements inside the plane: s in [s_lo, s_hi); the others stage zeros
  float value[PASSES];

  // Sets up this thread's share (called after the kernel's other set-up, so it takes no registers meanwhile).
  FEATUP_HD void init(int tid, const Planes<scalar_t>& src, int64_t origin_y, int64_t origin_x) {
    const int col = tid % PATCH_W, r0 = tid / PATCH_W;
    const int64_t x = origin_x + col, y0 = origin_y + r0;
    count = r0 < ROWS_PER_PASS ? (PATCH_H - r0 + ROWS_PER_PASS - 1) / ROWS_PER_PASS : 0;
    slot = tile_shape(KT).index(r0, col);
    first = src.offset(y0, x);
    step = ROWS_PER_PASS * src.cols();
    s_lo = s_hi = 0;
    if (count > 0 && x >= 0 && x < src.cols()) {
      const int64_t lo = y0 >= 0 ? 0 : (-y0 + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
      const int64_t left = src.rows() - y0;
      const int64_t hi = left > 0 ? (left + ROWS_PER_PASS - 1) / ROWS_PER_PASS : 0;
      s_lo = static_cast<int>(lo < count ? lo : count);
      s_hi = static_cast<int>(hi < count ? hi : count);
    }
  }
  // Reads this thread's elements of one plane into registers.
  FEATUP_HD void load(const scalar_t* plane) {
    FEATUP_UNROLL
    for (int s = 0; s < PASSES; ++s) value[s] = s >= s_lo && s < s_hi ? static_cast<float>(plane[first + s * step]) : 0.f;
  }
  // Writes them into one patch buffer.
  FEATUP_HD void store(float* buffer) const {
    FEATUP_UNROLL
    for (int s = 0; s < PASSES; ++s) {
      if (s < count) buffer[slot + s * ROWS_PER_PASS * ROW_STRIDE] = value[s];
    }
  }
};

// acc[q] += sum_ij taps[q][i*KT + j] * patch(ly + i, lx*P + q + j) for the P pixels of one thread; base is the
// word of patch(ly, lx*P) (ly * row_stride + lx). Each patch row's P + KT - 1 values are read once.
template <int KT, int P>
FEATUP_HD void convolve_rows(const float* buffer, int base, const float (&taps)[P][KT * KT], float (&acc)[P]) {
  constexpr int RS = tile_shape(KT).row_stride, PHASE_W = tile_shape(KT).phase_w;
  FEATUP_UNROLL
  for (int i = 0; i < KT; ++i) {
    float row[P + KT - 1];
    FEATUP_UNROLL
    for (int q = 0; q < P + KT - 1; ++q) row[q] = buffer[base + i * RS + (q % P) * PHASE_W + q / P];
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      FEATUP_UNROLL
      for (int j = 0; j < KT; ++j) acc[p] += taps[p][i * KT + j] * row[p + j];
    }
  }
}

// acc[q][i*KT + j] += gv[q] * patch(ly + i, lx*P + q + j): the filter-gradient products of one channel.
template <int KT, int P>
FEATUP_HD void accumulate_rows(const float* buffer, int base, const float (&gv)[P], float (&acc)[P][KT * KT]) {
  constexpr int RS = tile_shape(KT).row_stride, PHASE_W = tile_shape(KT).phase_w;
  FEATUP_UNROLL
  for (int i = 0; i < KT; ++i) {
    float row[P + KT - 1];
    FEATUP_UNROLL
    for (int q = 0; q < P + KT - 1; ++q) row[q] = buffer[base + i * RS + (q % P) * PHASE_W + q / P];
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      FEATUP_UNROLL
      for (int j = 0; j < KT; ++j) acc[p][i * KT + j] += gv[p] * row[p + j];
    }
  }
}

// Forward (GRAD_INPUT false: Y[c, h, w] from X) or input gradient (true: GX[c, y, x] from G, one thread per
// padded input pixel) of a templated k. Both are a convolution of the staged patch with per-pixel taps held in
// registers: the input gradient's taps are K[y-i, x-j, i, j] stored flipped, over a patch of G that starts k-1
// rows and columns before the tile (zero outside the image, as are the taps of output pixels outside it).
template <typename scalar_t, int KT, bool GRAD_INPUT>
struct ConvolveThread {
  static constexpr int P = pixels_per_thread(KT), TAPS = KT * KT;
  static constexpr int BUFFER = tile_shape(KT).patch_h * tile_shape(KT).row_stride;

  Planes<scalar_t> src;
  scalar_t* out;
  ConvGeometry g;
  BlockWork w;
  PatchStager<scalar_t, KT> stager;
  int64_t y, x0;  // this thread's row and first column on the output plane
  int base;
  float taps[P][TAPS];

  FEATUP_HD ConvolveThread(const scalar_t* in, const scalar_t* K, scalar_t* out_, const ConvGeometry& g_,
                           const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid)
      : src{in, g_, !GRAD_INPUT}, out(out_), g(g_), w(m, bx, by, bz, g_.C) {
    const int lx = tid % LANES_X, ly = tid / LANES_X;
    y = w.row0 + ly;
    x0 = w.col0 + lx * P;
    base = ly * tile_shape(KT).row_stride + lx;
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      const int64_t x = x0 + p;
      if (!GRAD_INPUT) {
        const bool ok = inside(p);
        FEATUP_UNROLL
        for (int t = 0; t < TAPS; ++t) {
          taps[p][t] = ok ? static_cast<float>(K[g.filter_offset(w.b, y, x, t / KT, t % KT)]) : 0.f;
        }
      } else {
        int64_t lo = 0, hi = 0;
        int i_lo = 0, i_hi = 0, j_lo = 0, j_hi = 0;  // taps whose output pixel lies in the image
        if (inside(p)) {
          taps_reading(y, g.H, KT, &lo, &hi);
          i_lo = static_cast<int>(lo), i_hi = static_cast<int>(hi);
          taps_reading(x, g.W, KT, &lo, &hi);
          j_lo = static_cast<int>(lo), j_hi = static_cast<int>(hi);
        }
        // Tap (i, j) of pixel (y - i, x - j), by linearity of filter_offset: kp - offset(0, i, j, 0, 0) + offset(0, 0, 0, i, j).
        const scalar_t* kp = K + g.filter_offset(w.b, y, x, 0, 0);
        FEATUP_UNROLL
        for (int i = 0; i < KT; ++i) {
          const scalar_t* kr = kp - g.filter_offset(0, i, 0, 0, 0);
          // patch row KT-1-i holds G row y - i: the taps are stored flipped. A branch per row (not a predicate
          // per tap) keeps ptxas from holding every tap load's address at once.
          if (i >= i_lo && i < i_hi) {
            FEATUP_UNROLL
            for (int j = 0; j < KT; ++j) {
              const bool tap = j >= j_lo && j < j_hi;
              taps[p][(KT - 1 - i) * KT + KT - 1 - j] =
                  tap ? static_cast<float>(kr[g.filter_offset(0, 0, 0, i, j) - g.filter_offset(0, 0, j, 0, 0)]) : 0.f;
            }
          } else {
            FEATUP_UNROLL
            for (int j = 0; j < KT; ++j) taps[p][(KT - 1 - i) * KT + KT - 1 - j] = 0.f;
          }
        }
      }
    }
    stager.init(tid, src, GRAD_INPUT ? w.row0 - (KT - 1) : w.row0, GRAD_INPUT ? w.col0 - (KT - 1) : w.col0);
  }
  FEATUP_HD bool inside(int p) const {
    return GRAD_INPUT ? y < g.Hp() && x0 + p < g.Wp() : y < g.H && x0 + p < g.W;
  }
  FEATUP_HD int64_t phases() const { return w.channels() > 0 ? w.channels() + 1 : 0; }
  FEATUP_HD void phase(int64_t n, float* smem) {
    if (n == 0) {
      stager.load(src.plane(w.b, w.c_begin));
      stager.store(smem);
      return;
    }
    const int64_t c = w.c_begin + n - 1;
    const bool more = c + 1 < w.c_end;
    if (more) stager.load(src.plane(w.b, c + 1));
    float acc[P];
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) acc[p] = 0.f;
    convolve_rows<KT, P>(smem + ((n - 1) & 1) * BUFFER, base, taps, acc);
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      if (inside(p)) {
        const int64_t at = GRAD_INPUT ? g.input_offset(w.b, c, y, x0 + p) : g.output_offset(w.b, c, y, x0 + p);
        out[at] = static_cast<scalar_t>(acc[p]);
      }
    }
    if (more) stager.store(smem + (n & 1) * BUFFER);
  }
  FEATUP_HD void finish() {}
};

// Filter gradient of a templated k: each thread sums g[c, h, w] * X[c, h+i, w+j] over the channel group for
// all k*k taps of its P pixels in registers, then writes each tap once.
template <typename scalar_t, int KT>
struct GradFiltersThread {
  static constexpr int P = pixels_per_thread(KT), TAPS = KT * KT;
  static constexpr int BUFFER = tile_shape(KT).patch_h * tile_shape(KT).row_stride;

  Planes<scalar_t> grad, input;
  float* gk;
  bool atomic;
  ConvGeometry g;
  BlockWork w;
  PatchStager<scalar_t, KT> stager;
  int64_t h, x0;
  int base;
  float gv[P], next[P];
  float acc[P][TAPS];

  FEATUP_HD GradFiltersThread(const scalar_t* G, const scalar_t* X, float* gk_, const ConvGeometry& g_, bool atomic_,
                              const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid)
      : grad{G, g_, false}, input{X, g_, true}, gk(gk_), atomic(atomic_), g(g_), w(m, bx, by, bz, g_.C) {
    stager.init(tid, input, w.row0, w.col0);
    const int lx = tid % LANES_X, ly = tid / LANES_X;
    h = w.row0 + ly;
    x0 = w.col0 + lx * P;
    base = ly * tile_shape(KT).row_stride + lx;
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      FEATUP_UNROLL
      for (int t = 0; t < TAPS; ++t) acc[p][t] = 0.f;
    }
  }
  FEATUP_HD bool inside(int p) const { return h < g.H && x0 + p < g.W; }
  FEATUP_HD void load_grad(int64_t c, float (&dst)[P]) const {
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      dst[p] = inside(p) ? static_cast<float>(grad.data[g.output_offset(w.b, c, h, x0 + p)]) : 0.f;
    }
  }
  FEATUP_HD int64_t phases() const { return w.channels() > 0 ? w.channels() + 1 : 0; }
  FEATUP_HD void phase(int64_t n, float* smem) {
    if (n == 0) {
      stager.load(input.plane(w.b, w.c_begin));
      stager.store(smem);
      load_grad(w.c_begin, gv);
      return;
    }
    const int64_t c = w.c_begin + n - 1;
    const bool more = c + 1 < w.c_end;
    if (more) {
      stager.load(input.plane(w.b, c + 1));
      load_grad(c + 1, next);
    }
    accumulate_rows<KT, P>(smem + ((n - 1) & 1) * BUFFER, base, gv, acc);
    if (more) {
      stager.store(smem + (n & 1) * BUFFER);
      FEATUP_UNROLL
      for (int p = 0; p < P; ++p) gv[p] = next[p];
    }
  }
  FEATUP_HD void finish() {
    FEATUP_UNROLL
    for (int p = 0; p < P; ++p) {
      if (!inside(p)) continue;
      FEATUP_UNROLL
      for (int t = 0; t < TAPS; ++t) write_tap(&gk[g.filter_offset(w.b, h, x0 + p, t / KT, t % KT)], acc[p][t], atomic);
    }
  }
};

// Stages plane c's patch at origin into one buffer (runtime k: every thread strides over the patch).
template <typename scalar_t>
FEATUP_HD void stage_patch(const TileShape& s, const Planes<scalar_t>& src, int64_t b, int64_t c, int64_t origin_y,
                           int64_t origin_x, int tid, float* buffer) {
  for (int e = tid; e < s.patch_h * s.patch_w; e += BLOCK_THREADS) {
    const int r = e / s.patch_w, col = e % s.patch_w;
    buffer[s.index(r, col)] = src.at(b, c, origin_y + r, origin_x + col);
  }
}

// Forward or input gradient of a runtime k (one pixel per thread): taps read from the filters per channel.
template <typename scalar_t, bool GRAD_INPUT>
struct RuntimeConvolveThread {
  Planes<scalar_t> src;
  const scalar_t* K;
  scalar_t* out;
  ConvGeometry g;
  BlockWork w;
  TileShape s;
  int tid, lx, ly;
  int64_t y, x;
  int64_t i_lo = 0, i_hi = 0, j_lo = 0, j_hi = 0;  // input gradient: taps whose output pixel exists

  FEATUP_HD RuntimeConvolveThread(const scalar_t* in, const scalar_t* K_, scalar_t* out_, const ConvGeometry& g_,
                                  const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid_)
      : src{in, g_, !GRAD_INPUT}, K(K_), out(out_), g(g_), w(m, bx, by, bz, g_.C), s(tile_shape(g_.k)), tid(tid_),
        lx(tid_ % LANES_X), ly(tid_ / LANES_X), y(w.row0 + ly), x(w.col0 + lx) {
    if (GRAD_INPUT && inside()) {
      taps_reading(y, g.H, g.k, &i_lo, &i_hi);
      taps_reading(x, g.W, g.k, &j_lo, &j_hi);
    }
  }
  FEATUP_HD bool inside() const { return GRAD_INPUT ? y < g.Hp() && x < g.Wp() : y < g.H && x < g.W; }
  FEATUP_HD int64_t phases() const { return 2 * w.channels(); }
  FEATUP_HD void phase(int64_t n, float* smem) {
    const int64_t c = w.c_begin + n / 2, k = g.k;
    if (n % 2 == 0) {
      const int64_t shift = GRAD_INPUT ? k - 1 : 0;
      stage_patch(s, src, w.b, c, w.row0 - shift, w.col0 - shift, tid, smem);
      return;
    }
    if (!inside()) return;
    float acc = 0.f;
    if (!GRAD_INPUT) {
      for (int i = 0; i < k; ++i) {
        for (int j = 0; j < k; ++j) {
          acc += static_cast<float>(K[g.filter_offset(w.b, y, x, i, j)]) * smem[s.index(ly + i, lx + j)];
        }
      }
      out[g.output_offset(w.b, c, y, x)] = static_cast<scalar_t>(acc);
    } else {
      for (int64_t i = i_lo; i < i_hi; ++i) {
        for (int64_t j = j_lo; j < j_hi; ++j) {
          acc += static_cast<float>(K[g.filter_offset(w.b, y - i, x - j, i, j)]) *
                 smem[s.index(ly + static_cast<int>(k - 1 - i), lx + static_cast<int>(k - 1 - j))];
        }
      }
      out[g.input_offset(w.b, c, y, x)] = static_cast<scalar_t>(acc);
    }
  }
  FEATUP_HD void finish() {}
};

// Filter gradient of a runtime k (one pixel per thread): CHUNK taps at a time are summed over the channel
// group in registers (the channels' patches staged once per chunk) and written once each.
template <typename scalar_t>
struct RuntimeGradFiltersThread {
  static constexpr int CHUNK = 32;

  Planes<scalar_t> grad, input;
  float* gk;
  bool atomic;
  ConvGeometry g;
  BlockWork w;
  TileShape s;
  int tid, lx, ly;
  int64_t h, x;
  int word[CHUNK];  // shared-memory word of each tap of the chunk for this thread
  float acc[CHUNK];

  FEATUP_HD RuntimeGradFiltersThread(const scalar_t* G, const scalar_t* X, float* gk_, const ConvGeometry& g_,
                                     bool atomic_, const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid_)
      : grad{G, g_, false}, input{X, g_, true}, gk(gk_), atomic(atomic_), g(g_), w(m, bx, by, bz, g_.C),
        s(tile_shape(g_.k)), tid(tid_), lx(tid_ % LANES_X), ly(tid_ / LANES_X), h(w.row0 + ly), x(w.col0 + lx) {}
  FEATUP_HD int64_t chunks() const { return (g.taps() + CHUNK - 1) / CHUNK; }
  FEATUP_HD int64_t phases() const { return chunks() * 2 * w.channels(); }
  FEATUP_HD void phase(int64_t n, float* smem) {
    const int64_t per_chunk = 2 * w.channels();
    const int64_t t0 = n / per_chunk * CHUNK, within = n % per_chunk;
    const int64_t c = w.c_begin + within / 2, k = g.k, taps = g.taps();
    if (within % 2 == 0) {
      stage_patch(s, input, w.b, c, w.row0, w.col0, tid, smem);
      return;
    }
    if (c == w.c_begin) {
      FEATUP_UNROLL
      for (int q = 0; q < CHUNK; ++q) {
        const int64_t t = t0 + q < taps ? t0 + q : 0;
        word[q] = s.index(ly + static_cast<int>(t / k), lx + static_cast<int>(t % k));
        acc[q] = 0.f;
      }
    }
    if (!(h < g.H && x < g.W)) return;
    const float gv = static_cast<float>(grad.data[g.output_offset(w.b, c, h, x)]);
    FEATUP_UNROLL
    for (int q = 0; q < CHUNK; ++q) acc[q] += gv * smem[word[q]];
    if (c + 1 == w.c_end) {
      FEATUP_UNROLL
      for (int q = 0; q < CHUNK; ++q) {
        const int64_t t = t0 + q;
        if (t < taps) write_tap(&gk[g.filter_offset(w.b, h, x, t / k, t % k)], acc[q], atomic);
      }
    }
  }
  FEATUP_HD void finish() {}
};

template <typename scalar_t, int KT>
using ForwardProgram = std::conditional_t<(KT > 0), ConvolveThread<scalar_t, KT, false>,
                                          RuntimeConvolveThread<scalar_t, false>>;
template <typename scalar_t, int KT>
using GradInputProgram = std::conditional_t<(KT > 0), ConvolveThread<scalar_t, KT, true>,
                                            RuntimeConvolveThread<scalar_t, true>>;
template <typename scalar_t, int KT>
using GradFiltersProgram = std::conditional_t<(KT > 0), GradFiltersThread<scalar_t, KT>,
                                              RuntimeGradFiltersThread<scalar_t>>;

// Calls fn with an integral constant for the templated kernel sizes (templated_k), 0 (runtime size) otherwise.
template <typename Fn>
void dispatch_k(int64_t k, Fn&& fn) {
  switch (k) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 9: fn(std::integral_constant<int, 9>{}); break;
    case 11: fn(std::integral_constant<int, 11>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace featup
