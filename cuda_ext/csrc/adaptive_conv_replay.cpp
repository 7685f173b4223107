// Host replay of the adaptive-conv CUDA kernels, for tests on machines without a GPU.
//
// Runs the kernels' own thread programs (adaptive_conv_thread.h) over the launch plan the CUDA entry points use
// (adaptive_conv_launch.h): every block, its BLOCK_THREADS threads one after another within each barrier-separated
// phase. Shared memory starts as NaN and the outputs as NaN (or zero where the plan zero-fills), so a read of an
// unstaged patch word or an unwritten output shows in the result. float32 CPU tensors only; not built by
// cuda_ext.build (the tests compile it).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // the Tensor type casters, without the whole C++ frontend

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "adaptive_conv_index.h"
#include "adaptive_conv_launch.h"
#include "adaptive_conv_shapes.h"
#include "adaptive_conv_thread.h"

namespace featup {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Runs make(map, bx, by, bz, tid)'s programs over every block of the plan.
template <class Make>
void replay_plan(const LaunchPlan& plan, Make make) {
  std::vector<float> smem(plan.shared_bytes / sizeof(float));
  for (const GridLaunch& l : plan.launches) {
    for (int64_t bz = 0; bz < l.grid_z; ++bz) {
      for (int64_t by = 0; by < l.grid_y; ++by) {
        for (int64_t bx = 0; bx < l.grid_x; ++bx) {
          std::fill(smem.begin(), smem.end(), kNaN);
          using Program = decltype(make(l.map, bx, by, bz, 0));
          std::vector<Program> threads;
          threads.reserve(BLOCK_THREADS);
          for (int tid = 0; tid < BLOCK_THREADS; ++tid) threads.push_back(make(l.map, bx, by, bz, tid));
          const int64_t phases = threads[0].phases();
          for (int64_t n = 0; n < phases; ++n) {
            for (Program& t : threads) t.phase(n, smem.data());
          }
          for (Program& t : threads) t.finish();
        }
      }
    }
  }
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "adaptive_conv replay: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// The CUDA entry point's result for op on CPU tensors: "forward" (a = X, b = K), "grad_input" (a = dY, b = K) or
// "grad_filters" (a = dY, b = X), planned for the given shared-memory limits and deterministic mode.
at::Tensor replay(const std::string& op, const at::Tensor& a_, const at::Tensor& b_, bool deterministic,
                  int64_t default_shared, int64_t optin_shared) {
  check_float_cpu(a_, "first operand");
  check_float_cpu(b_, "second operand");
  const at::Tensor a = a_.contiguous(), b = b_.contiguous();
  if (op == "forward" || op == "grad_input") {
    const bool grad_input = op == "grad_input";
    const ConvGeometry g = grad_input ? grad_input_geometry(a, b) : forward_geometry(a, b);
    const LaunchPlan plan = plan_launch(grad_input ? ConvOp::kGradInput : ConvOp::kForward, g, deterministic,
                                        default_shared, optin_shared);
    at::Tensor out = grad_input ? at::full({g.B, g.C, g.Hp(), g.Wp()}, kNaN, a.options())
                                : at::full({g.B, g.C, g.H, g.W}, kNaN, a.options());
    const float *A = a.data_ptr<float>(), *K = b.data_ptr<float>();
    float* O = out.data_ptr<float>();
    dispatch_k(g.k, [&](auto kt) {
      constexpr int KT = decltype(kt)::value;
      if (grad_input) {
        replay_plan(plan, [&](const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid) {
          return GradInputProgram<float, KT>(A, K, O, g, m, bx, by, bz, tid);
        });
      } else {
        replay_plan(plan, [&](const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid) {
          return ForwardProgram<float, KT>(A, K, O, g, m, bx, by, bz, tid);
        });
      }
    });
    return out;
  }
  TORCH_CHECK(op == "grad_filters", "adaptive_conv replay: op must be forward, grad_input or grad_filters, got ", op);
  const ConvGeometry g = grad_filters_geometry(a, b);
  const LaunchPlan plan = plan_launch(ConvOp::kGradFilters, g, deterministic, default_shared, optin_shared);
  at::Tensor out = plan.zero_init ? at::zeros({g.B, g.H, g.W, g.k, g.k}, a.options())
                                  : at::full({g.B, g.H, g.W, g.k, g.k}, kNaN, a.options());
  const float *G = a.data_ptr<float>(), *X = b.data_ptr<float>();
  float* O = out.data_ptr<float>();
  dispatch_k(g.k, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    replay_plan(plan, [&](const BlockMap& m, int64_t bx, int64_t by, int64_t bz, int tid) {
      return GradFiltersProgram<float, KT>(G, X, O, g, plan.atomic, m, bx, by, bz, tid);
    });
  });
  return out;
}

}  // namespace
}  // namespace featup

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Host replay of the adaptive-conv CUDA kernels' thread programs (tests)";
  m.def("replay", &featup::replay, "the CUDA kernels' result for op, computed on the host");
}
