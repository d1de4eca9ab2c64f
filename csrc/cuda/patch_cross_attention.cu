// CUDA kernels of lesionkit::patch_cross_attention (GRCSF Eq. 6).
//
// One block per (batch, head, window), all flattened on grid.x (2^31 - 1 blocks), so the
// number of windows is not limited by grid.y / grid.z's 65,535. One thread per token of the
// window (T = P*P <= 1024). Keys and values (queries in the key-side backward) stream through
// shared memory in chunks; every thread keeps its own row in registers / local memory and
// does an online softmax over the chunks (flash-attention style), so nothing is partitioned
// in global memory. The forward saves the per-query log-sum-exp; the backward recomputes the
// probabilities from it in two kernels: one thread per query for dq (and D_i = dO_i . O_i),
// then one thread per key for dk and dv, so no atomics are needed.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../patch_cross_attention.h"

namespace lesionkit {
namespace {

constexpr int kMaxChunk = 32;            // tokens per shared-memory chunk (upper bound)
constexpr int64_t kSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit
constexpr int64_t kMaxTokens = 1024;     // one thread per token

struct Layout {
  int64_t HW, W, P, T, windows, cols;
  // Offset inside an (H, W) plane of token t of window w.
  __device__ __forceinline__ int64_t pixel(int64_t w, int64_t t) const {
    return (w / cols) * P * W + (w % cols) * P + (t / P) * W + t % P;
  }
};

// dst[jj * C + c] = src plane's channel c at token j0 + jj, for jj < n (all threads help).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ src, int64_t C,
                                           const Layout& L, int64_t w, int64_t j0, int n,
                                           acc_t* dst) {
  for (int64_t idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
    const int64_t jj = idx / C, c = idx % C;
    dst[idx] = static_cast<acc_t>(src[c * L.HW + L.pixel(w, j0 + jj)]);
  }
}

template <typename scalar_t, typename acc_t, int kMaxD>
__global__ void forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                               acc_t* __restrict__ lse, int64_t dk, int64_t dv, Layout L,
                               int chunk, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = ks + chunk * dk;
  const int64_t block = blockIdx.x;  // (plane, window) flattened
  const int64_t plane = block / L.windows, w = block % L.windows;
  const scalar_t* qp = q + plane * dk * L.HW;
  const scalar_t* kp = k + plane * dk * L.HW;
  const scalar_t* vp = v + plane * dv * L.HW;
  const int64_t i = threadIdx.x;
  const bool active = i < L.T;
  const int64_t pix = active ? L.pixel(w, i) : 0;

  acc_t qi[kMaxD], oi[kMaxD], s[kMaxChunk];
  for (int64_t c = 0; c < dk; ++c) qi[c] = active ? static_cast<acc_t>(qp[c * L.HW + pix]) * scale : acc_t(0);
  for (int64_t c = 0; c < dv; ++c) oi[c] = 0;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), l = 0;

  for (int64_t j0 = 0; j0 < L.T; j0 += chunk) {
    const int n = static_cast<int>(L.T - j0 < chunk ? L.T - j0 : chunk);
    __syncthreads();  // the previous chunk is no longer read
    load_chunk(kp, dk, L, w, j0, n, ks);
    load_chunk(vp, dv, L, w, j0, n, vs);
    __syncthreads();
    if (!active) continue;
    acc_t chunk_max = m;
    for (int jj = 0; jj < n; ++jj) {
      acc_t dot = 0;
      for (int64_t c = 0; c < dk; ++c) dot += qi[c] * ks[jj * dk + c];
      s[jj] = dot;
      chunk_max = max(chunk_max, dot);
    }
    const acc_t correction = exp(m - chunk_max);  // 0 on the first chunk (m = -inf)
    l *= correction;
    for (int64_t c = 0; c < dv; ++c) oi[c] *= correction;
    for (int jj = 0; jj < n; ++jj) {
      const acc_t p = exp(s[jj] - chunk_max);
      l += p;
      for (int64_t c = 0; c < dv; ++c) oi[c] += p * vs[jj * dv + c];
    }
    m = chunk_max;
  }
  if (!active) return;
  const acc_t inv = acc_t(1) / l;
  scalar_t* op = out + plane * dv * L.HW;
  for (int64_t c = 0; c < dv; ++c) op[c * L.HW + pix] = static_cast<scalar_t>(oi[c] * inv);
  lse[plane * L.HW + pix] = m + log(l);
}

// One thread per query: D_i = dO_i . O_i (saved for the key kernel) and
// dq_i = scale * sum_j P_ij (dO_i . v_j - D_i) k_j.
template <typename scalar_t, typename acc_t, int kMaxD>
__global__ void backward_query_kernel(const scalar_t* __restrict__ grad_out,
                                      const scalar_t* __restrict__ q,
                                      const scalar_t* __restrict__ k,
                                      const scalar_t* __restrict__ v,
                                      const scalar_t* __restrict__ out,
                                      const acc_t* __restrict__ lse, acc_t* __restrict__ rowterm,
                                      scalar_t* __restrict__ dq, int64_t dk, int64_t dv, Layout L,
                                      int chunk, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = ks + chunk * dk;
  const int64_t block = blockIdx.x;
  const int64_t plane = block / L.windows, w = block % L.windows;
  const int64_t i = threadIdx.x;
  const bool active = i < L.T;
  const int64_t pix = active ? L.pixel(w, i) : 0;
  const scalar_t* kp = k + plane * dk * L.HW;
  const scalar_t* vp = v + plane * dv * L.HW;

  acc_t qi[kMaxD], doi[kMaxD], dqi[kMaxD];
  acc_t d = 0, lse_i = 0;
  if (active) {
    const scalar_t* qp = q + plane * dk * L.HW + pix;
    const scalar_t* gp = grad_out + plane * dv * L.HW + pix;
    const scalar_t* op = out + plane * dv * L.HW + pix;
    for (int64_t c = 0; c < dk; ++c) {
      qi[c] = static_cast<acc_t>(qp[c * L.HW]) * scale;
      dqi[c] = 0;
    }
    for (int64_t c = 0; c < dv; ++c) {
      doi[c] = static_cast<acc_t>(gp[c * L.HW]);
      d += doi[c] * static_cast<acc_t>(op[c * L.HW]);
    }
    lse_i = lse[plane * L.HW + pix];
    rowterm[plane * L.HW + pix] = d;
  }

  for (int64_t j0 = 0; j0 < L.T; j0 += chunk) {
    const int n = static_cast<int>(L.T - j0 < chunk ? L.T - j0 : chunk);
    __syncthreads();
    load_chunk(kp, dk, L, w, j0, n, ks);
    load_chunk(vp, dv, L, w, j0, n, vs);
    __syncthreads();
    if (!active) continue;
    for (int jj = 0; jj < n; ++jj) {
      acc_t s = 0, dp = 0;
      for (int64_t c = 0; c < dk; ++c) s += qi[c] * ks[jj * dk + c];
      for (int64_t c = 0; c < dv; ++c) dp += doi[c] * vs[jj * dv + c];
      const acc_t ds = exp(s - lse_i) * (dp - d);
      for (int64_t c = 0; c < dk; ++c) dqi[c] += ds * ks[jj * dk + c];
    }
  }
  if (!active) return;
  scalar_t* dqp = dq + plane * dk * L.HW + pix;
  for (int64_t c = 0; c < dk; ++c) dqp[c * L.HW] = static_cast<scalar_t>(dqi[c] * scale);
}

// One thread per key: dv_j = sum_i P_ij dO_i, dk_j = scale * sum_i P_ij (dO_i . v_j - D_i) q_i.
template <typename scalar_t, typename acc_t, int kMaxD>
__global__ void backward_key_kernel(const scalar_t* __restrict__ grad_out,
                                    const scalar_t* __restrict__ q,
                                    const scalar_t* __restrict__ k,
                                    const scalar_t* __restrict__ v,
                                    const acc_t* __restrict__ lse,
                                    const acc_t* __restrict__ rowterm, scalar_t* __restrict__ dk,
                                    scalar_t* __restrict__ dv, int64_t DK, int64_t DV, Layout L,
                                    int chunk, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gs = qs + chunk * DK;
  acc_t* ls = gs + chunk * DV;
  acc_t* rows = ls + chunk;  // D_i of the chunk's queries
  const int64_t block = blockIdx.x;
  const int64_t plane = block / L.windows, w = block % L.windows;
  const int64_t j = threadIdx.x;
  const bool active = j < L.T;
  const int64_t pix = active ? L.pixel(w, j) : 0;
  const scalar_t* qp = q + plane * DK * L.HW;
  const scalar_t* gp = grad_out + plane * DV * L.HW;

  acc_t kj[kMaxD], vj[kMaxD], dkj[kMaxD], dvj[kMaxD];
  if (active) {
    const scalar_t* kp = k + plane * DK * L.HW + pix;
    const scalar_t* vp = v + plane * DV * L.HW + pix;
    for (int64_t c = 0; c < DK; ++c) {
      kj[c] = static_cast<acc_t>(kp[c * L.HW]) * scale;
      dkj[c] = 0;
    }
    for (int64_t c = 0; c < DV; ++c) {
      vj[c] = static_cast<acc_t>(vp[c * L.HW]);
      dvj[c] = 0;
    }
  }

  for (int64_t i0 = 0; i0 < L.T; i0 += chunk) {
    const int n = static_cast<int>(L.T - i0 < chunk ? L.T - i0 : chunk);
    __syncthreads();
    load_chunk(qp, DK, L, w, i0, n, qs);
    load_chunk(gp, DV, L, w, i0, n, gs);
    for (int64_t ii = threadIdx.x; ii < n; ii += blockDim.x) {
      const int64_t at = plane * L.HW + L.pixel(w, i0 + ii);
      ls[ii] = lse[at];
      rows[ii] = rowterm[at];
    }
    __syncthreads();
    if (!active) continue;
    for (int ii = 0; ii < n; ++ii) {
      acc_t s = 0, dp = 0;
      for (int64_t c = 0; c < DK; ++c) s += kj[c] * qs[ii * DK + c];
      for (int64_t c = 0; c < DV; ++c) dp += vj[c] * gs[ii * DV + c];
      const acc_t p = exp(s - ls[ii]);
      const acc_t ds = p * (dp - rows[ii]);
      for (int64_t c = 0; c < DV; ++c) dvj[c] += p * gs[ii * DV + c];
      for (int64_t c = 0; c < DK; ++c) dkj[c] += ds * qs[ii * DK + c];
    }
  }
  if (!active) return;
  scalar_t* dkp = dk + plane * DK * L.HW + pix;
  scalar_t* dvp = dv + plane * DV * L.HW + pix;
  for (int64_t c = 0; c < DK; ++c) dkp[c * L.HW] = static_cast<scalar_t>(dkj[c] * scale);
  for (int64_t c = 0; c < DV; ++c) dvp[c * L.HW] = static_cast<scalar_t>(dvj[c]);
}

Layout make_layout(const WindowGrid& g) {
  return Layout{g.height * g.width, g.width, g.patch, g.tokens(), g.windows(), g.cols};
}

// Launch shape shared by the three kernels; checks the limits this kernel design has.
struct Launch {
  int64_t blocks;
  int threads, chunk;
  size_t shared;
};

Launch make_launch(const WindowGrid& g, size_t acc_size, int64_t per_token_values) {
  TORCH_CHECK(g.tokens() <= kMaxTokens, "the cuda kernel of patch_cross_attention runs one thread "
              "per window position and supports patch_size <= 32, got patch_size=", g.patch,
              "; use the triton or reference backend");
  TORCH_CHECK(std::max(g.dk, g.dv) <= 256, "the cuda kernel of patch_cross_attention supports "
              "dk, dv <= 256 channels per head, got dk=", g.dk, ", dv=", g.dv,
              "; use more heads or the triton / reference backend");
  Launch launch;
  launch.blocks = g.batch * g.heads * g.windows();
  TORCH_CHECK(launch.blocks <= std::numeric_limits<int32_t>::max(),
              "patch_cross_attention: B * h * windows should fit in grid.x (2^31 - 1), got ",
              launch.blocks);
  launch.threads = static_cast<int>((g.tokens() + 31) / 32 * 32);
  const int64_t per_token = per_token_values * static_cast<int64_t>(acc_size);
  launch.chunk = static_cast<int>(std::clamp<int64_t>(kSharedBytes / per_token, 1, kMaxChunk));
  launch.shared = static_cast<size_t>(launch.chunk * per_token);
  return launch;
}

// Calls body.template operator()<kMaxD>() with the smallest supported register bound.
template <typename Body>
void dispatch_channels(int64_t channels, Body&& body) {
  if (channels <= 64) {
    body(std::integral_constant<int, 64>{});
  } else {
    body(std::integral_constant<int, 256>{});
  }
}

std::tuple<at::Tensor, at::Tensor> patch_cross_attention_cuda(const at::Tensor& q_in,
                                                              const at::Tensor& k_in,
                                                              const at::Tensor& v_in,
                                                              int64_t patch_size, double scale) {
  const WindowGrid g = check_patch_attention_inputs(q_in, k_in, v_in, patch_size);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({g.batch, g.heads, g.dv, g.height, g.width}, v_in.options());
  auto lse = at::empty({g.batch, g.heads, g.height, g.width},
                       q_in.options().dtype(patch_attention_acc_type(q_in.scalar_type())));
  if (g.batch == 0 || g.heads == 0) return {out, lse};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Layout layout = make_layout(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "patch_cross_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Launch launch = make_launch(g, sizeof(acc_t), g.dk + g.dv);
    dispatch_channels(std::max(g.dk, g.dv), [&](auto max_d) {
      forward_kernel<scalar_t, acc_t, decltype(max_d)::value>
          <<<static_cast<unsigned int>(launch.blocks), launch.threads, launch.shared, stream>>>(
              q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
              v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
              lse.mutable_data_ptr<acc_t>(), g.dk, g.dv, layout, launch.chunk,
              static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_cross_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    int64_t patch_size, double scale) {
  const WindowGrid g = check_patch_attention_inputs(q_in, k_in, v_in, patch_size);
  check_patch_attention_backward_inputs(g, q_in, grad_out_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto dq = at::empty(q_in.sizes(), q_in.options());
  auto dk = at::empty(k_in.sizes(), k_in.options());
  auto dv = at::empty(v_in.sizes(), v_in.options());
  if (g.batch == 0 || g.heads == 0) return {dq, dk, dv};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const auto lse = lse_in.contiguous();
  auto rowterm = at::empty_like(lse);
  const Layout layout = make_layout(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "patch_cross_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Launch query_launch = make_launch(g, sizeof(acc_t), g.dk + g.dv);
    const Launch key_launch = make_launch(g, sizeof(acc_t), g.dk + g.dv + 2);
    dispatch_channels(std::max(g.dk, g.dv), [&](auto max_d) {
      constexpr int kMaxD = decltype(max_d)::value;
      backward_query_kernel<scalar_t, acc_t, kMaxD>
          <<<static_cast<unsigned int>(query_launch.blocks), query_launch.threads, query_launch.shared, stream>>>(
              grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
              out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
              rowterm.mutable_data_ptr<acc_t>(), dq.mutable_data_ptr<scalar_t>(), g.dk, g.dv,
              layout, query_launch.chunk, static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_key_kernel<scalar_t, acc_t, kMaxD>
          <<<static_cast<unsigned int>(key_launch.blocks), key_launch.threads, key_launch.shared, stream>>>(
              grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
              lse.const_data_ptr<acc_t>(), rowterm.const_data_ptr<acc_t>(),
              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), g.dk, g.dv,
              layout, key_launch.chunk, static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CUDA, m) {
  m.impl("patch_cross_attention", &lesionkit::patch_cross_attention_cuda);
  m.impl("patch_cross_attention_backward", &lesionkit::patch_cross_attention_backward_cuda);
}
