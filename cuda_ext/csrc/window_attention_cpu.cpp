// Fused CPU kernels of the windowed cross-attention: forward and the gradients of q, k and v.
//
// Work is split over (batch, query row) with at::parallel_for. A query row is walked in blocks of QB = 16
// neighbouring queries that share one key rectangle: the row window of the row times the union of the
// blocks' column windows (keys outside a query's own columns are masked for it). Queries are the vector
// axis: every contraction is a small register-tiled product whose inner loop loads QB-wide vectors and
// broadcasts one scalar per tile row (GCC vector extensions; AVX when the build enables it):
//   logits   S[t, q]  = sum_e k[t, e] Q[e, q]           (per head, e over d)
//   output   O[c, q]  = sum_t v[c, t] A[t, q]           (the dominant cost: C x window x QB per block)
// The dense (HqWq x hw) matrix never exists: memory is the output plus O(threads * heads * window * QB).
// The backward recomputes the attention of each block (flash-style) instead of storing it. Queries own
// their q-gradient; key-side gradients accumulate in per-task buffers covering only the key rows the task's
// query rows read, summed afterwards. Accumulation is float32 (float64 for double inputs).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "window_attention_index.h"
#include "window_attention_shapes.h"

namespace featup {
namespace {

constexpr int QB = 16;  // queries per block: the vector axis of every tile

template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static constexpr int L = 8;
  static constexpr int MR = 4;  // tile rows: MR x (QB / L) accumulators stay in registers
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int L = 4;
  static constexpr int MR = 2;
};
template <typename T> using Vec = typename Simd<T>::V;
template <typename T> constexpr int kNV = QB / Simd<T>::L;

template <typename T> inline Vec<T> vload(const T* p) {
  Vec<T> r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <typename T> inline void vstore(T* p, const Vec<T>& x) { std::memcpy(p, &x, sizeof(x)); }
inline Vec<float> vsplat(float x) { return Vec<float>{x, x, x, x, x, x, x, x}; }  // a broadcast ('0 + x' is an add)
inline Vec<double> vsplat(double x) { return Vec<double>{x, x, x, x}; }
template <typename V> inline V vmax(const V& a, const V& b) { return a > b ? a : b; }

// exp(x) for float lanes: Cody-Waite reduction x = n ln2 + r and a degree-6 polynomial for e^r (the Cephes
// coefficients, about 1 ulp), times 2^n built in the exponent bits. x is clamped to the normal range.
inline Vec<float> vexp(Vec<float> x) {
  using I = Simd<float>::I;
  x = x > vsplat(88.0f) ? vsplat(88.0f) : x;
  x = x < vsplat(-87.3f) ? vsplat(-87.3f) : x;
  const Vec<float> t = x * 1.44269504088896341f + 0.5f;
  Vec<float> n = __builtin_convertvector(__builtin_convertvector(t, I), Vec<float>);
  n = n > t ? n - 1.0f : n;  // floor
  const Vec<float> r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  Vec<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline Vec<double> vexp(Vec<double> x) {
  for (int l = 0; l < Simd<double>::L; ++l) x[l] = std::exp(x[l]);
  return x;
}

// acc[r][:] += sum_{u < nu, x < nx} a[r*rs + u*us + x*xs] * bm[(u*nx + x)*ldb + :QB]: MR broadcast rows times a
// QB-wide panel of bm. Each caller's layout is expressed through the strides.
template <int MR, typename T>
inline void tile_fma(const T* __restrict__ a, int64_t rs, int64_t us, int64_t xs, int64_t nu, int64_t nx,
                     const T* __restrict__ bm, int64_t ldb, Vec<T> (&acc)[MR][kNV<T>]) {
  constexpr int NV = kNV<T>, L = Simd<T>::L;
  for (int64_t u = 0; u < nu; ++u) {
    const T* au = a + u * us;
    const T* bu = bm + u * nx * ldb;
    for (int64_t x = 0; x < nx; ++x) {
      Vec<T> bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = vload(bu + x * ldb + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Vec<T> ar = vsplat(au[r * rs + x * xs]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
      }
    }
  }
}

template <int MR, typename T> inline void zero(Vec<T> (&acc)[MR][kNV<T>]) {
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kNV<T>; ++v) acc[r][v] = Vec<T>{};
}

// Calls fn(integral_constant<MR>, first_row) over [0, m) in tiles of MR rows, then single-row tails.
template <int MR, typename Fn> inline void over_row_tiles(int64_t m, Fn&& fn) {
  int64_t r = 0;
  for (; r + MR <= m; r += MR) fn(std::integral_constant<int, MR>{}, r);
  for (; r < m; ++r) fn(std::integral_constant<int, 1>{}, r);
}

// Query blocks of every row and their shared column ranges, with per-block masks, computed once per call.
template <typename T> struct BlockPlan {
  struct Block {
    int64_t j0, nq, x0, x1, mask;  // mask: offset of the block's (x1 - x0) x QB masks
  };
  std::vector<Block> blocks;
  std::vector<T> valid;  // 1 where column x0 + t is in query j0 + q's window (and for padding queries), else 0
  std::vector<T> bias;   // 0 where valid, -inf elsewhere: added to the logits before the max
  int64_t max_height = 0, max_width = 0;

  BlockPlan(const int64_t* rows, const int64_t* cols, const AttnGeometry& g) {
    for (int64_t i = 0; i < g.Hq; ++i) max_height = std::max(max_height, rows[2 * i + 1] - rows[2 * i]);
    for (int64_t j0 = 0; j0 < g.Wq; j0 += QB) {
      const int64_t nq = std::min<int64_t>(QB, g.Wq - j0);
      int64_t x0, x1;
      column_union(cols, j0, j0 + nq, &x0, &x1);
      blocks.push_back({j0, nq, x0, x1, static_cast<int64_t>(valid.size())});
      max_width = std::max(max_width, x1 - x0);
      for (int64_t x = x0; x < x1; ++x) {
        for (int64_t q = 0; q < QB; ++q) {
          const bool in = q >= nq || window_contains(cols, j0 + q, x);
          valid.push_back(in ? T(1) : T(0));
          bias.push_back(in ? T(0) : -std::numeric_limits<T>::infinity());
        }
      }
    }
  }
  int64_t max_keys() const { return max_height * max_width; }
};

// n rounded up to a multiple of QB: rows padded so that QB-wide tiles never run past them.
inline int64_t padded(int64_t n) { return (n + QB - 1) / QB * QB; }

// Per-thread buffers of one block's computation.
template <typename T> struct Scratch {
  std::vector<T> qt;  // N x d x QB   queries, transposed per head
  std::vector<T> qr;  // N x QB x dp  queries row-major, rows padded to dp (backward: key gradient)
  std::vector<T> p;   // N x K x QB   logits, then probabilities, then (backward) logit gradients
  std::vector<T> a;   // K x QB       head-mean attention
  std::vector<T> g;   // C x QB       output gradient (backward)
  std::vector<T> da;  // K x QB       attention gradient (backward)
  std::vector<T> gt;  // QB x Cp      output gradient transposed, channels padded to Cp (backward: value gradient)
  int64_t K, dp, Cp;

  Scratch(const AttnGeometry& g_, int64_t max_keys, bool backward)
      : K(max_keys), dp(padded(g_.d)), Cp(padded(g_.C)) {
    qt.assign(g_.N * g_.d * QB, T(0));
    p.assign(g_.N * K * QB, T(0));
    a.assign(K * QB, T(0));
    if (backward) {
      qr.assign(g_.N * QB * dp, T(0));
      g.assign(g_.C * QB, T(0));
      da.assign(K * QB, T(0));
      gt.assign(QB * Cp, T(0));
    }
  }
};

template <typename scalar_t, typename T> struct Inputs {
  const scalar_t* q;
  const T* k;   // (B, N, h, w, d) in the accumulation type
  const T* v;   // (B, C, h, w) in the accumulation type
  const T* vt;  // (B, h, w, C) channels-last copy (backward only)
  const int64_t* rows;
  const int64_t* cols;
  AttnGeometry g;
  T scale;
};

// Probabilities of every head (into s.p) and their mean (into s.a) for queries (b, i, j0 .. j0+nq) over the
// block's key window; also gathers the block's queries (s.qt, and s.qr when rows_too).
template <typename scalar_t, typename T>
void attend_block(const Inputs<scalar_t, T>& in, const BlockPlan<T>& plan, const typename BlockPlan<T>::Block& blk,
                  int64_t b, int64_t i, Scratch<T>& s, bool rows_too) {
  constexpr int NV = kNV<T>, L = Simd<T>::L, MR = Simd<T>::MR;
  const AttnGeometry& g = in.g;
  const KeyWindow win{in.rows[2 * i], in.rows[2 * i + 1], blk.x0, blk.x1};
  const int64_t K = win.size(), ux = win.width(), d = g.d;
  const T* valid = plan.valid.data() + blk.mask;
  const T* bias = plan.bias.data() + blk.mask;
  for (int64_t n = 0; n < g.N; ++n) {
    T* qt = s.qt.data() + n * d * QB;
    T* qr = s.qr.empty() ? nullptr : s.qr.data() + n * QB * s.dp;
    for (int64_t q = 0; q < QB; ++q) {
      const scalar_t* src = q < blk.nq ? in.q + g.q_offset(b, n, i, blk.j0 + q, 0) : nullptr;
      for (int64_t e = 0; e < d; ++e) {
        const T val = src ? static_cast<T>(src[e]) : T(0);
        qt[e * QB + q] = val;
        if (rows_too) qr[q * s.dp + e] = val;
      }
    }
    T* pn = s.p.data() + n * s.K * QB;
    for (int64_t y = win.y0; y < win.y1; ++y) {
      const T* krow = in.k + g.k_offset(b, n, y, win.x0, 0);
      T* prow = pn + (y - win.y0) * ux * QB;
      over_row_tiles<MR>(ux, [&](auto mr, int64_t x) {
        constexpr int R = decltype(mr)::value;
        Vec<T> acc[R][NV];
        zero<R, T>(acc);
        tile_fma<R, T>(krow + x * d, d, 0, 1, 1, d, qt, QB, acc);
        for (int r = 0; r < R; ++r)
          for (int v = 0; v < NV; ++v) vstore(prow + (x + r) * QB + v * L, acc[r][v] * in.scale);
      });
    }
    // Softmax over the window, per query (lane): masked keys get probability exactly 0.
    const int64_t uy = win.height();
    for (int v = 0; v < NV; ++v) {
      Vec<T> m = vsplat(-std::numeric_limits<T>::infinity()), sum = Vec<T>{};
      for (int64_t y = 0; y < uy; ++y)
        for (int64_t x = 0; x < ux; ++x)
          m = vmax(m, vload(pn + (y * ux + x) * QB + v * L) + vload(bias + x * QB + v * L));
      for (int64_t y = 0; y < uy; ++y) {
        for (int64_t x = 0; x < ux; ++x) {
          T* pt = pn + (y * ux + x) * QB + v * L;
          const Vec<T> e = vexp(vload(pt) + vload(bias + x * QB + v * L) - m) * vload(valid + x * QB + v * L);
          vstore(pt, e);
          sum += e;
        }
      }
      const Vec<T> inv = T(1) / sum;
      T* a = s.a.data();
      for (int64_t t = 0; t < K; ++t) {
        const Vec<T> pr = vload(pn + t * QB + v * L) * inv;
        vstore(pn + t * QB + v * L, pr);
        vstore(a + t * QB + v * L, n == 0 ? pr : vload(a + t * QB + v * L) + pr);
      }
    }
  }
  const T heads = static_cast<T>(g.N);
  for (int64_t t = 0; t < K * QB; t += L) vstore(s.a.data() + t, vload(s.a.data() + t) / heads);
}

// Writes lanes [0, nq) of a QB-wide tile row to dst[q * stride].
template <typename scalar_t, typename T>
inline void store_row(scalar_t* dst, int64_t stride, const Vec<T>* row, int64_t nq) {
  constexpr int NV = kNV<T>, L = Simd<T>::L;
  if constexpr (std::is_same<scalar_t, T>::value) {
    if (nq == QB && stride == 1) {
      for (int v = 0; v < NV; ++v) vstore(dst + v * L, row[v]);
      return;
    }
  }
  T buf[QB];
  for (int v = 0; v < NV; ++v) vstore(buf + v * L, row[v]);
  for (int64_t q = 0; q < nq; ++q) dst[q * stride] = static_cast<scalar_t>(buf[q]);
}

template <typename scalar_t, typename T>
void forward_kernel(const Inputs<scalar_t, T>& in, scalar_t* __restrict__ out) {
  constexpr int NV = kNV<T>, MR = Simd<T>::MR;
  const AttnGeometry& g = in.g;
  const BlockPlan<T> plan(in.rows, in.cols, g);
  at::parallel_for(0, g.B * g.Hq, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(g, plan.max_keys(), false);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.Hq, i = task % g.Hq;
      for (const auto& blk : plan.blocks) {
        attend_block(in, plan, blk, b, i, s, false);
        const KeyWindow win{in.rows[2 * i], in.rows[2 * i + 1], blk.x0, blk.x1};
        over_row_tiles<MR>(g.C, [&](auto mr, int64_t c) {
          constexpr int R = decltype(mr)::value;
          Vec<T> acc[R][NV];
          zero<R, T>(acc);
          tile_fma<R, T>(in.v + g.v_offset(b, c, win.y0, win.x0), g.h * g.w, g.w, 1, win.height(), win.width(),
                         s.a.data(), QB, acc);
          for (int r = 0; r < R; ++r) store_row<scalar_t, T>(out + g.out_offset(b, c + r, i, blk.j0), 1, acc[r], blk.nq);
        });
      }
    }
  });
}

// Key-side gradients of one task (a run of query rows of one batch element), over the key rows it reads.
template <typename T> struct KeyGrads {
  int64_t b, i0, i1, y0, y1;
  std::vector<T> dk;  // N x (y1-y0) x w x dp
  std::vector<T> dv;  // (y1-y0) x w x Cp  (channels-last)
};

template <typename scalar_t, typename T>
void backward_kernel(const Inputs<scalar_t, T>& in, const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ gq,
                     T* __restrict__ gk, T* __restrict__ gv, bool need_q, bool need_k, bool need_v) {
  constexpr int NV = kNV<T>, L = Simd<T>::L, MR = Simd<T>::MR;
  const AttnGeometry& g = in.g;
  const BlockPlan<T> plan(in.rows, in.cols, g);
  const int64_t dp = padded(g.d), Cp = padded(g.C);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.Hq, at::get_num_threads()));
  std::vector<KeyGrads<T>> tasks;
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      KeyGrads<T> t{b, g.Hq * c / chunks, g.Hq * (c + 1) / chunks, 0, 0, {}, {}};
      if (t.i0 == t.i1) continue;
      row_union(in.rows, t.i0, t.i1, &t.y0, &t.y1);
      tasks.push_back(std::move(t));
    }
  }
  const bool need_attn_grad = need_q || need_k;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(g, plan.max_keys(), true);
    for (int64_t ti = begin; ti < end; ++ti) {
      KeyGrads<T>& task = tasks[ti];
      const int64_t span = task.y1 - task.y0, b = task.b;
      if (need_k) task.dk.assign(g.N * span * g.w * dp, T(0));
      if (need_v) task.dv.assign(span * g.w * Cp, T(0));
      for (int64_t i = task.i0; i < task.i1; ++i) {
        for (const auto& blk : plan.blocks) {
          attend_block(in, plan, blk, b, i, s, need_k);
          const KeyWindow win{in.rows[2 * i], in.rows[2 * i + 1], blk.x0, blk.x1};
          const int64_t K = win.size(), ux = win.width();
          T* G = s.g.data();
          for (int64_t c = 0; c < g.C; ++c) {
            const scalar_t* src = grad_out + g.out_offset(b, c, i, blk.j0);
            for (int64_t q = 0; q < QB; ++q) G[c * QB + q] = q < blk.nq ? static_cast<T>(src[q]) : T(0);
          }
          if (need_v) {  // dv[key, c] += sum_q A[key, q] G[c, q]: channels are the vector axis (channels-last buffer)
            T* GT = s.gt.data();
            for (int64_t c = 0; c < g.C; ++c)
              for (int64_t q = 0; q < QB; ++q) GT[q * s.Cp + c] = G[c * QB + q];
            for (int64_t y = win.y0; y < win.y1; ++y) {
              T* dvrow = task.dv.data() + ((y - task.y0) * g.w + win.x0) * s.Cp;
              const T* arow = s.a.data() + (y - win.y0) * ux * QB;
              over_row_tiles<MR>(ux, [&](auto mr, int64_t x) {
                constexpr int R = decltype(mr)::value;
                for (int64_t c0 = 0; c0 < s.Cp; c0 += QB) {
                  Vec<T> acc[R][NV];
                  zero<R, T>(acc);
                  tile_fma<R, T>(arow + x * QB, QB, 0, 1, 1, QB, GT + c0, s.Cp, acc);
                  for (int r = 0; r < R; ++r)
                    for (int v = 0; v < NV; ++v) {
                      T* dst = dvrow + (x + r) * s.Cp + c0 + v * L;
                      vstore(dst, vload(dst) + acc[r][v]);
                    }
                }
              });
            }
          }
          if (!need_attn_grad) continue;
          // dA[key, q] = sum_c v[c, key] G[c, q], keys of one key row at a time from the channels-last copy.
          for (int64_t y = win.y0; y < win.y1; ++y) {
            T* darow = s.da.data() + (y - win.y0) * ux * QB;
            over_row_tiles<MR>(ux, [&](auto mr, int64_t x) {
              constexpr int R = decltype(mr)::value;
              Vec<T> acc[R][NV];
              zero<R, T>(acc);
              tile_fma<R, T>(in.vt + g.vt_offset(b, y, win.x0 + x, 0), g.C, 0, 1, 1, g.C, G, QB, acc);
              for (int r = 0; r < R; ++r)
                for (int v = 0; v < NV; ++v) vstore(darow + (x + r) * QB + v * L, acc[r][v]);
            });
          }
          const T heads = static_cast<T>(g.N);
          for (int64_t t = 0; t < K * QB; t += L) vstore(s.da.data() + t, vload(s.da.data() + t) / heads);  // dP_n
          for (int64_t n = 0; n < g.N; ++n) {
            // dP_n = dA / N; dS_n = P_n (dP_n - sum_keys P_n dP_n); logit gradient = scale dS_n (into s.p).
            T* pn = s.p.data() + n * s.K * QB;
            for (int v = 0; v < NV; ++v) {
              Vec<T> dot = Vec<T>{};
              for (int64_t t = 0; t < K; ++t) dot += vload(pn + t * QB + v * L) * vload(s.da.data() + t * QB + v * L);
              for (int64_t t = 0; t < K; ++t) {
                const Vec<T> pr = vload(pn + t * QB + v * L);
                vstore(pn + t * QB + v * L, pr * (vload(s.da.data() + t * QB + v * L) - dot) * in.scale);
              }
            }
            if (need_q) {  // dq[e, q] = sum_keys k[key, e] dS[key, q]
              over_row_tiles<MR>(g.d, [&](auto mr, int64_t e) {
                constexpr int R = decltype(mr)::value;
                Vec<T> acc[R][NV];
                zero<R, T>(acc);
                tile_fma<R, T>(in.k + g.k_offset(b, n, win.y0, win.x0, e), 1, g.w * g.d, g.d, win.height(), ux, pn,
                               QB, acc);
                for (int r = 0; r < R; ++r)
                  store_row<scalar_t, T>(gq + g.q_offset(b, n, i, blk.j0, e + r), g.d, acc[r], blk.nq);
              });
            }
            if (need_k) {  // dk[key, e] += sum_q dS[key, q] q[q, e]: head width is the vector axis here
              const T* qr = s.qr.data() + n * QB * dp;
              for (int64_t y = win.y0; y < win.y1; ++y) {
                T* dkrow = task.dk.data() + ((n * span + y - task.y0) * g.w + win.x0) * dp;
                const T* dsrow = pn + (y - win.y0) * ux * QB;
                over_row_tiles<MR>(ux, [&](auto mr, int64_t x) {
                  constexpr int R = decltype(mr)::value;
                  for (int64_t e0 = 0; e0 < dp; e0 += QB) {
                    Vec<T> acc[R][NV];
                    zero<R, T>(acc);
                    tile_fma<R, T>(dsrow + x * QB, QB, 0, 1, 1, QB, qr + e0, dp, acc);
                    for (int r = 0; r < R; ++r)
                      for (int v = 0; v < NV; ++v) {
                        T* dst = dkrow + (x + r) * dp + e0 + v * L;
                        vstore(dst, vload(dst) + acc[r][v]);
                      }
                  }
                });
              }
            }
          }
        }
      }
    }
  });
  // Sum the tasks' key-side buffers, one key row of one batch element per work item.
  at::parallel_for(0, g.B * g.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.h, y = item % g.h;
      for (const auto& task : tasks) {
        if (task.b != b || y < task.y0 || y >= task.y1) continue;
        const int64_t span = task.y1 - task.y0, yy = y - task.y0;
        if (need_k) {
          for (int64_t n = 0; n < g.N; ++n)
            for (int64_t x = 0; x < g.w; ++x) {
              const T* src = task.dk.data() + ((n * span + yy) * g.w + x) * dp;
              T* dst = gk + g.k_offset(b, n, y, x, 0);
              for (int64_t e = 0; e < g.d; ++e) dst[e] += src[e];
            }
        }
        if (need_v) {
          const T* src = task.dv.data() + yy * g.w * Cp;
          for (int64_t c = 0; c < g.C; ++c) {
            T* dst = gv + g.v_offset(b, c, y, 0);
            for (int64_t x = 0; x < g.w; ++x) dst[x] += src[x * Cp + c];
          }
        }
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "featup window_attention CPU kernel: ", name, " must be a CPU tensor, got ",
              t.device());
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Prepared {
  AttnGeometry g;
  at::Tensor q, k, v, rows, cols;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                 const at::Tensor& cols) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  check_cpu(rows, "rows");
  check_cpu(cols, "cols");
  const AttnGeometry g = attention_geometry(q, k, v, rows, cols);
  auto rows_c = rows.contiguous(), cols_c = cols.contiguous();
  check_windows(rows_c, g.h, "rows", "rows");
  check_windows(cols_c, g.w, "cols", "columns");
  const auto acc = accumulation_type(q.scalar_type());
  return {g, q.contiguous(), k.to(acc).contiguous(), v.to(acc).contiguous(), rows_c, cols_c};
}

template <typename scalar_t, typename T>
Inputs<scalar_t, T> inputs_of(const Prepared& p, const at::Tensor& vt) {
  return {p.q.data_ptr<scalar_t>(), p.k.data_ptr<T>(), p.v.data_ptr<T>(), vt.defined() ? vt.data_ptr<T>() : nullptr,
          p.rows.data_ptr<int64_t>(), p.cols.data_ptr<int64_t>(), p.g,
          static_cast<T>(std::pow(static_cast<double>(p.g.d), -0.5))};
}

}  // namespace

at::Tensor forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                       const at::Tensor& cols) {
  const Prepared p = prepare(q, k, v, rows, cols);
  const AttnGeometry& g = p.g;
  auto out = at::empty({g.B, g.C, g.Hq, g.Wq}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_forward_cpu", [&] {
    using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    forward_kernel<scalar_t, T>(inputs_of<scalar_t, T>(p, at::Tensor()), out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& rows, const at::Tensor& cols, bool need_q,
                                     bool need_k, bool need_v) {
  check_cpu(grad_out, "grad_output");
  const Prepared p = prepare(q, k, v, rows, cols);
  const AttnGeometry& g = p.g;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.B, g.C, g.Hq, g.Wq}),
              "window_attention backward: grad_output must be (B, C, Hq, Wq) = ", at::IntArrayRef({g.B, g.C, g.Hq, g.Wq}),
              ", got ", grad_out.sizes());
  auto go = grad_out.to(q.scalar_type()).contiguous();
  const auto acc = accumulation_type(q.scalar_type());
  const bool run = go.numel() > 0 && (need_q || need_k || need_v);
  // Every query's gradient is written when the kernel runs; with no channels it is zero.
  auto gq = need_q ? (run ? at::empty_like(p.q) : at::zeros_like(p.q)) : at::empty({0}, q.options());
  auto gk = need_k ? at::zeros({g.B, g.N, g.h, g.w, g.d}, q.options().dtype(acc)) : at::empty({0}, q.options());
  auto gv = need_v ? at::zeros({g.B, g.C, g.h, g.w}, q.options().dtype(acc)) : at::empty({0}, q.options());
  if (run) {
    auto vt = p.v.permute({0, 2, 3, 1}).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_backward_cpu", [&] {
      using T = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
      backward_kernel<scalar_t, T>(inputs_of<scalar_t, T>(p, vt), go.data_ptr<scalar_t>(),
                                   need_q ? gq.data_ptr<scalar_t>() : nullptr, need_k ? gk.data_ptr<T>() : nullptr,
                                   need_v ? gv.data_ptr<T>() : nullptr, need_q, need_k, need_v);
    });
  }
  return {gq, need_k ? gk.to(q.scalar_type()) : gk, need_v ? gv.to(q.scalar_type()) : gv};
}

}  // namespace featup

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FeatUp windowed cross-attention, fused CPU kernels";
  m.def("forward", &featup::forward_cpu, "out = window_attention(q, k, v, rows, cols)");
  m.def("backward", &featup::backward_cpu, "(dq, dk, dv) given dL/dout; unrequested gradients come back empty");
}
