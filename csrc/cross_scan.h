// Constants, the direction index map and input checks of lesionkit::cross_scan and
// cross_merge (VMamba's cross-scan, docs/ss2d.md), shared by their CPU and CUDA kernels and by
// the fused SS2D core (selective_scan.h), which reads every direction through the same map.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#if defined(__CUDACC__)
#define LESIONKIT_HOST_DEVICE __host__ __device__
#else
#define LESIONKIT_HOST_DEVICE
#endif

namespace lesionkit {

constexpr int kDirections = 4;

// Spatial (row-major) index read at step t of cross-scan direction k (VMamba order): 0
// row-major, 1 column-major, 2 and 3 the same reversed.
LESIONKIT_HOST_DEVICE inline int64_t direction_index(int k, int64_t t, int64_t height,
                                                     int64_t width) {
  if (k >= 2) t = height * width - 1 - t;
  return (k & 1) ? (t % height) * width + t / height : t;
}

inline void check_cross_scan_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x should be a (B, C, H, W) tensor, got ", x.dim(), "D");
}

inline void check_cross_merge_inputs(const at::Tensor& y, int64_t height, int64_t width) {
  TORCH_CHECK(y.dim() == 4 && y.size(1) == kDirections, "y should be a (B, 4, C, H*W) tensor, got ",
              y.sizes());
  TORCH_CHECK(height > 0 && width > 0, "H and W should be positive, got H=", height, ", W=", width);
  TORCH_CHECK(y.size(3) == height * width, "y's last dimension should be H*W = ", height * width,
              ", got ", y.size(3));
}

}  // namespace lesionkit
