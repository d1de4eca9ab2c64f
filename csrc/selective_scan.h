// Shapes, constants and input checks shared by the CPU and CUDA kernels of
// lesionkit::selective_scan and selective_scan_2d (docs/ops.md), so that a direct torch.ops
// call gets the same messages as the Python wrapper.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "cross_scan.h"

namespace lesionkit {

// The forward saves the state entering every chunk of this many steps; the backward walks the
// chunks in reverse and recomputes the states inside one chunk from its checkpoint, so no
// (b, d, l, n) tensor is ever stored. Equal to the CUDA block's 128 threads x 4 steps.
constexpr int64_t kScanChunk = 512;
constexpr int64_t kScanMaxState = 256;

inline int64_t scan_chunks(int64_t length) { return (length + kScanChunk - 1) / kScanChunk; }

struct ScanShape {
  int64_t batch, dim, length, state, groups;
};

inline at::ScalarType scan_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The output dtype: the input's, or (out_dtype = float32 for 16-bit inputs) the accumulation
// dtype, so that a bfloat16 / float16 scan can hand float32 results to the next layer unrounded.
inline at::ScalarType scan_out_type(at::ScalarType in, std::optional<at::ScalarType> out_dtype) {
  if (!out_dtype.has_value()) return in;
  TORCH_CHECK(*out_dtype == in || *out_dtype == scan_acc_type(in), "out_dtype should be None, ",
              in, " (the input dtype) or ", scan_acc_type(in), ", got ", *out_dtype);
  return *out_dtype;
}

// grad_out of a backward: the output's dtype, so the input's or the accumulation dtype.
inline void check_grad_out_type(const at::Tensor& grad_out, at::ScalarType in) {
  TORCH_CHECK(grad_out.scalar_type() == in || grad_out.scalar_type() == scan_acc_type(in),
              "grad_out should be ", in, " or ", scan_acc_type(in), " (the output dtype), got ",
              grad_out.scalar_type());
}

inline ScanShape check_selective_scan_inputs(const at::Tensor& u, const at::Tensor& delta,
                                             const at::Tensor& A, const at::Tensor& B,
                                             const at::Tensor& C,
                                             const std::optional<at::Tensor>& D,
                                             const std::optional<at::Tensor>& z,
                                             const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.dim() == 3, "u should be a (b, d, l) tensor, got ", u.dim(), "D");
  TORCH_CHECK(at::isFloatingType(u.scalar_type()), "u should be a floating tensor, got ",
              u.scalar_type());
  ScanShape s{u.size(0), u.size(1), u.size(2), 0, 1};
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta should have u's shape ", u.sizes(), ", got ",
              delta.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == s.dim, "A should have shape (d, n) with d = ", s.dim,
              ", got ", A.sizes());
  s.state = A.size(1);
  TORCH_CHECK(s.state >= 1 && s.state <= kScanMaxState, "A's n (d_state) should be in [1, ",
              kScanMaxState, "], got ", s.state);
  for (const auto* t : {&B, &C}) {
    const char* name = t == &B ? "B" : "C";
    const bool ok3 = t->dim() == 3 && t->size(0) == s.batch && t->size(1) == s.state &&
                     t->size(2) == s.length;
    const bool ok4 = t->dim() == 4 && t->size(0) == s.batch && t->size(1) > 0 &&
                     t->size(2) == s.state && t->size(3) == s.length;
    TORCH_CHECK(ok3 || ok4, name, " should have shape (b, g, n, l) or (b, n, l) with b = ",
                s.batch, ", n = ", s.state, ", l = ", s.length, ", got ", t->sizes());
  }
  s.groups = B.dim() == 4 ? B.size(1) : 1;
  const int64_t c_groups = C.dim() == 4 ? C.size(1) : 1;
  TORCH_CHECK(s.groups == c_groups, "B and C should have the same number of groups, got ",
              s.groups, " and ", c_groups);
  TORCH_CHECK(s.dim % s.groups == 0, "d should be divisible by the number of groups g, got d = ",
              s.dim, ", g = ", s.groups);
  const auto acc = scan_acc_type(u.scalar_type());
  for (const auto* t : {&delta, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "delta, B and C should have u's dtype ",
                u.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == u.device(), "delta, A, B, C, D, z and delta_bias should be on u's device ",
                u.device(), ", got ", t->device());
  }
  TORCH_CHECK(A.scalar_type() == acc, "A should be ", acc, " for ", u.scalar_type(),
              " inputs, got ", A.scalar_type());
  TORCH_CHECK(A.device() == u.device(), "A should be on u's device ", u.device(), ", got ",
              A.device());
  for (const auto* opt : {&D, &delta_bias}) {
    if (!opt->has_value()) continue;
    const char* name = opt == &D ? "D" : "delta_bias";
    const auto& t = **opt;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == s.dim, name, " should have shape (d,) = (", s.dim,
                ",), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == acc, name, " should be ", acc, " for ", u.scalar_type(),
                " inputs, got ", t.scalar_type());
    TORCH_CHECK(t.device() == u.device(), name, " should be on u's device ", u.device(), ", got ",
                t.device());
  }
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes(), "z should have u's shape ", u.sizes(), ", got ",
                z->sizes());
    TORCH_CHECK(z->scalar_type() == u.scalar_type(), "z should have u's dtype ", u.scalar_type(),
                ", got ", z->scalar_type());
    TORCH_CHECK(z->device() == u.device(), "z should be on u's device ", u.device(), ", got ",
                z->device());
  }
  return s;
}

inline void check_checkpoints(const at::Tensor& checkpoints, at::IntArrayRef leading,
                              int64_t length, int64_t state, at::ScalarType acc) {
  std::vector<int64_t> want(leading.begin(), leading.end());
  want.push_back(scan_chunks(length));
  want.push_back(state);
  TORCH_CHECK(checkpoints.sizes() == at::IntArrayRef(want) && checkpoints.scalar_type() == acc,
              "checkpoints should be a ", acc, " tensor of shape ", at::IntArrayRef(want),
              " (from the forward), got ", checkpoints.scalar_type(), " ", checkpoints.sizes());
}

// A direct torch.ops call of a backward can pass its extra tensors (grad_out, grad_last_state,
// checkpoints) on another device than the inputs; a kernel would then read foreign pointers.
inline void check_on_device(
    const at::Device& device, const char* owner,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    if (t != nullptr && t->defined()) {
      TORCH_CHECK(t->device() == device, name, " should be on ", owner, "'s device ", device,
                  ", got ", t->device());
    }
  }
}

struct Scan2dShape {
  int64_t batch, dim, height, width, state;
  int64_t length() const { return height * width; }
};

inline Scan2dShape check_selective_scan_2d_inputs(const at::Tensor& x, const at::Tensor& dt,
                                                  const at::Tensor& A, const at::Tensor& B,
                                                  const at::Tensor& C, const at::Tensor& D,
                                                  const at::Tensor& dt_bias) {
  TORCH_CHECK(x.dim() == 4, "x should be a (B, D, H, W) tensor, got ", x.dim(), "D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x should be a floating tensor, got ",
              x.scalar_type());
  Scan2dShape s{x.size(0), x.size(1), x.size(2), x.size(3), 0};
  TORCH_CHECK(A.dim() == 3 && A.size(0) == kDirections && A.size(1) == s.dim,
              "A should have shape (4, D, N) with D = ", s.dim, ", got ", A.sizes());
  s.state = A.size(2);
  TORCH_CHECK(s.state >= 1 && s.state <= kScanMaxState, "A's N (d_state) should be in [1, ",
              kScanMaxState, "], got ", s.state);
  const std::vector<int64_t> dt_shape{s.batch, kDirections, s.dim, s.height, s.width};
  const std::vector<int64_t> bc_shape{s.batch, kDirections, s.state, s.height, s.width};
  const std::vector<int64_t> p_shape{kDirections, s.dim};
  TORCH_CHECK(dt.sizes() == at::IntArrayRef(dt_shape), "dt should have shape ",
              at::IntArrayRef(dt_shape), ", got ", dt.sizes());
  TORCH_CHECK(B.sizes() == at::IntArrayRef(bc_shape), "B should have shape ",
              at::IntArrayRef(bc_shape), ", got ", B.sizes());
  TORCH_CHECK(C.sizes() == at::IntArrayRef(bc_shape), "C should have shape ",
              at::IntArrayRef(bc_shape), ", got ", C.sizes());
  TORCH_CHECK(D.sizes() == at::IntArrayRef(p_shape), "D should have shape (4, D) = (4, ", s.dim,
              "), got ", D.sizes());
  TORCH_CHECK(dt_bias.sizes() == at::IntArrayRef(p_shape), "dt_bias should have shape (4, D) = (4, ",
              s.dim, "), got ", dt_bias.sizes());
  const auto acc = scan_acc_type(x.scalar_type());
  for (const auto* t : {&dt, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dt, B and C should have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  for (const auto* t : {&A, &D, &dt_bias}) {
    TORCH_CHECK(t->scalar_type() == acc, "A, D and dt_bias should be ", acc, " for ",
                x.scalar_type(), " inputs, got ", t->scalar_type());
  }
  for (const auto* t : {&dt, &A, &B, &C, &D, &dt_bias}) {
    TORCH_CHECK(t->device() == x.device(), "dt, A, B, C, D and dt_bias should be on x's device ",
                x.device(), ", got ", t->device());
  }
  return s;
}

}  // namespace lesionkit
