// CPU kernels of lesionkit::patch_cross_attention (GRCSF Eq. 6).
//
// One task per (batch, head, window). A task copies the window's q, k, v channel-major into
// small per-thread tiles (each image row of a window is P contiguous values, so the reads are
// row copies, and nothing the size of the input is ever materialised), does the window's
// attention in the accumulation type and writes the output (and the per-query log-sum-exp)
// straight back into the NCHW layout. The backward recomputes the probabilities from the saved
// log-sum-exp (flash-attention style) instead of storing the (T x T) matrices of every window.
// All small products go through one register-blocked kernel whose inner loop runs over a
// contiguous row, so it vectorises over tokens / channels.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../patch_cross_attention.h"

namespace lesionkit {
namespace {

// ATen's elementwise grain (~32k multiply-adds per task) in units of one window's work.
int64_t window_grain(const WindowGrid& g) {
  const int64_t work = g.tokens() * (g.tokens() + 1) * (g.dk + g.dv);
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
}

// 64-byte vectors through GCC / Clang vector extensions: one AVX-512 register (two AVX2 or
// four SSE registers in a portable build), so the block below stays in registers.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename acc_t>
inline typename Vec<acc_t>::type load_vec(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store_vec(acc_t* p, typename Vec<acc_t>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// C (M x N, row stride ldc) = A (M x K, element (m, k) at A[m * sam + k * sak]) times
// B (K x N, row stride ldb). An 8-row x 2-vector block of C lives in sixteen registers across
// the whole K loop: per k, two vector loads of B, eight broadcasts of A and sixteen FMAs.
constexpr int64_t kRows = 8;

template <typename acc_t>
void matmul(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t sam, int64_t sak,
            const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t kLanes = sizeof(vec) / sizeof(acc_t);
  constexpr int64_t kCols = 2 * kLanes;
  const int64_t m_blocks = M / kRows * kRows, n_blocks = N / kCols * kCols;
  // Column panels outside, row blocks inside: one panel of B (K x 2 vectors) stays in L1 while
  // every row block of A passes over it; with the row blocks outside, all of B would stream
  // from L2 once per row block (4 MB per window at T = 256).
  for (int64_t n0 = 0; n0 < n_blocks; n0 += kCols) {
    for (int64_t m0 = 0; m0 < m_blocks; m0 += kRows) {
      vec c0[kRows] = {}, c1[kRows] = {};
      const acc_t* a = A + m0 * sam;
      for (int64_t k = 0; k < K; ++k, a += sak) {
        const vec b0 = load_vec(B + k * ldb + n0), b1 = load_vec(B + k * ldb + n0 + kLanes);
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
          const acc_t ar = a[r * sam];
          c0[r] += ar * b0;
          c1[r] += ar * b1;
        }
      }
      acc_t* c = C + m0 * ldc + n0;
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) {
        store_vec(c + r * ldc, c0[r]);
        store_vec(c + r * ldc + kLanes, c1[r]);
      }
    }
  }
  for (int64_t m0 = 0; m0 < m_blocks && n_blocks < N; m0 += kRows) {
    {  // column tail: the same rows, a runtime width
      const int64_t n0 = n_blocks, width = N - n0;
      for (int64_t r = 0; r < kRows; ++r) std::fill_n(C + (m0 + r) * ldc + n0, width, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* b = B + k * ldb + n0;
        for (int64_t r = 0; r < kRows; ++r) {
          const acc_t a = A[(m0 + r) * sam + k * sak];
          acc_t* c = C + (m0 + r) * ldc + n0;
#pragma omp simd
          for (int64_t n = 0; n < width; ++n) c[n] += a * b[n];
        }
      }
    }
  }
  for (int64_t m0 = m_blocks; m0 < M; ++m0) {  // row tail
    acc_t* c = C + m0 * ldc;
    std::fill_n(c, N, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = A[m0 * sam + k * sak];
      const acc_t* b = B + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// exp for the softmax, in a form the compiler vectorises (std::exp is a scalar libm call):
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (split in two constants for
// precision), exp(r) by the Cephes degree-6 polynomial; about 1 ulp on the clamped range.
// x below -87.3 (including -inf) gives ~1e-38 instead of 0, which the softmax cannot tell.
inline float softmax_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from its exponent bits (memcpy, not std::bit_cast: the sources build as C++17 too).
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline double softmax_exp(double x) { return std::exp(x); }

// softmax_exp on 16 floats at once (floor done as truncation corrected by the sign).
inline Vec<float>::type softmax_exp(Vec<float>::type x) {
  using vf = Vec<float>::type;
  typedef int32_t vi __attribute__((vector_size(64)));
  const vf lo = vf{} - 87.3f, hi = vf{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf t = x * 1.44269504088896341f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(t, vi), vf);
  n += __builtin_convertvector(n > t, vf);  // -1 where truncation rounded a negative t up
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// row[j] = exp(row[j] * scale - shift) for j < n; returns their sum.
inline float exp_row(float* row, int64_t n, float scale, float shift) {
  using vf = Vec<float>::type;
  constexpr int64_t kLanes = sizeof(vf) / sizeof(float);
  vf acc = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf e = softmax_exp(load_vec(row + j) * scale - shift);
    store_vec(row + j, e);
    acc += e;
  }
  float sum = 0;
  for (int64_t i = 0; i < kLanes; ++i) sum += acc[i];
  for (; j < n; ++j) {
    row[j] = softmax_exp(row[j] * scale - shift);
    sum += row[j];
  }
  return sum;
}

inline double exp_row(double* row, int64_t n, double scale, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] * scale - shift);
    sum += row[j];
  }
  return sum;
}

// dst (n x n) = src (n x n) transposed, in 16 x 16 tiles: a tile's 16 source rows and 16
// destination rows stay in L1, where a row-by-row transposed write would touch a new cache line
// for every element (T = 256: 65,536 lines per window).
template <typename acc_t>
void transpose(const acc_t* __restrict src, acc_t* __restrict dst, int64_t n) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t i1 = std::min(n, i0 + kTile);
    for (int64_t j0 = 0; j0 < n; j0 += kTile) {
      const int64_t j1 = std::min(n, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) dst[j * n + i] = src[i * n + j];
      }
    }
  }
}

// Where the window of task `unit` starts: (batch * heads) plane index and the offset of its
// top-left pixel inside an (H, W) plane.
struct WindowAt {
  int64_t plane, origin;
};

inline WindowAt window_at(const WindowGrid& g, int64_t unit) {
  const int64_t plane = unit / g.windows(), w = unit % g.windows();
  return {plane, (w / g.cols) * g.patch * g.width + (w % g.cols) * g.patch};
}

// Strides of a (B, h, d, H, W) operand.
struct Strides {
  int64_t b, h, c, y, x;
};

inline Strides strides_of(const at::Tensor& t) {  // t is 5-D, or a (M, ...) 6-D tensor's map
  const int64_t o = t.dim() - 5;
  return {t.stride(o), t.stride(o + 1), t.stride(o + 2), t.stride(o + 3), t.stride(o + 4)};
}

// The top-left element of window (row, col) of plane `plane` (= batch * heads + head).
inline int64_t window_offset(const WindowGrid& g, const Strides& s, int64_t plane, int64_t unit) {
  const int64_t w = unit % g.windows();
  return (plane / g.heads) * s.b + (plane % g.heads) * s.h + (w / g.cols) * g.patch * s.y +
         (w % g.cols) * g.patch * s.x;
}

// One window of an operand -> tile (C, T). Rows of P contiguous values (x stride 1, the
// NCHW case) copy as rows; channel-contiguous pixels (channels-last) are read pixel by pixel.
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* src, const Strides& s, int64_t channels, const WindowGrid& g,
            int64_t plane, int64_t unit, acc_t* tile) {
  const int64_t P = g.patch, T = g.tokens();
  const scalar_t* base = src + window_offset(g, s, plane, unit);
  if (s.x == 1) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t y = 0; y < P; ++y) {
        const scalar_t* row = base + c * s.c + y * s.y;
        acc_t* dst = tile + c * T + y * P;
#pragma omp simd
        for (int64_t x = 0; x < P; ++x) dst[x] = static_cast<acc_t>(row[x]);
      }
    }
    return;
  }
  for (int64_t y = 0; y < P; ++y) {
    for (int64_t x = 0; x < P; ++x) {
      const scalar_t* px = base + y * s.y + x * s.x;
      acc_t* dst = tile + y * P + x;
      for (int64_t c = 0; c < channels; ++c) dst[c * T] = static_cast<acc_t>(px[c * s.c]);
    }
  }
}

// tile (C, T) -> one window of an operand.
template <typename scalar_t, typename acc_t>
void scatter(const acc_t* tile, int64_t channels, const WindowGrid& g, const Strides& s,
             int64_t plane, int64_t unit, scalar_t* dst) {
  const int64_t P = g.patch, T = g.tokens();
  scalar_t* base = dst + window_offset(g, s, plane, unit);
  if (s.x == 1) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t y = 0; y < P; ++y) {
        scalar_t* row = base + c * s.c + y * s.y;
        const acc_t* src = tile + c * T + y * P;
#pragma omp simd
        for (int64_t x = 0; x < P; ++x) row[x] = static_cast<scalar_t>(src[x]);
      }
    }
    return;
  }
  for (int64_t y = 0; y < P; ++y) {
    for (int64_t x = 0; x < P; ++x) {
      scalar_t* px = base + y * s.y + x * s.x;
      const acc_t* src = tile + y * P + x;
      for (int64_t c = 0; c < channels; ++c) px[c * s.c] = static_cast<scalar_t>(src[c * T]);
    }
  }
}

// A strided operand: its data and strides; k's map m starts m * map_stride further.
template <typename T>
struct Operand {
  T* data;
  Strides s;
  int64_t map_stride = 0;
};

template <typename T>
Operand<const T> read_operand(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), strides_of(t), t.dim() == 6 ? t.stride(0) : 0};
}

template <typename T>
Operand<T> write_operand(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), strides_of(t), t.dim() == 6 ? t.stride(0) : 0};
}

template <typename scalar_t>
void forward_impl(Operand<const scalar_t> q, Operand<const scalar_t> k, Operand<const scalar_t> v,
                  Operand<scalar_t> out, at::opmath_type<scalar_t>* lse, const WindowGrid& g,
                  double scale_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.tokens(), P = g.patch;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const int64_t units = g.batch * g.heads * g.windows();

  // scale and the sizes are captured by value: through a reference, the float scale could alias
  // the tiles in the compiler's eyes and the softmax loops would not vectorise.
  at::parallel_for(0, units, window_grain(g), [&, scale, T, P](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(g.dk * T), kt(g.dk * T), vt(g.dv * T), ot(g.dv * T), s(T * T), pt(T * T);
    for (int64_t unit = begin; unit < end; ++unit) {
      const WindowAt at = window_at(g, unit);
      gather(q.data, q.s, g.dk, g, at.plane, unit, qt.data());
      gather(k.data, k.s, g.dk, g, at.plane, unit, kt.data());
      gather(v.data, v.s, g.dv, g, at.plane, unit, vt.data());
      // S = Q^T K over channels: S[i, j] = q_i . k_j
      matmul(T, T, g.dk, qt.data(), 1, T, kt.data(), T, s.data(), T);
      acc_t* lse_plane = lse + at.plane * g.height * g.width + at.origin;
      for (int64_t i = 0; i < T; ++i) {
        acc_t* row = s.data() + i * T;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < T; ++j) m = std::max(m, row[j] * scale);
        const acc_t l = exp_row(row, T, scale, m);
        const acc_t inv = acc_t(1) / l;
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) row[j] *= inv;
        lse_plane[(i / P) * g.width + i % P] = m + std::log(l);
      }
      transpose(s.data(), pt.data(), T);  // P transposed, for the value product
      // O = V P^T: o_i = sum_j p_ij v_j, channel-major
      matmul(g.dv, T, T, vt.data(), T, 1, pt.data(), T, ot.data(), T);
      scatter(ot.data(), g.dv, g, out.s, at.plane, unit, out.data);
    }
  });
}

template <typename scalar_t>
void backward_impl(Operand<const scalar_t> grad_out, Operand<const scalar_t> q,
                   Operand<const scalar_t> k, Operand<const scalar_t> v, Operand<const scalar_t> out,
                   const at::opmath_type<scalar_t>* lse, Operand<scalar_t> dq, Operand<scalar_t> dk,
                   Operand<scalar_t> dv, const WindowGrid& g, double scale_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.tokens(), P = g.patch;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const int64_t units = g.batch * g.heads * g.windows();

  // scale and the sizes are captured by value: through a reference, the float scale could alias
  // the tiles in the compiler's eyes and the softmax loops would not vectorise.
  at::parallel_for(0, units, window_grain(g), [&, scale, T, P](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(g.dk * T), kt(g.dk * T), vt(g.dv * T), dot(g.dv * T), ot(g.dv * T);
    std::vector<acc_t> p(T * T), dp(T * T), ds(T * T), dst(T * T), rowterm(T);
    std::vector<acc_t> dqt(g.dk * T), dkt(g.dk * T), dvt(g.dv * T);
    for (int64_t unit = begin; unit < end; ++unit) {
      const WindowAt at = window_at(g, unit);
      gather(q.data, q.s, g.dk, g, at.plane, unit, qt.data());
      gather(k.data, k.s, g.dk, g, at.plane, unit, kt.data());
      gather(v.data, v.s, g.dv, g, at.plane, unit, vt.data());
      gather(grad_out.data, grad_out.s, g.dv, g, at.plane, unit, dot.data());
      gather(out.data, out.s, g.dv, g, at.plane, unit, ot.data());
      // D_i = dO_i . O_i, the softmax backward's row term.
      std::fill(rowterm.begin(), rowterm.end(), acc_t(0));
      for (int64_t c = 0; c < g.dv; ++c) {
        const acc_t* a = dot.data() + c * T;
        const acc_t* b = ot.data() + c * T;
#pragma omp simd
        for (int64_t i = 0; i < T; ++i) rowterm[i] += a[i] * b[i];
      }
      // Recompute P_ij = exp(scale q_i . k_j - lse_i).
      matmul(T, T, g.dk, qt.data(), 1, T, kt.data(), T, p.data(), T);
      const acc_t* lse_plane = lse + at.plane * g.height * g.width + at.origin;
      for (int64_t i = 0; i < T; ++i) {
        const acc_t l = lse_plane[(i / P) * g.width + i % P];
        acc_t* row = p.data() + i * T;
        exp_row(row, T, scale, l);
      }
      // dV_j = sum_i P_ij dO_i;  dP_ij = dO_i . v_j
      matmul(g.dv, T, T, dot.data(), T, 1, p.data(), T, dvt.data(), T);
      matmul(T, T, g.dv, dot.data(), 1, T, vt.data(), T, dp.data(), T);
      // dS_ij = scale P_ij (dP_ij - D_i), kept row-major and transposed
      for (int64_t i = 0; i < T; ++i) {
        const acc_t d = rowterm[i];
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) ds[i * T + j] = scale * p[i * T + j] * (dp[i * T + j] - d);
      }
      transpose(ds.data(), dst.data(), T);
      // dQ_i = sum_j dS_ij k_j;  dK_j = sum_i dS_ij q_i
      matmul(g.dk, T, T, kt.data(), T, 1, dst.data(), T, dqt.data(), T);
      matmul(g.dk, T, T, qt.data(), T, 1, ds.data(), T, dkt.data(), T);
      scatter(dqt.data(), g.dk, g, dq.s, at.plane, unit, dq.data);
      scatter(dkt.data(), g.dk, g, dk.s, at.plane, unit, dk.data);
      scatter(dvt.data(), g.dv, g, dv.s, at.plane, unit, dv.data);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> patch_cross_attention_cpu(const at::Tensor& q_in,
                                                             const at::Tensor& k_in,
                                                             const at::Tensor& v_in,
                                                             int64_t patch_size, double scale) {
  const WindowGrid g = check_patch_attention_inputs(q_in, k_in, v_in, patch_size);
  auto out = at::empty({g.batch, g.heads, g.dv, g.height, g.width}, v_in.options());
  auto lse = at::empty({g.batch, g.heads, g.height, g.width},
                       q_in.options().dtype(patch_attention_acc_type(q_in.scalar_type())));
  if (g.batch == 0 || g.heads == 0) return {out, lse};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "patch_cross_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t>(read_operand<scalar_t>(q), read_operand<scalar_t>(k),
                           read_operand<scalar_t>(v), write_operand<scalar_t>(out),
                           lse.mutable_data_ptr<acc_t>(), g, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_cross_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    int64_t patch_size, double scale) {
  const WindowGrid g = check_patch_attention_inputs(q_in, k_in, v_in, patch_size);
  check_patch_attention_backward_inputs(g, q_in, grad_out_in, out_in, lse_in);
  auto dq = at::empty(q_in.sizes(), q_in.options());
  auto dk = at::empty(k_in.sizes(), k_in.options());
  auto dv = at::empty(v_in.sizes(), v_in.options());
  if (g.batch == 0 || g.heads == 0) return {dq, dk, dv};
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const auto lse = lse_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "patch_cross_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t>(read_operand<scalar_t>(grad_out), read_operand<scalar_t>(q),
                            read_operand<scalar_t>(k), read_operand<scalar_t>(v),
                            read_operand<scalar_t>(out), lse.const_data_ptr<acc_t>(),
                            write_operand<scalar_t>(dq), write_operand<scalar_t>(dk),
                            write_operand<scalar_t>(dv), g, scale);
  });
  return {dq, dk, dv};
}


// ---- patch_cross_attention_mix: out = sum_m w_m softmax(scale q k_m^T) v -----------------------
//
// The M key sets share q and v, so the mixture of their probabilities is formed first and v
// multiplied once: forward, one (dv x T x T) product instead of M; backward, G = dO v^T and
// dV = dO^T (sum_m w_m P_m) once each. Per map only the dk-wide products remain (the scores,
// dQ, dK). The softmax row term is E_m,i = sum_j P_m,ij G_ij (no per-map output is kept), and
// dw_m = sum_i E_m,i.
//
// Unlike the single attention above (which makes its inputs contiguous), these kernels pass
// q, k, v and grad_out to gather / scatter with their own strides and write out, dq, dk, dv in
// the layout of q, k, v (at::empty_like): a channels-last caller (GRCSF's RCU, whose
// projections are 1x1 convolutions of a channels-last feature) makes no layout copy on the way
// in or out.

// q (B, h, dk, H, W), k (M, B, h, dk, H, W), v (B, h, dv, H, W), weights (M,) acc dtype.
WindowGrid check_mix_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& weights, int64_t patch_size) {
  TORCH_CHECK(k.dim() == 6 && k.size(0) >= 1,
              "k should be a (M, B, h, dk, H, W) tensor with M >= 1, got shape ", k.sizes());
  const WindowGrid g = check_patch_attention_inputs(q, k.select(0, 0), v, patch_size);
  const auto acc = patch_attention_acc_type(q.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == k.size(0) && weights.scalar_type() == acc &&
                  weights.device() == q.device(),
              "weights should be a ", acc, " tensor of shape (", k.size(0), ",) on ", q.device(),
              ", got ", weights.scalar_type(), " ", weights.sizes(), " on ", weights.device());
  return g;
}

template <typename scalar_t>
void mix_forward_impl(Operand<const scalar_t> q, Operand<const scalar_t> k, Operand<const scalar_t> v,
                      const at::opmath_type<scalar_t>* weights, int64_t maps, Operand<scalar_t> out,
                      at::opmath_type<scalar_t>* lse, const WindowGrid& g, double scale_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.tokens(), P = g.patch;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const int64_t units = g.batch * g.heads * g.windows();
  const int64_t lse_map = g.batch * g.heads * g.height * g.width;
  std::vector<acc_t> w(weights, weights + maps);

  at::parallel_for(0, units, std::max<int64_t>(1, window_grain(g) / maps),
                   [&, scale, T, P](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(g.dk * T), kt(g.dk * T), vt(g.dv * T), ot(g.dv * T), s(T * T), mix(T * T),
        pt(T * T);
    for (int64_t unit = begin; unit < end; ++unit) {
      const WindowAt at = window_at(g, unit);
      gather(q.data, q.s, g.dk, g, at.plane, unit, qt.data());
      gather(v.data, v.s, g.dv, g, at.plane, unit, vt.data());
      std::fill(mix.begin(), mix.end(), acc_t(0));
      for (int64_t m = 0; m < maps; ++m) {
        gather(k.data + m * k.map_stride, k.s, g.dk, g, at.plane, unit, kt.data());
        matmul(T, T, g.dk, qt.data(), 1, T, kt.data(), T, s.data(), T);
        acc_t* lse_plane = lse + m * lse_map + at.plane * g.height * g.width + at.origin;
        const acc_t wm = w[m];
        for (int64_t i = 0; i < T; ++i) {
          acc_t* row = s.data() + i * T;
          acc_t* mrow = mix.data() + i * T;
          acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < T; ++j) mx = std::max(mx, row[j] * scale);
          const acc_t l = exp_row(row, T, scale, mx);
          const acc_t c = wm / l;  // w_m times the softmax's normalisation
#pragma omp simd
          for (int64_t j = 0; j < T; ++j) mrow[j] += c * row[j];
          lse_plane[(i / P) * g.width + i % P] = mx + std::log(l);
        }
      }
      transpose(mix.data(), pt.data(), T);
      // O = V Mix^T: o_i = sum_j (sum_m w_m p_m,ij) v_j
      matmul(g.dv, T, T, vt.data(), T, 1, pt.data(), T, ot.data(), T);
      scatter(ot.data(), g.dv, g, out.s, at.plane, unit, out.data);
    }
  });
}

template <typename scalar_t>
void mix_backward_impl(Operand<const scalar_t> grad_out, Operand<const scalar_t> q,
                       Operand<const scalar_t> k, Operand<const scalar_t> v,
                       const at::opmath_type<scalar_t>* weights, int64_t maps,
                       const at::opmath_type<scalar_t>* lse, Operand<scalar_t> dq,
                       Operand<scalar_t> dk, Operand<scalar_t> dv,
                       at::opmath_type<scalar_t>* dw_units, const WindowGrid& g, double scale_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.tokens(), P = g.patch;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const int64_t units = g.batch * g.heads * g.windows();
  const int64_t lse_map = g.batch * g.heads * g.height * g.width;
  std::vector<acc_t> w(weights, weights + maps);

  at::parallel_for(0, units, std::max<int64_t>(1, window_grain(g) / maps),
                   [&, scale, T, P](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(g.dk * T), kt(g.dk * T), vt(g.dv * T), dot(g.dv * T);
    std::vector<acc_t> p(T * T), G(T * T), mix(T * T), ds(T * T), dst(T * T);
    std::vector<acc_t> dqt(g.dk * T), dqm(g.dk * T), dkt(g.dk * T), dvt(g.dv * T);
    for (int64_t unit = begin; unit < end; ++unit) {
      const WindowAt at = window_at(g, unit);
      gather(q.data, q.s, g.dk, g, at.plane, unit, qt.data());
      gather(v.data, v.s, g.dv, g, at.plane, unit, vt.data());
      gather(grad_out.data, grad_out.s, g.dv, g, at.plane, unit, dot.data());
      // G_ij = dO_i . v_j, shared by every map (dP_m = w_m G).
      matmul(T, T, g.dv, dot.data(), 1, T, vt.data(), T, G.data(), T);
      std::fill(mix.begin(), mix.end(), acc_t(0));
      for (int64_t m = 0; m < maps; ++m) {
        gather(k.data + m * k.map_stride, k.s, g.dk, g, at.plane, unit, kt.data());
        matmul(T, T, g.dk, qt.data(), 1, T, kt.data(), T, p.data(), T);
        const acc_t* lse_plane = lse + m * lse_map + at.plane * g.height * g.width + at.origin;
        const acc_t wm = w[m];
        acc_t dw = 0;
        for (int64_t i = 0; i < T; ++i) {
          acc_t* row = p.data() + i * T;
          exp_row(row, T, scale, lse_plane[(i / P) * g.width + i % P]);
          const acc_t* grow = G.data() + i * T;
          acc_t e = 0;
#pragma omp simd reduction(+ : e)
          for (int64_t j = 0; j < T; ++j) e += row[j] * grow[j];
          dw += e;
          acc_t* mrow = mix.data() + i * T;
          acc_t* drow = ds.data() + i * T;
          const acc_t c = scale * wm;
#pragma omp simd
          for (int64_t j = 0; j < T; ++j) mrow[j] += wm * row[j];
          // dS_m,ij = scale w_m P_m,ij (G_ij - E_m,i)
#pragma omp simd
          for (int64_t j = 0; j < T; ++j) drow[j] = c * row[j] * (grow[j] - e);
        }
        dw_units[unit * maps + m] = dw;
        transpose(ds.data(), dst.data(), T);
        // dQ_i += sum_j dS_m,ij k_m,j;  dK_m,j = sum_i dS_m,ij q_i
        matmul(g.dk, T, T, kt.data(), T, 1, dst.data(), T, m == 0 ? dqt.data() : dqm.data(), T);
        if (m > 0) {
#pragma omp simd
          for (int64_t x = 0; x < g.dk * T; ++x) dqt[x] += dqm[x];
        }
        matmul(g.dk, T, T, qt.data(), T, 1, ds.data(), T, dkt.data(), T);
        scatter(dkt.data(), g.dk, g, dk.s, at.plane, unit, dk.data + m * dk.map_stride);
      }
      // dV_j = sum_i (sum_m w_m P_m,ij) dO_i
      matmul(g.dv, T, T, dot.data(), T, 1, mix.data(), T, dvt.data(), T);
      scatter(dqt.data(), g.dk, g, dq.s, at.plane, unit, dq.data);
      scatter(dvt.data(), g.dv, g, dv.s, at.plane, unit, dv.data);
    }
  });
}

// Inputs are read through their strides; an input whose elements overlap (an expanded view)
// is fine to read, but outputs shaped like it are allocated dense by at::empty_like.
std::tuple<at::Tensor, at::Tensor> patch_cross_attention_mix_cpu(const at::Tensor& q,
                                                                 const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const at::Tensor& weights_in,
                                                                 int64_t patch_size, double scale) {
  const WindowGrid g = check_mix_inputs(q, k, v, weights_in, patch_size);
  const int64_t maps = k.size(0);
  auto out = at::empty_like(v);
  auto lse = at::empty({maps, g.batch, g.heads, g.height, g.width},
                       q.options().dtype(patch_attention_acc_type(q.scalar_type())));
  if (g.batch == 0 || g.heads == 0) return {out, lse};
  const auto weights = weights_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "patch_cross_attention_mix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mix_forward_impl<scalar_t>(read_operand<scalar_t>(q), read_operand<scalar_t>(k),
                               read_operand<scalar_t>(v), weights.const_data_ptr<acc_t>(), maps,
                               write_operand<scalar_t>(out), lse.mutable_data_ptr<acc_t>(), g, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_cross_attention_mix_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& weights_in, const at::Tensor& lse_in, int64_t patch_size, double scale) {
  const WindowGrid g = check_mix_inputs(q, k, v, weights_in, patch_size);
  const int64_t maps = k.size(0);
  const std::vector<int64_t> out_shape{g.batch, g.heads, g.dv, g.height, g.width};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) &&
                  grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(),
              "grad_out should be a ", q.scalar_type(), " tensor of shape ",
              at::IntArrayRef(out_shape), " on ", q.device(), ", got ", grad_out.scalar_type(), " ",
              grad_out.sizes(), " on ", grad_out.device());
  const auto acc = patch_attention_acc_type(q.scalar_type());
  const std::vector<int64_t> lse_shape{maps, g.batch, g.heads, g.height, g.width};
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_shape) && lse_in.scalar_type() == acc &&
                  lse_in.device() == q.device(),
              "lse should be a ", acc, " tensor of shape ", at::IntArrayRef(lse_shape), " on ",
              q.device(), ", got ", lse_in.scalar_type(), " ", lse_in.sizes(), " on ",
              lse_in.device());
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  const int64_t units = g.batch * g.heads * g.windows();
  auto dw_units = at::zeros({units, maps}, weights_in.options());
  if (g.batch == 0 || g.heads == 0) return {dq, dk, dv, dw_units.sum(0)};
  const auto lse = lse_in.contiguous();
  const auto weights = weights_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "patch_cross_attention_mix_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mix_backward_impl<scalar_t>(read_operand<scalar_t>(grad_out), read_operand<scalar_t>(q),
                                read_operand<scalar_t>(k), read_operand<scalar_t>(v),
                                weights.const_data_ptr<acc_t>(), maps, lse.const_data_ptr<acc_t>(),
                                write_operand<scalar_t>(dq), write_operand<scalar_t>(dk),
                                write_operand<scalar_t>(dv), dw_units.mutable_data_ptr<acc_t>(), g,
                                scale);
  });
  // Per-window partial sums, added in a fixed order (the result does not depend on threads).
  return {dq, dk, dv, dw_units.sum(0)};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("patch_cross_attention", &lesionkit::patch_cross_attention_cpu);
  m.impl("patch_cross_attention_backward", &lesionkit::patch_cross_attention_backward_cpu);
  m.impl("patch_cross_attention_mix", &lesionkit::patch_cross_attention_mix_cpu);
  m.impl("patch_cross_attention_mix_backward", &lesionkit::patch_cross_attention_mix_backward_cpu);
}
