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
//
// A channels-first view (x (..., C) over (outer, C, inner) memory, as SS2D's out_norm gets the
// scan's output permuted) is read in place by forward_kernel_cf / backward_kernel_cf below,
// and its dx is written back in that layout; any other strided x is copied to rows first.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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


// Channels-first input: x is a (..., C) view of memory laid out (outer, C, inner), e.g. the
// (B, H, W, C) permute of a (B, C, H, W) tensor, as the SS2D layer's out_norm receives the
// scan's output. Tiles of kTile positions of one outer index are read as C rows of kTile
// contiguous values (C x kTile in the accumulation dtype, lanes = positions), the statistics are
// taken per lane, and the output rows (position-major, contiguous) are written out of the
// tile; the backward writes dx back in x's channels-first layout. No copy of x is made.
constexpr int64_t kTile = 16;
constexpr int64_t kTilesPerBlock = kRowsPerBlock / kTile;  // weight-gradient partials per block of rows

// copy(n) for a tile row of m positions, n = m: with n the constant kTile for a full tile the
// float copies and bf16 conversions of load_tile / store_tile are inlined vector moves; with a
// run-time length GCC turned each 16-value float copy into a memcpy call, which took most of
// the backward's time.
template <typename Copy>
inline void with_lanes(int64_t m, Copy&& copy) {
  if (m == kTile) {
    copy(kTile);
  } else {
    copy(m);
  }
}

// The C rows of m positions at xs (row stride `inner`) into the C x kTile tile X; the lanes
// past m are zeroed, so they add nothing to the sums over positions.
template <typename in_t, typename acc_t>
inline void load_channel_tile(const in_t* xs, int64_t inner, int64_t C, int64_t m, acc_t* X) {
  for (int64_t c = 0; c < C; ++c) {
    with_lanes(m, [&](int64_t n) { load_tile(xs + c * inner, X + c * kTile, n); });
  }
  if (m < kTile) {
    for (int64_t c = 0; c < C; ++c) std::fill(X + c * kTile + m, X + (c + 1) * kTile, acc_t(0));
  }
}

// dst[c * kTile + l] = src[l * C + c] for the m rows of C values at src: the tile's rows
// turned channel-major, converted to the accumulation dtype.
template <typename scalar_t, typename acc_t>
inline void load_rows_transposed(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t m, int64_t C) {
  for (int64_t l = 0; l < m; ++l) {
    const scalar_t* row = src + l * C;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      const auto* bits = reinterpret_cast<const uint16_t*>(row);
      for (int64_t c = 0; c < C; ++c) {
        const uint32_t u = static_cast<uint32_t>(bits[c]) << 16;
        float f;
        std::memcpy(&f, &u, sizeof(f));
        dst[c * kTile + l] = f;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) dst[c * kTile + l] = static_cast<acc_t>(row[c]);
    }
  }
}

template <typename in_t, typename out_t>
void forward_kernel_cf(const in_t* x_p, const at::Tensor& weight, const at::Tensor& bias, double eps, int64_t outer,
                       int64_t C, int64_t inner, out_t* o_p, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<in_t>;
  const acc_t *w_p = weight.const_data_ptr<acc_t>(), *b_p = bias.const_data_ptr<acc_t>();
  acc_t *mean_p = mean.mutable_data_ptr<acc_t>(), *rstd_p = rstd.mutable_data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps), inv_c = acc_t(1) / static_cast<acc_t>(C);
  const int64_t tiles = (inner + kTile - 1) / kTile;
  at::parallel_for(0, outer * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(C * kTile), row(C);
    acc_t* X = buf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / tiles, p0 = (task % tiles) * kTile, m = std::min(kTile, inner - p0);
      const in_t* xs = x_p + o * C * inner + p0;
      load_channel_tile(xs, inner, C, m, X);
      acc_t mu[kTile] = {}, var[kTile] = {}, s[kTile];
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) mu[l] += X[c * kTile + l];
      }
#pragma omp simd
      for (int64_t l = 0; l < kTile; ++l) mu[l] *= inv_c;
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) {
          const acc_t v = X[c * kTile + l] - mu[l];
          var[l] += v * v;
        }
      }
#pragma omp simd
      for (int64_t l = 0; l < kTile; ++l) s[l] = acc_t(1) / std::sqrt(var[l] * inv_c + e);
      const int64_t r0 = o * inner + p0;  // first output row of the tile
      for (int64_t l = 0; l < m; ++l) {
        const acc_t ml = mu[l], sl = s[l];
        for (int64_t c = 0; c < C; ++c) row[c] = (X[c * kTile + l] - ml) * sl * w_p[c] + b_p[c];
        store_tile(row.data(), o_p + (r0 + l) * C, C);
        mean_p[r0 + l] = ml;
        rstd_p[r0 + l] = sl;
      }
    }
  });
}

template <typename in_t, typename out_t>
void backward_kernel_cf(const out_t* g_p, const in_t* x_p, const at::Tensor& weight, const at::Tensor& mean,
                        const at::Tensor& rstd, int64_t outer, int64_t C, int64_t inner, in_t* dx_p,
                        at::Tensor& dw_blocks, at::Tensor& db_blocks) {
  using acc_t = at::opmath_type<in_t>;
  const acc_t* w_p = weight.const_data_ptr<acc_t>();
  const acc_t *mean_p = mean.const_data_ptr<acc_t>(), *rstd_p = rstd.const_data_ptr<acc_t>();
  acc_t *dw_p = dw_blocks.mutable_data_ptr<acc_t>(), *db_p = db_blocks.mutable_data_ptr<acc_t>();
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const int64_t tiles = (inner + kTile - 1) / kTile;
  const int64_t blocks_per_outer = (tiles + kTilesPerBlock - 1) / kTilesPerBlock;
  at::parallel_for(0, outer * blocks_per_outer, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(C * kTile), gbuf(C * kTile), dwl(C * kTile), dbl(C * kTile);
    acc_t *X = xbuf.data(), *G = gbuf.data();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t o = blk / blocks_per_outer, t0 = (blk % blocks_per_outer) * kTilesPerBlock;
      const int64_t t_end = std::min(tiles, t0 + kTilesPerBlock);
      std::fill(dwl.begin(), dwl.end(), acc_t(0));  // per-lane partials of this block
      std::fill(dbl.begin(), dbl.end(), acc_t(0));
      for (int64_t t = t0; t < t_end; ++t) {
        const int64_t p0 = t * kTile, m = std::min(kTile, inner - p0), r0 = o * inner + p0;
        const in_t* xs = x_p + o * C * inner + p0;
        load_channel_tile(xs, inner, C, m, X);
        if (m < kTile) std::fill(G, G + C * kTile, acc_t(0));  // no gradient past the last position
        load_rows_transposed(g_p + r0 * C, G, m, C);
        acc_t mu[kTile] = {}, s[kTile] = {}, a[kTile] = {}, b[kTile] = {};
        for (int64_t l = 0; l < m; ++l) {
          mu[l] = mean_p[r0 + l];
          s[l] = rstd_p[r0 + l];
        }
        for (int64_t c = 0; c < C; ++c) {
          acc_t* xc = X + c * kTile;
          const acc_t* gc = G + c * kTile;
          acc_t *dwc = dwl.data() + c * kTile, *dbc = dbl.data() + c * kTile;
          const acc_t wc = w_p[c];
#pragma omp simd
          for (int64_t l = 0; l < kTile; ++l) {
            xc[l] = (xc[l] - mu[l]) * s[l];  // x hat
            dbc[l] += gc[l];
            dwc[l] += gc[l] * xc[l];
            a[l] += gc[l] * wc;
            b[l] += gc[l] * wc * xc[l];
          }
        }
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) {
          a[l] *= inv_c;
          b[l] *= inv_c;
        }
        // dx = rstd (w dy - mean(w dy) - x hat mean(w dy x hat)), back in x's layout
        in_t* dxs = dx_p + o * C * inner + p0;
        for (int64_t c = 0; c < C; ++c) {
          acc_t* xc = X + c * kTile;
          const acc_t* gc = G + c * kTile;
          const acc_t wc = w_p[c];
#pragma omp simd
          for (int64_t l = 0; l < kTile; ++l) xc[l] = s[l] * (gc[l] * wc - a[l] - xc[l] * b[l]);
          with_lanes(m, [&](int64_t n) { store_tile(xc, dxs + c * inner, n); });
        }
      }
      acc_t* dw = dw_p + blk * C;
      acc_t* db = db_p + blk * C;
      for (int64_t c = 0; c < C; ++c) {
        dw[c] = lane_total(dwl.data() + c * kTile);
        db[c] = lane_total(dbl.data() + c * kTile);
      }
    }
  });
}

// (outer, C, inner) when x (..., C) is a view of channels-first memory (x.movedim(-1, 1)
// contiguous, the last dimension not already contiguous); {0, 0, 0} otherwise.
std::tuple<int64_t, int64_t, int64_t> channels_first_layout(const at::Tensor& x) {
  if (x.dim() < 3 || x.size(-1) < 2 || x.stride(-1) == 1 || !x.movedim(-1, 1).is_contiguous()) return {0, 0, 0};
  const int64_t outer = x.size(0), C = x.size(-1);
  return {outer, C, x.numel() / (outer * C)};
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
  const auto acc = weight.scalar_type();
  const auto stats_shape = x_in.sizes().slice(0, x_in.dim() - 1);
  auto out = at::empty(x_in.sizes(), x_in.options().dtype(out_dtype));
  auto mean = at::empty(stats_shape, x_in.options().dtype(acc));
  auto rstd = at::empty(stats_shape, x_in.options().dtype(acc));
  if (x_in.numel() == 0) return {out, mean, rstd};
  int64_t outer, channels, inner;
  std::tie(outer, channels, inner) = channels_first_layout(x_in);
  if (outer > 0) {  // read in place, output rows contiguous
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "layer_norm_last_cpu_cf", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "layer_norm_last_cpu_cf_out", [&] {
        forward_kernel_cf<in_t, scalar_t>(x_in.const_data_ptr<in_t>(), weight.contiguous(), bias.contiguous(), eps,
                                          outer, channels, inner, out.mutable_data_ptr<scalar_t>(), mean, rstd);
      });
    });
    return {out, mean, rstd};
  }
  const auto x = x_in.contiguous();
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
  const auto grad_out = grad_out_in.contiguous();
  const auto mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  int64_t outer, channels, inner;
  std::tie(outer, channels, inner) = channels_first_layout(x_in);
  if (outer > 0) {  // dx in x's channels-first layout (its strides), as x was read
    const int64_t tiles = (inner + kTile - 1) / kTile;
    const int64_t blocks = outer * ((tiles + kTilesPerBlock - 1) / kTilesPerBlock);
    auto dx = at::empty_like(x_in);
    auto dw_blocks = at::empty({blocks, channels}, weight.options());
    auto db_blocks = at::empty({blocks, channels}, weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "layer_norm_last_backward_cpu_cf",
                                    [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                      "layer_norm_last_backward_cpu_cf_out", [&] {
        backward_kernel_cf<in_t, scalar_t>(grad_out.const_data_ptr<scalar_t>(), x_in.const_data_ptr<in_t>(),
                                           weight.contiguous(), mean, rstd, outer, channels, inner,
                                           dx.mutable_data_ptr<in_t>(), dw_blocks, db_blocks);
      });
    });
    return {dx, dw_blocks.sum(0), db_blocks.sum(0)};
  }
  const auto x = x_in.contiguous();
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
