"""CMakeLists.txt builds the operator library that torch.ops.load_library can load."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


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
