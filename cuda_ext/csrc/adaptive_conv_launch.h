// Launch plan of the adaptive-conv CUDA kernels: tiles, batch and channel-group chunking within CUDA's
// grid limits, shared-memory sizing and how the filter gradient combines channel groups.
//
// Pure host code (plus the block-to-work map the kernels call), so the CPU extension exports it
// (`cuda_launch_plan`) and the GPU-less tests check the same plan the CUDA entry points launch.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "adaptive_conv_index.h"

namespace featup {

constexpr int LANES_X = 8;   // threads along a tile row: a warp spans 32 / LANES_X = 4 tile rows
constexpr int LANES_Y = 16;  // threads along a tile column, one tile row each
constexpr int BLOCK_THREADS = LANES_X * LANES_Y;
constexpr int CHANNELS_PER_BLOCK = 32;  // channels one block reduces (except a deterministic filter gradient)
constexpr int64_t MAX_GRID_X = 2147483647;  // CUDA's limits on gridDim.x and on gridDim.y / gridDim.z
constexpr int64_t MAX_GRID_YZ = 65535;
constexpr int SHARED_BANKS = 32;  // 4-byte shared-memory banks; a warp's 32 loads in 32 banks take one pass

enum class ConvOp : int { kForward = 0, kGradInput = 1, kGradFilters = 2 };

// Filter sizes with a compile-time kernel (taps in registers); every other k takes the runtime-k kernel.
FEATUP_HD constexpr bool templated_k(int64_t k) {
  return k == 1 || k == 3 || k == 5 || k == 7 || k == 9 || k == 11;
}

// Adjacent pixels of a row one thread computes: each patch value it loads serves up to p outputs from
// registers. Bounded by the registers their p*k*k taps (or filter-gradient sums) take; 1 for runtime k.
FEATUP_HD constexpr int pixels_per_thread(int64_t k) {
  return !templated_k(k) ? 1 : k <= 7 ? 4 : k == 9 ? 2 : 1;
}

// A block's tile and the shared-memory layout of the patch it stages per channel (the tile plus a k-1 halo).
// Patch column col lives in phase col % p at position col / p, so the p adjacent pixels of LANES_X threads
// read LANES_X consecutive words for every tap; row_stride % SHARED_BANKS == LANES_X puts the 4 rows a warp
// spans in 4 disjoint sets of banks: each shared-memory load of a warp hits 32 distinct banks.
struct TileShape {
  int p;                   // pixels per thread along a row
  int tile_w, tile_h;      // pixels a block covers
  int patch_w, patch_h;    // staged patch: tile_w + k - 1 columns, tile_h + k - 1 rows
  int phase_w;             // words of one phase of a patch row: ceil(patch_w / p)
  int row_stride;          // words between patch rows
  int buffers;             // 2: the next channel is staged while this one is computed (templated k); else 1

  FEATUP_HD constexpr int index(int row, int col) const { return row * row_stride + (col % p) * phase_w + col / p; }
  FEATUP_HD constexpr int buffer_floats() const { return patch_h * row_stride; }
};

FEATUP_HD constexpr TileShape tile_shape(int64_t k) {
  const int kk = static_cast<int>(k);
  const int p = pixels_per_thread(k);
  const int patch_w = LANES_X * p + kk - 1;
  const int phase_w = (patch_w + p - 1) / p;
  const int used = p * phase_w;
  const int row_stride = used + ((LANES_X - used % SHARED_BANKS) % SHARED_BANKS + SHARED_BANKS) % SHARED_BANKS;
  return TileShape{p, LANES_X * p, LANES_Y, patch_w, LANES_Y + kk - 1, phase_w, row_stride, templated_k(k) ? 2 : 1};
}

// Dynamic shared memory of one block: its patch buffers.
inline size_t patch_bytes(int64_t k) {
  const TileShape s = tile_shape(k);
  return static_cast<size_t>(s.buffers) * static_cast<size_t>(s.patch_h) * static_cast<size_t>(s.row_stride) *
         sizeof(float);
}

// Which work a block does: blockIdx.x is a tile of the plane, blockIdx.y a channel group, blockIdx.z a
// batch element, each offset by where this launch starts. Passed to the kernels by value.
struct BlockMap {
  int64_t tiles_w;             // tiles per row of the plane
  int64_t tile_w, tile_h;      // pixels per tile (tile_shape)
  int64_t batch0;              // batch element of blockIdx.z == 0
  int64_t group0;              // channel group of blockIdx.y == 0
  int64_t channels_per_group;

  FEATUP_HD int64_t batch(int64_t bz) const { return batch0 + bz; }
  FEATUP_HD int64_t row0(int64_t bx) const { return bx / tiles_w * tile_h; }
  FEATUP_HD int64_t col0(int64_t bx) const { return bx % tiles_w * tile_w; }
  FEATUP_HD int64_t channel_begin(int64_t by) const { return (group0 + by) * channels_per_group; }
  FEATUP_HD int64_t channel_end(int64_t by, int64_t C) const {
    const int64_t end = channel_begin(by) + channels_per_group;
    return end < C ? end : C;
  }
};

// One kernel launch: its grid and where its blocks start.
struct GridLaunch {
  int64_t grid_x, grid_y, grid_z;
  BlockMap map;
};

struct LaunchPlan {
  std::vector<GridLaunch> launches;  // empty when there is nothing to compute (an empty or all-zero result)
  size_t shared_bytes = 0;           // dynamic shared memory per block
  bool opt_in = false;               // shared_bytes exceeds the default limit: raise the kernel's limit first
  bool atomic = false;               // filter gradient: several channel groups meet in one buffer (atomicAdd)
  bool zero_init = false;            // filter gradient: the float32 buffer must start at zero
};

// Largest odd k whose patch fits in limit bytes (0 if none).
inline int64_t largest_k_fitting(int64_t limit) {
  int64_t k = -1;
  while (static_cast<int64_t>(patch_bytes(k + 2)) <= limit) k += 2;
  return k > 0 ? k : 0;
}

// The launches of one op over geometry g. deterministic (torch.use_deterministic_algorithms) makes the
// filter gradient reduce all channels in one group, so it needs no atomics. default_shared / optin_shared
// are the device's per-block shared-memory limits without and with cudaFuncSetAttribute.
inline LaunchPlan plan_launch(ConvOp op, const ConvGeometry& g, bool deterministic, int64_t default_shared,
                              int64_t optin_shared) {
  const char* name = op == ConvOp::kForward ? "forward" : op == ConvOp::kGradInput ? "grad_input" : "grad_filters";
  LaunchPlan plan;
  plan.shared_bytes = patch_bytes(g.k);
  const int64_t limit = std::max(default_shared, optin_shared);
  TORCH_CHECK(static_cast<int64_t>(plan.shared_bytes) <= limit, "adaptive_conv CUDA ", name, ": k=", g.k,
              " needs ", plan.shared_bytes, " bytes of shared memory per block, more than this GPU's limit of ",
              limit, " bytes; the largest filter size it runs is k=", largest_k_fitting(limit),
              " (use a smaller k, or CPU tensors)");
  plan.opt_in = static_cast<int64_t>(plan.shared_bytes) > default_shared;

  // The input gradient has one thread per padded input pixel, the others one per output pixel.
  const int64_t rows = op == ConvOp::kGradInput ? g.Hp() : g.H;
  const int64_t cols = op == ConvOp::kGradInput ? g.Wp() : g.W;
  const TileShape shape = tile_shape(g.k);
  const int64_t tiles_w = (cols + shape.tile_w - 1) / shape.tile_w;
  const int64_t tiles = (rows + shape.tile_h - 1) / shape.tile_h * tiles_w;
  TORCH_CHECK(tiles <= MAX_GRID_X, "adaptive_conv CUDA ", name, ": a ", rows, " x ", cols, " plane needs ", tiles,
              " tiles of ", shape.tile_h, "x", shape.tile_w, " pixels, more than CUDA's grid limit of ", MAX_GRID_X,
              "; split the image");

  const bool one_group = op == ConvOp::kGradFilters && deterministic;
  const int64_t per_group = one_group ? std::max<int64_t>(g.C, 1) : CHANNELS_PER_BLOCK;
  const int64_t groups = (g.C + per_group - 1) / per_group;
  if (op == ConvOp::kGradFilters) {
    plan.atomic = groups > 1;
    // Each thread writes its taps once per channel group (plain stores for one group, else atomicAdd into
    // zeros); with no channels every filter gradient is an empty sum.
    plan.zero_init = plan.atomic || g.C == 0;
  }
  if (g.B == 0 || groups == 0 || tiles == 0) return plan;
  for (int64_t b0 = 0; b0 < g.B; b0 += MAX_GRID_YZ) {
    for (int64_t c0 = 0; c0 < groups; c0 += MAX_GRID_YZ) {
      plan.launches.push_back({tiles, std::min(MAX_GRID_YZ, groups - c0), std::min(MAX_GRID_YZ, g.B - b0),
                               BlockMap{tiles_w, shape.tile_w, shape.tile_h, b0, c0, per_group}});
    }
  }
  return plan;
}

}  // namespace featup
