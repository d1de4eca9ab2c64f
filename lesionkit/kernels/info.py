"""What was built and what each op runs on: ``lesionkit.kernels.info()``."""

from __future__ import annotations

import torch

from lesionkit.kernels import _library
from lesionkit.kernels.backend import (
    BACKENDS,
    registered_ops,
    requested_backend,
    triton_installed,
    unavailable_reason,
)


def _triton_version() -> str | None:
    if not triton_installed():
        return None
    import triton

    return triton.__version__


def info() -> dict:
    """``{op_name: {backend: available}}`` for every op, plus ``"build"`` facts.

    A backend counts as available when it can run here now: compiled and, for GPU backends,
    with a GPU present (Triton also under ``TRITON_INTERPRET=1``).
    """
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    table: dict = {}
    for name in sorted(registered_ops()):
        row = {}
        for backend in BACKENDS:
            device = gpu if backend in ("cuda", "triton") and gpu is not None else torch.device("cpu")
            row[backend] = unavailable_reason(name, backend, device) is None
        table[name] = row
    facts = _library.build_facts()
    table["build"] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "compiled_library": _library.HAS_OPS,
        "load_error": _library.LOAD_ERROR,
        "cuda_compiled": facts.get("cuda") == "1",
        "openmp": facts.get("openmp") == "1",
        "simd": facts.get("simd"),
        "triton": _triton_version(),
        "gpu": torch.cuda.get_device_name() if gpu is not None else None,
        "requested_backend": requested_backend(),
    }
    return table


def format_info(table: dict | None = None) -> str:
    """Plain-text table of :func:`info`, as ``python -m lesionkit.kernels`` prints it."""
    table = info() if table is None else table
    ops = [name for name in table if name != "build"]
    width = max([len("op")] + [len(name) for name in ops])
    lines = ["  ".join(["op".ljust(width)] + [b.ljust(9) for b in BACKENDS])]
    for name in ops:
        cells = ["yes" if table[name][b] else "-" for b in BACKENDS]
        lines.append("  ".join([name.ljust(width)] + [c.ljust(9) for c in cells]))
    lines.append("")
    for key, value in table["build"].items():
        lines.append(f"{key:>18}: {value}")
    return "\n".join(lines)
