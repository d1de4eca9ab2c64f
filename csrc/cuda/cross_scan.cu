// CUDA kernels of lesionkit::cross_scan and cross_merge (docs/ss2d.md), mirroring
// csrc/cpu/cross_scan.cpp: a grid-stride loop with one thread per pixel of a (batch, channel)
// plane; cross_scan writes the pixel to its four sequence positions, cross_merge gathers the
// four entries of each pixel and writes their sum once, so neither needs atomics.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../cross_scan.h"

namespace lesionkit {
namespace {

template <typename scalar_t>
__global__ void cross_scan_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                  int64_t planes, int64_t channels, int64_t H, int64_t W) {
  const int64_t L = H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < planes * L;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = i / L, p = i % L;
    const int64_t b = plane / channels, c = plane % channels;
    const scalar_t v = x[i];
    const int64_t t_col = (p % W) * H + p / W;
    const int64_t base = (b * kDirections * channels + c) * L;
    out[base + p] = v;
    out[base + channels * L + t_col] = v;
    out[base + 2 * channels * L + (L - 1 - p)] = v;
    out[base + 3 * channels * L + (L - 1 - t_col)] = v;
  }
}

template <typename scalar_t>
__global__ void cross_merge_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                   int64_t planes, int64_t channels, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < planes * L;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = i / L, p = i % L;
    const int64_t b = plane / channels, c = plane % channels;
    const int64_t t_col = (p % W) * H + p / W;
    const int64_t base = (b * kDirections * channels + c) * L;
    const acc_t v = static_cast<acc_t>(y[base + p]) +
                    static_cast<acc_t>(y[base + channels * L + t_col]) +
                    static_cast<acc_t>(y[base + 2 * channels * L + (L - 1 - p)]) +
                    static_cast<acc_t>(y[base + 3 * channels * L + (L - 1 - t_col)]);
    out[i] = static_cast<scalar_t>(v);
  }
}

int64_t elementwise_blocks(int64_t total) {
  return std::min<int64_t>((total + 255) / 256, int64_t(1) << 16);
}

at::Tensor cross_scan_cuda(const at::Tensor& x_in) {
  check_cross_scan_input(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t batch = x_in.size(0), channels = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  auto out = at::empty({batch, kDirections, channels, H * W}, x_in.options());
  if (out.numel() == 0) return out;
  const auto x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_scan_cuda", [&] {
    cross_scan_kernel<scalar_t><<<elementwise_blocks(x.numel()), 256, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), batch * channels,
        channels, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor cross_merge_cuda(const at::Tensor& y_in, int64_t H, int64_t W) {
  check_cross_merge_inputs(y_in, H, W);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t batch = y_in.size(0), channels = y_in.size(2);
  auto out = at::empty({batch, channels, H, W}, y_in.options());
  if (out.numel() == 0) return out;
  const auto y = y_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "cross_merge_cuda", [&] {
    cross_merge_kernel<scalar_t><<<elementwise_blocks(out.numel()), 256, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
        y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), batch * channels,
        channels, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CUDA, m) {
  m.impl("cross_scan", &lesionkit::cross_scan_cuda);
  m.impl("cross_merge", &lesionkit::cross_merge_cuda);
}
