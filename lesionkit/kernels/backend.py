"""Backend choice for lesionkit's operators.

Every op has a pure-PyTorch ``reference`` and may have compiled ``cpu`` / ``cuda`` kernels
(``lesionkit._C``) and a ``triton`` kernel. ``LESIONKIT_BACKEND`` (default ``auto``) or the
:func:`use_backend` context manager picks one; ``auto`` takes the best available for the
tensors' device. A backend asked for by name that cannot run raises
:class:`BackendUnavailableError` saying why and how to get it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from lesionkit.kernels import _library

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "LESIONKIT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the op here."""


@dataclass(frozen=True)
class OpSpec:
    """Which backends an op implements and the order ``auto`` tries on a GPU."""

    name: str
    cpu: bool = True
    cuda: bool = True
    triton: bool = True
    auto_gpu_order: tuple[str, ...] = ("cuda", "triton", "reference")


_OPS: dict[str, OpSpec] = {}
# A stack rather than a ContextVar: torch.compile traces reads of module globals (and guards
# on them), so the chosen backend is baked into the compiled graph correctly.
_forced: list[str] = []
# Chunk sizes of the active export_mode blocks (innermost last); empty outside export_mode.
_export_chunks: list[int] = []
_warned_fallback = False


def register_op(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    return dict(_OPS)


def _validate(name: str, source: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{source} should be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run lesionkit ops inside the block on backend `name` (or ``auto``)."""
    _forced.append(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


@contextlib.contextmanager
def export_mode(chunk_size: int | None = None) -> Iterator[None]:
    """Run lesionkit ops inside the block as plain tensor ops that export to ONNX.

    Every op takes its pure-PyTorch reference, except ``selective_scan`` and ``selective_scan_2d``,
    which take the two-level chunked scan of
    :mod:`lesionkit.kernels.reference.export_scan` with `chunk_size` steps per chunk (default
    :data:`~lesionkit.kernels.reference.export_scan.DEFAULT_CHUNK`): a graph without a loop over
    the sequence length. ``lesionkit export --format onnx`` traces the model inside this block.
    """
    from lesionkit.kernels.reference.export_scan import DEFAULT_CHUNK, check_chunk_size

    _export_chunks.append(DEFAULT_CHUNK if chunk_size is None else check_chunk_size(chunk_size))
    _forced.append("reference")
    try:
        yield
    finally:
        _forced.pop()
        _export_chunks.pop()


def export_chunk_size() -> int | None:
    """The scan chunk size of the innermost :func:`export_mode` block, or None outside one."""
    return _export_chunks[-1] if _export_chunks else None


def requested_backend() -> str:
    """The backend asked for: innermost :func:`use_backend`, else ``LESIONKIT_BACKEND``."""
    if _forced:
        return _forced[-1]
    return _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


# Looked up once at import: torch.compile cannot trace importlib (a graph break, an error under
# fullgraph=True), and every op's backend choice asks this.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compiled_reason(op: str, backend: str, implemented: bool, device: torch.device) -> str | None:
    """Why the compiled `backend` ("cpu" or "cuda") cannot run `op` on `device`, or None."""
    if not implemented:
        return f"{op} has no {backend} kernel"
    if device.type != backend:
        return f"the {backend} backend runs on {backend.upper()} tensors, got tensors on {device}"
    rebuild = _library.REBUILD_COMMAND if backend == "cpu" else _library.CUDA_REBUILD_COMMAND
    if not _library.HAS_OPS:
        return (f"the compiled library lesionkit._C is not loaded ({_library.LOAD_ERROR}); "
                f"build it with `{rebuild}`")
    if not _library.has_kernel(op, backend.upper()):
        if backend == "cuda":
            return ("lesionkit._C was built without CUDA kernels; rebuild on a machine with the "
                    f"CUDA toolkit: `{rebuild}`")
        return f"lesionkit._C has no CPU kernel for {op}; rebuild with `{rebuild}`"
    return None


def unavailable_reason(op: str, backend: str, device: torch.device | str) -> str | None:
    """Why `backend` cannot run `op` on `device`, or None when it can."""
    spec = _OPS[op]
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        return _compiled_reason(op, backend, getattr(spec, backend), device)
    if backend == "triton":
        if not spec.triton:
            return f"{op} has no triton kernel"
        if not triton_installed():
            return "triton is not installed (`pip install triton`)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"the triton backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
                f"got tensors on {device}")
    raise ValueError(f"backend should be one of {', '.join(BACKENDS)}; got {backend!r}")


def select_backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device` under the current request."""
    requested = requested_backend()
    if requested != "auto":
        reason = unavailable_reason(op, requested, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run {op}: {reason}")
        return requested
    order = ("cpu", "reference") if device.type == "cpu" else _OPS[op].auto_gpu_order
    for candidate in order:
        if unavailable_reason(op, candidate, device) is None:
            if candidate == "reference" and order[0] != "reference":
                _warn_fallback(op, unavailable_reason(op, order[0], device))
            return candidate
    return "reference"


def _warn_fallback(op: str, reason: str | None) -> None:
    global _warned_fallback
    if _warned_fallback or torch.compiler.is_compiling():
        return
    _warned_fallback = True
    warnings.warn(
        f"lesionkit: running the pure-PyTorch reference for {op} (and any other op without a "
        f"kernel here) because {reason}. Set {ENV_VAR}=reference to silence this.",
        RuntimeWarning, stacklevel=3,
    )


def lazy_triton_module(name: str, register: Callable[[ModuleType], None]) -> Callable[[], ModuleType]:
    """A loader of ``lesionkit.kernels.triton.<name>``: imported on first call (importing triton is
    slow), with ``register(module)`` (the Triton ops' autograd) run once, before first use."""

    loaded: list[ModuleType] = []  # a plain container: torch.compile reads it as a constant

    @torch.compiler.disable  # the first load (an import) cannot be traced: a graph break there
    def first_load() -> ModuleType:
        if not loaded:
            module = importlib.import_module(f"lesionkit.kernels.triton.{name}")
            register(module)
            loaded.append(module)
        return loaded[0]

    def load() -> ModuleType:
        # Once loaded, torch.compile (fullgraph too) traces through this without importlib.
        return loaded[0] if loaded else first_load()

    return load

