// CPU kernels of lesionkit::selective_scan (Mamba S6) and selective_scan_2d (the fused SS2D
// core) (docs/ops.md); cross_scan and cross_merge are in cross_scan.cpp.
//
// h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  y_t = <C_t, h_t> + D u_t,  y *= silu(z).
//
// One task per (batch, channel) (at::parallel_for), sequential over l, the n-vector of the state
// in SIMD lanes: B and C are transposed once to step-major (l, n) rows so that step t reads one
// contiguous n-vector (n = 16 float32 is one AVX-512 register), and the inner loop over n is
// written for the compiler to vectorise (`omp simd`, a polynomial exp with no branches or
// calls). n = 1 and n = 16 are compiled as their own instances with n a constant.
//
// The forward stores only the state entering each chunk of kScanChunk steps. The backward walks
// the chunks in reverse, recomputes the chunk's states from its checkpoint into a (chunk, n)
// buffer, then runs the adjoint recurrence g_{t-1} = exp(dt_t A) g_t + dy_{t-1} C_{t-1}.
// Gradients of B and C (shared by the channels of a group) go to per-task partial buffers that
// are summed afterwards, so no two threads write the same element.
//
// The fused 2D kernel runs the same per-channel scan four times per (batch, channel), reading x,
// dt, B and C through each direction's index map (B and C transposed once to pixel-major (L, n)
// rows, their gradients accumulated in pixel order) and summing the four outputs in a float
// row: cross_scan / cross_merge never materialise (B, 4, D, L) tensors, and no per-direction
// reordered copy of B, C or their gradients is made.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 warns inside its own AVX-512 header (min/max of _mm512_undefined_ps); a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// AVX2 + FMA without AVX-512 (most laptops, AMD before Zen 4): n = 16 float32 is two 8-lane
// registers. The compiler's vectorisation of the generic loops left this path 20x slower than
// the AVX-512 one (docs/ss2d.md).
#define LK_AVX2 1
#endif

#include "../selective_scan.h"

namespace lesionkit {
namespace {

#define LK_INLINE inline __attribute__((always_inline))

// exp with Cody-Waite range reduction x = k ln2 + r (|r| <= ln2 / 2) and a degree-5 minimax
// polynomial of e^r (relative error < 1.5e-7 evaluated in float32 with FMAs, below float32's own
// rounding of dt * A; the degree-6 Taylor polynomial used before reached 2.2e-7 with one FMA
// more); 2^k is added to the exponent bits. Branch-free, so it vectorises inside the n loop.
// The scalar, AVX2 (fast_exp8) and AVX-512 (fast_exp16) versions share these constants, so the
// three give the same value up to the order of their roundings.
namespace expc {
constexpr float kLo = -86.0f, kHi = 88.0f;  // keep e^x a normal float, so 2^k fits the exponent
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;       // ln 2 split in two: k * kLn2Hi is exact
constexpr float kLn2Lo = 1.428606765330187e-06f;   // for |k| <= 128
// Coefficients of e^r, highest degree first: a least-squares fit of the relative error on
// |r| <= ln2 / 2 reweighted towards minimax (Lawson), c0 held at 1. exp_poly writes the Horner
// steps out: as a loop, the scalar version slowed the 2D scan 1.6x (GCC 12).
constexpr float kPoly[6] = {8.290302940e-03f, 4.189792275e-02f, 1.666763574e-01f, 4.999915063e-01f,
                           9.999997020e-01f, 1.0f};
}  // namespace expc

// e^r for x = k ln2 + r: the reduction and the polynomial, shared by the three versions below.
// `Lanes` supplies fma(a, b, c) = a b + c and splat(c) for its type (float, __m256, __m512).
template <typename Lanes, typename V>
LK_INLINE V exp_poly(V x, V k) {
  V r = Lanes::fma(k, Lanes::splat(-expc::kLn2Hi), x);
  r = Lanes::fma(k, Lanes::splat(-expc::kLn2Lo), r);
  V p = Lanes::splat(expc::kPoly[0]);
  p = Lanes::fma(p, r, Lanes::splat(expc::kPoly[1]));
  p = Lanes::fma(p, r, Lanes::splat(expc::kPoly[2]));
  p = Lanes::fma(p, r, Lanes::splat(expc::kPoly[3]));
  p = Lanes::fma(p, r, Lanes::splat(expc::kPoly[4]));
  return Lanes::fma(p, r, Lanes::splat(expc::kPoly[5]));
}

struct ScalarLanes {
  static LK_INLINE float fma(float a, float b, float c) { return std::fma(a, b, c); }
  static LK_INLINE float splat(float c) { return c; }
};

LK_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, expc::kLo), expc::kHi);
  float k = x * expc::kLog2e;
  k = (k + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  float p = exp_poly<ScalarLanes>(x, k);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(k) << 23;
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

// float64 is for gradcheck-grade checks: keep libm's exp.
LK_INLINE double fast_exp(double x) { return std::exp(x); }

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1]; log1p(e) = 2 atanh(s) with
// s = e / (2 + e) in (0, 1/3], whose odd series converges to float precision in 7 terms
// (error < (1/3)^15 / 15 = 5e-9). No cancellation for small e, no branch, so it vectorises.
LK_INLINE float softplus(float x) {
  const float e = fast_exp(-std::fabs(x));
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = std::fma(p, s2, 1.0f / 11.0f);
  p = std::fma(p, s2, 1.0f / 9.0f);
  p = std::fma(p, s2, 1.0f / 7.0f);
  p = std::fma(p, s2, 1.0f / 5.0f);
  p = std::fma(p, s2, 1.0f / 3.0f);
  p = std::fma(p, s2, 1.0f);
  return std::max(x, 0.0f) + 2.0f * s * p;
}

LK_INLINE double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

template <typename T>
LK_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

struct IdentityMap {
  LK_INLINE int64_t operator()(int64_t t) const { return t; }
};

// Direction k of the cross-scan as a precomputed index array (shared by all channels), so the
// per-step gather is one load rather than a division.
struct DirectionMap {
  const int32_t* index;
  LK_INLINE int64_t operator()(int64_t t) const { return index[t]; }
};

std::vector<int32_t> direction_indices(int64_t height, int64_t width) {
  const int64_t L = height * width;
  TORCH_CHECK(L < (int64_t(1) << 31), "H*W should be below 2^31, got ", L);
  std::vector<int32_t> index(kDirections * L);
  for (int k = 0; k < kDirections; ++k) {
    for (int64_t t = 0; t < L; ++t) {
      index[k * L + t] = static_cast<int32_t>(direction_index(k, t, height, width));
    }
  }
  return index;
}

// One scan: a (batch, channel[, direction]) row. B and C are (l, n) rows read at map(t): in step
// order for the 1D scan (identity map), in pixel order for the 2D one (direction k's index map).
template <typename scalar_t, typename acc_t>
struct Row {
  const scalar_t* u;      // read at map(t)
  const scalar_t* delta;  // read at map(t)
  const acc_t* A;         // (n,)
  acc_t D, bias;
  const acc_t* B;  // (l, n)
  const acc_t* C;  // (l, n)
  acc_t* checkpoints;  // (chunks, n)
};

template <typename acc_t>
struct Workspace {
  // Per step of the current chunk: dt, dt * u, u, y and d dt / d delta (softplus' sigmoid);
  // the backward also keeps the chunk's states and decays exp(dt A) (chunk, n).
  std::vector<acc_t> dt, dtu, u, y, dsoft, states, decay;
  Workspace(int64_t n, bool backward)
      : dt(kScanChunk), dtu(kScanChunk), u(kScanChunk), y(kScanChunk), dsoft(kScanChunk),
        states(backward ? (kScanChunk + 2) * n : n), decay(backward ? kScanChunk * n : 0) {}
};

// dt_t = softplus(delta_t + bias), dt_t u_t and u_t of steps [t0, t0 + len) into the workspace:
// a gather through the map, then one vectorised pass.
template <typename scalar_t, typename acc_t, typename Map>
LK_INLINE void load_steps(const Row<scalar_t, acc_t>& row, Map map, bool softplus_dt, int64_t t0,
                          int64_t len, Workspace<acc_t>& ws, bool with_dsoft = false) {
  acc_t* __restrict__ u = ws.u.data();
  acc_t* __restrict__ dt = ws.dt.data();
  acc_t* __restrict__ dtu = ws.dtu.data();
  acc_t* __restrict__ dsoft = ws.dsoft.data();
  for (int64_t i = 0; i < len; ++i) {
    const int64_t p = map(t0 + i);
    u[i] = static_cast<acc_t>(row.u[p]);
    dt[i] = static_cast<acc_t>(row.delta[p]);
  }
  const acc_t bias = row.bias;
  if (softplus_dt) {
    if (with_dsoft) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dsoft[i] = sigmoid(dt[i] + bias);
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dt[i] = softplus(dt[i] + bias);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dt[i] += bias;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dtu[i] = dt[i] * u[i];
}

#if defined(__AVX512F__)
struct Lanes16 {
  static LK_INLINE __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static LK_INLINE __m512 splat(float c) { return _mm512_set1_ps(c); }
};

// fast_exp on 16 lanes: the same reduction and polynomial, 2^k applied by vscalefps.
LK_INLINE __m512 fast_exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(expc::kLo)), _mm512_set1_ps(expc::kHi));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(expc::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp_poly<Lanes16>(x, k), k);
}

// Sixteen horizontal sums at once: lane j of the result is the sum of v[j]'s lanes. A transpose
// folded into additions (unpack, shuffle within 128-bit lanes, then across them): 45
// instructions for 16 sums where sixteen _mm512_reduce_add_ps take about 8 each. The forward
// keeps one product vector C_t h_t per step and reduces a block of 16 steps here (1.27x the
// forward kernel's speed at (8, 48, 32 x 32), one thread). The same deferral in the backward's
// adjoint pass (two products per step) measured slower than reduce_add_pair there, so it is not
// used.
LK_INLINE __m512 reduce_add16(const __m512* v) {
  __m512 t[8], q[4];
  for (int j = 0; j < 8; ++j) {
    t[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                         _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  }
  for (int j = 0; j < 4; ++j) {
    q[j] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // q[j]'s 128-bit block b holds block b's partial sums of v[4j .. 4j + 3]; add the blocks.
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

LK_INLINE __mmask16 first_lanes(int64_t m) {
  return m >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1u);
}
#endif

#if defined(LK_AVX2)
struct Lanes8 {
  static LK_INLINE __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static LK_INLINE __m256 splat(float c) { return _mm256_set1_ps(c); }
};

// fast_exp on 8 lanes: the scalar version's reduction and polynomial; 2^k added to the exponent
// bits (the clamp keeps the result a normal float).
LK_INLINE __m256 fast_exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(expc::kLo)), _mm256_set1_ps(expc::kHi));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(expc::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_poly<Lanes8>(x, k);
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(k), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// Eight horizontal sums at once: lane j of the result is the sum of v[j]'s lanes (two rounds of
// pairwise hadd, then the 128-bit halves added), as reduce_add16 does for AVX-512.
LK_INLINE __m256 reduce_add8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Both horizontal sums of v and w in one tree.
LK_INLINE void reduce_add_pair8(__m256 v, __m256 w, float& sum_v, float& sum_w) {
  __m256 s = _mm256_hadd_ps(v, w);  // v01 v23 w01 w23 | v45 v67 w45 w67
  s = _mm256_hadd_ps(s, s);         // v0-3 w0-3 . . | v4-7 w4-7 . .
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  sum_v = _mm_cvtss_f32(t);
  sum_w = _mm_cvtss_f32(_mm_movehdup_ps(t));
}
#endif

// Steps [t0, t0 + len) from state h (updated in place); y_i = <C, h> + D u into ws.y. With
// `history`, the state after step i is also kept at history[(i + 1) * n].
template <int kN, typename scalar_t, typename acc_t, typename Map>
LK_INLINE void scan_steps(const Row<scalar_t, acc_t>& row, Map map, int64_t n_runtime, int64_t t0,
                          int64_t len, acc_t* __restrict__ h, acc_t* __restrict__ history,
                          Workspace<acc_t>& ws) {
#if defined(__AVX512F__)
  if constexpr (kN == 16 && std::is_same_v<acc_t, float>) {
    // n = 16 float32 is one AVX-512 register: the state stays in it across steps.
    const __m512 A = _mm512_loadu_ps(row.A);
    __m512 hv = _mm512_loadu_ps(h);
    // Blocks of 16 steps: the products C_t * h_t are kept and their 16 sums taken at once.
    const __m512 Dv = _mm512_set1_ps(row.D);
    for (int64_t lo = 0; lo < len; lo += 16) {
      const int64_t m = std::min<int64_t>(16, len - lo);
      __m512 prod[16];
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = lo + j;
        const __m512 a = fast_exp16(_mm512_mul_ps(_mm512_set1_ps(ws.dt[i]), A));
        const int64_t p = map(t0 + i);
        hv = _mm512_fmadd_ps(a, hv, _mm512_mul_ps(_mm512_set1_ps(ws.dtu[i]), _mm512_loadu_ps(row.B + p * 16)));
        if (history != nullptr) _mm512_storeu_ps(history + (i + 1) * 16, hv);
        prod[j] = _mm512_mul_ps(_mm512_loadu_ps(row.C + p * 16), hv);
      }
      for (int64_t j = m; j < 16; ++j) prod[j] = _mm512_setzero_ps();
      const __mmask16 mask = first_lanes(m);
      const __m512 y = _mm512_fmadd_ps(Dv, _mm512_maskz_loadu_ps(mask, ws.u.data() + lo), reduce_add16(prod));
      _mm512_mask_storeu_ps(ws.y.data() + lo, mask, y);
    }
    _mm512_storeu_ps(h, hv);
    return;
  }
#elif defined(LK_AVX2)
  if constexpr (kN == 16 && std::is_same_v<acc_t, float>) {
    // n = 16 float32 in two registers; blocks of 8 steps reduced at once (reduce_add8).
    const __m256 A0 = _mm256_loadu_ps(row.A), A1 = _mm256_loadu_ps(row.A + 8);
    __m256 h0 = _mm256_loadu_ps(h), h1 = _mm256_loadu_ps(h + 8);
    for (int64_t lo = 0; lo < len; lo += 8) {
      const int64_t m = std::min<int64_t>(8, len - lo);
      __m256 prod[8];
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = lo + j;
        const __m256 dt = _mm256_set1_ps(ws.dt[i]), dtu = _mm256_set1_ps(ws.dtu[i]);
        const float* Bp = row.B + map(t0 + i) * 16;
        const float* Cp = row.C + map(t0 + i) * 16;
        h0 = _mm256_fmadd_ps(fast_exp8(_mm256_mul_ps(dt, A0)), h0, _mm256_mul_ps(dtu, _mm256_loadu_ps(Bp)));
        h1 = _mm256_fmadd_ps(fast_exp8(_mm256_mul_ps(dt, A1)), h1, _mm256_mul_ps(dtu, _mm256_loadu_ps(Bp + 8)));
        if (history != nullptr) {
          _mm256_storeu_ps(history + (i + 1) * 16, h0);
          _mm256_storeu_ps(history + (i + 1) * 16 + 8, h1);
        }
        prod[j] = _mm256_fmadd_ps(_mm256_loadu_ps(Cp + 8), h1, _mm256_mul_ps(_mm256_loadu_ps(Cp), h0));
      }
      for (int64_t j = m; j < 8; ++j) prod[j] = _mm256_setzero_ps();
      alignas(32) float sums[8];
      _mm256_store_ps(sums, reduce_add8(prod));
      for (int64_t j = 0; j < m; ++j) ws.y[lo + j] = sums[j] + row.D * ws.u[lo + j];
    }
    _mm256_storeu_ps(h, h0);
    _mm256_storeu_ps(h + 8, h1);
    return;
  }
#endif
  const int64_t n = kN > 0 ? kN : n_runtime;
  const acc_t* __restrict__ A = row.A;
  for (int64_t i = 0; i < len; ++i) {
    const acc_t dt = ws.dt[i], dtu = ws.dtu[i];
    const acc_t* __restrict__ Bt = row.B + map(t0 + i) * n;
    const acc_t* __restrict__ Ct = row.C + map(t0 + i) * n;
    acc_t y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t j = 0; j < n; ++j) {
      h[j] = fast_exp(dt * A[j]) * h[j] + dtu * Bt[j];
      y += Ct[j] * h[j];
    }
    if (history != nullptr) std::memcpy(history + (i + 1) * n, h, n * sizeof(acc_t));
    ws.y[i] = y + row.D * ws.u[i];
  }
}

// Forward of one row. `emit(t0, len, y)` receives y of steps [t0, t0 + len) (D u included, z not
// applied).
template <int kN, typename scalar_t, typename acc_t, typename Map, typename Emit>
void scan_row_forward(const Row<scalar_t, acc_t>& row, int64_t length, int64_t n, Map map,
                      bool softplus_dt, acc_t* last_state, Workspace<acc_t>& ws, Emit emit) {
  acc_t* h = ws.states.data();
  std::fill(h, h + n, acc_t(0));
  for (int64_t t0 = 0, c = 0; t0 < length; t0 += kScanChunk, ++c) {
    const int64_t len = std::min(kScanChunk, length - t0);
    std::memcpy(row.checkpoints + c * n, h, n * sizeof(acc_t));
    load_steps(row, map, softplus_dt, t0, len, ws);
    scan_steps<kN>(row, map, n, t0, len, h, static_cast<acc_t*>(nullptr), ws);
    emit(t0, len, ws.y.data());
  }
  if (last_state != nullptr) std::memcpy(last_state, h, n * sizeof(acc_t));
}

// Per-row gradient outputs of the backward.
template <typename acc_t>
struct RowGrads {
  acc_t* dB;  // (l, n) partial, accumulated
  acc_t* dC;  // (l, n) partial, accumulated
  acc_t* dA;  // (n,), accumulated
  acc_t dD = 0, dbias = 0;
};

#if defined(__AVX512F__)
// Both horizontal sums of v and w in one reduction tree (4 shuffles and 4 adds instead of 8 + 8):
// the 128-bit blocks of v and w are paired first, so every later step works on both at once.
LK_INLINE void reduce_add_pair(__m512 v, __m512 w, float& sum_v, float& sum_w) {
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(v, w, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(v, w, _MM_SHUFFLE(3, 2, 3, 2)));
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
  sum_v = _mm512_cvtss_f32(s);
  sum_w = _mm_cvtss_f32(_mm512_extractf32x4_ps(s, 2));
}
#endif

#if defined(__AVX512F__) || defined(LK_AVX2)
// Sixteen float32 lanes, the width of the n = 16 state: one AVX-512 register, or two AVX2 ones.
// scan_row_backward16 is written once against it; each operation is the instruction sequence
// the two paths used before they shared a body (dot and dot_pair fold the AVX2 halves with an
// FMA before the reduction tree).
struct Vec16 {
#if defined(__AVX512F__)
  __m512 v;
  static LK_INLINE Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  LK_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }
  static LK_INLINE Vec16 set1(float x) { return {_mm512_set1_ps(x)}; }
  static LK_INLINE Vec16 mul(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static LK_INLINE Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static LK_INLINE Vec16 exp(Vec16 a) { return {fast_exp16(a.v)}; }
  // sum_j a_j b_j
  static LK_INLINE float dot(Vec16 a, Vec16 b) { return _mm512_reduce_add_ps(_mm512_mul_ps(a.v, b.v)); }
  // sum_j a_j b_j and sum_j c_j d_j in one reduction tree
  static LK_INLINE void dot_pair(Vec16 a, Vec16 b, Vec16 c, Vec16 d, float& ab, float& cd) {
    reduce_add_pair(_mm512_mul_ps(a.v, b.v), _mm512_mul_ps(c.v, d.v), ab, cd);
  }
#else
  __m256 lo, hi;
  static LK_INLINE Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  LK_INLINE void store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
  static LK_INLINE Vec16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static LK_INLINE Vec16 mul(Vec16 a, Vec16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static LK_INLINE Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  static LK_INLINE Vec16 exp(Vec16 a) { return {fast_exp8(a.lo), fast_exp8(a.hi)}; }
  static LK_INLINE __m256 fold(Vec16 a, Vec16 b) {  // (a b)'s two halves added: 8 partial sums
    return _mm256_fmadd_ps(a.hi, b.hi, _mm256_mul_ps(a.lo, b.lo));
  }
  static LK_INLINE float dot(Vec16 a, Vec16 b) {
    float ab, unused;
    reduce_add_pair8(fold(a, b), _mm256_setzero_ps(), ab, unused);
    return ab;
  }
  static LK_INLINE void dot_pair(Vec16 a, Vec16 b, Vec16 c, Vec16 d, float& ab, float& cd) {
    reduce_add_pair8(fold(a, b), fold(c, d), ab, cd);
  }
#endif
};

// scan_row_backward for n = 16 float32, the state and its adjoint in one Vec16 each. The
// recompute keeps exp(dt A) of every step next to the states, so the adjoint pass computes no
// exp; y is recomputed only when grad_y needs it (z's gate); dA stays in registers for the
// whole row; the two per-step reductions over n share one reduction tree.
template <typename scalar_t, typename Map, typename GradY, typename Emit>
void scan_row_backward16(const Row<scalar_t, float>& row, int64_t length, Map map,
                         bool softplus_dt, bool needs_y, float* g_io, RowGrads<float>& grads,
                         Workspace<float>& ws, GradY grad_y, Emit emit) {
  using V = Vec16;
  const V A = V::load(row.A);
  V g = V::load(g_io);
  V dA = V::load(grads.dA);
  float* __restrict__ hist = ws.states.data();
  float* __restrict__ decay = ws.decay.data();
  for (int64_t c = scan_chunks(length) - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk;
    const int64_t len = std::min(kScanChunk, length - t0);
    load_steps(row, map, softplus_dt, t0, len, ws, /*with_dsoft=*/softplus_dt);
    // Recompute: hist[i] is h before step i, decay[i] = exp(dt_i A).
    V h = V::load(row.checkpoints + c * 16);
    h.store(hist);
    for (int64_t i = 0; i < len; ++i) {
      const V a = V::exp(V::mul(V::set1(ws.dt[i]), A));
      a.store(decay + i * 16);
      const int64_t p = map(t0 + i);
      h = V::fmadd(a, h, V::mul(V::set1(ws.dtu[i]), V::load(row.B + p * 16)));
      h.store(hist + (i + 1) * 16);
      if (needs_y) ws.y[i] = V::dot(V::load(row.C + p * 16), h) + row.D * ws.u[i];
    }
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = t0 + i, p = map(t);
      const float u = ws.u[i], dt = ws.dt[i];
      const float dy = grad_y(t, p, ws.y[i]);
      grads.dD += dy * u;
      const V dyv = V::set1(dy);
      const V Bt = V::load(row.B + p * 16);
      const V gj = V::fmadd(dyv, V::load(row.C + p * 16), g);  // dL/dh_t
      float* dCp = grads.dC + p * 16;
      float* dBp = grads.dB + p * 16;
      V::fmadd(dyv, V::load(hist + (i + 1) * 16), V::load(dCp)).store(dCp);
      V::fmadd(gj, V::set1(ws.dtu[i]), V::load(dBp)).store(dBp);
      const V ga = V::mul(gj, V::load(decay + i * 16));
      const V gha = V::mul(ga, V::load(hist + i * 16));  // through the decay exp(dt A)
      dA = V::fmadd(gha, V::set1(dt), dA);
      g = ga;  // dL/dh_{t-1} from this step
      float sum_ghaA, sum_gB;
      V::dot_pair(gha, A, gj, Bt, sum_ghaA, sum_gB);
      const float ddt = sum_ghaA + sum_gB * u;
      const float du = dy * row.D + sum_gB * dt;
      const float ddelta = softplus_dt ? ddt * ws.dsoft[i] : ddt;
      grads.dbias += ddelta;
      emit(t, p, du, ddelta);
    }
  }
  g.store(g_io);
  dA.store(grads.dA);
}
#endif

// Backward of one row. `grad_y(t, p, y)` returns dL/dy_t given y_t (applying z's gate and
// writing dz where there is one; `needs_y` says whether it reads y); `emit(t, p, du, ddelta)`
// receives the input gradients. `g` (n,) holds dL/dh at the end on entry (the gradient of the
// last state, or zeros).
template <int kN, typename scalar_t, typename acc_t, typename Map, typename GradY, typename Emit>
void scan_row_backward(const Row<scalar_t, acc_t>& row, int64_t length, int64_t n_runtime,
                       Map map, bool softplus_dt, bool needs_y, acc_t* __restrict__ g,
                       RowGrads<acc_t>& grads, Workspace<acc_t>& ws, GradY grad_y, Emit emit) {
#if defined(__AVX512F__) || defined(LK_AVX2)
  if constexpr (kN == 16 && std::is_same_v<acc_t, float>) {
    scan_row_backward16(row, length, map, softplus_dt, needs_y, g, grads, ws, grad_y, emit);
    return;
  }
#endif
  (void)needs_y;
  const int64_t n = kN > 0 ? kN : n_runtime;
  const acc_t* __restrict__ A = row.A;
  acc_t* __restrict__ dA = grads.dA;
  acc_t* __restrict__ hist = ws.states.data();
  for (int64_t c = scan_chunks(length) - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk;
    const int64_t len = std::min(kScanChunk, length - t0);
    // Recompute the chunk's states from its checkpoint: hist[i + 1] is h after step i.
    std::memcpy(hist, row.checkpoints + c * n, n * sizeof(acc_t));
    load_steps(row, map, softplus_dt, t0, len, ws, /*with_dsoft=*/true);
    {
      acc_t* h = hist + (kScanChunk + 1) * n;  // running state, past the history rows
      std::memcpy(h, hist, n * sizeof(acc_t));
      scan_steps<kN>(row, map, n, t0, len, h, hist, ws);
    }
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = t0 + i, p = map(t);
      const acc_t u = ws.u[i], dt = ws.dt[i], dtu = ws.dtu[i];
      const acc_t dy = grad_y(t, p, ws.y[i]);
      grads.dD += dy * u;
      const acc_t* __restrict__ Bt = row.B + p * n;
      const acc_t* __restrict__ Ct = row.C + p * n;
      acc_t* __restrict__ dBt = grads.dB + p * n;
      acc_t* __restrict__ dCt = grads.dC + p * n;
      const acc_t* __restrict__ h_now = hist + (i + 1) * n;
      const acc_t* __restrict__ h_prev = hist + i * n;
      acc_t sum_gB = 0, sum_ghaA = 0;
#pragma omp simd reduction(+ : sum_gB, sum_ghaA)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t gj = g[j] + dy * Ct[j];  // dL/dh_t
        dCt[j] += dy * h_now[j];
        const acc_t a = fast_exp(dt * A[j]);
        const acc_t gha = gj * h_prev[j] * a;  // through the decay exp(dt A)
        sum_ghaA += gha * A[j];
        dA[j] += gha * dt;
        dBt[j] += gj * dtu;
        sum_gB += gj * Bt[j];
        g[j] = gj * a;  // dL/dh_{t-1} from this step
      }
      const acc_t ddt = sum_ghaA + sum_gB * u;
      const acc_t du = dy * row.D + sum_gB * dt;
      const acc_t ddelta = softplus_dt ? ddt * ws.dsoft[i] : ddt;
      grads.dbias += ddelta;
      emit(t, p, du, ddelta);
    }
  }
}

// out = y * silu(z) (or y without z), cast to the output dtype.
template <typename scalar_t, typename out_t, typename acc_t>
void write_gated(const acc_t* __restrict__ y, const scalar_t* __restrict__ z,
                 out_t* __restrict__ out, int64_t len) {
  if (z != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t zz = static_cast<acc_t>(z[i]);
      out[i] = static_cast<out_t>(y[i] * zz * sigmoid(zz));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<out_t>(y[i]);
  }
}

// Calls fn.template operator()<kN>() with n as a constant for the specialised widths.
template <typename Fn>
void dispatch_state(int64_t n, Fn&& fn) {
  if (n == 16) {
    fn(std::integral_constant<int, 16>{});
  } else if (n == 1) {
    fn(std::integral_constant<int, 1>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
}

// (b, g, n, l) -> step-major (b, g, l, n) in the accumulation dtype.
at::Tensor step_major(const at::Tensor& t, int64_t groups, at::ScalarType acc) {
  const auto v = t.dim() == 3 ? t.unsqueeze(1) : t;
  return v.to(acc).transpose(2, 3).contiguous();
}

// Splits of a group's channels per batch entry, so the backward has a few tasks per thread
// while each task owns its dB/dC partial buffer.
int64_t backward_splits(int64_t batch, int64_t channels) {
  const int64_t want = (4 * at::get_num_threads() + batch - 1) / std::max<int64_t>(batch, 1);
  return std::max<int64_t>(1, std::min(channels, want));
}

// ---------------------------------------------------------------------------------------------
// selective_scan

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_cpu(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
    const std::optional<at::Tensor>& z_in, const std::optional<at::Tensor>& bias_in,
    bool delta_softplus, std::optional<at::ScalarType> out_dtype) {
  const ScanShape s = check_selective_scan_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in,
                                                  bias_in);
  const auto acc = scan_acc_type(u_in.scalar_type());
  const auto acc_opts = u_in.options().dtype(acc);
  const auto out_type = scan_out_type(u_in.scalar_type(), out_dtype);
  auto out = at::empty(u_in.sizes(), u_in.options().dtype(out_type));
  auto last_state = at::zeros({s.batch, s.dim, s.state}, acc_opts);
  auto checkpoints = at::empty({s.batch, s.dim, scan_chunks(s.length), s.state}, acc_opts);
  if (s.batch == 0 || s.dim == 0 || s.length == 0) return {out, last_state, checkpoints};

  const auto u = u_in.contiguous();
  const auto delta = delta_in.contiguous();
  const auto A = A_in.contiguous();
  const auto Bt = step_major(B_in, s.groups, acc);
  const auto Ct = step_major(C_in, s.groups, acc);
  const auto D = D_in.has_value() ? D_in->contiguous() : at::Tensor();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const auto z = z_in.has_value() ? z_in->contiguous() : at::Tensor();
  const int64_t per_group = s.dim / s.groups, L = s.length, n = s.state;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(),
                                  "selective_scan_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* u_p = u.const_data_ptr<scalar_t>();
    const scalar_t* delta_p = delta.const_data_ptr<scalar_t>();
    const scalar_t* z_p = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* A_p = A.const_data_ptr<acc_t>();
    const acc_t* D_p = D.defined() ? D.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bias_p = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    const acc_t* B_p = Bt.const_data_ptr<acc_t>();
    const acc_t* C_p = Ct.const_data_ptr<acc_t>();
    // float32 output from 16-bit inputs goes through out_f.
    const bool float_out = out_type != u.scalar_type();
    scalar_t* out_p = float_out ? nullptr : out.mutable_data_ptr<scalar_t>();
    acc_t* out_f = float_out ? out.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* last_p = last_state.mutable_data_ptr<acc_t>();
    acc_t* ckpt_p = checkpoints.mutable_data_ptr<acc_t>();
    const int64_t chunks = scan_chunks(L);
    at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
      Workspace<acc_t> ws(n, false);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / s.dim, d = idx % s.dim, grp = d / per_group;
        const Row<scalar_t, acc_t> row{u_p + idx * L, delta_p + idx * L, A_p + d * n,
                                       D_p ? D_p[d] : acc_t(0), bias_p ? bias_p[d] : acc_t(0),
                                       B_p + (b * s.groups + grp) * L * n,
                                       C_p + (b * s.groups + grp) * L * n,
                                       ckpt_p + idx * chunks * n};
        const scalar_t* z_row = z_p ? z_p + idx * L : nullptr;
        dispatch_state(n, [&](auto width) {
          scan_row_forward<decltype(width)::value>(
              row, L, n, IdentityMap{}, delta_softplus, last_p + idx * n, ws,
              [&](int64_t t0, int64_t len, const acc_t* y) {
                const scalar_t* z_chunk = z_row ? z_row + t0 : nullptr;
                if (out_f) {
                  write_gated(y, z_chunk, out_f + idx * L + t0, len);
                } else {
                  write_gated(y, z_chunk, out_p + idx * L + t0, len);
                }
              });
        });
      }
    });
  });
  return {out, last_state, checkpoints};
}

// The per-split partial buffers (b, splits, ...) summed over the splits; with one split (one
// task per batch element) a view, where at::sum over a size-1 dimension would copy.
at::Tensor sum_splits(const at::Tensor& partial) {
  return partial.size(1) == 1 ? partial.select(1, 0) : partial.sum(1);
}

// (b, S, g, l, n) partial sums -> (b, g, n, l), or (b, n, l) when B was given without groups.
at::Tensor finish_bc_grad(const at::Tensor& partial, const at::Tensor& like) {
  auto g = sum_splits(partial).transpose(2, 3);
  if (like.dim() == 3) g = g.squeeze(1);
  return g.to(like.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_backward_cpu(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_last_in,
                       const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                       const at::Tensor& B_in, const at::Tensor& C_in,
                       const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& z_in,
                       const std::optional<at::Tensor>& bias_in, bool delta_softplus,
                       const at::Tensor& checkpoints_in) {
  const ScanShape s = check_selective_scan_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in,
                                                  bias_in);
  const auto acc = scan_acc_type(u_in.scalar_type());
  const auto acc_opts = u_in.options().dtype(acc);
  TORCH_CHECK(grad_out_in.sizes() == u_in.sizes(), "grad_out should have u's shape ", u_in.sizes(),
              ", got ", grad_out_in.sizes());
  check_grad_out_type(grad_out_in, u_in.scalar_type());
  check_checkpoints(checkpoints_in, {s.batch, s.dim}, s.length, s.state, acc);
  if (grad_last_in.has_value()) {
    TORCH_CHECK(grad_last_in->sizes() == at::IntArrayRef({s.batch, s.dim, s.state}),
                "grad_last_state should have shape (b, d, n) = (", s.batch, ", ", s.dim, ", ",
                s.state, "), got ", grad_last_in->sizes());
  }
  const int64_t per_group = s.dim / s.groups, L = s.length, n = s.state;
  const int64_t splits = backward_splits(s.batch, per_group);

  auto du = at::empty(u_in.sizes(), u_in.options());
  auto ddelta = at::empty(u_in.sizes(), u_in.options());
  auto dz = z_in.has_value() ? at::empty(u_in.sizes(), u_in.options()) : at::empty({0}, u_in.options());
  auto dB_part = at::zeros({s.batch, splits, s.groups, L, n}, acc_opts);
  auto dC_part = at::zeros({s.batch, splits, s.groups, L, n}, acc_opts);
  auto dA_part = at::zeros({s.batch, s.dim, n}, acc_opts);
  auto dD_part = at::zeros({s.batch, s.dim}, acc_opts);
  auto dbias_part = at::zeros({s.batch, s.dim}, acc_opts);

  if (s.batch > 0 && s.dim > 0 && L > 0) {
    const auto u = u_in.contiguous();
    const auto delta = delta_in.contiguous();
    const auto grad_out = grad_out_in.to(acc).contiguous();  // read in float32
    const auto A = A_in.contiguous();
    const auto Bt = step_major(B_in, s.groups, acc);
    const auto Ct = step_major(C_in, s.groups, acc);
    const auto D = D_in.has_value() ? D_in->contiguous() : at::Tensor();
    const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
    const auto z = z_in.has_value() ? z_in->contiguous() : at::Tensor();
    const auto ckpt = checkpoints_in.contiguous();
    const auto grad_last = grad_last_in.has_value() ? grad_last_in->to(acc).contiguous() : at::Tensor();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(),
                                    "selective_scan_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* u_p = u.const_data_ptr<scalar_t>();
      const scalar_t* delta_p = delta.const_data_ptr<scalar_t>();
      const acc_t* go_p = grad_out.const_data_ptr<acc_t>();
      const scalar_t* z_p = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
      const acc_t* A_p = A.const_data_ptr<acc_t>();
      const acc_t* D_p = D.defined() ? D.const_data_ptr<acc_t>() : nullptr;
      const acc_t* bias_p = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
      const acc_t* B_p = Bt.const_data_ptr<acc_t>();
      const acc_t* C_p = Ct.const_data_ptr<acc_t>();
      const acc_t* ckpt_p = ckpt.const_data_ptr<acc_t>();
      const acc_t* gl_p = grad_last.defined() ? grad_last.const_data_ptr<acc_t>() : nullptr;
      scalar_t* du_p = du.mutable_data_ptr<scalar_t>();
      scalar_t* ddelta_p = ddelta.mutable_data_ptr<scalar_t>();
      scalar_t* dz_p = z_p ? dz.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* dB_p = dB_part.mutable_data_ptr<acc_t>();
      acc_t* dC_p = dC_part.mutable_data_ptr<acc_t>();
      acc_t* dA_p = dA_part.mutable_data_ptr<acc_t>();
      acc_t* dD_p = dD_part.mutable_data_ptr<acc_t>();
      acc_t* dbias_p = dbias_part.mutable_data_ptr<acc_t>();
      const int64_t chunks = scan_chunks(L);

      // Task (b, split): channels [lo, hi) of the split in every group.
      at::parallel_for(0, s.batch * splits, 1, [&](int64_t begin, int64_t end) {
        Workspace<acc_t> ws(n, true);
        std::vector<acc_t> g(n);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / splits, split = task % splits;
          const int64_t lo = split * per_group / splits, hi = (split + 1) * per_group / splits;
          for (int64_t grp = 0; grp < s.groups; ++grp) {
            acc_t* dB_row = dB_p + ((b * splits + split) * s.groups + grp) * L * n;
            acc_t* dC_row = dC_p + ((b * splits + split) * s.groups + grp) * L * n;
            for (int64_t d = grp * per_group + lo; d < grp * per_group + hi; ++d) {
              const int64_t idx = b * s.dim + d;
              const Row<scalar_t, acc_t> row{
                  u_p + idx * L, delta_p + idx * L, A_p + d * n, D_p ? D_p[d] : acc_t(0),
                  bias_p ? bias_p[d] : acc_t(0), B_p + (b * s.groups + grp) * L * n,
                  C_p + (b * s.groups + grp) * L * n, const_cast<acc_t*>(ckpt_p) + idx * chunks * n};
              RowGrads<acc_t> grads{dB_row, dC_row, dA_p + idx * n};
              if (gl_p) {
                std::copy(gl_p + idx * n, gl_p + (idx + 1) * n, g.begin());
              } else {
                std::fill(g.begin(), g.end(), acc_t(0));
              }
              const acc_t* go_row = go_p + idx * L;
              const scalar_t* z_row = z_p ? z_p + idx * L : nullptr;
              scalar_t* dz_row = dz_p ? dz_p + idx * L : nullptr;
              scalar_t* du_row = du_p + idx * L;
              scalar_t* ddelta_row = ddelta_p + idx * L;
              dispatch_state(n, [&](auto width) {
                scan_row_backward<decltype(width)::value>(
                    row, L, n, IdentityMap{}, delta_softplus, z_row != nullptr, g.data(), grads,
                    ws,
                    [&](int64_t t, int64_t, acc_t y) {
                      const acc_t go = go_row[t];
                      if (!z_row) return go;
                      const acc_t zz = static_cast<acc_t>(z_row[t]);
                      const acc_t sg = sigmoid(zz);
                      dz_row[t] = static_cast<scalar_t>(go * y * sg * (acc_t(1) + zz * (acc_t(1) - sg)));
                      return go * zz * sg;
                    },
                    [&](int64_t t, int64_t, acc_t du_t, acc_t ddelta_t) {
                      du_row[t] = static_cast<scalar_t>(du_t);
                      ddelta_row[t] = static_cast<scalar_t>(ddelta_t);
                    });
              });
              dD_p[idx] = grads.dD;
              dbias_p[idx] = grads.dbias;
            }
          }
        }
      });
    });
  }
  auto dB = finish_bc_grad(dB_part, B_in);
  auto dC = finish_bc_grad(dC_part, C_in);
  auto dA = dA_part.sum(0);
  auto dD = D_in.has_value() ? dD_part.sum(0) : at::empty({0}, acc_opts);
  auto dbias = bias_in.has_value() ? dbias_part.sum(0) : at::empty({0}, acc_opts);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

// ---------------------------------------------------------------------------------------------
// selective_scan_2d: the SS2D core fused.

// Positions of a (.., N, H, W) tensor are in tiles of this many: a tile's N x 16 values are read
// and written while they sit in L1.
constexpr int64_t kTile = 16;

// (B, 4, N, H, W) -> (B, 4, L, N), N innermost in pixel order, in the accumulation dtype: the
// scans read direction k's step t at row index_k(t), so no per-direction reordered copy is made
// (a view when B already comes N-innermost in float32). B and C arrive as strided views of the
// layer's projection, pixels innermost; those are transposed here tile by tile with the cast
// fused: ATen's strided copy of the same took 0.3 ms for a (8, 4, 16, 32 x 32) bfloat16 tensor;
// with splits_to_spatial's inverse, 36 such copies and about 10 ms of a 274 ms vmunet_tiny
// training step (one thread, AMD EPYC Zen 5).
at::Tensor positions_major(const at::Tensor& t, at::ScalarType acc) {
  const auto rows = t.flatten(3).transpose(2, 3);
  if (t.scalar_type() == acc && rows.is_contiguous()) return rows;
  if (t.stride(4) != 1 || t.stride(3) != t.size(4)) return rows.to(acc).contiguous();
  const int64_t groups = t.size(1), n = t.size(2), L = t.size(3) * t.size(4);
  auto out = at::empty({t.size(0), groups, L, n}, t.options().dtype(acc));
  const int64_t sb = t.stride(0), sg = t.stride(1), sn = t.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "positions_major", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    acc_t* dst = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, t.size(0) * groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const scalar_t* s = src + (bg / groups) * sb + (bg % groups) * sg;
        acc_t* d = dst + bg * L * n;
        for (int64_t p0 = 0; p0 < L; p0 += kTile) {
          const int64_t m = std::min(kTile, L - p0);
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* sj = s + j * sn + p0;
            for (int64_t q = 0; q < m; ++q) d[(p0 + q) * n + j] = static_cast<acc_t>(sj[q]);
          }
        }
      }
    });
  });
  return out;
}

// The inverse, with the backward's per-split partial sums added: (B, S, 4, L, N) in the
// accumulation dtype -> (B, 4, N, H, W) in `type`, summed over the S splits.
at::Tensor splits_to_spatial(const at::Tensor& partial, int64_t height, int64_t width, at::ScalarType type) {
  const int64_t batch = partial.size(0), splits = partial.size(1), groups = partial.size(2);
  const int64_t L = partial.size(3), n = partial.size(4);
  auto out = at::empty({batch, groups, n, height, width}, partial.options().dtype(type));
  const auto part = partial.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "splits_to_spatial", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* src = part.const_data_ptr<acc_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t split_stride = groups * L * n;
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t b = bg / groups, g = bg % groups;
        const acc_t* s = src + (b * splits * groups + g) * L * n;
        scalar_t* d = dst + bg * n * L;
        for (int64_t p0 = 0; p0 < L; p0 += kTile) {
          const int64_t m = std::min(kTile, L - p0);
          for (int64_t j = 0; j < n; ++j) {
            for (int64_t q = 0; q < m; ++q) {
              acc_t v = s[(p0 + q) * n + j];
              for (int64_t k = 1; k < splits; ++k) v += s[k * split_stride + (p0 + q) * n + j];
              d[j * L + p0 + q] = static_cast<scalar_t>(v);
            }
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> selective_scan_2d_cpu(
    const at::Tensor& x_in, const at::Tensor& dt_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const at::Tensor& D_in, const at::Tensor& bias_in, bool dt_softplus,
    std::optional<at::ScalarType> out_dtype) {
  const Scan2dShape s = check_selective_scan_2d_inputs(x_in, dt_in, A_in, B_in, C_in, D_in, bias_in);
  const auto acc = scan_acc_type(x_in.scalar_type());
  const int64_t L = s.length(), n = s.state, chunks = scan_chunks(L);
  const auto out_type = scan_out_type(x_in.scalar_type(), out_dtype);
  auto out = at::empty(x_in.sizes(), x_in.options().dtype(out_type));
  auto checkpoints = at::empty({s.batch, kDirections, s.dim, chunks, n}, x_in.options().dtype(acc));
  if (s.batch == 0 || s.dim == 0 || L == 0) return {out, checkpoints};

  const auto x = x_in.contiguous();
  const auto dt = dt_in.contiguous();
  const auto A = A_in.contiguous();
  const auto D = D_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto Bt = positions_major(B_in, acc);
  const auto Ct = positions_major(C_in, acc);
  const auto index = direction_indices(s.height, s.width);
  // The four directions' sum, in the accumulation dtype (the output itself when that matches).
  auto sum = out_type == acc ? out : at::empty(x_in.sizes(), x_in.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "selective_scan_2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* dt_p = dt.const_data_ptr<scalar_t>();
    const acc_t* A_p = A.const_data_ptr<acc_t>();
    const acc_t* D_p = D.const_data_ptr<acc_t>();
    const acc_t* bias_p = bias.const_data_ptr<acc_t>();
    const acc_t* B_p = Bt.const_data_ptr<acc_t>();
    const acc_t* C_p = Ct.const_data_ptr<acc_t>();
    acc_t* ckpt_p = checkpoints.mutable_data_ptr<acc_t>();
    acc_t* sum_p = sum.mutable_data_ptr<acc_t>();
    // Directions outside, channels inside: consecutive scans share one direction's B and C
    // rows (2 x L x n floats), which then stay in cache.
    at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
      Workspace<acc_t> ws(n, false);
      for (int k = 0; k < kDirections; ++k) {
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t b = idx / s.dim, d = idx % s.dim;
          const int64_t kd = k * s.dim + d;
          const int64_t bk = b * kDirections + k;
          const Row<scalar_t, acc_t> row{x_p + idx * L, dt_p + (bk * s.dim + d) * L, A_p + kd * n,
                                         D_p[kd], bias_p[kd], B_p + bk * L * n, C_p + bk * L * n,
                                         ckpt_p + (bk * s.dim + d) * chunks * n};
          acc_t* sum_row = sum_p + idx * L;
          dispatch_state(n, [&](auto width) {
            scan_row_forward<decltype(width)::value>(
                row, L, n, DirectionMap{index.data() + k * L}, dt_softplus,
                static_cast<acc_t*>(nullptr), ws,
                [&](int64_t t0, int64_t len, const acc_t* y) {
                  const int32_t* idx_k = index.data() + k * L + t0;
                  if (k == 0) {
                    for (int64_t i = 0; i < len; ++i) sum_row[idx_k[i]] = y[i];
                  } else {
                    for (int64_t i = 0; i < len; ++i) sum_row[idx_k[i]] += y[i];
                  }
                });
          });
        }
      }
    });
  });
  if (!sum.is_same(out)) out.copy_(sum);
  return {out, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_2d_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                          const at::Tensor& dt_in, const at::Tensor& A_in, const at::Tensor& B_in,
                          const at::Tensor& C_in, const at::Tensor& D_in, const at::Tensor& bias_in,
                          bool dt_softplus, const at::Tensor& checkpoints_in) {
  const Scan2dShape s = check_selective_scan_2d_inputs(x_in, dt_in, A_in, B_in, C_in, D_in, bias_in);
  const auto acc = scan_acc_type(x_in.scalar_type());
  const auto acc_opts = x_in.options().dtype(acc);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes(), "grad_out should have x's shape ", x_in.sizes(),
              ", got ", grad_out_in.sizes());
  check_grad_out_type(grad_out_in, x_in.scalar_type());
  check_checkpoints(checkpoints_in, {s.batch, kDirections, s.dim}, s.length(), s.state, acc);
  const int64_t L = s.length(), n = s.state, chunks = scan_chunks(L);
  const int64_t splits = backward_splits(s.batch, s.dim);

  auto dx = at::zeros(x_in.sizes(), x_in.options());
  // dx summed over the four directions in the accumulation dtype (dx itself when that matches).
  auto dx_sum = x_in.scalar_type() == acc ? dx : at::zeros(x_in.sizes(), acc_opts);
  auto ddt = at::empty(dt_in.sizes(), dt_in.options());
  auto dB_part = at::zeros({s.batch, splits, kDirections, L, n}, acc_opts);
  auto dC_part = at::zeros({s.batch, splits, kDirections, L, n}, acc_opts);
  auto dA_part = at::zeros({s.batch, kDirections, s.dim, n}, acc_opts);
  auto dD_part = at::zeros({s.batch, kDirections, s.dim}, acc_opts);
  auto dbias_part = at::zeros({s.batch, kDirections, s.dim}, acc_opts);

  if (s.batch > 0 && s.dim > 0 && L > 0) {
    const auto x = x_in.contiguous();
    const auto dt = dt_in.contiguous();
    const auto grad_out = grad_out_in.to(acc).contiguous();  // read in float32
    const auto A = A_in.contiguous();
    const auto D = D_in.contiguous();
    const auto bias = bias_in.contiguous();
    const auto Bt = positions_major(B_in, acc);
    const auto Ct = positions_major(C_in, acc);
    const auto ckpt = checkpoints_in.contiguous();
    const auto index = direction_indices(s.height, s.width);

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "selective_scan_2d_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x_p = x.const_data_ptr<scalar_t>();
      const scalar_t* dt_p = dt.const_data_ptr<scalar_t>();
      const acc_t* go_p = grad_out.const_data_ptr<acc_t>();
      const acc_t* A_p = A.const_data_ptr<acc_t>();
      const acc_t* D_p = D.const_data_ptr<acc_t>();
      const acc_t* bias_p = bias.const_data_ptr<acc_t>();
      const acc_t* B_p = Bt.const_data_ptr<acc_t>();
      const acc_t* C_p = Ct.const_data_ptr<acc_t>();
      const acc_t* ckpt_p = ckpt.const_data_ptr<acc_t>();
      scalar_t* ddt_p = ddt.mutable_data_ptr<scalar_t>();
      acc_t* dB_p = dB_part.mutable_data_ptr<acc_t>();
      acc_t* dC_p = dC_part.mutable_data_ptr<acc_t>();
      acc_t* dA_p = dA_part.mutable_data_ptr<acc_t>();
      acc_t* dD_p = dD_part.mutable_data_ptr<acc_t>();
      acc_t* dbias_p = dbias_part.mutable_data_ptr<acc_t>();

      acc_t* dx_sum_p = dx_sum.mutable_data_ptr<acc_t>();
      // Task (b, split): channels [lo, hi) of every direction, directions outside so that the
      // direction's B, C rows and dB, dC partials stay in cache; the task owns its dx rows.
      at::parallel_for(0, s.batch * splits, 1, [&](int64_t begin, int64_t end) {
        Workspace<acc_t> ws(n, true);
        std::vector<acc_t> g(n);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / splits, split = task % splits;
          const int64_t lo = split * s.dim / splits, hi = (split + 1) * s.dim / splits;
          for (int k = 0; k < kDirections; ++k) {
            const int64_t bk = b * kDirections + k;
            const int64_t part = (b * splits + split) * kDirections + k;
            for (int64_t d = lo; d < hi; ++d) {
              const int64_t idx = b * s.dim + d;
              const int64_t kd = k * s.dim + d;
              const int64_t row_idx = bk * s.dim + d;
              const acc_t* go_row = go_p + idx * L;
              acc_t* dx_row = dx_sum_p + idx * L;
              const Row<scalar_t, acc_t> row{x_p + idx * L, dt_p + row_idx * L, A_p + kd * n,
                                             D_p[kd], bias_p[kd], B_p + bk * L * n,
                                             C_p + bk * L * n,
                                             const_cast<acc_t*>(ckpt_p) + row_idx * chunks * n};
              RowGrads<acc_t> grads{dB_p + part * L * n, dC_p + part * L * n, dA_p + row_idx * n};
              std::fill(g.begin(), g.end(), acc_t(0));
              scalar_t* ddt_row = ddt_p + row_idx * L;
              dispatch_state(n, [&](auto width) {
                scan_row_backward<decltype(width)::value>(
                    row, L, n, DirectionMap{index.data() + k * L}, dt_softplus,
                    /*needs_y=*/false, g.data(), grads, ws,
                    [&](int64_t, int64_t p, acc_t) { return go_row[p]; },
                    [&](int64_t, int64_t p, acc_t du_t, acc_t ddt_t) {
                      dx_row[p] += du_t;
                      ddt_row[p] = static_cast<scalar_t>(ddt_t);
                    });
              });
              dD_p[row_idx] = grads.dD;
              dbias_p[row_idx] = grads.dbias;
            }
          }
        }
      });
    });
    if (!dx_sum.is_same(dx)) dx.copy_(dx_sum);
  }
  auto dB = splits_to_spatial(dB_part, s.height, s.width, B_in.scalar_type());
  auto dC = splits_to_spatial(dC_part, s.height, s.width, C_in.scalar_type());
  return {dx, ddt, dA_part.sum(0), dB, dC, dD_part.sum(0), dbias_part.sum(0)};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CPU, m) {
  m.impl("selective_scan", &lesionkit::selective_scan_cpu);
  m.impl("selective_scan_backward", &lesionkit::selective_scan_backward_cpu);
  m.impl("selective_scan_2d", &lesionkit::selective_scan_2d_cpu);
  m.impl("selective_scan_2d_backward", &lesionkit::selective_scan_2d_backward_cpu);
}
