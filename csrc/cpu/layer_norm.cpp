// CPU kernels of lesionkit::layer_norm_last and its backward: LayerNorm over the last
// dimension with float32 statistics for 16-bit inputs and outputs (docs/ops.md).
//
// Why not ATen's: under CPU autocast the SS2D models' LayerNorms run on bf16 rows of 24-384
// channels, where ATen's mixed-dtype kernel took about 3.6x the time of a float32 LayerNorm
// on the same rows (docs/cmssm.md), and casting to float32 first only moved the time into the
// casts. Here rows are read in their own dtype in tiles, converted in registers-sized loops
// (tile_io.h), normalised in float32 and written in the requested output dtype, so a float32
// residual stream can be normalised straight to the bf16 the next projection reads.
//
// Row sums use kLanes independent partial sums (lane_total); the weight and bias gradients are
// summed per fixed block of rows and the blocks' sums added afterwards, so results do not
// depend on how the rows were split between threads.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "tile_io.h"

namespace lesionkit {
namespace {

constexpr int64_t kRowsPerBlock = 256;  // rows per task and per weight-gradient partial
constexpr int64_t kTileValues = 4096;   // values per tile buffer: 16 KiB of float

template <typename acc_t>
inline acc_t row_sum(const acc_t* __restrict__ x, int64_t C) {
  acc_t d[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) d[l] += x[c + l];
  }
  for (int64_t l = 0; c < C; ++c, ++l) d[l] += x[c];
  return lane_total(d);
}

template <typename acc_t>
inline acc_t row_dot(const acc_t* __restrict__ x, const acc_t* __restrict__ y, int64_t C) {
  acc_t d[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) d[l] += x[c + l] * y[c + l];
  }
  for (int64_t l = 0; c < C; ++c, ++l) d[l] += x[c] * y[c];
  return lane_total(d);
}

template <typename acc_t>
inline acc_t row_centred_squares(const acc_t* __restrict__ x, acc_t mean, int64_t C) {
  acc_t d[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = x[c + l] - mean;
      d[l] += v * v;
    }
  }
  for (int64_t l = 0; c < C; ++c, ++l) {
    const acc_t v = x[c] - mean;
    d[l] += v * v;
  }
  return lane_total(d);
}

template <typename in_t, typename out_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                    at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const in_t* x_p = x.const_data_ptr<in_t>();
  const acc_t *w_p = weight.const_data_ptr<acc_t>(), *b_p = bias.const_data_ptr<acc_t>();
  out_t* o_p = out.mutable_data_ptr<out_t>();
  acc_t *mean_p = mean.mutable_data_ptr<acc_t>(), *rstd_p = rstd.mutable_data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps), inv_c = acc_t(1) / static_cast<acc_t>(C);
  const int64_t tile_rows = std::max<int64_t>(1, kTileValues / C);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(tile_rows * C);
    acc_t* X = buf.data();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerBlock);
      for (int64_t r0 = blk * kRowsPerBlock; r0 < r_end; r0 += tile_rows) {
        const int64_t n = std::min(tile_rows, r_end - r0);
        load_tile(x_p + r0 * C, X, n * C);
        for (int64_t r = 0; r < n; ++r) {
          acc_t* xr = X + r * C;
          const acc_t m = row_sum(xr, C) * inv_c;
          const acc_t s = acc_t(1) / std::sqrt(row_centred_squares(xr, m, C) * inv_c + e);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) xr[c] = (xr[c] - m) * s * w_p[c] + b_p[c];
          mean_p[r0 + r] = m;
          rstd_p[r0 + r] = s;
        }
        store_tile(X, o_p + r0 * C, n * C);
      }
    }
  });
}

template <typename in_t, typename out_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw_blocks,
                     at::Tensor& db_blocks) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const in_t* x_p = x.const_data_ptr<in_t>();
  const out_t* g_p = grad_out.const_data_ptr<out_t>();
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const acc_t *mean_p = mean.const_data_ptr<acc_t>(), *rstd_p = rstd.const_data_ptr<acc_t>();
  in_t* dx_p = dx.mutable_data_ptr<in_t>();
  acc_t *dw_p = dw_blocks.mutable_data_ptr<acc_t>(), *db_p = db_blocks.mutable_data_ptr<acc_t>();
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const int64_t tile_rows = std::max<int64_t>(1, kTileValues / C);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(tile_rows * C), gbuf(tile_rows * C), wg(C);
    acc_t *X = xbuf.data(), *G = gbuf.data(), *WG = wg.data();
    for (int64_t blk = begin; blk < end; ++blk) {
      acc_t* dw = dw_p + blk * C;  // this block's partial sums (zeroed by the caller)
      acc_t* db = db_p + blk * C;
      const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerBlock);
      for (int64_t r0 = blk * kRowsPerBlock; r0 < r_end; r0 += tile_rows) {
        const int64_t n = std::min(tile_rows, r_end - r0);
        load_tile(x_p + r0 * C, X, n * C);
        load_tile(g_p + r0 * C, G, n * C);
        for (int64_t r = 0; r < n; ++r) {
          acc_t *xr = X + r * C, *gr = G + r * C;
          const acc_t m = mean_p[r0 + r], s = rstd_p[r0 + r];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            xr[c] = (xr[c] - m) * s;  // x hat
            db[c] += gr[c];
            dw[c] += gr[c] * xr[c];
            WG[c] = gr[c] * w_p[c];
          }
          const acc_t a = row_sum(WG, C) * inv_c, b = row_dot(WG, xr, C) * inv_c;
          // dx = rstd (w dy - mean(w dy) - x hat mean(w dy x hat)), written over the x tile
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) xr[c] = s * (WG[c] - a - xr[c] * b);
        }
        store_tile(X, dx_p + r0 * C, n * C);
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1, "x should have at least one dimension, got a scalar");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x should be a floating tensor, got ", x.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t C = x.size(-1);
  for (const auto* t : {&weight, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == acc && t->device() == x.device(),
                "weight and bias should be ", acc, " tensors of shape (", C, ",) on ", x.device(), ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_last_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps,
                                                                   at::ScalarType out_dtype) {
  check_inputs(x_in, weight, bias);
  TORCH_CHECK(at::isFloatingType(out_dtype), "out_dtype should be a floating dtype, got ", out_dtype);
  TORCH_CHECK(eps > 0, "eps should be > 0, got ", eps);
  const auto x = x_in.contiguous();
  const auto acc = weight.scalar_type();
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  auto out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  auto mean = at::empty(stats_shape, x.options().dtype(acc));
  auto rstd = at::empty(stats_shape, x.options().dtype(acc));
  if (x.numel() == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_last_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "layer_norm_last_cpu_out", [&] {
      forward_kernel<in_t, scalar_t>(x, weight.contiguous(), bias.contiguous(), eps, out, mean, rstd);
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_last_backward_cpu(const at::Tensor& grad_out_in,
                                                                            const at::Tensor& x_in,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& mean_in,
                                                                            const at::Tensor& rstd_in) {
  check_inputs(x_in, weight, weight);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && grad_out_in.device() == x_in.device() &&
                  at::isFloatingType(grad_out_in.scalar_type()),
              "grad_out should be a floating tensor of x's shape ", x_in.sizes(), " on ", x_in.device(), ", got ",
              grad_out_in.scalar_type(), " ", grad_out_in.sizes(), " on ", grad_out_in.device());
  const auto stats_shape = x_in.sizes().slice(0, x_in.dim() - 1);
  for (const auto* t : {&mean_in, &rstd_in}) {
    TORCH_CHECK(t->sizes() == stats_shape && t->scalar_type() == weight.scalar_type(), "mean and rstd should be ",
                weight.scalar_type(), " tensors of shape ", stats_shape, ", got ", t->scalar_type(), " ",
                t->sizes());
  }
  const auto x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  const auto mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  auto dx = at::empty(x.sizes(), x.options());
  auto dw_blocks = at::zeros({blocks, C}, weight.options());
  auto db_blocks = at::zeros({blocks, C}, weight.options());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_last_backward_cpu", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                      "layer_norm_last_backward_cpu_out", [&] {
        backward_kernel<in_t, scalar_t>(grad_out, x, weight.contiguous(), mean, rstd, dx, dw_blocks, db_blocks);
      });
    });
  }
  return {dx, dw_blocks.sum(0), db_blocks.sum(0)};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("layer_norm_last", &lesionkit::layer_norm_last_cpu);
  m.impl("layer_norm_last_backward", &lesionkit::layer_norm_last_backward_cpu);
}
