"""Shared test set-up.

Triton kernels run on the CPU under the Triton interpreter when no GPU is present; the
variable must be set before any Triton kernel is defined, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lesionkit.kernels.backend import unavailable_reason  # noqa: E402


def kernel_backends(op: str) -> list[tuple[str, torch.device]]:
    """(backend, device) pairs with a kernel that can run `op` here, reference excluded."""
    pairs = []
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda"), ("triton", "cpu")):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if backend == "triton" and device == "cpu" and torch.cuda.is_available():
            continue  # on a GPU machine Triton is tested on the GPU
        if unavailable_reason(op, backend, torch.device(device)) is None:
            pairs.append((backend, torch.device(device)))
    return pairs


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_state(a, b, where: str = "state") -> None:
    """Checkpoint contents equal, recursively: tensors bit for bit (dtype too), NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, (where, a, b)
    else:
        assert a == b, (where, a, b)


def recipe_without(name: str, *keys: str) -> dict:
    """The shipped recipe ``name`` as a plain dict without ``keys`` (and its out_dir): what a
    method's recipe must share with its baseline's."""
    from pathlib import Path

    from lesionkit.engine.registry import load_train_config

    data = load_train_config(Path(__file__).resolve().parents[1] / "lesionkit" / "configs" / f"{name}.yaml").to_dict()
    for key in (*keys, "out_dir"):
        data.pop(key, None)
    return data


def build_meta(name: str, **kwargs) -> torch.nn.Module:
    """A registered model on the meta device: full-size models get their shapes checked at no memory or init cost."""
    from lesionkit.models import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


# Every test runs with LESIONKIT_TEST_THREADS torch threads (1 unless set), restored afterwards,
# so a module's speed does not depend on which module ran before it. `.ci/run` runs the kernel
# tests a second time with 2 so that the parallel paths (at::parallel_for splits) stay tested.
TEST_THREADS = int(os.environ.get("LESIONKIT_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _test_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for the test: two on a shared 2-core machine oversubscribe and run 10-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backend_params(op: str) -> list:
    """pytest params of :func:`kernel_backends`, one id per backend."""
    return [pytest.param(b, d, id=f"{b}-{d.type}") for b, d in kernel_backends(op)]
