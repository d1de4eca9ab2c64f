// Host-side launch plan of the CUDA patch cross-attention kernels. Plain C++ (no CUDA, no torch)
// so tests/test_cuda_launch_math.py compiles and checks it on a machine without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace lesionkit {
namespace patch_attention {

constexpr int kThreads = 256;                // threads per block, the kernels' __launch_bounds__
constexpr int kMaxChunk = 32;                // tokens per shared-memory chunk (upper bound)
constexpr int64_t kSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit
constexpr int64_t kMaxPatch = 32;            // P <= 32: T = P*P <= 1024 tokens, 4 rounds
constexpr int64_t kMaxChannels = 256;        // dk, dv per head
constexpr int64_t kMaxGridX = 2147483647LL;  // CUDA's limit on grid.x

struct Launch {
  int64_t blocks = 0;  // (batch * head, window) flattened on grid.x
  int threads = 0;     // multiple of 32, <= kThreads
  int rounds = 0;      // each thread handles tokens threadIdx.x + r * threads, r < rounds
  int chunk = 0;       // tokens per shared-memory chunk
  int64_t shared = 0;  // dynamic shared memory bytes
};

// Compile-time bound of the per-thread channel arrays for `channels` (max of dk and dv): the
// kernels unroll their channel loops to it, so the arrays have constant indices.
inline int register_bound(int64_t channels) {
  return channels <= 16 ? 16 : channels <= 64 ? 64 : 256;
}

// Fills `launch` for `planes` (batch * heads) planes of `windows` windows of P x P tokens whose
// shared-memory chunks hold `per_token_values` accumulation values (of `acc_size` bytes) per
// token; returns "" or why the kernels cannot take the input.
inline std::string plan_launch(int64_t planes, int64_t windows, int64_t patch, int64_t dk,
                               int64_t dv, int64_t per_token_values, int64_t acc_size,
                               Launch* launch) {
  if (patch < 1 || patch > kMaxPatch) {
    return "the cuda kernel of patch_cross_attention supports patch_size <= 32, got patch_size=" +
           std::to_string(patch) + "; use the triton or reference backend";
  }
  if (std::max(dk, dv) > kMaxChannels) {
    return "the cuda kernel of patch_cross_attention supports dk, dv <= 256 channels per head, "
           "got dk=" + std::to_string(dk) + ", dv=" + std::to_string(dv) +
           "; use more heads or the triton / reference backend";
  }
  const int64_t blocks = planes * windows;
  if (blocks > kMaxGridX) {
    return "patch_cross_attention: B * h * windows should fit in grid.x (2^31 - 1), got " +
           std::to_string(blocks);
  }
  const int64_t tokens = patch * patch;
  launch->blocks = blocks;
  launch->threads = static_cast<int>(std::min<int64_t>(kThreads, (tokens + 31) / 32 * 32));
  launch->rounds = static_cast<int>((tokens + launch->threads - 1) / launch->threads);
  const int64_t per_token = per_token_values * acc_size;
  launch->chunk = static_cast<int>(std::clamp<int64_t>(kSharedBytes / per_token, 1, kMaxChunk));
  launch->shared = launch->chunk * per_token;
  return "";
}

}  // namespace patch_attention
}  // namespace lesionkit
