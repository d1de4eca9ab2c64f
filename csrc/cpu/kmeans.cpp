// CPU kernel of lesionkit::kmeans (batched Lloyd iterations, AMLP Sec. 3.1).
//
// One task per problem (at::parallel_for over B): a problem's points (N x D, ~600 KB at
// N = 196, D = 768 in float) stay hot in the core's cache for all its iterations. One pass over
// the points per iteration assigns each point and adds it to its cluster's running sum right
// away, while its row is in L1. Dot products and row updates are SIMD over D (omp simd). For
// k = 2 the assignment is one dot product per point, the sign test
// 2 x.(c1 - c0) + |c0|^2 - |c1|^2 > 0 (label 1), the same decision as the argmin over j of
// |c_j|^2 - 2 x.c_j that general k uses. 16-bit inputs are converted to float once per problem.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kmeans.h"

namespace lesionkit {
namespace {

template <typename T>
inline T squared_distance(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const T d = a[i] - b[i];
    s += d * d;
  }
  return s;
}

template <typename T>
inline void add_row(T* __restrict acc, const T* __restrict row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += row[i];
}

// Rows per block of the assignment: the block's dot products with one vector run as kRows
// independent chains (no waiting on one accumulator's latency) and read the vector once for
// all of them.
constexpr int64_t kRows = 4;
// Lanes of each partial sum: one AVX-512 register of float, the compiler's vector otherwise.
constexpr int64_t kLanes = 16;

// out[r] = rows[r] . v for the kRows rows starting at `rows` (stride D).
template <typename T>
inline void dot_rows(const T* __restrict rows, const T* __restrict v, int64_t D, T* out) {
  T acc[kRows][kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T w = v[d + l];
      for (int64_t r = 0; r < kRows; ++r) acc[r][l] += rows[r * D + d + l] * w;
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    T s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += acc[r][l];
    for (int64_t e = d; e < D; ++e) s += rows[r * D + e] * v[e];
    out[r] = s;
  }
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Per-task scratch, reused across the problems of one task.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> points, sums, direction, norms, scores;
  std::vector<int64_t> counts;
  Scratch(const KMeansShape& s, bool convert)
      : points(convert ? s.points * s.dim : 0), sums(s.clusters * s.dim), direction(s.dim),
        norms(s.clusters), scores(kRows * s.clusters), counts(s.clusters) {}
};

// One Lloyd iteration of one problem in one pass over its points: each block of kRows points is
// assigned and added to its clusters' running sums right away, while its rows are in L1. Then
// the centroids move (an empty cluster keeps its centroid). Returns the summed squared shift.
template <typename acc_t>
acc_t lloyd_step(const acc_t* x, acc_t* c, int64_t* labels, Scratch<acc_t>& w,
                 const KMeansShape& s) {
  const int64_t N = s.points, D = s.dim, k = s.clusters;
  std::fill(w.sums.begin(), w.sums.end(), acc_t(0));
  std::fill(w.counts.begin(), w.counts.end(), int64_t(0));
  acc_t* scores = w.scores.data();
  const auto accumulate = [&](int64_t n, int64_t label) {
    labels[n] = label;
    ++w.counts[label];
    add_row(w.sums.data() + label * D, x + n * D, D);
  };
  if (k == 2) {
    // Label 1 iff 2 x.(c1 - c0) + |c0|^2 - |c1|^2 > 0: one dot product per point.
    acc_t* dir = w.direction.data();
    for (int64_t d = 0; d < D; ++d) dir[d] = c[D + d] - c[d];
    const acc_t bias = dot(c, c, D) - dot(c + D, c + D, D);
    int64_t n = 0;
    for (; n + kRows <= N; n += kRows) {
      dot_rows(x + n * D, dir, D, scores);
      for (int64_t r = 0; r < kRows; ++r) accumulate(n + r, 2 * scores[r] + bias > 0 ? 1 : 0);
    }
    for (; n < N; ++n) accumulate(n, 2 * dot(x + n * D, dir, D) + bias > 0 ? 1 : 0);
  } else {
    // argmin_j |c_j|^2 - 2 x.c_j, ties to the lower j.
    for (int64_t j = 0; j < k; ++j) w.norms[j] = dot(c + j * D, c + j * D, D);
    const auto nearest = [&](const acc_t* dots) {
      int64_t label = 0;
      acc_t best = std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < k; ++j) {
        const acc_t score = w.norms[j] - 2 * dots[j];
        if (score < best) {
          best = score;
          label = j;
        }
      }
      return label;
    };
    int64_t n = 0;
    std::vector<acc_t> dots(k);
    for (; n + kRows <= N; n += kRows) {
      for (int64_t j = 0; j < k; ++j) {
        acc_t block[kRows];
        dot_rows(x + n * D, c + j * D, D, block);
        for (int64_t r = 0; r < kRows; ++r) scores[r * k + j] = block[r];
      }
      for (int64_t r = 0; r < kRows; ++r) accumulate(n + r, nearest(scores + r * k));
    }
    for (; n < N; ++n) {
      for (int64_t j = 0; j < k; ++j) dots[j] = dot(x + n * D, c + j * D, D);
      accumulate(n, nearest(dots.data()));
    }
  }
  acc_t shift = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (w.counts[j] == 0) continue;  // empty cluster: keep the centroid, shift 0
    const acc_t inv = acc_t(1) / acc_t(w.counts[j]);
    acc_t* cj = c + j * D;
    const acc_t* sj = w.sums.data() + j * D;
#pragma omp simd reduction(+ : shift)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t moved = sj[d] * inv;
      const acc_t delta = moved - cj[d];
      shift += delta * delta;
      cj[d] = moved;
    }
  }
  return shift;
}

template <typename scalar_t>
void kmeans_impl(const scalar_t* x_all, const at::opmath_type<scalar_t>* init,
                 const at::opmath_type<scalar_t>* tol, int64_t iters, int64_t* labels_all,
                 at::opmath_type<scalar_t>* centroids_all, at::opmath_type<scalar_t>* dist_all,
                 int64_t* n_iter, const KMeansShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t N = s.points, D = s.dim, k = s.clusters;
  std::atomic<int64_t> first_bad{-1};

  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(s, convert);
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* x;
      if constexpr (convert) {
        const scalar_t* src = x_all + b * N * D;
        for (int64_t i = 0; i < N * D; ++i) w.points[i] = static_cast<acc_t>(src[i]);
        x = w.points.data();
      } else {
        x = x_all + b * N * D;
      }
      acc_t* c = centroids_all + b * k * D;
      std::copy(init + b * k * D, init + (b + 1) * k * D, c);
      int64_t* labels = labels_all + b * N;
      int64_t it = 0;
      while (it < iters) {
        const acc_t shift = lloyd_step(x, c, labels, w, s);
        ++it;
        if (shift <= tol[b]) break;
      }
      n_iter[b] = it;

      // Final assignment against the final centroids, with the distances computed directly.
      acc_t* dist = dist_all + b * N * k;
      acc_t total = 0;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* row = x + n * D;
        int64_t label = 0;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t dj = squared_distance(row, c + j * D, D);
          dist[n * k + j] = dj;
          if (dj < dist[n * k + label]) label = j;
          total += dj;
        }
        labels[n] = label;
      }
      if (!std::isfinite(total)) {  // NaN / inf in x (or an overflow): report the first problem
        int64_t expected = -1;
        first_bad.compare_exchange_strong(expected, b);
      }
    }
  });
  TORCH_CHECK(first_bad.load() < 0, "x should be finite, problem ", first_bad.load(),
              " holds NaN or inf values (or its distances overflow)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_cpu(
    const at::Tensor& x_in, const at::Tensor& init_in, const at::Tensor& tol_in, int64_t iters) {
  const KMeansShape s = check_kmeans_inputs(x_in, init_in, tol_in, iters);
  const auto acc = x_in.options().dtype(kmeans_acc_type(x_in.scalar_type()));
  const auto index = x_in.options().dtype(at::kLong);
  auto labels = at::empty({s.batch, s.points}, index);
  auto centroids = at::empty({s.batch, s.clusters, s.dim}, acc);
  auto distances = at::empty({s.batch, s.points, s.clusters}, acc);
  auto n_iter = at::empty({s.batch}, index);
  if (s.batch == 0) return {labels, centroids, distances, n_iter};

  const auto x = x_in.contiguous();
  const auto init = init_in.contiguous();
  const auto tol = tol_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kmeans_impl<scalar_t>(x.const_data_ptr<scalar_t>(), init.const_data_ptr<acc_t>(),
                          tol.const_data_ptr<acc_t>(), iters, labels.mutable_data_ptr<int64_t>(),
                          centroids.mutable_data_ptr<acc_t>(), distances.mutable_data_ptr<acc_t>(),
                          n_iter.mutable_data_ptr<int64_t>(), s);
  });
  return {labels, centroids, distances, n_iter};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("kmeans", &lesionkit::kmeans_cpu);
}
