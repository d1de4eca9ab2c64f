// CPU kernels of lesionkit::gcu_compensate and its backward: GRCSF's global compensation
// (Eq. 1-2) after the squeeze-excitations, in one pass over the pixels (docs/grcsf.md).
// PyTorch's element-wise ops take about ten passes over the (B, C, H, W) tensors for this, and
// in bfloat16 over channels-last tensors each is several times slower than a float32 copy.
// Here the tensors are read channels-last (a pixel's C channels are contiguous) in tiles of
// pixels, converted to the accumulation dtype, and each tile goes through three vectorised
// loops: the per-pixel sums over the channels, the per-pixel scalars (vectorised over pixels),
// and the per-channel outputs or gradients.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "tile_io.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own _mm512_reduce_add_ps trips -Wmaybe-uninitialized inside its header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace lesionkit {
namespace {

constexpr int64_t kPixelsPerTask = 512;
constexpr int64_t kTileValues = 4096;  // values per tile buffer: 16 KiB of float

void check_inputs(const at::Tensor& re_up, const at::Tensor& up, const at::Tensor& up_scale,
                  const at::Tensor& skip, const at::Tensor& skip_scale) {
  TORCH_CHECK(skip.dim() == 4, "skip should be a (B, C, H, W) tensor, got ", skip.sizes());
  TORCH_CHECK(re_up.sizes() == skip.sizes() && up.sizes() == skip.sizes(),
              "re_up and up should have skip's shape ", skip.sizes(), ", got ", re_up.sizes(), " and ",
              up.sizes());
  TORCH_CHECK(up_scale.dim() == 2 && up_scale.size(0) == skip.size(0) && up_scale.size(1) == skip.size(1) &&
                  skip_scale.sizes() == up_scale.sizes(),
              "up_scale and skip_scale should be (B, C) = (", skip.size(0), ", ", skip.size(1), "), got ",
              up_scale.sizes(), " and ", skip_scale.sizes());
  for (const auto* t : {&re_up, &up, &up_scale, &skip_scale}) {
    TORCH_CHECK(t->scalar_type() == skip.scalar_type(), "gcu_compensate's tensors should share one dtype, got ",
                re_up.scalar_type(), ", ", up.scalar_type(), ", ", up_scale.scalar_type(), ", ",
                skip.scalar_type(), ", ", skip_scale.scalar_type());
  }
}

at::Tensor channels_last(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Per pixel p of a tile: a.b, |a|^2, |b|^2 with a = ru * u * su, b = f * sf over the C channels.
template <typename acc_t>
inline void tile_sums(const acc_t* __restrict__ ru, const acc_t* __restrict__ u, const acc_t* __restrict__ f,
                      const acc_t* __restrict__ su, const acc_t* __restrict__ sf, int64_t pixels, int64_t C,
                      acc_t* __restrict__ dot, acc_t* __restrict__ aa, acc_t* __restrict__ bb) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C % 16 == 0) {
      for (int64_t p = 0; p < pixels; ++p) {
        __m512 d = _mm512_set1_ps(0.0f), x = _mm512_set1_ps(0.0f), y = _mm512_set1_ps(0.0f);
        const int64_t off = p * C;
        for (int64_t c = 0; c < C; c += 16) {
          const __m512 a = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(ru + off + c), _mm512_loadu_ps(u + off + c)),
                                         _mm512_loadu_ps(su + c));
          const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(f + off + c), _mm512_loadu_ps(sf + c));
          d = _mm512_fmadd_ps(a, b, d);
          x = _mm512_fmadd_ps(a, a, x);
          y = _mm512_fmadd_ps(b, b, y);
        }
        dot[p] = _mm512_reduce_add_ps(d), aa[p] = _mm512_reduce_add_ps(x), bb[p] = _mm512_reduce_add_ps(y);
      }
      return;
    }
  }
#endif
  for (int64_t p = 0; p < pixels; ++p) {
    acc_t d[kLanes] = {}, x[kLanes] = {}, y[kLanes] = {};
    const int64_t off = p * C;
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t a = ru[off + c + l] * u[off + c + l] * su[c + l];
        const acc_t b = f[off + c + l] * sf[c + l];
        d[l] += a * b;
        x[l] += a * a;
        y[l] += b * b;
      }
    }
    for (; c < C; ++c) {
      const acc_t a = ru[off + c] * u[off + c] * su[c];
      const acc_t b = f[off + c] * sf[c];
      d[0] += a * b;
      x[0] += a * a;
      y[0] += b * b;
    }
    dot[p] = lane_total(d), aa[p] = lane_total(x), bb[p] = lane_total(y);
  }
}

// Per pixel p of a tile: sum_c go * f.
template <typename acc_t>
inline void tile_dots(const acc_t* __restrict__ go, const acc_t* __restrict__ f, int64_t pixels, int64_t C,
                      acc_t* __restrict__ out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C % 16 == 0) {
      for (int64_t p = 0; p < pixels; ++p) {
        __m512 d = _mm512_set1_ps(0.0f);
        for (int64_t c = 0; c < C; c += 16) {
          d = _mm512_fmadd_ps(_mm512_loadu_ps(go + p * C + c), _mm512_loadu_ps(f + p * C + c), d);
        }
        out[p] = _mm512_reduce_add_ps(d);
      }
      return;
    }
  }
#endif
  for (int64_t p = 0; p < pixels; ++p) {
    acc_t d[kLanes] = {};
    const int64_t off = p * C;
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) d[l] += go[off + c + l] * f[off + c + l];
    }
    for (; c < C; ++c) d[0] += go[off + c] * f[off + c];
    out[p] = lane_total(d);
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& re_up, const at::Tensor& up, const at::Tensor& up_scale,
                    const at::Tensor& skip, const at::Tensor& skip_scale, double eps, at::Tensor& out,
                    at::Tensor& residual) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = skip.size(0), C = skip.size(1), HW = skip.size(2) * skip.size(3);
  const scalar_t *ru_p = re_up.const_data_ptr<scalar_t>(), *u_p = up.const_data_ptr<scalar_t>(),
                 *f_p = skip.const_data_ptr<scalar_t>();
  const acc_t *su_p = up_scale.const_data_ptr<acc_t>(), *sf_p = skip_scale.const_data_ptr<acc_t>();
  scalar_t* o_p = out.mutable_data_ptr<scalar_t>();
  acc_t* r_p = residual.mutable_data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps);
  const int64_t tile = std::max<int64_t>(1, kTileValues / C);
  const int64_t tasks_per_image = (HW + kPixelsPerTask - 1) / kPixelsPerTask;
  at::parallel_for(0, B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(4 * tile * C + 3 * tile);
    acc_t *RU = buf.data(), *U = RU + tile * C, *F = U + tile * C, *O = F + tile * C;
    acc_t *dot = O + tile * C, *aa = dot + tile, *bb = aa + tile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tasks_per_image, first = (task % tasks_per_image) * kPixelsPerTask;
      const int64_t last = std::min(HW, first + kPixelsPerTask);
      const acc_t *su = su_p + n * C, *sf = sf_p + n * C;
      for (int64_t t0 = first; t0 < last; t0 += tile) {
        const int64_t np = std::min(tile, last - t0), off = (n * HW + t0) * C, m = np * C;
        load_tile(ru_p + off, RU, m);
        load_tile(u_p + off, U, m);
        load_tile(f_p + off, F, m);
        tile_sums(RU, U, F, su, sf, np, C, dot, aa, bb);
        acc_t* r = r_p + n * HW + t0;
#pragma omp simd
        for (int64_t p = 0; p < np; ++p) r[p] = dot[p] / std::max(std::sqrt(aa[p]) * std::sqrt(bb[p]), e);
        for (int64_t p = 0; p < np; ++p) {
          const acc_t rp = r[p];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) O[p * C + c] = rp * F[p * C + c] + F[p * C + c];
        }
        store_tile(O, o_p + off, m);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& grad_residual, const at::Tensor& re_up,
                     const at::Tensor& up, const at::Tensor& up_scale, const at::Tensor& skip,
                     const at::Tensor& skip_scale, double eps, at::Tensor& d_re_up, at::Tensor& d_up,
                     at::Tensor& d_skip, at::Tensor& partial, int64_t tasks_per_image) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = skip.size(1), HW = skip.size(2) * skip.size(3), B = skip.size(0);
  const scalar_t *ru_p = re_up.const_data_ptr<scalar_t>(), *u_p = up.const_data_ptr<scalar_t>(),
                 *f_p = skip.const_data_ptr<scalar_t>(), *go_p = grad_out.const_data_ptr<scalar_t>();
  const acc_t *su_p = up_scale.const_data_ptr<acc_t>(), *sf_p = skip_scale.const_data_ptr<acc_t>();
  const acc_t* gr_p = grad_residual.defined() ? grad_residual.const_data_ptr<acc_t>() : nullptr;
  scalar_t *dru_p = d_re_up.mutable_data_ptr<scalar_t>(), *du_p = d_up.mutable_data_ptr<scalar_t>(),
           *df_p = d_skip.mutable_data_ptr<scalar_t>();
  acc_t* part_p = partial.mutable_data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps);
  const int64_t tile = std::max<int64_t>(1, kTileValues / C);
  at::parallel_for(0, B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(7 * tile * C + 8 * tile);
    acc_t *RU = buf.data(), *U = RU + tile * C, *F = U + tile * C, *GO = F + tile * C;
    acc_t *DRU = GO + tile * C, *DU = DRU + tile * C, *DF = DU + tile * C;
    acc_t *dot = DF + tile * C, *aa = dot + tile, *bb = aa + tile, *gr = bb + tile;
    acc_t *inv = gr + tile, *r1 = inv + tile, *ka = r1 + tile, *kb = ka + tile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tasks_per_image, first = (task % tasks_per_image) * kPixelsPerTask;
      const int64_t last = std::min(HW, first + kPixelsPerTask);
      const acc_t *__restrict__ su = su_p + n * C, *__restrict__ sf = sf_p + n * C;
      // This task's partial sums of up_scale's and skip_scale's gradients.
      acc_t *__restrict__ d_su = part_p + task * 2 * C, *__restrict__ d_sf = d_su + C;
      for (int64_t t0 = first; t0 < last; t0 += tile) {
        const int64_t np = std::min(tile, last - t0), off = (n * HW + t0) * C, m = np * C;
        load_tile(ru_p + off, RU, m);
        load_tile(u_p + off, U, m);
        load_tile(f_p + off, F, m);
        load_tile(go_p + off, GO, m);
        tile_sums(RU, U, F, su, sf, np, C, dot, aa, bb);
        tile_dots(GO, F, np, C, gr);  // dL/dR: through out = R * f + f, plus R's own gradient
        if (gr_p) {
          for (int64_t p = 0; p < np; ++p) gr[p] += gr_p[n * HW + t0 + p];
        }
        // R = a.b / max(|a||b|, eps); where not clamped, dR/da = b / |a||b| - R a / |a|^2 and
        // dR/db = a / |a||b| - R b / |b|^2 (both norms > 0 there); clamped, the norms pass none.
#pragma omp simd
        for (int64_t p = 0; p < np; ++p) {
          const acc_t denom = std::sqrt(aa[p]) * std::sqrt(bb[p]);
          const bool clamped = !(denom > e);
          const acc_t i = acc_t(1) / (clamped ? e : denom);
          const acc_t r = dot[p] * i;
          inv[p] = i;
          r1[p] = r + acc_t(1);
          ka[p] = clamped ? acc_t(0) : r / aa[p];
          kb[p] = clamped ? acc_t(0) : r / bb[p];
        }
        for (int64_t p = 0; p < np; ++p) {
          const acc_t g = gr[p], ip = inv[p], kap = ka[p], kbp = kb[p], rp1 = r1[p];
          const int64_t o = p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t a = RU[o + c] * U[o + c] * su[c], b = F[o + c] * sf[c];
            const acc_t ga = g * (b * ip - kap * a), gb = g * (a * ip - kbp * b);
            DRU[o + c] = ga * U[o + c] * su[c];
            DU[o + c] = ga * RU[o + c] * su[c];
            d_su[c] += ga * RU[o + c] * U[o + c];
            DF[o + c] = GO[o + c] * rp1 + gb * sf[c];
            d_sf[c] += gb * F[o + c];
          }
        }
        store_tile(DRU, dru_p + off, m);
        store_tile(DU, du_p + off, m);
        store_tile(DF, df_p + off, m);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gcu_compensate_cpu(const at::Tensor& re_up_in, const at::Tensor& up_in,
                                                      const at::Tensor& up_scale_in, const at::Tensor& skip_in,
                                                      const at::Tensor& skip_scale_in, double eps) {
  check_inputs(re_up_in, up_in, up_scale_in, skip_in, skip_scale_in);
  const auto acc_type = acc_type_of(skip_in);
  auto out = at::empty(skip_in.sizes(), skip_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto residual = at::empty({skip_in.size(0), 1, skip_in.size(2), skip_in.size(3)}, skip_in.options().dtype(acc_type));
  if (out.numel() == 0) return {out, residual};
  const auto re_up = channels_last(re_up_in), up = channels_last(up_in), skip = channels_last(skip_in);
  const auto up_scale = up_scale_in.to(acc_type).contiguous(), skip_scale = skip_scale_in.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "gcu_compensate_cpu", [&] {
    forward_kernel<scalar_t>(re_up, up, up_scale, skip, skip_scale, eps, out, residual);
  });
  return {out, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gcu_compensate_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_residual_in, const at::Tensor& re_up_in,
    const at::Tensor& up_in, const at::Tensor& up_scale_in, const at::Tensor& skip_in,
    const at::Tensor& skip_scale_in, double eps) {
  check_inputs(re_up_in, up_in, up_scale_in, skip_in, skip_scale_in);
  TORCH_CHECK(grad_out_in.sizes() == skip_in.sizes(), "grad_out should have skip's shape ", skip_in.sizes(),
              ", got ", grad_out_in.sizes());
  const int64_t B = skip_in.size(0), C = skip_in.size(1), HW = skip_in.size(2) * skip_in.size(3);
  const bool has_gr = grad_residual_in.has_value() && grad_residual_in->defined();
  if (has_gr) {
    TORCH_CHECK(grad_residual_in->numel() == B * HW, "grad_residual should be (B, 1, H, W), got ",
                grad_residual_in->sizes());
  }
  const auto acc_type = acc_type_of(skip_in);
  const auto cl = skip_in.options().memory_format(at::MemoryFormat::ChannelsLast);
  auto d_re_up = at::empty(skip_in.sizes(), cl), d_up = at::empty(skip_in.sizes(), cl),
       d_skip = at::empty(skip_in.sizes(), cl);
  const int64_t tasks_per_image = std::max<int64_t>(1, (HW + kPixelsPerTask - 1) / kPixelsPerTask);
  // Per-task partial sums of the scales' gradients, summed over each image's tasks at the end.
  auto partial = at::zeros({B, tasks_per_image, 2, C}, skip_in.options().dtype(acc_type));
  if (d_skip.numel() > 0) {
    const auto re_up = channels_last(re_up_in), up = channels_last(up_in), skip = channels_last(skip_in),
               grad_out = channels_last(grad_out_in.to(skip_in.scalar_type()));
    const auto up_scale = up_scale_in.to(acc_type).contiguous(),
               skip_scale = skip_scale_in.to(acc_type).contiguous();
    const auto grad_residual = has_gr ? grad_residual_in->to(acc_type).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, skip.scalar_type(), "gcu_compensate_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_out, grad_residual, re_up, up, up_scale, skip, skip_scale, eps, d_re_up, d_up,
                                d_skip, partial, tasks_per_image);
    });
  }
  auto sums = partial.sum(1);  // (B, 2, C)
  return {d_re_up, d_up, sums.select(1, 0).to(up_scale_in.scalar_type()), d_skip,
          sums.select(1, 1).to(skip_scale_in.scalar_type())};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("gcu_compensate", &lesionkit::gcu_compensate_cpu);
  m.impl("gcu_compensate_backward", &lesionkit::gcu_compensate_backward_cpu);
}
