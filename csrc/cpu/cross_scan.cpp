// CPU kernels of lesionkit::cross_scan and cross_merge, VMamba's cross-scan (B, C, H, W) ->
// (B, 4, C, H*W) and its adjoint (docs/ss2d.md). Pure index maps, one task per (batch, channel)
// plane: cross_scan reads the plane once and writes its four sequences; cross_merge sums the
// four entries of each pixel in the accumulation dtype and writes the plane once.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../cross_scan.h"

namespace lesionkit {
namespace {

at::Tensor cross_scan_cpu(const at::Tensor& x_in) {
  check_cross_scan_input(x_in);
  const int64_t batch = x_in.size(0), channels = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t L = H * W;
  auto out = at::empty({batch, kDirections, channels, L}, x_in.options());
  if (out.numel() == 0) return out;
  const auto x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_scan_cpu", [&] {
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, 32768 / L), [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / channels, c = idx % channels;
        const scalar_t* plane = x_p + idx * L;
        scalar_t* o[kDirections];
        for (int k = 0; k < kDirections; ++k) o[k] = out_p + ((b * kDirections + k) * channels + c) * L;
        for (int64_t t = 0; t < L; ++t) {
          o[0][t] = plane[t];
          o[2][L - 1 - t] = plane[t];
        }
        for (int64_t w = 0, t = 0; w < W; ++w) {
          for (int64_t h = 0; h < H; ++h, ++t) {
            o[1][t] = plane[h * W + w];
            o[3][L - 1 - t] = plane[h * W + w];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor cross_merge_cpu(const at::Tensor& y_in, int64_t H, int64_t W) {
  check_cross_merge_inputs(y_in, H, W);
  const int64_t batch = y_in.size(0), channels = y_in.size(2), L = H * W;
  auto out = at::empty({batch, channels, H, W}, y_in.options());
  if (out.numel() == 0) return out;
  const auto y = y_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "cross_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* y_p = y.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, 32768 / L), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(L);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / channels, c = idx % channels;
        const scalar_t* in[kDirections];
        for (int k = 0; k < kDirections; ++k) in[k] = y_p + ((b * kDirections + k) * channels + c) * L;
        for (int64_t t = 0; t < L; ++t) {
          sum[t] = static_cast<acc_t>(in[0][t]) + static_cast<acc_t>(in[2][L - 1 - t]);
        }
        for (int64_t w = 0, t = 0; w < W; ++w) {
          for (int64_t h = 0; h < H; ++h, ++t) {
            sum[h * W + w] += static_cast<acc_t>(in[1][t]) + static_cast<acc_t>(in[3][L - 1 - t]);
          }
        }
        scalar_t* o = out_p + idx * L;
        for (int64_t p = 0; p < L; ++p) o[p] = static_cast<scalar_t>(sum[p]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("cross_scan", &lesionkit::cross_scan_cpu);
  m.impl("cross_merge", &lesionkit::cross_merge_cpu);
}
