"""Backend choice, availability errors and info() of lesionkit.kernels."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library, backend

REPO = Path(__file__).resolve().parents[1]


def test_use_backend_nests_and_restores():
    assert K.requested_backend() == "auto"
    with K.use_backend("reference"):
        assert K.requested_backend() == "reference"
        with K.use_backend("auto"):
            assert K.requested_backend() == "auto"
        assert K.requested_backend() == "reference"
    assert K.requested_backend() == "auto"


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use_backend.*'tpu'"):
        with K.use_backend("tpu"):
            pass
    monkeypatch.setenv("LESIONKIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LESIONKIT_BACKEND should be one of.*'fastest'"):
        K.select_backend("patchwise_softmax_loss", torch.device("cpu"))


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv("LESIONKIT_BACKEND", "reference")
    assert K.select_backend("patchwise_softmax_loss", torch.device("cpu")) == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_requested_gpu_backend_on_cpu_tensors_says_why():
    with K.use_backend("cuda"), pytest.raises(K.BackendUnavailableError, match="runs on CUDA tensors"):
        K.patchwise_softmax_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 4, 1.0)


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend.unavailable_reason("patchwise_softmax_loss", "triton", torch.device("cpu"))
    if backend.triton_installed():
        assert "TRITON_INTERPRET=1" in reason
    else:
        assert "triton is not installed" in reason


def test_missing_library_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_library, "HAS_OPS", False)
    monkeypatch.setattr(_library, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert K.select_backend("patchwise_softmax_loss", torch.device("cpu")) == "reference"
        loss = K.patchwise_softmax_loss(torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 4, 1.0)
    assert len([w for w in caught if "pure-PyTorch reference" in str(w.message)]) == 1
    assert loss.item() == pytest.approx(1.0 / 4)
    with K.use_backend("cpu"), pytest.raises(K.BackendUnavailableError,
                                             match="simulated.*pip install --no-build-isolation -e ."):
        K.select_backend("patchwise_softmax_loss", torch.device("cpu"))


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built")
def test_auto_picks_the_compiled_kernel_on_cpu():
    assert K.select_backend("patchwise_softmax_loss", torch.device("cpu")) == "cpu"


def test_info_lists_every_op_and_build_facts():
    table = K.info()
    row = table["patchwise_softmax_loss"]
    assert set(row) == set(K.BACKENDS)
    assert row["reference"] is True
    assert row["cpu"] is _library.HAS_OPS
    assert row["cuda"] is (_library.HAS_OPS and torch.cuda.is_available()
                           and _library.has_kernel("patchwise_softmax_loss", "CUDA"))
    build = table["build"]
    assert build["torch"] == torch.__version__
    assert build["compiled_library"] is _library.HAS_OPS
    assert "patchwise_softmax_loss" in K.format_info(table)


def test_python_dash_m_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "lesionkit.kernels"], capture_output=True,
                         text=True, cwd=REPO, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)}).stdout
    assert "patchwise_softmax_loss" in out and "compiled_library" in out


def test_backend_choice_traces_under_torch_compile_fullgraph():
    # torch.compile cannot trace importlib (a graph break; an error under fullgraph=True), and
    # choosing a backend, loading a Triton op module included, runs inside a compiled graph.
    # The Triton ops themselves compile on a GPU only; this checks the Python around them.
    loads = []
    load = backend.lazy_triton_module("cross_scan", loads.append) if backend.triton_installed() else None
    if load is not None:
        load()

    def f(x):
        y = x + backend.triton_installed() + (backend.select_backend("cross_scan", x.device) == "cpu")
        if load is not None:
            y = y + len(load().__name__)
        return y

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    torch.testing.assert_close(got, f(torch.zeros(2)))
    assert len(loads) == (1 if load is not None else 0)  # registered once, not again when traced
