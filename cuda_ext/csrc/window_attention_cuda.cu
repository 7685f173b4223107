// CUDA kernels of the windowed cross-attention: forward and the gradients of q, k and v.
//
// One warp per query. A block holds WARPS warps = WARPS neighbouring queries of one row; each warp keeps its
// query (all heads) in shared memory. Per head, the warp first finds the softmax statistics of its window
// (lanes over keys, online max/sum, then a warp reduction). The forward then walks the window in chunks of
// 32 keys: lane t computes the head-mean attention of key t (cached in shared memory when the window fits),
// and the warp accumulates attention x value with lanes over channels, reading a channels-last copy of the
// values (coalesced). Outputs are staged in shared memory so that a block writes WARPS consecutive pixels
// per channel. The backward recomputes the attention; per key it reduces the output gradient against the
// values (lanes over channels), owns its query's gradient in shared memory, and adds key and value
// gradients with float32 atomics (so it is not deterministic, and says so). Arithmetic is float32 throughout.
#include <torch/extension.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cfloat>

#include "window_attention_index.h"
#include "window_attention_shapes.h"

namespace featup {
namespace {

constexpr int WARPS = 8;          // queries (warps) per block
constexpr int CPL = 4;            // channels per lane in one channel group
constexpr int CG = 32 * CPL;      // channels per group
constexpr int KCACHE = 256;       // windows up to this many keys keep their attention in shared memory
constexpr size_t SMEM_LIMIT = 48 * 1024;

#define FEATUP_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// l * exp(m - m_new), with an empty partial (l == 0, m == -inf) contributing nothing.
__device__ __forceinline__ float rescale(float l, float m, float m_new) { return l == 0.f ? 0.f : l * expf(m - m_new); }

// The block's query (b, i, j0 + warp) of a flat block index.
struct QueryOfWarp {
  int64_t b, i, j;
};
__device__ __forceinline__ QueryOfWarp query_of(const AttnGeometry& g, int64_t block, int warp) {
  const int64_t tiles = (g.Wq + WARPS - 1) / WARPS;
  const int64_t tile = block % tiles, bi = block / tiles;
  return {bi / g.Hq, bi % g.Hq, tile * WARPS + warp};
}

// scale * q_n . k_n[key], with q_n in shared memory (float) and the key read from global memory.
template <typename scalar_t>
__device__ __forceinline__ float logit(const float* qs, const scalar_t* __restrict__ k, const AttnGeometry& g,
                                       int64_t b, int64_t n, int64_t y, int64_t x, float scale) {
  const scalar_t* kr = k + g.k_offset(b, n, y, x, 0);
  float s = 0.f;
  for (int64_t e = 0; e < g.d; ++e) s += qs[n * g.d + e] * static_cast<float>(kr[e]);
  return s * scale;
}

// Per head: the window's maximum logit and 1 / sum of exp(logit - max), into stats[2n], stats[2n+1].
template <typename scalar_t>
__device__ void softmax_stats(const float* qs, const scalar_t* __restrict__ k, const AttnGeometry& g,
                              const KeyWindow& win, int64_t b, float scale, float* stats) {
  const int lane = threadIdx.x & 31;
  for (int64_t n = 0; n < g.N; ++n) {
    float m = -FLT_MAX, l = 0.f;
    for (int64_t t = lane; t < win.size(); t += 32) {
      const float s = logit(qs, k, g, b, n, win.key_y(t), win.key_x(t), scale);
      const float m_new = fmaxf(m, s);
      l = rescale(l, m, m_new) + expf(s - m_new);
      m = m_new;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
      const float m_new = fmaxf(m, m2);
      l = rescale(l, m, m_new) + rescale(l2, m2, m_new);
      m = m_new;
    }
    if (lane == 0) {
      stats[2 * n] = m;
      stats[2 * n + 1] = 1.f / l;
    }
  }
  __syncwarp();
}

// Head-mean attention of window key t.
template <typename scalar_t>
__device__ __forceinline__ float attention(const float* qs, const float* stats, const scalar_t* __restrict__ k,
                                           const AttnGeometry& g, const KeyWindow& win, int64_t b, int64_t t,
                                           float scale) {
  const int64_t y = win.key_y(t), x = win.key_x(t);
  float a = 0.f;
  for (int64_t n = 0; n < g.N; ++n) a += expf(logit(qs, k, g, b, n, y, x, scale) - stats[2 * n]) * stats[2 * n + 1];
  return a / static_cast<float>(g.N);
}

template <typename scalar_t>
__device__ void load_query(const scalar_t* __restrict__ q, const AttnGeometry& g, const QueryOfWarp& p, float* qs) {
  const int lane = threadIdx.x & 31;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t e = lane; e < g.d; e += 32) qs[n * g.d + e] = static_cast<float>(q[g.q_offset(p.b, n, p.i, p.j, e)]);
  __syncwarp();
}

// Shared memory per warp: query (N*d), statistics (2N), then kernel-specific parts.
__host__ __device__ inline int64_t warp_floats(const AttnGeometry& g) { return g.N * g.d + 2 * g.N; }

template <typename scalar_t>
__global__ void __launch_bounds__(WARPS * 32)
forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ vt,
               const int64_t* __restrict__ rows, const int64_t* __restrict__ cols, scalar_t* __restrict__ out,
               AttnGeometry g, float scale) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t per_warp = warp_floats(g) + KCACHE;
  float* qs = smem + warp * per_warp;
  float* stats = qs + g.N * g.d;
  float* cache = stats + 2 * g.N;
  float* staged = smem + WARPS * per_warp;  // CG x WARPS outputs of the current channel group
  const QueryOfWarp p = query_of(g, blockIdx.x, warp);
  const int64_t j0 = p.j - warp;
  const bool valid = p.j < g.Wq;
  KeyWindow win{0, 0, 0, 0};
  bool cached = false;
  if (valid) {
    win = query_window(rows, cols, p.i, p.j);
    load_query(q, g, p, qs);
    softmax_stats(qs, k, g, win, p.b, scale, stats);
    cached = win.size() <= KCACHE;
    if (cached) {
      for (int64_t t = lane; t < win.size(); t += 32) cache[t] = attention(qs, stats, k, g, win, p.b, t, scale);
      __syncwarp();
    }
  }
  for (int64_t c0 = 0; c0 < g.C; c0 += CG) {  // the same trip count in every warp: the barriers below are safe
    float acc[CPL];
#pragma unroll
    for (int u = 0; u < CPL; ++u) acc[u] = 0.f;
    if (valid) {
      for (int64_t t0 = 0; t0 < win.size(); t0 += 32) {
        const int64_t t = t0 + lane;
        float mine = 0.f;
        if (!cached && t < win.size()) mine = attention(qs, stats, k, g, win, p.b, t, scale);
        const int64_t chunk = min(static_cast<int64_t>(32), win.size() - t0);
        for (int s = 0; s < chunk; ++s) {
          const float a = cached ? cache[t0 + s] : __shfl_sync(0xffffffffu, mine, s);
          const scalar_t* vrow = vt + g.vt_offset(p.b, win.key_y(t0 + s), win.key_x(t0 + s), 0);
#pragma unroll
          for (int u = 0; u < CPL; ++u) {
            const int64_t c = c0 + u * 32 + lane;
            if (c < g.C) acc[u] += a * static_cast<float>(vrow[c]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < CPL; ++u) staged[(u * 32 + lane) * WARPS + warp] = acc[u];
    __syncthreads();
    for (int idx = threadIdx.x; idx < CG * WARPS; idx += WARPS * 32) {
      const int64_t c = c0 + idx / WARPS, j = j0 + idx % WARPS;
      if (c < g.C && j < g.Wq) out[g.out_offset(p.b, c, p.i, j)] = static_cast<scalar_t>(staged[idx]);
    }
    __syncthreads();
  }
}

// Per query: dA[key] = g . v[key] / N, rowdot_n = sum_keys P_n dA, dS_n = P_n (dA - rowdot_n) scale;
// dq_n = sum dS_n k_n (shared, lanes over head width), dk_n += dS_n q_n and dv[key] += A g (atomics).
template <typename scalar_t>
__global__ void __launch_bounds__(WARPS * 32)
backward_kernel(const scalar_t* __restrict__ gout_t, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                const scalar_t* __restrict__ vt, const int64_t* __restrict__ rows, const int64_t* __restrict__ cols,
                scalar_t* __restrict__ gq, float* __restrict__ gk, float* __restrict__ gvt, AttnGeometry g,
                float scale, bool need_q, bool need_k, bool need_v) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t per_warp = warp_floats(g) + g.N * g.d + g.N;
  float* qs = smem + warp * per_warp;
  float* stats = qs + g.N * g.d;
  float* dqs = stats + 2 * g.N;
  float* rowdot = dqs + g.N * g.d;
  const QueryOfWarp p = query_of(g, blockIdx.x, warp);
  if (p.j >= g.Wq) return;  // no block-wide barriers below
  const KeyWindow win = query_window(rows, cols, p.i, p.j);
  load_query(q, g, p, qs);
  softmax_stats(qs, k, g, win, p.b, scale, stats);
  for (int64_t e = lane; e < g.N * g.d; e += 32) dqs[e] = 0.f;
  for (int64_t n = lane; n < g.N; n += 32) rowdot[n] = 0.f;
  __syncwarp();
  const scalar_t* grow = gout_t + g.out_t_offset(p.b, p.i, p.j, 0);
  const float inv_heads = 1.f / static_cast<float>(g.N);
  const bool need_attn_grad = need_q || need_k;
  // dA of the chunk's keys: lane s ends up holding key t0 + s's value.
  auto chunk_dA = [&](int64_t t0) {
    float mine = 0.f;
    const int64_t chunk = min(static_cast<int64_t>(32), win.size() - t0);
    for (int s = 0; s < chunk; ++s) {
      const scalar_t* vrow = vt + g.vt_offset(p.b, win.key_y(t0 + s), win.key_x(t0 + s), 0);
      float part = 0.f;
      for (int64_t c = lane; c < g.C; c += 32) part += static_cast<float>(grow[c]) * static_cast<float>(vrow[c]);
      const float total = warp_sum(part) * inv_heads;
      if (lane == s) mine = total;
    }
    return mine;
  };
  if (need_attn_grad) {
    for (int64_t t0 = 0; t0 < win.size(); t0 += 32) {
      const float da = chunk_dA(t0);
      const int64_t t = t0 + lane;
      for (int64_t n = 0; n < g.N; ++n) {
        float part = 0.f;
        if (t < win.size())
          part = expf(logit(qs, k, g, p.b, n, win.key_y(t), win.key_x(t), scale) - stats[2 * n]) * stats[2 * n + 1] * da;
        part = warp_sum(part);
        if (lane == 0) rowdot[n] += part;
      }
    }
    __syncwarp();
  }
  for (int64_t t0 = 0; t0 < win.size(); t0 += 32) {
    const int64_t t = t0 + lane;
    const bool has = t < win.size();
    const int64_t y = has ? win.key_y(t) : 0, x = has ? win.key_x(t) : 0;
    const int64_t chunk = min(static_cast<int64_t>(32), win.size() - t0);
    const float da = need_attn_grad ? chunk_dA(t0) : 0.f;
    float a = 0.f;
    for (int64_t n = 0; n < g.N; ++n) {
      const float pr = has ? expf(logit(qs, k, g, p.b, n, y, x, scale) - stats[2 * n]) * stats[2 * n + 1] : 0.f;
      a += pr;
      if (!need_attn_grad) continue;
      const float ds = pr * (da - rowdot[n]) * scale;
      for (int s = 0; s < chunk; ++s) {
        const float dss = __shfl_sync(0xffffffffu, ds, s);
        const int64_t ys = win.key_y(t0 + s), xs = win.key_x(t0 + s);
        for (int64_t e = lane; e < g.d; e += 32) {
          if (need_q) dqs[n * g.d + e] += dss * static_cast<float>(k[g.k_offset(p.b, n, ys, xs, e)]);
          if (need_k) atomicAdd(gk + g.k_offset(p.b, n, ys, xs, e), dss * qs[n * g.d + e]);
        }
      }
    }
    if (need_v) {
      a *= inv_heads;
      for (int s = 0; s < chunk; ++s) {
        const float as = __shfl_sync(0xffffffffu, a, s);
        float* dst = gvt + g.vt_offset(p.b, win.key_y(t0 + s), win.key_x(t0 + s), 0);
        for (int64_t c = lane; c < g.C; c += 32) atomicAdd(dst + c, as * static_cast<float>(grow[c]));
      }
    }
  }
  if (need_q) {
    __syncwarp();
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t e = lane; e < g.d; e += 32) gq[g.q_offset(p.b, n, p.i, p.j, e)] = static_cast<scalar_t>(dqs[n * g.d + e]);
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "featup window_attention CUDA kernel: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "featup window_attention CUDA kernel: ", name, " is on ", t.device(),
              " but q is on ", like.device(), "; move them to one device");
}

struct Prepared {
  AttnGeometry g;
  at::Tensor q, k, vt, rows, cols;
};

// Checks, windows validated on the host (they are tiny), contiguous inputs and windows on q's device.
Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                 const at::Tensor& cols, int64_t smem_floats_extra) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  const AttnGeometry g = attention_geometry(q, k, v, rows, cols);
  TORCH_CHECK(q.scalar_type() != at::kDouble, "featup window_attention CUDA kernel: float64 runs on the fallback");
  for (const at::Tensor* w : {&rows, &cols})
    TORCH_CHECK(w->device().is_cpu() || w->device() == q.device(), "featup window_attention CUDA kernel: windows must "
                "be on the CPU or on q's device ", q.device(), ", got ", w->device());
  auto rows_h = rows.to(at::kCPU).contiguous(), cols_h = cols.to(at::kCPU).contiguous();
  check_windows(rows_h, g.h, "rows", "rows");
  check_windows(cols_h, g.w, "cols", "columns");
  const size_t smem = static_cast<size_t>(WARPS * (warp_floats(g) + smem_floats_extra)) * sizeof(float);
  TORCH_CHECK(smem <= SMEM_LIMIT, "featup window_attention CUDA kernel: heads x head width = ", g.N * g.d,
              " needs ", smem, " bytes of shared memory per block (limit ", SMEM_LIMIT, "); use fewer or narrower heads");
  return {g, q.contiguous(), k.contiguous(), v.permute({0, 2, 3, 1}).contiguous(),
          rows_h.to(q.device()).contiguous(), cols_h.to(q.device()).contiguous()};
}

int64_t blocks_of(const AttnGeometry& g) { return g.B * g.Hq * ((g.Wq + WARPS - 1) / WARPS); }

float scale_of(const AttnGeometry& g) { return static_cast<float>(std::pow(static_cast<double>(g.d), -0.5)); }

}  // namespace

at::Tensor forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                        const at::Tensor& cols) {
  check_cuda(q, "q", q);
  c10::cuda::CUDAGuard guard(q.device());
  const Prepared pr = prepare(q, k, v, rows, cols, KCACHE + CG);
  const AttnGeometry& g = pr.g;
  auto out = at::empty({g.B, g.C, g.Hq, g.Wq}, q.options());
  if (out.numel() == 0) return out;
  const size_t smem = static_cast<size_t>(WARPS * (warp_floats(g) + KCACHE) + CG * WARPS) * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  FEATUP_DISPATCH_CUDA_TYPES(q.scalar_type(), "window_attention_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_of(g), WARPS * 32, smem, stream>>>(
        pr.q.data_ptr<scalar_t>(), pr.k.data_ptr<scalar_t>(), pr.vt.data_ptr<scalar_t>(), pr.rows.data_ptr<int64_t>(),
        pr.cols.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), g, scale_of(g));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& rows, const at::Tensor& cols, bool need_q,
                                      bool need_k, bool need_v) {
  check_cuda(q, "q", q);
  c10::cuda::CUDAGuard guard(q.device());
  check_cuda(grad_out, "grad_output", q);
  const AttnGeometry g0 = attention_geometry(q, k, v, rows, cols);
  const Prepared pr = prepare(q, k, v, rows, cols, g0.N * g0.d + g0.N);
  const AttnGeometry& g = pr.g;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.B, g.C, g.Hq, g.Wq}),
              "window_attention backward: grad_output must be (B, C, Hq, Wq) = ", at::IntArrayRef({g.B, g.C, g.Hq, g.Wq}),
              ", got ", grad_out.sizes());
  if (need_k || need_v) at::globalContext().alertNotDeterministic("featup::window_attention_backward (CUDA)");
  auto f32 = q.options().dtype(at::kFloat);
  auto gq = need_q ? at::zeros_like(pr.q) : at::empty({0}, q.options());
  auto gk = need_k ? at::zeros({g.B, g.N, g.h, g.w, g.d}, f32) : at::empty({0}, f32);
  auto gvt = need_v ? at::zeros({g.B, g.h, g.w, g.C}, f32) : at::empty({0}, f32);
  if (grad_out.numel() > 0 && (need_q || need_k || need_v)) {
    auto gout_t = grad_out.to(q.scalar_type()).permute({0, 2, 3, 1}).contiguous();
    const size_t smem = static_cast<size_t>(WARPS * (warp_floats(g) + g.N * g.d + g.N)) * sizeof(float);
    auto stream = at::cuda::getCurrentCUDAStream();
    FEATUP_DISPATCH_CUDA_TYPES(q.scalar_type(), "window_attention_backward_cuda", [&] {
      backward_kernel<scalar_t><<<blocks_of(g), WARPS * 32, smem, stream>>>(
          gout_t.data_ptr<scalar_t>(), pr.q.data_ptr<scalar_t>(), pr.k.data_ptr<scalar_t>(),
          pr.vt.data_ptr<scalar_t>(), pr.rows.data_ptr<int64_t>(), pr.cols.data_ptr<int64_t>(),
          need_q ? gq.data_ptr<scalar_t>() : nullptr, need_k ? gk.data_ptr<float>() : nullptr,
          need_v ? gvt.data_ptr<float>() : nullptr, g, scale_of(g), need_q, need_k, need_v);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto gv = need_v ? gvt.permute({0, 3, 1, 2}).contiguous().to(q.scalar_type()) : at::empty({0}, q.options());
  return {gq, need_k ? gk.to(q.scalar_type()) : at::empty({0}, q.options()), gv};
}

}  // namespace featup

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FeatUp windowed cross-attention, CUDA kernels";
  m.def("forward", &featup::forward_cuda, "out = window_attention(q, k, v, rows, cols)");
  m.def("backward", &featup::backward_cuda, "(dq, dk, dv) given dL/dout; unrequested gradients come back empty");
}
