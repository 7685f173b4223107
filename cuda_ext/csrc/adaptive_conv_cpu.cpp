// Fused CPU kernels of the adaptive convolution: forward, input gradient and filter gradient.
//
// Each kernel parallelises over (batch, row) with at::parallel_for (OpenMP in PyTorch builds, sized by
// torch.get_num_threads()), keeps a row of filters in a small tap-major scratch buffer so the innermost
// loop over w is unit-stride and vectorisable, and accumulates in float32 (float64 for double inputs).
// No B*C*k*k*H*W temporary is ever made: the extra memory is O(threads * k*k * W).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "adaptive_conv_index.h"
#include "adaptive_conv_launch.h"
#include "adaptive_conv_shapes.h"

namespace featup {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Copies the filters of row h, taps of rows i in [i_lo, i_hi), into buf laid out as [i][j][w]
// (i.e. buf[t * W + w] with t = i*k + j), converted to the accumulation type.
template <typename scalar_t, typename acc_t>
void load_filter_row(const scalar_t* __restrict__ K, const ConvGeometry& g, int64_t b, int64_t h,
                     int64_t i_lo, int64_t i_hi, acc_t* __restrict__ buf) {
  const int64_t k = g.k, W = g.W;
  for (int64_t w = 0; w < W; ++w) {
    const scalar_t* src = K + g.filter_offset(b, h, w, 0, 0);
    for (int64_t i = i_lo; i < i_hi; ++i) {
      for (int64_t j = 0; j < k; ++j) buf[(i * k + j) * W + w] = static_cast<acc_t>(src[i * k + j]);
    }
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ K, scalar_t* __restrict__ Y,
                    const ConvGeometry g) {
  using acc_t = typename Acc<scalar_t>::type;
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    const int64_t W = g.W, k = g.k, T = g.taps();
    std::vector<acc_t> kbuf(T * W), acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.H, h = row % g.H;
      load_filter_row(K, g, b, h, 0, k, kbuf.data());
      for (int64_t c = 0; c < g.C; ++c) {
        acc_t* __restrict__ a = acc.data();
        for (int64_t w = 0; w < W; ++w) a[w] = acc_t(0);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = t / k, j = t % k;
          const scalar_t* __restrict__ x = X + g.input_offset(b, c, h + i, j);
          const acc_t* __restrict__ kr = kbuf.data() + t * W;
#pragma GCC ivdep
          for (int64_t w = 0; w < W; ++w) a[w] += kr[w] * static_cast<acc_t>(x[w]);
        }
        scalar_t* __restrict__ y = Y + g.output_offset(b, c, h, 0);
        for (int64_t w = 0; w < W; ++w) y[w] = static_cast<scalar_t>(a[w]);
      }
    }
  });
}

// grad_X[b,c,y,x] = sum_ij G[b,c,y-i,x-j] K[b,y-i,x-j,i,j], gathered one padded input row at a time so
// that no two threads ever write the same element.
template <typename scalar_t>
void grad_input_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ K, scalar_t* __restrict__ GX,
                       const ConvGeometry g) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t Hp = g.Hp();
  at::parallel_for(0, g.B * Hp, 1, [&](int64_t begin, int64_t end) {
    const int64_t W = g.W, Wp = g.Wp(), k = g.k;
    std::vector<acc_t> kbuf(g.taps() * W), acc(Wp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Hp, y = row % Hp;
      int64_t i_lo, i_hi;
      taps_reading(y, g.H, k, &i_lo, &i_hi);
      // Row i of the buffer holds the taps (i, :) of output row h = y - i.
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t h = y - i;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* src = K + g.filter_offset(b, h, w, i, 0);
          for (int64_t j = 0; j < k; ++j) kbuf[(i * k + j) * W + w] = static_cast<acc_t>(src[j]);
        }
      }
      for (int64_t c = 0; c < g.C; ++c) {
        acc_t* __restrict__ a = acc.data();
        for (int64_t x = 0; x < Wp; ++x) a[x] = acc_t(0);
        for (int64_t i = i_lo; i < i_hi; ++i) {
          const scalar_t* __restrict__ gr = G + g.output_offset(b, c, y - i, 0);
          for (int64_t j = 0; j < k; ++j) {
            const acc_t* __restrict__ kr = kbuf.data() + (i * k + j) * W;
            acc_t* __restrict__ aj = a + j;
#pragma GCC ivdep
            for (int64_t w = 0; w < W; ++w) aj[w] += kr[w] * static_cast<acc_t>(gr[w]);
          }
        }
        scalar_t* __restrict__ out = GX + g.input_offset(b, c, y, 0);
        for (int64_t x = 0; x < Wp; ++x) out[x] = static_cast<scalar_t>(a[x]);
      }
    }
  });
}

// grad_K[b,h,w,i,j] = sum_c G[b,c,h,w] X[b,c,h+i,w+j]: one output row per task, reduced over channels
// in a tap-major scratch row, then written back in the (B,H,W,k,k) layout.
template <typename scalar_t>
void grad_filters_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ X, scalar_t* __restrict__ GK,
                         const ConvGeometry g) {
  using acc_t = typename Acc<scalar_t>::type;
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    const int64_t W = g.W, k = g.k, T = g.taps();
    std::vector<acc_t> kbuf(T * W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.H, h = row % g.H;
      std::fill(kbuf.begin(), kbuf.end(), acc_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* __restrict__ gr = G + g.output_offset(b, c, h, 0);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = t / k, j = t % k;
          const scalar_t* __restrict__ x = X + g.input_offset(b, c, h + i, j);
          acc_t* __restrict__ kr = kbuf.data() + t * W;
#pragma GCC ivdep
          for (int64_t w = 0; w < W; ++w) kr[w] += static_cast<acc_t>(gr[w]) * static_cast<acc_t>(x[w]);
        }
      }
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* dst = GK + g.filter_offset(b, h, w, 0, 0);
        for (int64_t t = 0; t < T; ++t) dst[t] = static_cast<scalar_t>(kbuf[t * W + w]);
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "featup adaptive_conv CPU kernel: ", name, " must be a CPU tensor, got ",
              t.device());
}

}  // namespace

at::Tensor forward_cpu(const at::Tensor& input_, const at::Tensor& filters_) {
  const ConvGeometry g = forward_geometry(input_, filters_);
  check_cpu(input_, "input");
  check_cpu(filters_, "filters");
  auto input = input_.contiguous();
  auto filters = filters_.contiguous();
  auto out = at::empty({g.B, g.C, g.H, g.W}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "adaptive_conv_forward_cpu", [&] {
    forward_kernel<scalar_t>(input.data_ptr<scalar_t>(), filters.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g);
  });
  return out;
}

at::Tensor grad_input_cpu(const at::Tensor& grad_out_, const at::Tensor& filters_) {
  const ConvGeometry g = grad_input_geometry(grad_out_, filters_);
  check_cpu(grad_out_, "grad_output");
  check_cpu(filters_, "filters");
  auto grad_out = grad_out_.contiguous();
  auto filters = filters_.contiguous().to(grad_out.scalar_type());
  auto gx = at::empty({g.B, g.C, g.Hp(), g.Wp()}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "adaptive_conv_grad_input_cpu", [&] {
    grad_input_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), filters.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
  });
  return gx;
}

at::Tensor grad_filters_cpu(const at::Tensor& grad_out_, const at::Tensor& input_) {
  const ConvGeometry g = grad_filters_geometry(grad_out_, input_);
  check_cpu(grad_out_, "grad_output");
  check_cpu(input_, "input");
  const int64_t k = g.k;
  auto grad_out = grad_out_.contiguous();
  auto input = input_.contiguous().to(grad_out.scalar_type());
  auto gk = at::empty({g.B, g.H, g.W, k, k}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "adaptive_conv_grad_filters_cpu", [&] {
    grad_filters_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), g);
  });
  return gk;
}

// The CUDA kernels' launch plan for op ("forward", "grad_input" or "grad_filters") on these sizes and
// shared-memory limits. Pure host code, exported from this module so that GPU-less tests check it.
pybind11::dict cuda_launch_plan(const std::string& op, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k,
                                bool deterministic, int64_t default_shared, int64_t optin_shared) {
  using namespace pybind11::literals;
  TORCH_CHECK(op == "forward" || op == "grad_input" || op == "grad_filters",
              "cuda_launch_plan: op must be forward, grad_input or grad_filters, got ", op);
  const ConvOp o = op == "forward" ? ConvOp::kForward : op == "grad_input" ? ConvOp::kGradInput : ConvOp::kGradFilters;
  const LaunchPlan plan = plan_launch(o, ConvGeometry{B, C, H, W, k}, deterministic, default_shared, optin_shared);
  pybind11::list launches;
  for (const GridLaunch& l : plan.launches) {
    launches.append(pybind11::dict("grid"_a = pybind11::make_tuple(l.grid_x, l.grid_y, l.grid_z),
                                   "tiles_w"_a = l.map.tiles_w, "tile"_a = pybind11::make_tuple(l.map.tile_w, l.map.tile_h),
                                   "batch0"_a = l.map.batch0, "group0"_a = l.map.group0,
                                   "channels_per_group"_a = l.map.channels_per_group));
  }
  return pybind11::dict("launches"_a = launches, "shared_bytes"_a = plan.shared_bytes, "opt_in"_a = plan.opt_in,
                        "atomic"_a = plan.atomic, "zero_init"_a = plan.zero_init, "threads"_a = BLOCK_THREADS);
}

// The CUDA kernels' tile for filter size k and the shared-memory word of each patch element (a (patch_h,
// patch_w) int64 tensor): host code, exported so that GPU-less tests check the layout is bank-conflict free.
pybind11::dict cuda_patch_layout(int64_t k) {
  using namespace pybind11::literals;
  TORCH_CHECK(k >= 1, "cuda_patch_layout: k must be positive, got ", k);
  const TileShape s = tile_shape(k);
  auto index = at::empty({s.patch_h, s.patch_w}, at::kLong);
  auto a = index.accessor<int64_t, 2>();
  for (int r = 0; r < s.patch_h; ++r) {
    for (int c = 0; c < s.patch_w; ++c) a[r][c] = s.index(r, c);
  }
  return pybind11::dict("pixels_per_thread"_a = s.p, "tile"_a = pybind11::make_tuple(s.tile_w, s.tile_h),
                        "lanes"_a = pybind11::make_tuple(LANES_X, LANES_Y), "row_stride"_a = s.row_stride,
                        "buffers"_a = s.buffers, "index"_a = index);
}

}  // namespace featup

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FeatUp adaptive convolution, fused CPU kernels";
  m.def("forward", &featup::forward_cpu, "Y = adaptive_conv(X, K)");
  m.def("grad_input", &featup::grad_input_cpu, "dL/dX given dL/dY and K");
  m.def("grad_filters", &featup::grad_filters_cpu, "dL/dK given dL/dY and X");
  m.def("cuda_launch_plan", &featup::cuda_launch_plan, "launch plan of the CUDA kernels (host code, for tests)");
  m.def("cuda_patch_layout", &featup::cuda_patch_layout, "tile and shared-memory patch layout of the CUDA kernels");
}
