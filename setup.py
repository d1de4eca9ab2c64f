"""Build lesionkit and its compiled operator library `lesionkit._C`.

CPU sources (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu)
are added when torch is a CUDA build and nvcc is found (CUDA_HOME), or when
LESIONKIT_FORCE_CUDA=1; LESIONKIT_SKIP_CUDA=1 leaves them out. TORCH_CUDA_ARCH_LIST picks the
GPU architectures. LESIONKIT_CPU_NATIVE=0 builds portable CPU code instead of -march=native.
LESIONKIT_NO_EXTENSION=1 builds the pure-Python package without `lesionkit._C` (every op then runs
on its PyTorch reference; the packaging test uses it to build a wheel in seconds).
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_path(cuda_home):
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run(
            [cxx, flag, "-x", "c++", "-E", "-", "-o", os.devnull],
            input=b"", capture_output=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# With -march=native, GCC also tunes for the build machine (-mtune=native). GCC 12.2's tunings
# for Ice Lake / Sapphire Rapids Xeons (icelake-server, sapphirerapids) miscompile
# selective_scan_2d_cpu: a cmov reads the flags of an unrelated add, so the accumulation dtype of
# a float64 scan comes out float32 ("expected scalar type Double but found Float"). The
# instruction set stays native; the scheduling is the portable one. tests/test_cpu_build_targets.py
# builds the CPU kernels with these flags for several CPU targets and checks their results.
CPU_ARCH_FLAGS = ["-march=native", "-mtune=generic"]


def build_extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "ops.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [os.path.relpath(p, ROOT)
                    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]

    nvcc = _nvcc_path(CUDA_HOME)
    if _flag("LESIONKIT_SKIP_CUDA"):
        with_cuda, why = False, "skipped by LESIONKIT_SKIP_CUDA=1"
    elif _flag("LESIONKIT_FORCE_CUDA"):
        with_cuda, why = True, "forced by LESIONKIT_FORCE_CUDA=1"
    elif torch.version.cuda is None:
        with_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    elif nvcc is None:
        with_cuda, why = False, "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    else:
        with_cuda, why = True, f"torch CUDA {torch.version.cuda} and nvcc at {nvcc}"

    cxx_flags = ["-O3", "-fopenmp", "-DLESIONKIT_PYTHON_MODULE"]
    native = os.environ.get("LESIONKIT_CPU_NATIVE", "1") != "0" and all(
        _compiler_accepts(flag) for flag in CPU_ARCH_FLAGS)
    if native:
        cxx_flags += CPU_ARCH_FLAGS
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "-DLESIONKIT_PYTHON_MODULE"]
    if with_cuda:
        cxx_flags.append("-DLESIONKIT_WITH_CUDA")
        nvcc_flags.append("-DLESIONKIT_WITH_CUDA")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for the data-centre GPUs lesionkit targets instead of every
            # architecture the toolkit knows (which multiplies the build time).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    print("lesionkit build configuration:")
    print(f"  torch           {torch.__version__}")
    print(f"  CPU sources     {len(sources)} ({' '.join(CPU_ARCH_FLAGS) if native else 'portable'}, OpenMP)")
    print(f"  CUDA            {'yes' if with_cuda else 'no'}: {why}")
    if with_cuda:
        print(f"  CUDA_HOME       {CUDA_HOME}")
        print(f"  CUDA sources    {len(cuda_sources)}")
        print(f"  arch list       {os.environ.get('TORCH_CUDA_ARCH_LIST')}")

    if with_cuda:
        ext = CUDAExtension(
            "lesionkit._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "lesionkit._C", sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = ([], {}) if _flag("LESIONKIT_NO_EXTENSION") else build_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
