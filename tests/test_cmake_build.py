"""CMakeLists.txt builds the operator library that torch.ops.load_library can load."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# setup.py's nvcc flags that CMakeLists.txt leaves out on purpose: the Python-module switch, and
# LESIONKIT_WITH_CUDA, which it sets with target_compile_definitions for every language.
SETUP_ONLY = {"-DLESIONKIT_PYTHON_MODULE", "-DLESIONKIT_WITH_CUDA"}


def _setup_nvcc_flags() -> list[str]:
    """The `nvcc_flags = [...]` list literal of setup.py."""
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "nvcc_flags" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no nvcc_flags list")


def _cmake_nvcc_flags() -> list[str]:
    text = (REPO / "CMakeLists.txt").read_text()
    match = re.search(r"set\(LESIONKIT_NVCC_FLAGS\s(.*?)\)", text, re.S)
    assert match, "CMakeLists.txt has no LESIONKIT_NVCC_FLAGS list"
    assert '"$<$<COMPILE_LANGUAGE:CUDA>:${LESIONKIT_NVCC_FLAGS}>"' in text, "LESIONKIT_NVCC_FLAGS is not applied to CUDA"
    return match.group(1).split()


def test_cmake_nvcc_flags_match_setup_py():
    # setup.py's build gets torch's extension defaults (COMMON_NVCC_FLAGS: --expt-relaxed-constexpr,
    # needed by std::numeric_limits<acc_t>::infinity() in device code, and the half switches)
    # plus its own list; the CMake build must pass the same.
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    want = (set(COMMON_NVCC_FLAGS) | set(_setup_nvcc_flags())) - SETUP_ONLY
    got = set(_cmake_nvcc_flags())
    assert "--expt-relaxed-constexpr" in got
    assert want <= got, f"CMakeLists.txt lacks {sorted(want - got)}"
    assert got <= want, f"CMakeLists.txt has nvcc flags setup.py does not use: {sorted(got - want)}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_cuda_configure_passes_the_nvcc_flags(tmp_path):
    # Configure only (compiling the CUDA sources takes minutes): every .cu file's compile
    # command carries the flags. Skips without nvcc.
    import torch.utils
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    roots = [Path(r) for r in roots if r and list(Path(r).glob("lib*/libcudart.so*")) and (Path(r) / "bin" / "nvcc").exists()]
    if torch.version.cuda is None or not roots:
        pytest.skip("needs a CUDA build of torch and the CUDA toolkit (CUDA_HOME)")
    nvcc = roots[0] / "bin" / "nvcc"
    result = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path), "-DLESIONKIT_WITH_CUDA=ON",
                             f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                             f"-DCUDA_TOOLKIT_ROOT_DIR={nvcc.parents[1]}", "-DCMAKE_CUDA_ARCHITECTURES=90",
                             "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = [c for c in json.loads((tmp_path / "compile_commands.json").read_text()) if c["file"].endswith(".cu")]
    assert len(commands) == len(list((REPO / "csrc" / "cuda").glob("*.cu")))
    for command in commands:
        for flag in ("--expt-relaxed-constexpr", "-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__"):
            assert flag in command["command"].split(), (command["file"], flag)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_library_registers_the_ops(tmp_path):
    import torch.utils
    from torch.utils.cpp_extension import CUDA_HOME

    configure = ["cmake", "-S", str(REPO), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:
        # A CUDA build of torch has CMake look for the toolkit (headers, libcudart) even for a
        # CPU-only library.
        roots = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
        roots = [r for r in roots if r and list(Path(r).glob("lib*/libcudart.so*"))]
        if not roots:
            pytest.skip("torch is a CUDA build, whose CMake config needs the CUDA toolkit (CUDA_HOME)")
        configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={roots[0]}")
    for cmd in (configure, ["cmake", "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    library = tmp_path / "liblesionkit_ops.so"
    assert library.exists()
    # A fresh interpreter: lesionkit._C would already own the `lesionkit` namespace here.
    check = f"""
import torch
torch.ops.load_library({str(library)!r})
pred = torch.arange(32.0).reshape(1, 2, 4, 4) / 32
loss, patch_loss, weights = torch.ops.lesionkit.patchwise_softmax_loss(pred, torch.zeros_like(pred), 2, 1.0, None)
want = (pred ** 2).reshape(1, 2, 2, 2, 2, 2).mean(dim=(1, 3, 5)).reshape(1, -1)
assert torch.allclose(patch_loss, want), (patch_loss, want)
assert torch.allclose(weights.sum(), torch.tensor(1.0))
print("ok", torch.ops.lesionkit._build_info())
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok cuda=0")
