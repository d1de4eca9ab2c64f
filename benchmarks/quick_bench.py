"""A short timing of every op on every provider, for gpu_check.sh.

Providers per op: ``reference`` (eager PyTorch), ``compiled-reference`` (torch.compile of the
reference), and each kernel backend that runs on the device (``cuda``, ``triton``; ``cpu`` on a
CPU), plus ``compiled-<backend>`` (the kernel inside a torch.compile graph). Forward and
forward + backward medians (CUDA-synchronised), peak memory on a GPU. ``--size tiny`` gives
shapes small enough for a CPU dry run; ``gpu`` the VM-UNet / SegMAE training shapes.

    python benchmarks/quick_bench.py --size gpu --json results/<gpu>-gpu_check.json --markdown bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import lesionkit.kernels as K
from lesionkit.kernels.backend import unavailable_reason

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import machine_name  # noqa: E402

# (op, shape) per size. Patch-wise: (B, C, H, W, P) of SegMAE at 224; scans: VM-UNet stage 1
# (b, K*D, L, N, g) and its 2D form (B, D, H, W, N); cross-scan: (B, C, H, W).
SHAPES = {
    "gpu": {"patchwise_softmax_loss": (32, 3, 224, 224, 16), "selective_scan": (8, 768, 3136, 16, 4),
            "selective_scan_2d": (8, 192, 56, 56, 16), "cross_scan": (32, 192, 56, 56),
            "cross_merge": (32, 192, 56, 56)},
    "tiny": {"patchwise_softmax_loss": (2, 1, 16, 16, 8), "selective_scan": (1, 8, 64, 4, 2),
             "selective_scan_2d": (1, 4, 6, 6, 4), "cross_scan": (1, 4, 6, 6), "cross_merge": (1, 4, 6, 6)},
}


def make_inputs(op: str, shape: tuple, device: torch.device) -> tuple:
    """(function of the tensors, tensors that take a gradient, other arguments)."""
    g = torch.Generator().manual_seed(0)

    def rand(*s, scale=1.0, dtype=torch.float32):
        return (torch.rand(*s, generator=g) * scale).to(device, dtype)

    if op == "patchwise_softmax_loss":
        b, c, h, w, p = shape
        return (lambda pred, target: K.patchwise_softmax_loss(pred, target, p, 0.5)), (rand(b, c, h, w),), (rand(b, c, h, w),)
    if op == "selective_scan":
        b, d, length, n, groups = shape
        A = -rand(d, n, scale=0.5)
        return ((lambda u, delta, B, C: K.selective_scan(u, delta, A, B, C, delta_softplus=True)),
                (rand(b, d, length), rand(b, d, length, scale=0.5), rand(b, groups, n, length), rand(b, groups, n, length)), ())
    if op == "selective_scan_2d":
        b, d, h, w, n = shape
        A, D, bias = -rand(4, d, n, scale=0.5), rand(4, d), rand(4, d, scale=0.5)
        return ((lambda x, dt, B, C: K.selective_scan_2d(x, dt, A, B, C, D, bias)),
                (rand(b, d, h, w), rand(b, 4, d, h, w, scale=0.5), rand(b, 4, n, h, w), rand(b, 4, n, h, w)), ())
    if op == "cross_scan":
        b, c, h, w = shape
        return K.cross_scan, (rand(b, c, h, w),), ()
    if op == "cross_merge":
        b, c, h, w = shape
        return (lambda y: K.cross_merge(y, h, w)), (rand(b, 4, c, h * w),), ()
    raise ValueError(f"unknown op {op!r}")


def kernel_backends(op: str, device: torch.device) -> list[str]:
    out = []
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is for correctness, not speed
        if unavailable_reason(op, backend, device) is None:
            out.append(backend)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(op, shape, provider, device, reps, compile_backend):
    fn, grad_args, other = make_inputs(op, shape, device)
    backend = provider.removeprefix("compiled-")
    if provider.startswith("compiled-"):
        fn = torch.compile(fn, backend=compile_backend)
    grad_args = [a.requires_grad_() for a in grad_args]

    def forward():
        with torch.no_grad(), K.use_backend(backend):
            fn(*grad_args, *other)

    def full():
        with K.use_backend(backend):
            out = fn(*grad_args, *other)
        torch.autograd.grad(out.float().sum(), grad_args)

    t0 = time.perf_counter()
    full()
    forward()  # warm-up; for compiled providers this is the compile
    first_s = time.perf_counter() - t0
    forward()
    full()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"op": op, "shape": list(shape), "provider": provider, "first_call_s": round(first_s, 3),
           "forward_ms": _median_ms(forward, device, reps), "full_ms": _median_ms(full, device, reps)}
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="gpu" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager for --size tiny)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and args.size != "tiny" else "cpu")
    reps = args.reps or (20 if device.type == "cuda" else 1)
    compile_backend = args.compile_backend or ("aot_eager" if args.size == "tiny" else "inductor")
    rows, failures = [], []
    for op, shape in SHAPES[args.size].items():
        kernels = kernel_backends(op, device)
        providers = ["reference", "compiled-reference"] + kernels + [f"compiled-{b}" for b in kernels]
        for provider in providers:
            try:
                row = bench(op, shape, provider, device, reps, compile_backend)
            except Exception as exc:  # noqa: BLE001 - recorded and reported in the exit status
                failures.append(f"{op}/{provider}: {type(exc).__name__}: {exc}")
                row = {"op": op, "shape": list(shape), "provider": provider, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": machine_name(), "device": str(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "size": args.size, "reps": reps,
              "compile_backend": compile_backend, "load": os.getloadavg(), "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        lines = [f"## Quick benchmark on {result['machine']} (torch {torch.__version__}, {args.size} shapes, "
                 f"median of {reps}, load {result['load'][0]:.2f})", "",
                 "| op | shape | provider | forward ms | forward+backward ms |", "|---|---|---|---|---|"]
        for r in rows:
            cells = ("error: " + r["error"][:60], "") if "error" in r else (f"{r['forward_ms']:.3f}", f"{r['full_ms']:.3f}")
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['provider']} | {cells[0]} | {cells[1]} |")
        args.markdown.write_text("\n".join(lines) + "\n")
    for f in failures:
        print("FAILED", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
