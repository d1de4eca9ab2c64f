// Input checks shared by the CPU and CUDA kernels of lesionkit::patchwise_softmax_loss, so a
// direct torch.ops call gets the same messages as the Python wrapper.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace lesionkit {

struct PatchGrid {
  int64_t batch, channels, height, width, patch, rows, cols;
  int64_t patches() const { return rows * cols; }
};

inline PatchGrid check_patchwise_inputs(
    const at::Tensor& pred, const at::Tensor& target, int64_t patch_size, double beta,
    const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(pred.dim() == 4, "pred should be a (B, C, H, W) tensor, got ", pred.dim(), "D");
  TORCH_CHECK(pred.sizes() == target.sizes(), "pred and target should have the same shape, got ",
              pred.sizes(), " and ", target.sizes());
  TORCH_CHECK(pred.device() == target.device(), "pred and target should be on the same device, got ",
              pred.device(), " and ", target.device());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(),
              "pred and target should have the same dtype, got ", pred.scalar_type(), " and ",
              target.scalar_type());
  TORCH_CHECK(at::isFloatingType(pred.scalar_type()), "pred should be a floating tensor, got ",
              pred.scalar_type());
  TORCH_CHECK(patch_size > 0, "patch_size should be positive, got ", patch_size);
  TORCH_CHECK(beta > 0, "beta should be > 0, got ", beta);
  PatchGrid g{pred.size(0), pred.size(1), pred.size(2), pred.size(3), patch_size, 0, 0};
  TORCH_CHECK(g.height % patch_size == 0 && g.width % patch_size == 0,
              "H and W should be divisible by patch_size=", patch_size, ", got H=", g.height,
              ", W=", g.width);
  TORCH_CHECK(g.height > 0 && g.width > 0, "pred should have H, W > 0, got H=", g.height,
              ", W=", g.width);
  g.rows = g.height / patch_size;
  g.cols = g.width / patch_size;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "mask should be a bool tensor, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == g.batch && m.size(1) == g.patches(),
                "mask should have shape (B, N) = (", g.batch, ", ", g.patches(), "), got ",
                m.sizes());
    TORCH_CHECK(m.device() == pred.device(), "mask should be on pred's device ", pred.device(),
                ", got ", m.device());
  }
  return g;
}

// Accumulation (and saved patch-loss / weight) dtype: double for double, else float.
inline at::ScalarType patchwise_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_patchwise_backward_inputs(const PatchGrid& g, const at::Tensor& grad_loss,
                                            const at::Tensor& patch_loss,
                                            const at::Tensor& weights, at::ScalarType acc_type,
                                            const at::Device& device) {
  // A direct torch.ops call can mix devices; the kernel would read foreign pointers.
  TORCH_CHECK(grad_loss.device() == device && patch_loss.device() == device &&
                  weights.device() == device,
              "grad_loss, patch_loss and weights should be on pred's device ", device, ", got ",
              grad_loss.device(), ", ", patch_loss.device(), " and ", weights.device());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == g.batch,
              "grad_loss should have shape (B,) = (", g.batch, "), got ", grad_loss.sizes());
  for (const auto* t : {&patch_loss, &weights}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == g.batch && t->size(1) == g.patches() &&
                    t->scalar_type() == acc_type,
                "patch_loss and weights should be ", acc_type, " tensors of shape (", g.batch,
                ", ", g.patches(), "), got ", t->scalar_type(), " ", t->sizes());
  }
}

}  // namespace lesionkit
