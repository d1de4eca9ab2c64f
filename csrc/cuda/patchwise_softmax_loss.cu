// CUDA kernels of lesionkit::patchwise_softmax_loss (SegMAE Eq. 5-8, Eq. 12).
//
// Forward: one block per patch reduces its C*P*P squared errors (the only full read of pred
// and target), then one block per image does the max-subtracted softmax over its N patch
// losses. Backward: one block per image turns the saved patch losses and weights into
// per-patch coefficients, then a grid-stride elementwise kernel writes the gradient.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../patchwise_softmax_loss.h"
#include "block_reduce.cuh"
#include "launch.cuh"

namespace lesionkit {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void patch_loss_kernel(const scalar_t* __restrict__ pred,
                                  const scalar_t* __restrict__ target,
                                  acc_t* __restrict__ patch_loss, int64_t C, int64_t H, int64_t W,
                                  int64_t P, int64_t cols, int64_t N) {
  __shared__ acc_t scratch[32];
  const int64_t patch = blockIdx.x;  // (b, i) flattened: the grid's x dimension has room for it
  const int64_t b = patch / N, i = patch % N;
  const int64_t r = i / cols, col = i % cols;
  const int64_t per_patch = C * P * P;
  acc_t acc = 0;
  for (int64_t idx = threadIdx.x; idx < per_patch; idx += blockDim.x) {
    const int64_t c = idx / (P * P), rem = idx % (P * P);
    const int64_t y = rem / P, x = rem % P;
    const int64_t offset = ((b * C + c) * H + r * P + y) * W + col * P + x;
    const acc_t d = static_cast<acc_t>(pred[offset]) - static_cast<acc_t>(target[offset]);
    acc += d * d;
  }
  acc = lesionkit::cuda::block_sum(acc, scratch);
  if (threadIdx.x == 0) patch_loss[patch] = acc / static_cast<acc_t>(per_patch);
}

template <typename scalar_t, typename acc_t>
__global__ void softmax_kernel(const acc_t* __restrict__ patch_loss, const bool* __restrict__ mask,
                               acc_t* __restrict__ weights, scalar_t* __restrict__ loss, int64_t N,
                               acc_t inv_beta) {
  __shared__ acc_t scratch[32];
  const int64_t b = blockIdx.x;
  const acc_t* L = patch_loss + b * N;
  const bool* m = mask ? mask + b * N : nullptr;
  acc_t* w = weights + b * N;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();

  acc_t lmax = lowest, count = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    if (m && !m[i]) continue;
    lmax = max(lmax, L[i]);
    count += 1;
  }
  lmax = lesionkit::cuda::block_max(lmax, scratch, lowest);
  count = lesionkit::cuda::block_sum(count, scratch);

  acc_t denom = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc_t e = (m && !m[i]) ? acc_t(0) : exp((L[i] - lmax) * inv_beta);
    w[i] = e;
    denom += e;
  }
  denom = lesionkit::cuda::block_sum(denom, scratch);

  acc_t total = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc_t wi = w[i] / denom;
    w[i] = wi;
    total += wi * L[i];
  }
  total = lesionkit::cuda::block_sum(total, scratch);
  // An image with no counted patch has no loss; the Python wrapper rejects such masks before
  // launch, a direct op call gets NaN rather than a silent zero.
  if (threadIdx.x == 0) {
    loss[b] = static_cast<scalar_t>(count > 0 ? total / count
                                              : std::numeric_limits<acc_t>::quiet_NaN());
  }
}

template <typename acc_t>
__global__ void coefficient_kernel(const acc_t* __restrict__ grad_loss,
                                   const acc_t* __restrict__ patch_loss,
                                   const acc_t* __restrict__ weights, const bool* __restrict__ mask,
                                   acc_t* __restrict__ coef, int64_t N, acc_t inv_beta,
                                   acc_t inv_count, bool detach_weights) {
  __shared__ acc_t scratch[32];
  const int64_t b = blockIdx.x;
  const acc_t* L = patch_loss + b * N;
  const acc_t* w = weights + b * N;
  const bool* m = mask ? mask + b * N : nullptr;
  acc_t count = 0, lbar = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    if (m && !m[i]) continue;
    count += 1;
    lbar += w[i] * L[i];
  }
  count = lesionkit::cuda::block_sum(count, scratch);
  lbar = lesionkit::cuda::block_sum(lbar, scratch);
  // d loss_b / d L'_i = w_i / n_b * (1 + (L'_i - sum_j w_j L'_j) / beta), times 2 / (C P^2).
  const acc_t scale = count > 0 ? grad_loss[b] / count * 2 * inv_count : acc_t(0);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc_t through_w = detach_weights ? acc_t(1) : acc_t(1) + (L[i] - lbar) * inv_beta;
    coef[b * N + i] = (m && !m[i]) ? acc_t(0) : scale * w[i] * through_w;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                            const acc_t* __restrict__ coef, scalar_t* __restrict__ grad,
                            int64_t total, int64_t C, int64_t H, int64_t W, int64_t P, int64_t cols,
                            int64_t N) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = idx % W;
    const int64_t row = idx / W;
    const int64_t h = row % H;
    const int64_t b = row / (C * H);
    const acc_t k = coef[b * N + (h / P) * cols + x / P];
    grad[idx] = static_cast<scalar_t>(k * (static_cast<acc_t>(pred[idx]) -
                                           static_cast<acc_t>(target[idx])));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_softmax_loss_cuda(
    const at::Tensor& pred_in, const at::Tensor& target_in, int64_t patch_size, double beta,
    const std::optional<at::Tensor>& mask_in, bool /*detach_weights: backward only*/) {
  TORCH_CHECK(pred_in.is_cuda(), "pred should be a CUDA tensor for the CUDA kernel, got one on ",
              pred_in.device());
  const PatchGrid g = check_patchwise_inputs(pred_in, target_in, patch_size, beta, mask_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const auto acc = pred_in.options().dtype(patchwise_acc_type(pred_in.scalar_type()));
  auto loss = at::empty({g.batch}, pred_in.options());
  auto patch_loss = at::empty({g.batch, g.patches()}, acc);
  auto weights = at::empty({g.batch, g.patches()}, acc);
  if (g.batch == 0) return {loss, patch_loss, weights};

  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto mask = mask_in.has_value() ? std::optional<at::Tensor>(mask_in->contiguous())
                                        : std::nullopt;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "patchwise_softmax_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    patch_loss_kernel<scalar_t, acc_t>
        <<<cuda::grid_x(g.batch * g.patches(), "batch * patches"), kThreads, 0, stream>>>(
        pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
        patch_loss.mutable_data_ptr<acc_t>(), g.channels, g.height, g.width, g.patch, g.cols,
        g.patches());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    softmax_kernel<scalar_t, acc_t><<<cuda::grid_x(g.batch, "batch"), kThreads, 0, stream>>>(
        patch_loss.const_data_ptr<acc_t>(), mask ? mask->const_data_ptr<bool>() : nullptr,
        weights.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<scalar_t>(), g.patches(),
        static_cast<acc_t>(1.0 / beta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, patch_loss, weights};
}

at::Tensor patchwise_softmax_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& pred_in, const at::Tensor& target_in,
    const at::Tensor& patch_loss_in, const at::Tensor& weights_in,
    const std::optional<at::Tensor>& mask_in, int64_t patch_size, double beta, bool detach_weights) {
  TORCH_CHECK(pred_in.is_cuda(), "pred should be a CUDA tensor for the CUDA kernel, got one on ",
              pred_in.device());
  const PatchGrid g = check_patchwise_inputs(pred_in, target_in, patch_size, beta, mask_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const auto acc_type = patchwise_acc_type(pred_in.scalar_type());
  check_patchwise_backward_inputs(g, grad_loss, patch_loss_in, weights_in, acc_type,
                                  pred_in.device());
  auto grad = at::empty(pred_in.sizes(), pred_in.options());
  // C = 0 leaves nothing to write: a zero-block grid would be an invalid launch.
  if (grad.numel() == 0) return grad;

  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto gl = grad_loss.to(acc_type).contiguous();
  const auto patch_loss = patch_loss_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto mask = mask_in.has_value() ? std::optional<at::Tensor>(mask_in->contiguous())
                                        : std::nullopt;
  auto coef = at::empty({g.batch, g.patches()}, patch_loss.options());
  const int64_t total = pred.numel();
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535LL * 32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "patchwise_softmax_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    coefficient_kernel<acc_t><<<cuda::grid_x(g.batch, "batch"), kThreads, 0, stream>>>(
        gl.const_data_ptr<acc_t>(), patch_loss.const_data_ptr<acc_t>(),
        weights.const_data_ptr<acc_t>(), mask ? mask->const_data_ptr<bool>() : nullptr,
        coef.mutable_data_ptr<acc_t>(), g.patches(), static_cast<acc_t>(1.0 / beta),
        static_cast<acc_t>(1.0 / static_cast<double>(g.channels * g.patch * g.patch)),
        detach_weights);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
        coef.const_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>(), total, g.channels,
        g.height, g.width, g.patch, g.cols, g.patches());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CUDA, m) {
  m.impl("patchwise_softmax_loss", &lesionkit::patchwise_softmax_loss_cuda);
  m.impl("patchwise_softmax_loss_backward", &lesionkit::patchwise_softmax_loss_backward_cuda);
}
