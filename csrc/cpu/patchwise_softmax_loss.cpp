// CPU kernels of lesionkit::patchwise_softmax_loss (SegMAE Eq. 5-8, Eq. 12).
//
// Forward: one pass over pred/target accumulating squared errors row by row (contiguous,
// vectorisable), then a per-image softmax over the N patch losses. Backward: per-patch
// coefficients from the saved patch losses and weights, then one elementwise pass writing
// the gradient. Accumulation is in float for half/bfloat16/float and double for double.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../patchwise_softmax_loss.h"

namespace lesionkit {
namespace {

// Work units are patch rows (one image, P pixel rows); aim for ~32k elements per task, ATen's
// own grain for elementwise loops.
constexpr int64_t kGrainElements = 32768;

int64_t grain_for(int64_t elements_per_unit) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_unit));
}

template <typename scalar_t>
void forward_impl(const scalar_t* pred, const scalar_t* target, const bool* mask,
                  at::opmath_type<scalar_t>* patch_loss, at::opmath_type<scalar_t>* weights,
                  scalar_t* loss, const PatchGrid& g, double beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.patches(), P = g.patch, W = g.width;
  const acc_t inv_count = acc_t(1) / acc_t(g.channels * P * P);  // Eq. 6: mean over the patch

  at::parallel_for(0, g.batch * g.rows, grain_for(g.channels * P * W), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(W);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / g.rows, r = unit % g.rows;
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t c = 0; c < g.channels; ++c) {
        for (int64_t y = 0; y < P; ++y) {
          const int64_t offset = ((b * g.channels + c) * g.height + r * P + y) * W;
          const scalar_t* p = pred + offset;
          const scalar_t* t = target + offset;
          acc_t* acc = row.data();
#pragma omp simd
          for (int64_t x = 0; x < W; ++x) {
            const acc_t d = acc_t(p[x]) - acc_t(t[x]);  // Eq. 5
            acc[x] += d * d;
          }
        }
      }
      acc_t* out = patch_loss + b * N + r * g.cols;
      for (int64_t col = 0; col < g.cols; ++col) {
        acc_t s = 0;
        for (int64_t x = col * P; x < (col + 1) * P; ++x) s += row[x];
        out[col] = s * inv_count;
      }
    }
  });

  // Eq. 7-8 per image: max-subtracted softmax of L'/beta over the counted patches.
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* L = patch_loss + b * N;
      const bool* m = mask ? mask + b * N : nullptr;
      acc_t* w = weights + b * N;
      acc_t lmax = -std::numeric_limits<acc_t>::infinity();
      int64_t count = 0;
      for (int64_t i = 0; i < N; ++i) {
        if (m && !m[i]) continue;
        lmax = std::max(lmax, L[i]);
        ++count;
      }
      TORCH_CHECK(count > 0, "mask should have at least one true entry per image, image ", b,
                  " has none");
      const acc_t inv_beta = acc_t(1 / beta);
      acc_t denom = 0;
      for (int64_t i = 0; i < N; ++i) {
        const acc_t e = (m && !m[i]) ? acc_t(0) : std::exp((L[i] - lmax) * inv_beta);
        w[i] = e;
        denom += e;
      }
      acc_t total = 0;
      for (int64_t i = 0; i < N; ++i) {
        w[i] /= denom;
        total += w[i] * L[i];
      }
      loss[b] = static_cast<scalar_t>(total / acc_t(count));
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::opmath_type<scalar_t>* grad_loss, const scalar_t* pred,
                   const scalar_t* target, const at::opmath_type<scalar_t>* patch_loss,
                   const at::opmath_type<scalar_t>* weights, const bool* mask, scalar_t* grad,
                   const PatchGrid& g, double beta, bool detach_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.patches(), P = g.patch, W = g.width;
  const acc_t inv_count = acc_t(1) / acc_t(g.channels * P * P);

  // d loss_b / d L'_i = w_i / n_b * (1 + (L'_i - sum_j w_j L'_j) / beta); the second term is the
  // path through the softmax weights (dropped when they are detached). The factor 2 / (C P^2)
  // of d L'_i / d pred (Eq. 5-6) is folded in so the elementwise pass is one multiply.
  std::vector<acc_t> coef(g.batch * N);
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* L = patch_loss + b * N;
      const acc_t* w = weights + b * N;
      const bool* m = mask ? mask + b * N : nullptr;
      int64_t count = 0;
      acc_t lbar = 0;
      for (int64_t i = 0; i < N; ++i) {
        if (m && !m[i]) continue;
        ++count;
        lbar += w[i] * L[i];
      }
      const acc_t scale = count > 0 ? grad_loss[b] / acc_t(count) * 2 * inv_count : acc_t(0);
      const acc_t inv_beta = acc_t(1 / beta);
      for (int64_t i = 0; i < N; ++i) {
        const acc_t through_w = detach_weights ? acc_t(1) : acc_t(1) + (L[i] - lbar) * inv_beta;
        coef[b * N + i] = (m && !m[i]) ? acc_t(0) : scale * w[i] * through_w;
      }
    }
  });

  const int64_t rows = g.batch * g.channels * g.height;
  at::parallel_for(0, rows, grain_for(W), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % g.height;
      const int64_t b = row / (g.channels * g.height);
      const acc_t* k = coef.data() + b * N + (h / P) * g.cols;
      const scalar_t* p = pred + row * W;
      const scalar_t* t = target + row * W;
      scalar_t* out = grad + row * W;
      for (int64_t col = 0; col < g.cols; ++col) {
        const acc_t kk = k[col];
        const int64_t x0 = col * P;
#pragma omp simd
        for (int64_t x = x0; x < x0 + P; ++x) {
          out[x] = static_cast<scalar_t>(kk * (acc_t(p[x]) - acc_t(t[x])));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_softmax_loss_cpu(
    const at::Tensor& pred_in, const at::Tensor& target_in, int64_t patch_size, double beta,
    const std::optional<at::Tensor>& mask_in, bool /*detach_weights: backward only*/) {
  const PatchGrid g = check_patchwise_inputs(pred_in, target_in, patch_size, beta, mask_in);
  const auto acc = pred_in.options().dtype(patchwise_acc_type(pred_in.scalar_type()));
  auto loss = at::empty({g.batch}, pred_in.options());
  auto patch_loss = at::empty({g.batch, g.patches()}, acc);
  auto weights = at::empty({g.batch, g.patches()}, acc);
  if (g.batch == 0) return {loss, patch_loss, weights};

  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto mask = mask_in.has_value() ? std::optional<at::Tensor>(mask_in->contiguous())
                                        : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "patchwise_softmax_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t>(pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
                           mask ? mask->const_data_ptr<bool>() : nullptr,
                           patch_loss.mutable_data_ptr<acc_t>(), weights.mutable_data_ptr<acc_t>(),
                           loss.mutable_data_ptr<scalar_t>(), g, beta);
  });
  return {loss, patch_loss, weights};
}

at::Tensor patchwise_softmax_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& pred_in, const at::Tensor& target_in,
    const at::Tensor& patch_loss_in, const at::Tensor& weights_in,
    const std::optional<at::Tensor>& mask_in, int64_t patch_size, double beta, bool detach_weights) {
  const PatchGrid g = check_patchwise_inputs(pred_in, target_in, patch_size, beta, mask_in);
  const auto acc_type = patchwise_acc_type(pred_in.scalar_type());
  check_patchwise_backward_inputs(g, grad_loss, patch_loss_in, weights_in, acc_type,
                                  pred_in.device());
  auto grad = at::empty(pred_in.sizes(), pred_in.options());
  if (g.batch == 0) return grad;

  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto gl = grad_loss.to(acc_type).contiguous();
  const auto patch_loss = patch_loss_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto mask = mask_in.has_value() ? std::optional<at::Tensor>(mask_in->contiguous())
                                        : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "patchwise_softmax_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t>(gl.const_data_ptr<acc_t>(), pred.const_data_ptr<scalar_t>(),
                            target.const_data_ptr<scalar_t>(), patch_loss.const_data_ptr<acc_t>(),
                            weights.const_data_ptr<acc_t>(),
                            mask ? mask->const_data_ptr<bool>() : nullptr,
                            grad.mutable_data_ptr<scalar_t>(), g, beta, detach_weights);
  });
  return grad;
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("patchwise_softmax_loss", &lesionkit::patchwise_softmax_loss_cpu);
  m.impl("patchwise_softmax_loss_backward", &lesionkit::patchwise_softmax_loss_backward_cpu);
}
