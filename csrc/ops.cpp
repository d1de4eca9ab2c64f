// Every schema of the `lesionkit` operator namespace lives here (one op, one schema).
// Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, each registering itself with a
// single TORCH_LIBRARY_IMPL block; fake (meta) and autograd registrations are in Python
// (lesionkit/kernels/<op>.py).

#include <torch/library.h>

#include <string>

#ifdef LESIONKIT_PYTHON_MODULE
#include <Python.h>

// `import lesionkit._C` loads this library, which runs the registrations below. The module
// itself is empty: every entry point is a torch operator, never a pybind symbol.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lesionkit compiled operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace lesionkit {
namespace {

// Build facts of this binary, reported by lesionkit.kernels.info().
std::string build_info() {
  std::string info = "cuda=";
#ifdef LESIONKIT_WITH_CUDA
  info += "1";
#else
  info += "0";
#endif
  info += ";openmp=";
#ifdef _OPENMP
  info += "1";
#else
  info += "0";
#endif
  info += ";simd=";
#if defined(__AVX512F__)
  info += "avx512";
#elif defined(__AVX2__)
  info += "avx2";
#elif defined(__ARM_NEON)
  info += "neon";
#else
  info += "generic";
#endif
  return info;
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY(lesionkit, m) {
  m.def("_build_info() -> str", &lesionkit::build_info);

  // SegMAE Eq. 5-8 (and the masked reconstruction loss of Eq. 12). Returns the per-image loss
  // (B,), the per-patch mean squared errors L' (B, N) and the softmax weights w (B, N); the
  // last two are saved for the backward. `detach_weights` only changes the backward; it is part
  // of the schema so the autograd registration sees it.
  m.def(
      "patchwise_softmax_loss(Tensor pred, Tensor target, int patch_size, float beta, "
      "Tensor? mask, bool detach_weights=False) -> (Tensor, Tensor, Tensor)");
  // Gradient with respect to `pred` (the gradient for `target` is its negative).
  m.def(
      "patchwise_softmax_loss_backward(Tensor grad_loss, Tensor pred, Tensor target, "
      "Tensor patch_loss, Tensor weights, Tensor? mask, int patch_size, float beta, "
      "bool detach_weights) -> Tensor");

  // Selective scan (Mamba S6, docs/ops.md): u, delta, z (b, d, l); A (d, n); B, C (b, g, n, l)
  // or (b, n, l); D, delta_bias (d,). Returns the output (u's dtype, or out_dtype = float32 for
  // 16-bit inputs), the last state (b, d, n) and the checkpoints (b, d, ceil(l / 512), n): the
  // state entering every 512-step chunk, from which the backward recomputes the states instead
  // of storing (b, d, l, n).
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, ScalarType? out_dtype=None) -> "
      "(Tensor, Tensor, Tensor)");
  // Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); dD, dz and ddelta_bias are empty
  // when D, z and delta_bias are None. grad_last_state is the gradient of the last state;
  // grad_out has the output's dtype (u's, or float32).
  m.def(
      "selective_scan_backward(Tensor grad_out, Tensor? grad_last_state, Tensor u, Tensor delta, "
      "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool delta_softplus, Tensor checkpoints) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  // The SS2D core fused: x (B, D, H, W), dt (B, 4, D, H, W), A (4, D, N), B and C
  // (B, 4, N, H, W), D and dt_bias (4, D), every direction read through its cross-scan index map
  // and the four outputs summed. Returns the output (x's dtype, or out_dtype = float32 for 16-bit
  // inputs) and checkpoints (B, 4, D, ceil(L / 512), N).
  m.def(
      "selective_scan_2d(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, "
      "Tensor dt_bias, bool dt_softplus, ScalarType? out_dtype=None) -> (Tensor, Tensor)");
  // Gradients (dx, ddt, dA, dB, dC, dD, ddt_bias).
  m.def(
      "selective_scan_2d_backward(Tensor grad_out, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
      "Tensor D, Tensor dt_bias, bool dt_softplus, Tensor checkpoints) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  // VMamba's cross-scan (B, C, H, W) -> (B, 4, C, H*W) (row-major, column-major, both reversed)
  // and its adjoint cross_merge (B, 4, C, H*W) -> (B, C, H, W); each is the other's backward.
  m.def("cross_scan(Tensor x) -> Tensor");
  m.def("cross_merge(Tensor y, int H, int W) -> Tensor");

  // Batched k-means (AMLP Sec. 3.1): B independent problems x (B, N, D), Lloyd iterations from
  // the given centroids init (B, k, D), each problem stopping once the summed squared shift of
  // its centroids is <= its tol (B,) or after `iters` updates; an empty cluster keeps its
  // centroid. init and tol are in x's accumulation dtype (double for double, else float); the
  // seeded initialisation and the relative tolerance are computed once in Python for every
  // backend. Returns labels (B, N) int64, centroids (B, k, D) and squared distances (B, N, k)
  // in the accumulation dtype, and the updates run n_iter (B,) int64.
  m.def("kmeans(Tensor x, Tensor init, Tensor tol, int iters) -> (Tensor, Tensor, Tensor, Tensor)");
  // Patch cross-attention (GRCSF Eq. 6): q, k (B, h, dk, H, W), v (B, h, dv, H, W); softmax
  // attention among the P*P positions of every non-overlapping P x P window, read and written
  // in the NCHW layout. Returns the output (B, h, dv, H, W) and the per-query log-sum-exp
  // (B, h, H, W) in float (double for double), from which the backward recomputes the softmax.
  m.def(
      "patch_cross_attention(Tensor q, Tensor k, Tensor v, int patch_size, float scale) -> "
      "(Tensor, Tensor)");
  // Gradients (dq, dk, dv).
  m.def(
      "patch_cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int patch_size, float scale) -> (Tensor, Tensor, Tensor)");
  // M key sets over one q and v (GRCSF Eq. 6 with both residual maps): k (M, B, h, dk, H, W),
  // weights (M,) in the accumulation dtype; out = sum_m weights[m] softmax(scale q k[m]^T) v per
  // window, (B, h, dv, H, W), and the log-sum-exp of every map (M, B, h, H, W).
  m.def(
      "patch_cross_attention_mix(Tensor q, Tensor k, Tensor v, Tensor weights, int patch_size, "
      "float scale) -> (Tensor, Tensor)");
  // Gradients (dq, dk, dv, dweights).
  m.def(
      "patch_cross_attention_mix_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor weights, Tensor lse, int patch_size, float scale) -> (Tensor, Tensor, Tensor, Tensor)");

  // GRCSF's global compensation (Eq. 1-2) after its squeeze-excitations, per pixel: with
  // a = re_up * up * up_scale and b = skip * skip_scale (re_up, up, skip (B, C, H, W), the
  // scales (B, C) broadcast over H, W), R = sum_c a b / max(|a| |b|, eps) and
  // out = R * skip + skip. Returns out (skip's dtype and layout) and R (B, 1, H, W) in float
  // (double for double); the backward recomputes a, b and the norms.
  m.def(
      "gcu_compensate(Tensor re_up, Tensor up, Tensor up_scale, Tensor skip, Tensor skip_scale, "
      "float eps) -> (Tensor, Tensor)");
  // Gradients (d re_up, d up, d up_scale, d skip, d skip_scale); grad_residual may be absent.
  m.def(
      "gcu_compensate_backward(Tensor grad_out, Tensor? grad_residual, Tensor re_up, Tensor up, "
      "Tensor up_scale, Tensor skip, Tensor skip_scale, float eps) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");

  // LayerNorm over the last dimension with float statistics (double for double): x (..., C) in
  // any floating dtype, weight and bias (C,) in the accumulation dtype. Returns the output in
  // out_dtype and the per-row mean and 1 / sqrt(var + eps) (x.shape[:-1], accumulation dtype).
  m.def(
      "layer_norm_last(Tensor x, Tensor weight, Tensor bias, float eps, ScalarType out_dtype) -> "
      "(Tensor, Tensor, Tensor)");
  // Gradients (dx in x's dtype, dweight, dbias).
  m.def(
      "layer_norm_last_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");
}
