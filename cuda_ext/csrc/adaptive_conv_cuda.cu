// CUDA kernels of the adaptive convolution: forward, input gradient and filter gradient.
//
// Each kernel runs a thread program of adaptive_conv_thread.h (the per-thread work, shared with the host replay
// the GPU-less tests run): a block of BLOCK_THREADS threads covers a tile of pixels and a group of channels, stages
// one channel's patch at a time in shared memory (bank-conflict-free layout, double-buffered for the templated k),
// and each thread computes several adjacent pixels with their taps (or filter-gradient sums) in registers, so a
// patch value read from shared memory serves several multiply-adds. All arithmetic accumulates in float32.
// The filter gradient was the reference's defect (only k of k*k taps got a gradient): here each thread owns all
// k*k taps of its pixels and reduces over channels, with atomics only across channel groups (none under
// torch.use_deterministic_algorithms: one group then holds every channel).
// Grids, batch/channel chunking and shared-memory sizing come from plan_launch (adaptive_conv_launch.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/utils/pybind.h>  // the Tensor type casters; torch/extension.h would add the whole C++ frontend

#include "adaptive_conv_index.h"
#include "adaptive_conv_launch.h"
#include "adaptive_conv_shapes.h"
#include "adaptive_conv_thread.h"

namespace featup {
namespace {

// float32 and the two 16-bit types; float64 on CUDA goes to the pure-PyTorch path, which keeps double.
#define FEATUP_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Runs a thread program (adaptive_conv_thread.h): its phases with a block barrier between consecutive ones.
template <class Program>
__device__ __forceinline__ void run_phases(Program& t, float* smem) {
  const int64_t phases = t.phases();
  for (int64_t n = 0; n < phases; ++n) {
    if (n > 0) __syncthreads();
    t.phase(n, smem);
  }
  t.finish();
}

template <typename scalar_t, int KT>
__global__ void __launch_bounds__(BLOCK_THREADS)
    forward_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ K, scalar_t* __restrict__ Y,
                   ConvGeometry g, BlockMap m) {
  extern __shared__ float smem[];
  ForwardProgram<scalar_t, KT> t(X, K, Y, g, m, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  run_phases(t, smem);
}

template <typename scalar_t, int KT>
__global__ void __launch_bounds__(BLOCK_THREADS)
    grad_input_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ K, scalar_t* __restrict__ GX,
                      ConvGeometry g, BlockMap m) {
  extern __shared__ float smem[];
  GradInputProgram<scalar_t, KT> t(G, K, GX, g, m, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  run_phases(t, smem);
}

template <typename scalar_t, int KT>
__global__ void __launch_bounds__(BLOCK_THREADS)
    grad_filters_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ X, float* __restrict__ GK,
                        ConvGeometry g, bool atomic, BlockMap m) {
  extern __shared__ float smem[];
  GradFiltersProgram<scalar_t, KT> t(G, X, GK, g, atomic, m, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  run_phases(t, smem);
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
    kernel<<<grid, BLOCK_THREADS, plan.shared_bytes, stream>>>(args..., l.map);
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
