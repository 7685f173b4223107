// CUDA kernels of the adaptive convolution: forward, input gradient and filter gradient.
//
// A block covers a TILE_H x TILE_W tile of pixels and a group of channels. Each thread keeps the k*k
// filter taps it needs in registers (k is a template parameter for the common sizes, runtime otherwise)
// and the block stages one channel's input (or output-gradient) patch in shared memory, so every value
// read from global memory is reused k*k times. All arithmetic accumulates in float32.
// The filter gradient was the reference's defect (only k of k*k taps got a gradient): here each thread
// owns all k*k taps of its pixel and reduces over channels, with atomics only across channel groups
// (none under torch.use_deterministic_algorithms: one group then holds every channel).
// Grids, batch/channel chunking and shared-memory sizing come from plan_launch (adaptive_conv_launch.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>  // the Tensor type casters; torch/extension.h would add the whole C++ frontend

#include "adaptive_conv_index.h"
#include "adaptive_conv_launch.h"
#include "adaptive_conv_shapes.h"

namespace featup {
namespace {

// float32 and the two 16-bit types; float64 on CUDA goes to the pure-PyTorch path, which keeps double.
#define FEATUP_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Tap count held in registers: KT*KT for a compile-time size, else nothing (read from global memory).
template <int KT> struct TapRegs { float v[KT * KT]; };
template <> struct TapRegs<0> { float v[1]; };

template <typename scalar_t, int KT>
__global__ void forward_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ K,
                               scalar_t* __restrict__ Y, ConvGeometry g, BlockMap m) {
  extern __shared__ float patch[];
  const int k = KT > 0 ? KT : static_cast<int>(g.k);
  const int PW = TILE_W + k - 1, PH = TILE_H + k - 1;
  const int64_t b = m.batch(blockIdx.z);
  const int64_t h0 = m.row0(blockIdx.x), w0 = m.col0(blockIdx.x);
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t h = h0 + ty, w = w0 + tx;
  const bool valid = h < g.H && w < g.W;

  TapRegs<KT> regs;
  if (KT > 0 && valid) {
    for (int t = 0; t < k * k; ++t) regs.v[t] = static_cast<float>(K[g.filter_offset(b, h, w, t / k, t % k)]);
  }
  const int64_t c_begin = m.channel_begin(blockIdx.y), c_end = m.channel_end(blockIdx.y, g.C);
  const int tid = ty * TILE_W + tx;
  for (int64_t c = c_begin; c < c_end; ++c) {
    __syncthreads();
    for (int p = tid; p < PH * PW; p += TILE_H * TILE_W) {
      const int64_t y = h0 + p / PW, x = w0 + p % PW;
      patch[p] = (y < g.Hp() && x < g.Wp()) ? static_cast<float>(X[g.input_offset(b, c, y, x)]) : 0.f;
    }
    __syncthreads();
    if (!valid) continue;
    float acc = 0.f;
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < k; ++j) {
        const float kv = KT > 0 ? regs.v[i * k + j] : static_cast<float>(K[g.filter_offset(b, h, w, i, j)]);
        acc += kv * patch[(ty + i) * PW + tx + j];
      }
    }
    Y[g.output_offset(b, c, h, w)] = static_cast<scalar_t>(acc);
  }
}

// One thread per padded input pixel (y, x): gathers G[y-i, x-j] * K[y-i, x-j, i, j] over valid taps.
template <typename scalar_t, int KT>
__global__ void grad_input_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ K,
                                  scalar_t* __restrict__ GX, ConvGeometry g, BlockMap m) {
  extern __shared__ float patch[];
  const int k = KT > 0 ? KT : static_cast<int>(g.k);
  const int PW = TILE_W + k - 1, PH = TILE_H + k - 1;
  const int64_t b = m.batch(blockIdx.z);
  const int64_t y0 = m.row0(blockIdx.x), x0 = m.col0(blockIdx.x);
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t y = y0 + ty, x = x0 + tx;
  const bool valid = y < g.Hp() && x < g.Wp();

  int64_t i_lo = 0, i_hi = 0, j_lo = 0, j_hi = 0;
  if (valid) {
    taps_reading(y, g.H, k, &i_lo, &i_hi);
    taps_reading(x, g.W, k, &j_lo, &j_hi);
  }
  TapRegs<KT> regs;
  if constexpr (KT > 0) {
#pragma unroll
    for (int t = 0; t < KT * KT; ++t) {
      const int i = t / KT, j = t % KT;
      const bool tap = i >= i_lo && i < i_hi && j >= j_lo && j < j_hi;
      regs.v[t] = tap ? static_cast<float>(K[g.filter_offset(b, y - i, x - j, i, j)]) : 0.f;
    }
  }
  const int64_t c_begin = m.channel_begin(blockIdx.y), c_end = m.channel_end(blockIdx.y, g.C);
  const int tid = ty * TILE_W + tx;
  for (int64_t c = c_begin; c < c_end; ++c) {
    __syncthreads();
    // The patch holds G rows [y0-k+1, y0+TILE_H) and columns [x0-k+1, x0+TILE_W), zero outside the image.
    for (int p = tid; p < PH * PW; p += TILE_H * TILE_W) {
      const int64_t gy = y0 - (k - 1) + p / PW, gx = x0 - (k - 1) + p % PW;
      const bool in = gy >= 0 && gy < g.H && gx >= 0 && gx < g.W;
      patch[p] = in ? static_cast<float>(G[g.output_offset(b, c, gy, gx)]) : 0.f;
    }
    __syncthreads();
    if (!valid) continue;
    float acc = 0.f;
    if constexpr (KT > 0) {
      // All KT*KT taps with compile-time indices, so they stay in registers: a tap outside [i_lo, i_hi) x
      // [j_lo, j_hi) is zero in regs and reads a zero of the patch (its G position lies outside the image).
#pragma unroll
      for (int i = 0; i < KT; ++i) {
#pragma unroll
        for (int j = 0; j < KT; ++j) acc += regs.v[i * KT + j] * patch[(ty + KT - 1 - i) * PW + (tx + KT - 1 - j)];
      }
    } else {
      for (int64_t i = i_lo; i < i_hi; ++i) {
        for (int64_t j = j_lo; j < j_hi; ++j) {
          acc += static_cast<float>(K[g.filter_offset(b, y - i, x - j, i, j)]) *
                 patch[(ty + k - 1 - i) * PW + (tx + k - 1 - j)];
        }
      }
    }
    GX[g.input_offset(b, c, y, x)] = static_cast<scalar_t>(acc);
  }
}

// One thread per output pixel, all k*k taps in registers, reduced over one channel group; groups are
// combined with atomicAdd into a float32 buffer (plain stores when there is a single group).
template <typename scalar_t, int KT>
__global__ void grad_filters_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ X,
                                    float* __restrict__ GK, ConvGeometry g, bool atomic, BlockMap m) {
  extern __shared__ float patch[];
  constexpr int KR = KT > 0 ? KT : 1;
  const int k = KT > 0 ? KT : static_cast<int>(g.k);
  const int PW = TILE_W + k - 1, PH = TILE_H + k - 1;
  const int64_t b = m.batch(blockIdx.z);
  const int64_t h0 = m.row0(blockIdx.x), w0 = m.col0(blockIdx.x);
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t h = h0 + ty, w = w0 + tx;
  const bool valid = h < g.H && w < g.W;
  float acc[KR * KR];
  for (int t = 0; t < KR * KR; ++t) acc[t] = 0.f;

  const int64_t c_begin = m.channel_begin(blockIdx.y), c_end = m.channel_end(blockIdx.y, g.C);
  const int tid = ty * TILE_W + tx;
  for (int64_t c = c_begin; c < c_end; ++c) {
    __syncthreads();
    for (int p = tid; p < PH * PW; p += TILE_H * TILE_W) {
      const int64_t yy = h0 + p / PW, xx = w0 + p % PW;
      patch[p] = (yy < g.Hp() && xx < g.Wp()) ? static_cast<float>(X[g.input_offset(b, c, yy, xx)]) : 0.f;
    }
    __syncthreads();
    if (!valid) continue;
    const float gv = static_cast<float>(G[g.output_offset(b, c, h, w)]);
    if (KT > 0) {
      for (int t = 0; t < KR * KR; ++t) acc[t] += gv * patch[(ty + t / KR) * PW + tx + t % KR];
    } else {
      // Runtime tap count: accumulate straight into the zeroed float32 buffer. With one channel group this
      // thread is the only writer of its pixel's taps, so a plain (deterministic) add suffices.
      for (int i = 0; i < k; ++i) {
        for (int j = 0; j < k; ++j) {
          float* dst = &GK[g.filter_offset(b, h, w, i, j)];
          const float v = gv * patch[(ty + i) * PW + tx + j];
          if (atomic) atomicAdd(dst, v); else *dst += v;
        }
      }
    }
  }
  if (!valid || KT == 0) return;
  for (int t = 0; t < KR * KR; ++t) {
    float* dst = &GK[g.filter_offset(b, h, w, t / KR, t % KR)];
    if (atomic) atomicAdd(dst, acc[t]); else *dst = acc[t];
  }
}

// Calls fn with an integral constant for the templated kernel sizes (the k where templated_k holds),
// 0 (runtime size) otherwise.
template <typename Fn>
void dispatch_k(int64_t k, Fn&& fn) {
  switch (k) {
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 9: fn(std::integral_constant<int, 9>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// The plan of op over g on the current device (its shared-memory limits; deterministic mode from torch).
LaunchPlan device_plan(ConvOp op, const ConvGeometry& g) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return plan_launch(op, g, at::globalContext().deterministicAlgorithms(),
                     static_cast<int64_t>(props->sharedMemPerBlock), static_cast<int64_t>(props->sharedMemPerBlockOptin));
}

// Runs every launch of the plan on the current stream: args are the kernel's parameters but the last,
// the BlockMap of each launch.
template <typename... Params, typename... Args>
void launch_plan(void (*kernel)(Params...), const LaunchPlan& plan, Args... args) {
  if (plan.launches.empty()) return;
  if (plan.opt_in) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.shared_bytes)));
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  for (const GridLaunch& l : plan.launches) {
    const dim3 grid(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y), static_cast<unsigned>(l.grid_z));
    kernel<<<grid, dim3(TILE_W, TILE_H), plan.shared_bytes, stream>>>(args..., l.map);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "featup adaptive_conv CUDA kernel: ", name, " must be a CUDA tensor, got ", t.device());
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& input_, const at::Tensor& filters_) {
  const ConvGeometry g = forward_geometry(input_, filters_);
  check_cuda(input_, "input");
  check_cuda(filters_, "filters");
  c10::cuda::CUDAGuard guard(input_.device());
  const LaunchPlan plan = device_plan(ConvOp::kForward, g);
  auto input = input_.contiguous();
  auto filters = filters_.contiguous().to(input.scalar_type());
  auto out = at::empty({g.B, g.C, g.H, g.W}, input.options());
  FEATUP_DISPATCH_CUDA_TYPES(input.scalar_type(), "adaptive_conv_forward_cuda", [&] {
    dispatch_k(g.k, [&](auto kt) {
      launch_plan(&forward_kernel<scalar_t, decltype(kt)::value>, plan,
                  input.data_ptr<scalar_t>(), filters.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g);
    });
  });
  return out;
}

at::Tensor grad_input_cuda(const at::Tensor& grad_out_, const at::Tensor& filters_) {
  const ConvGeometry g = grad_input_geometry(grad_out_, filters_);
  check_cuda(grad_out_, "grad_output");
  check_cuda(filters_, "filters");
  c10::cuda::CUDAGuard guard(grad_out_.device());
  const LaunchPlan plan = device_plan(ConvOp::kGradInput, g);
  auto grad_out = grad_out_.contiguous();
  auto filters = filters_.contiguous().to(grad_out.scalar_type());
  auto gx = at::empty({g.B, g.C, g.Hp(), g.Wp()}, grad_out.options());
  FEATUP_DISPATCH_CUDA_TYPES(grad_out.scalar_type(), "adaptive_conv_grad_input_cuda", [&] {
    dispatch_k(g.k, [&](auto kt) {
      launch_plan(&grad_input_kernel<scalar_t, decltype(kt)::value>, plan,
                  grad_out.data_ptr<scalar_t>(), filters.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
    });
  });
  return gx;
}

at::Tensor grad_filters_cuda(const at::Tensor& grad_out_, const at::Tensor& input_) {
  const ConvGeometry g = grad_filters_geometry(grad_out_, input_);
  check_cuda(grad_out_, "grad_output");
  check_cuda(input_, "input");
  c10::cuda::CUDAGuard guard(grad_out_.device());
  const LaunchPlan plan = device_plan(ConvOp::kGradFilters, g);
  auto grad_out = grad_out_.contiguous();
  auto input = input_.contiguous().to(grad_out.scalar_type());
  const auto options = grad_out.options().dtype(at::kFloat);
  auto acc = plan.zero_init ? at::zeros({g.B, g.H, g.W, g.k, g.k}, options) : at::empty({g.B, g.H, g.W, g.k, g.k}, options);
  FEATUP_DISPATCH_CUDA_TYPES(grad_out.scalar_type(), "adaptive_conv_grad_filters_cuda", [&] {
    dispatch_k(g.k, [&](auto kt) {
      launch_plan(&grad_filters_kernel<scalar_t, decltype(kt)::value>, plan,
                  grad_out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), acc.data_ptr<float>(), g,
                  plan.atomic);
    });
  });
  return grad_out.scalar_type() == at::kFloat ? acc : acc.to(grad_out.scalar_type());
}

}  // namespace featup

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FeatUp adaptive convolution, CUDA kernels";
  m.def("forward", &featup::forward_cuda, "Y = adaptive_conv(X, K)");
  m.def("grad_input", &featup::grad_input_cuda, "dL/dX given dL/dY and K");
  m.def("grad_filters", &featup::grad_filters_cuda, "dL/dK given dL/dY and X");
}
