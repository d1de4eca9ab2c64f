// CUDA kernels of lesionkit::patch_cross_attention (GRCSF Eq. 6).
//
// One block per (batch, head, window), all flattened on grid.x (2^31 - 1 blocks), so the
// number of windows is not limited by grid.y / grid.z's 65,535. Blocks of at most 256 threads
// (__launch_bounds__(kThreads), so the register allocation always fits the launch); thread t
// handles the window's tokens t, t + 256, ... (up to 4 rounds at P = 32). Keys and values
// (queries in the key-side backward) stream through shared memory in chunks, stored
// channel-major and loaded so that neighbouring threads read neighbouring pixels (a window row
// is P contiguous values per channel). Every thread keeps its token's rows in arrays whose
// channel loops have a compile-time bound (16, 64 or 256, the smallest that holds
// max(dk, dv)); up to 64 they are unrolled, so the arrays are indexed by constants and live in
// registers; the 256 bound (65 to 256 channels) keeps them in local memory. The forward does an online softmax key by key (flash-attention
// style, rescaling only when the running max grows) and saves the per-query log-sum-exp; the
// backward recomputes the probabilities from it in two kernels: dq (and D_i = dO_i . O_i) per
// query, then dk and dv per key, so no atomics are needed. The launch plan is host-only C++ in
// patch_cross_attention_launch.h.

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
#include <string>
#include <tuple>
#include <type_traits>

#include "../patch_cross_attention.h"
#include "patch_cross_attention_launch.h"

namespace lesionkit {
namespace {

using patch_attention::kThreads;
using patch_attention::Launch;

struct Layout {
  int64_t HW, W, P, T, windows, cols;
  // Offset inside an (H, W) plane of token t of window w.
  __device__ __forceinline__ int64_t pixel(int64_t w, int64_t t) const {
    return (w / cols) * P * W + (w % cols) * P + (t / P) * W + t % P;
  }
};

// dst[c * chunk + jj] = src plane's channel c at token j0 + jj, for jj < n (all threads help).
// Consecutive threads take consecutive tokens of one channel: neighbouring pixels of a window
// row, so the reads coalesce; the channel-major layout keeps the shared stores conflict-free.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ src, int64_t C,
                                           const Layout& L, int64_t w, int64_t j0, int n,
                                           int chunk, acc_t* dst) {
  for (int64_t idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
    const int64_t c = idx / n, jj = idx % n;
    dst[c * chunk + jj] = static_cast<acc_t>(src[c * L.HW + L.pixel(w, j0 + jj)]);
  }
}

// The channel loops are unrolled up to 64 channels (constant indices: the arrays live in
// registers); the 256-channel variant would only trade local memory for spills and minutes of
// compile time, so its loops stay rolled.
template <int kMaxD>
constexpr int kUnroll = kMaxD <= 64 ? kMaxD : 1;

// sum_c a[c] * s[c * chunk] over the first `channels` of kMaxD (unrolled: constant indices).
template <typename acc_t, int kMaxD>
__device__ __forceinline__ acc_t dot_column(const acc_t (&a)[kMaxD], const acc_t* s, int chunk,
                                            int64_t channels) {
  acc_t sum = 0;
#pragma unroll(kUnroll<kMaxD>)
  for (int c = 0; c < kMaxD; ++c) {
    if (c < channels) sum += a[c] * s[c * chunk];
  }
  return sum;
}

// a[c] += f * s[c * chunk] over the first `channels`.
template <typename acc_t, int kMaxD>
__device__ __forceinline__ void axpy_column(acc_t (&a)[kMaxD], acc_t f, const acc_t* s, int chunk,
                                            int64_t channels) {
#pragma unroll(kUnroll<kMaxD>)
  for (int c = 0; c < kMaxD; ++c) {
    if (c < channels) a[c] += f * s[c * chunk];
  }
}

// a[c] = channel c of token `pix` of plane p (times `mul`), 0 past `channels` or when inactive.
template <typename scalar_t, typename acc_t, int kMaxD>
__device__ __forceinline__ void load_row(acc_t (&a)[kMaxD], const scalar_t* __restrict__ p,
                                         int64_t HW, int64_t channels, bool active, acc_t mul) {
#pragma unroll(kUnroll<kMaxD>)
  for (int c = 0; c < kMaxD; ++c) {
    a[c] = (active && c < channels) ? static_cast<acc_t>(p[c * HW]) * mul : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, int kMaxD>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ p, const acc_t (&a)[kMaxD],
                                          int64_t HW, int64_t channels, acc_t mul) {
#pragma unroll(kUnroll<kMaxD>)
  for (int c = 0; c < kMaxD; ++c) {
    if (c < channels) p[c * HW] = static_cast<scalar_t>(a[c] * mul);
  }
}

template <typename scalar_t, typename acc_t, int kMaxD>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                   acc_t* __restrict__ lse, int64_t dk, int64_t dv, Layout L, int chunk,
                   acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = ks + chunk * dk;
  const int64_t block = blockIdx.x;  // (plane, window) flattened
  const int64_t plane = block / L.windows, w = block % L.windows;
  const scalar_t* kp = k + plane * dk * L.HW;
  const scalar_t* vp = v + plane * dv * L.HW;

  for (int64_t i0 = 0; i0 < L.T; i0 += blockDim.x) {  // the same trip count in every thread
    const int64_t i = i0 + threadIdx.x;
    const bool active = i < L.T;
    const int64_t pix = active ? L.pixel(w, i) : 0;
    acc_t qi[kMaxD], oi[kMaxD];
    load_row<scalar_t, acc_t, kMaxD>(qi, q + plane * dk * L.HW + pix, L.HW, dk, active, scale);
    load_row<scalar_t, acc_t, kMaxD>(oi, q, L.HW, 0, false, acc_t(0));
    acc_t m = -std::numeric_limits<acc_t>::infinity(), l = 0;

    for (int64_t j0 = 0; j0 < L.T; j0 += chunk) {
      const int n = static_cast<int>(L.T - j0 < chunk ? L.T - j0 : chunk);
      __syncthreads();  // the previous chunk is no longer read
      load_chunk(kp, dk, L, w, j0, n, chunk, ks);
      load_chunk(vp, dv, L, w, j0, n, chunk, vs);
      __syncthreads();
      if (!active) continue;
      for (int jj = 0; jj < n; ++jj) {
        const acc_t s = dot_column<acc_t, kMaxD>(qi, ks + jj, chunk, dk);
        if (s > m) {  // a new running max: rescale what was summed so far (0 the first time)
          const acc_t r = exp(m - s);
          l *= r;
#pragma unroll(kUnroll<kMaxD>)
          for (int c = 0; c < kMaxD; ++c) oi[c] *= r;
          m = s;
        }
        const acc_t p = exp(s - m);
        l += p;
        axpy_column<acc_t, kMaxD>(oi, p, vs + jj, chunk, dv);
      }
    }
    if (active) {
      store_row<scalar_t, acc_t, kMaxD>(out + plane * dv * L.HW + pix, oi, L.HW, dv, acc_t(1) / l);
      lse[plane * L.HW + pix] = m + log(l);
    }
  }
}

// Per query: D_i = dO_i . O_i (saved for the key kernel) and
// dq_i = scale * sum_j P_ij (dO_i . v_j - D_i) k_j.
template <typename scalar_t, typename acc_t, int kMaxD>
__global__ void __launch_bounds__(kThreads)
    backward_query_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          const scalar_t* __restrict__ out, const acc_t* __restrict__ lse,
                          acc_t* __restrict__ rowterm, scalar_t* __restrict__ dq, int64_t dk,
                          int64_t dv, Layout L, int chunk, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = ks + chunk * dk;
  const int64_t block = blockIdx.x;
  const int64_t plane = block / L.windows, w = block % L.windows;
  const scalar_t* kp = k + plane * dk * L.HW;
  const scalar_t* vp = v + plane * dv * L.HW;

  for (int64_t i0 = 0; i0 < L.T; i0 += blockDim.x) {
    const int64_t i = i0 + threadIdx.x;
    const bool active = i < L.T;
    const int64_t pix = active ? L.pixel(w, i) : 0;
    acc_t qi[kMaxD], doi[kMaxD], dqi[kMaxD];
    load_row<scalar_t, acc_t, kMaxD>(qi, q + plane * dk * L.HW + pix, L.HW, dk, active, scale);
    load_row<scalar_t, acc_t, kMaxD>(doi, grad_out + plane * dv * L.HW + pix, L.HW, dv, active,
                                     acc_t(1));
    load_row<scalar_t, acc_t, kMaxD>(dqi, q, L.HW, 0, false, acc_t(0));
    acc_t d = 0, lse_i = 0;
    if (active) {
      const scalar_t* op = out + plane * dv * L.HW + pix;
#pragma unroll(kUnroll<kMaxD>)
      for (int c = 0; c < kMaxD; ++c) {
        if (c < dv) d += doi[c] * static_cast<acc_t>(op[c * L.HW]);
      }
      lse_i = lse[plane * L.HW + pix];
      rowterm[plane * L.HW + pix] = d;
    }

    for (int64_t j0 = 0; j0 < L.T; j0 += chunk) {
      const int n = static_cast<int>(L.T - j0 < chunk ? L.T - j0 : chunk);
      __syncthreads();
      load_chunk(kp, dk, L, w, j0, n, chunk, ks);
      load_chunk(vp, dv, L, w, j0, n, chunk, vs);
      __syncthreads();
      if (!active) continue;
      for (int jj = 0; jj < n; ++jj) {
        const acc_t s = dot_column<acc_t, kMaxD>(qi, ks + jj, chunk, dk);
        const acc_t dp = dot_column<acc_t, kMaxD>(doi, vs + jj, chunk, dv);
        axpy_column<acc_t, kMaxD>(dqi, exp(s - lse_i) * (dp - d), ks + jj, chunk, dk);
      }
    }
    if (active) store_row<scalar_t, acc_t, kMaxD>(dq + plane * dk * L.HW + pix, dqi, L.HW, dk, scale);
  }
}

// Per key: dv_j = sum_i P_ij dO_i, dk_j = scale * sum_i P_ij (dO_i . v_j - D_i) q_i.
template <typename scalar_t, typename acc_t, int kMaxD>
__global__ void __launch_bounds__(kThreads)
    backward_key_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                        const acc_t* __restrict__ lse, const acc_t* __restrict__ rowterm,
                        scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int64_t DK,
                        int64_t DV, Layout L, int chunk, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gs = qs + chunk * DK;
  acc_t* ls = gs + chunk * DV;
  acc_t* rows = ls + chunk;  // D_i of the chunk's queries
  const int64_t block = blockIdx.x;
  const int64_t plane = block / L.windows, w = block % L.windows;
  const scalar_t* qp = q + plane * DK * L.HW;
  const scalar_t* gp = grad_out + plane * DV * L.HW;

  for (int64_t j0 = 0; j0 < L.T; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const bool active = j < L.T;
    const int64_t pix = active ? L.pixel(w, j) : 0;
    acc_t kj[kMaxD], vj[kMaxD], dkj[kMaxD], dvj[kMaxD];
    load_row<scalar_t, acc_t, kMaxD>(kj, k + plane * DK * L.HW + pix, L.HW, DK, active, scale);
    load_row<scalar_t, acc_t, kMaxD>(vj, v + plane * DV * L.HW + pix, L.HW, DV, active, acc_t(1));
    load_row<scalar_t, acc_t, kMaxD>(dkj, q, L.HW, 0, false, acc_t(0));
    load_row<scalar_t, acc_t, kMaxD>(dvj, q, L.HW, 0, false, acc_t(0));

    for (int64_t i0 = 0; i0 < L.T; i0 += chunk) {
      const int n = static_cast<int>(L.T - i0 < chunk ? L.T - i0 : chunk);
      __syncthreads();
      load_chunk(qp, DK, L, w, i0, n, chunk, qs);
      load_chunk(gp, DV, L, w, i0, n, chunk, gs);
      for (int64_t ii = threadIdx.x; ii < n; ii += blockDim.x) {
        const int64_t at = plane * L.HW + L.pixel(w, i0 + ii);
        ls[ii] = lse[at];
        rows[ii] = rowterm[at];
      }
      __syncthreads();
      if (!active) continue;
      for (int ii = 0; ii < n; ++ii) {
        const acc_t s = dot_column<acc_t, kMaxD>(kj, qs + ii, chunk, DK);
        const acc_t dp = dot_column<acc_t, kMaxD>(vj, gs + ii, chunk, DV);
        const acc_t p = exp(s - ls[ii]);
        axpy_column<acc_t, kMaxD>(dvj, p, gs + ii, chunk, DV);
        axpy_column<acc_t, kMaxD>(dkj, p * (dp - rows[ii]), qs + ii, chunk, DK);
      }
    }
    if (active) {
      store_row<scalar_t, acc_t, kMaxD>(dk + plane * DK * L.HW + pix, dkj, L.HW, DK, scale);
      store_row<scalar_t, acc_t, kMaxD>(dv + plane * DV * L.HW + pix, dvj, L.HW, DV, acc_t(1));
    }
  }
}

Layout make_layout(const WindowGrid& g) {
  return Layout{g.height * g.width, g.width, g.patch, g.tokens(), g.windows(), g.cols};
}

// The launch plan of patch_cross_attention_launch.h, its refusals as errors.
Launch make_launch(const WindowGrid& g, size_t acc_size, int64_t per_token_values) {
  Launch launch;
  const std::string why = patch_attention::plan_launch(
      g.batch * g.heads, g.windows(), g.patch, g.dk, g.dv, per_token_values,
      static_cast<int64_t>(acc_size), &launch);
  TORCH_CHECK(why.empty(), why);
  return launch;
}

// Calls body(std::integral_constant<int, kMaxD>) with the bound register_bound() picks.
template <typename Body>
void dispatch_channels(int64_t channels, Body&& body) {
  switch (patch_attention::register_bound(channels)) {
    case 16: body(std::integral_constant<int, 16>{}); break;
    case 64: body(std::integral_constant<int, 64>{}); break;
    default: body(std::integral_constant<int, 256>{}); break;
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
