"""CI cannot pass with the compiled library missing.

Without ``lesionkit._C`` every compiled-backend test case is simply not generated (the backend
is unavailable), so a broken build would leave a green suite. ``LESIONKIT_REQUIRE_OPS=1`` (set by
``.ci/run``) turns that into a failure that prints why the library did not load.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesionkit.kernels import _library
from lesionkit.kernels.backend import registered_ops

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("LESIONKIT_REQUIRE_OPS", "0") == "1"


@pytest.mark.skipif(not REQUIRED, reason="LESIONKIT_REQUIRE_OPS is not 1")
def test_compiled_library_loaded():
    assert _library.HAS_OPS, f"LESIONKIT_REQUIRE_OPS=1 but lesionkit._C did not load: {_library.LOAD_ERROR}"
    missing = [name for name, spec in registered_ops().items() if spec.cpu and not _library.has_kernel(name, "CPU")]
    assert not missing, f"lesionkit._C loaded without CPU kernels for {missing}"
    if torch.cuda.is_available() and _library.build_facts().get("cuda") == "1":
        missing = [name for name, spec in registered_ops().items()
                   if spec.cuda and not _library.has_kernel(name, "CUDA")]
        assert not missing, f"lesionkit._C was built with CUDA but has no CUDA kernels for {missing}"


def test_requirement_fails_and_prints_the_load_error_when_the_library_is_missing(tmp_path):
    # A None entry in sys.modules makes `from lesionkit import _C` raise ImportError, as a
    # missing or broken build does; the check above must then fail, naming the error.
    code = ("import sys; sys.modules['lesionkit._C'] = None; import test_required_ops as t\n"
            "try:\n    t.test_compiled_library_loaded()\nexcept AssertionError as e:\n    print('FAILED:', e)")
    env = {**os.environ, "LESIONKIT_REQUIRE_OPS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FAILED: LESIONKIT_REQUIRE_OPS=1 but lesionkit._C did not load: ModuleNotFoundError" in run.stdout, (
        run.stdout[-3000:])
