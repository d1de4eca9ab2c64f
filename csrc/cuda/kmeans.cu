// CUDA kernels of lesionkit::kmeans (batched Lloyd iterations, AMLP Sec. 3.1).
//
// One launch per Lloyd iteration for all problems, one block per problem; a problem that has
// converged clears its `active` flag and its block returns at once in later launches, so the
// host never synchronises inside the loop. Inside a block:
//   assign  - one warp per point: lanes stride over D, warp-shuffle sums of the dot products,
//             label = argmin_j |c_j|^2 - 2 x.c_j (ties to the lower j); for k = 2 the sign
//             test 2 x.(c1 - c0) + |c0|^2 - |c1|^2 > 0, as the CPU kernel does;
//   update  - one thread per feature d walks the points in order and adds x[n, d] to its
//             cluster's sum (up to 4 clusters in registers per pass), so the sums are
//             deterministic without atomics; empty clusters keep their centroid;
//   converge- a block sum of the squared shift against the problem's tol.
// A last launch writes the directly computed squared distances to the final centroids and the
// labels. Accumulation in float (half, bfloat16, float) or double.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../kmeans.h"
#include "block_reduce.cuh"

namespace lesionkit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kClustersPerPass = 4;
constexpr int kMaxSharedClusters = 64;  // |c_j|^2 kept in shared memory up to this k

template <typename T>
__device__ __forceinline__ T warp_all_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
lloyd_step_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ centroids,
                  const acc_t* __restrict__ tol, int64_t* __restrict__ labels_all,
                  int* __restrict__ active, int64_t* __restrict__ n_iter, int64_t N, int64_t D,
                  int64_t k) {
  __shared__ acc_t norms[kMaxSharedClusters];
  __shared__ acc_t scratch[32];
  const int64_t b = blockIdx.x;
  if (active[b] == 0) return;  // uniform across the block
  const scalar_t* xb = x + b * N * D;
  acc_t* c = centroids + b * k * D;
  int64_t* labels = labels_all + b * N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // |c_j|^2, one warp per centroid.
  const bool shared_norms = k <= kMaxSharedClusters;
  if (shared_norms) {
    for (int64_t j = warp; j < k; j += kWarps) {
      acc_t s = 0;
      for (int64_t d = lane; d < D; d += 32) s += c[j * D + d] * c[j * D + d];
      s = warp_all_sum(s);
      if (lane == 0) norms[j] = s;
    }
  }
  __syncthreads();

  // Assign: one warp per point.
  for (int64_t n = warp; n < N; n += kWarps) {
    const scalar_t* row = xb + n * D;
    int64_t label = 0;
    if (k == 2) {
      acc_t s = 0;
      for (int64_t d = lane; d < D; d += 32) s += static_cast<acc_t>(row[d]) * (c[D + d] - c[d]);
      s = warp_all_sum(s);
      label = 2 * s + norms[0] - norms[1] > 0 ? 1 : 0;
    } else {
      acc_t best = 0;
      for (int64_t j = 0; j < k; ++j) {
        acc_t s = 0, norm = 0;
        for (int64_t d = lane; d < D; d += 32) {
          const acc_t cj = c[j * D + d];
          s += static_cast<acc_t>(row[d]) * cj;
          if (!shared_norms) norm += cj * cj;
        }
        s = warp_all_sum(s);
        norm = shared_norms ? norms[j] : warp_all_sum(norm);
        const acc_t score = norm - 2 * s;
        if (j == 0 || score < best) {  // strict: ties go to the lower index
          best = score;
          label = j;
        }
      }
    }
    if (lane == 0) labels[n] = label;
  }
  __syncthreads();  // the labels (global memory) visible to the whole block

  // Update: thread per feature, points in order, kClustersPerPass cluster sums in registers.
  acc_t shift = 0;
  for (int64_t j0 = 0; j0 < k; j0 += kClustersPerPass) {
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      acc_t sum[kClustersPerPass] = {};
      int members[kClustersPerPass] = {};
      // Unrolled so that several points' loads are in flight per thread.
#pragma unroll 8
      for (int64_t n = 0; n < N; ++n) {
        const int64_t rel = labels[n] - j0;
        const acc_t v = static_cast<acc_t>(xb[n * D + d]);
#pragma unroll
        for (int q = 0; q < kClustersPerPass; ++q) {
          if (rel == q) {
            sum[q] += v;
            ++members[q];
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kClustersPerPass; ++q) {
        const int64_t j = j0 + q;
        if (j >= k || members[q] == 0) continue;  // empty cluster: keep the centroid
        const acc_t moved = sum[q] / static_cast<acc_t>(members[q]);
        const acc_t delta = moved - c[j * D + d];
        shift += delta * delta;
        c[j * D + d] = moved;
      }
    }
  }
  shift = lesionkit::cuda::block_sum(shift, scratch);
  if (threadIdx.x == 0) {
    n_iter[b] += 1;
    if (shift <= tol[b]) active[b] = 0;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
assign_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ centroids,
              int64_t* __restrict__ labels_all, acc_t* __restrict__ distances, int64_t N,
              int64_t D, int64_t k) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t* c = centroids + b * k * D;
  // Points of this problem handled by this block: gridDim.y blocks share a problem.
  for (int64_t n = blockIdx.y * kWarps + warp; n < N; n += static_cast<int64_t>(gridDim.y) * kWarps) {
    const scalar_t* row = x + (b * N + n) * D;
    acc_t* dist = distances + (b * N + n) * k;
    acc_t best = 0;
    int64_t label = 0;
    for (int64_t j = 0; j < k; ++j) {
      acc_t s = 0;
      for (int64_t d = lane; d < D; d += 32) {
        const acc_t diff = static_cast<acc_t>(row[d]) - c[j * D + d];
        s += diff * diff;
      }
      s = warp_all_sum(s);
      if (lane == 0) dist[j] = s;
      if (j == 0 || s < best) {
        best = s;
        label = j;
      }
    }
    if (lane == 0) labels_all[b * N + n] = label;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_cuda(
    const at::Tensor& x_in, const at::Tensor& init_in, const at::Tensor& tol_in, int64_t iters) {
  const KMeansShape s = check_kmeans_inputs(x_in, init_in, tol_in, iters);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto index = x_in.options().dtype(at::kLong);
  auto labels = at::empty({s.batch, s.points}, index);
  auto centroids = init_in.contiguous().clone();
  auto distances = at::empty({s.batch, s.points, s.clusters}, init_in.options());
  auto n_iter = at::zeros({s.batch}, index);
  if (s.batch == 0) return {labels, centroids, distances, n_iter};
  TORCH_CHECK(s.batch <= 2147483647, "x should have at most 2^31 - 1 problems, got ", s.batch);

  const auto x = x_in.contiguous();
  const auto tol = tol_in.contiguous();
  auto active = at::ones({s.batch}, x_in.options().dtype(at::kInt));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Enough blocks per problem in the final pass to fill the GPU when B is small.
  const int64_t blocks_per_problem =
      std::max<int64_t>(1, std::min<int64_t>((s.points + kWarps - 1) / kWarps,
                                             (1024 + s.batch - 1) / s.batch));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t it = 0; it < iters; ++it) {
      lloyd_step_kernel<scalar_t, acc_t><<<static_cast<unsigned>(s.batch), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), centroids.mutable_data_ptr<acc_t>(),
          tol.const_data_ptr<acc_t>(), labels.mutable_data_ptr<int64_t>(),
          active.mutable_data_ptr<int>(), n_iter.mutable_data_ptr<int64_t>(), s.points, s.dim,
          s.clusters);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const dim3 grid(static_cast<unsigned>(s.batch), static_cast<unsigned>(blocks_per_problem));
    assign_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), centroids.const_data_ptr<acc_t>(),
        labels.mutable_data_ptr<int64_t>(), distances.mutable_data_ptr<acc_t>(), s.points, s.dim,
        s.clusters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {labels, centroids, distances, n_iter};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CUDA, m) {
  m.impl("kmeans", &lesionkit::kmeans_cuda);
}
