// Launch-size checks shared by the CUDA kernels: a block count computed in int64 must fit the
// grid dimension it goes into, or the launch would silently get a truncated (or zero) grid.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lesionkit {
namespace cuda {

// Hardware limits of gridDim (compute capability >= 3.0).
constexpr int64_t kMaxGridX = 2147483647LL;
constexpr int64_t kMaxGridYZ = 65535LL;

// `blocks` for grid axis x as the unsigned int dim3 takes; `what` names the count in the error.
inline unsigned int grid_x(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks <= kMaxGridX, what, " = ", blocks,
              " blocks do not fit a CUDA grid (1 to ", kMaxGridX, ")");
  return static_cast<unsigned int>(blocks);
}

// The same for grid axes y and z.
inline unsigned int grid_yz(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks <= kMaxGridYZ, what, " = ", blocks,
              " blocks do not fit a CUDA grid's y or z axis (1 to ", kMaxGridYZ, ")");
  return static_cast<unsigned int>(blocks);
}

}  // namespace cuda
}  // namespace lesionkit
