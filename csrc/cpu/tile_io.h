// Helpers shared by the CPU kernels that work on tiles of contiguous rows in the
// accumulation dtype (gcu_compensate.cpp, layer_norm.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lesionkit {

// Tile loads and stores in the accumulation dtype. bfloat16 is converted with integer ops the
// compiler vectorises (c10's scalar conversion does not vectorise here).
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const auto* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      dst[i] = f;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    auto* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &src[i], sizeof(bits));
      const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest, ties to even
      d[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN stays NaN
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Sums over the channels in kLanes independent partial sums, added up as a tree at the end: a
// plain reduction loop over C (16 at the top stage) left the compiler adding the vector's lanes
// one after the other from the stack, which cost more than everything else in the kernel.
constexpr int64_t kLanes = 16;

template <typename acc_t>
inline acc_t lane_total(acc_t* v) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) v[l] += v[l + width];
  }
  return v[0];
}

}  // namespace lesionkit
