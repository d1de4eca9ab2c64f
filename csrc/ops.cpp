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
}
