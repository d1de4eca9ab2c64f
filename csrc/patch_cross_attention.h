// Input checks shared by the CPU and CUDA kernels of lesionkit::patch_cross_attention, so a
// direct torch.ops call gets the same messages as the Python wrapper.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace lesionkit {

// q, k (B, h, dk, H, W), v (B, h, dv, H, W); windows are the non-overlapping P x P tiles,
// numbered row-major, and the P*P positions of a window are its tokens (also row-major).
struct WindowGrid {
  int64_t batch, heads, dk, dv, height, width, patch, rows, cols;
  int64_t windows() const { return rows * cols; }
  int64_t tokens() const { return patch * patch; }
};

inline WindowGrid check_patch_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, int64_t patch_size) {
  TORCH_CHECK(q.dim() == 5, "q should be a (B, h, dk, H, W) tensor, got ", q.dim(), "D");
  TORCH_CHECK(k.dim() == 5, "k should be a (B, h, dk, H, W) tensor, got ", k.dim(), "D");
  TORCH_CHECK(v.dim() == 5, "v should be a (B, h, dv, H, W) tensor, got ", v.dim(), "D");
  TORCH_CHECK(q.sizes() == k.sizes(), "q and k should have the same shape (B, h, dk, H, W), got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(3) == q.size(3) &&
                  v.size(4) == q.size(4),
              "v should match q in B, h, H, W (", q.size(0), ", ", q.size(1), ", ", q.size(3),
              ", ", q.size(4), "), got ", v.sizes());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "q, k and v should be on the same device, got ", q.device(), ", ", k.device(),
              " and ", v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k and v should have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q should be a floating tensor, got ",
              q.scalar_type());
  TORCH_CHECK(patch_size > 0, "patch_size should be positive, got ", patch_size);
  WindowGrid g{q.size(0), q.size(1), q.size(2), v.size(2), q.size(3), q.size(4), patch_size, 0, 0};
  TORCH_CHECK(g.height > 0 && g.width > 0 && g.height % patch_size == 0 &&
                  g.width % patch_size == 0,
              "H and W should be positive multiples of patch_size=", patch_size, ", got H=",
              g.height, ", W=", g.width);
  TORCH_CHECK(g.dk > 0 && g.dv > 0, "q and v should have at least one channel, got dk=", g.dk,
              ", dv=", g.dv);
  g.rows = g.height / patch_size;
  g.cols = g.width / patch_size;
  return g;
}

// Accumulation (and saved log-sum-exp) dtype: double for double, else float.
inline at::ScalarType patch_attention_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_patch_attention_backward_inputs(const WindowGrid& g, const at::Tensor& q,
                                                  const at::Tensor& grad_out,
                                                  const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{g.batch, g.heads, g.dv, g.height, g.width};
  for (const auto* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape) && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device(),
                "grad_out and out should be ", q.scalar_type(), " tensors of shape ",
                at::IntArrayRef(out_shape), " on ", q.device(), ", got ", t->scalar_type(), " ",
                t->sizes(), " on ", t->device());
  }
  const auto acc = patch_attention_acc_type(q.scalar_type());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == g.batch && lse.size(1) == g.heads &&
                  lse.size(2) == g.height && lse.size(3) == g.width &&
                  lse.scalar_type() == acc && lse.device() == q.device(),
              "lse should be a ", acc, " tensor of shape (", g.batch, ", ", g.heads, ", ",
              g.height, ", ", g.width, ") on ", q.device(), ", got ", lse.scalar_type(), " ",
              lse.sizes(), " on ", lse.device());
}

}  // namespace lesionkit
