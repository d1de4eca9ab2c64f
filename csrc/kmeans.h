// Input checks shared by the CPU and CUDA kernels of lesionkit::kmeans, so a direct torch.ops
// call gets the same messages as the Python wrapper.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lesionkit {

// Accumulation dtype of k-means (and of its centroid / distance outputs and inputs `init`,
// `tol`): double for double, float for float, half and bfloat16.
inline at::ScalarType kmeans_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct KMeansShape {
  int64_t batch, points, dim, clusters;
};

inline KMeansShape check_kmeans_inputs(const at::Tensor& x, const at::Tensor& init,
                                       const at::Tensor& tol, int64_t iters) {
  TORCH_CHECK(x.dim() == 3, "x should be a (B, N, D) tensor, got ", x.dim(), "D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x should be a floating tensor, got ",
              x.scalar_type());
  const KMeansShape s{x.size(0), x.size(1), x.size(2), init.dim() == 3 ? init.size(1) : 0};
  TORCH_CHECK(s.batch == 0 || (s.points > 0 && s.dim > 0),
              "x should have N >= 1 points of D >= 1 features per problem, got ", x.sizes());
  const auto acc = kmeans_acc_type(x.scalar_type());
  TORCH_CHECK(init.dim() == 3 && init.size(0) == s.batch && init.size(1) >= 1 &&
                  init.size(2) == s.dim,
              "init should be a (B, k, D) tensor with B = ", s.batch, ", k >= 1, D = ", s.dim,
              ", got ", init.sizes());
  TORCH_CHECK(init.scalar_type() == acc, "init should be ", acc, " for x of ", x.scalar_type(),
              ", got ", init.scalar_type());
  TORCH_CHECK(tol.dim() == 1 && tol.size(0) == s.batch && tol.scalar_type() == acc,
              "tol should be a (B,) = (", s.batch, ") ", acc, " tensor, got ", tol.scalar_type(),
              " ", tol.sizes());
  TORCH_CHECK(init.device() == x.device() && tol.device() == x.device(),
              "init and tol should be on x's device ", x.device(), ", got ", init.device(),
              " and ", tol.device());
  TORCH_CHECK(iters >= 0, "iters should be >= 0, got ", iters);
  return s;
}

}  // namespace lesionkit
