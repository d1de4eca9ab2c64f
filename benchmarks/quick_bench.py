"""A short timing of every op on every provider, for gpu_check.sh.

Providers per op: ``reference`` (eager PyTorch), ``compiled-reference`` (torch.compile of the
reference), and each kernel backend that runs on the device (``cuda``, ``triton``; ``cpu`` on a
CPU), plus ``compiled-<backend>`` (the kernel inside a torch.compile graph). Forward and
forward + backward medians (CUDA-synchronised), peak memory on a GPU. ``--size tiny`` gives
shapes small enough for a CPU dry run; ``gpu`` the VM-UNet / SegMAE / GRCSF / AMLP training shapes.

Each row also gives the forward's speed-up over ``reference`` (the unfused PyTorch baseline)
and its effective bandwidth: the bytes of the op's inputs and outputs, each counted once (a
lower bound of its memory traffic), over the forward time, and that as a share of the GPU's
HBM bandwidth where known (H100 SXM 3.35 TB/s, H200 4.8 TB/s). ``--budget-s`` stops starting
new measurements once that many seconds have passed (the rest are listed as skipped) and the
JSON is rewritten after every row, so a run cut short still leaves its results.

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
# Patch attention: (B, h, dk, dv, H, W, P) of GRCSF's last RCU stage at 224 (64 channels,
# dk = 64 / 8, P = 16); k-means: (B, N, D, k) of AMLP's per-image pixel clustering.
SHAPES = {
    "gpu": {"patchwise_softmax_loss": (32, 3, 224, 224, 16), "selective_scan": (8, 768, 3136, 16, 4),
            "selective_scan_2d": (8, 192, 56, 56, 16), "cross_scan": (32, 192, 56, 56),
            "cross_merge": (32, 192, 56, 56), "patch_cross_attention": (8, 1, 8, 64, 224, 224, 16),
            "kmeans": (32, 50176, 3, 2)},
    "tiny": {"patchwise_softmax_loss": (2, 1, 16, 16, 8), "selective_scan": (1, 8, 64, 4, 2),
             "selective_scan_2d": (1, 4, 6, 6, 4), "cross_scan": (1, 4, 6, 6), "cross_merge": (1, 4, 6, 6),
             "patch_cross_attention": (1, 1, 4, 6, 8, 8, 4), "kmeans": (2, 40, 3, 2)},
}
NO_GRADIENT = {"kmeans"}  # timed forward only
# HBM bandwidth (bytes/s) by device-name fragment, most specific first.
HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))


def hbm_bandwidth(device: torch.device) -> float | None:
    """The device's HBM bandwidth in bytes/s when its name is in HBM_BYTES_PER_S."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for fragment, bw in HBM_BYTES_PER_S if fragment in name), None)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in `value` (a tensor, or a tuple / named tuple of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


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
    if op == "patch_cross_attention":
        b, heads, dk, dv, h, w, p = shape
        return ((lambda q, k, v: K.patch_cross_attention(q, k, v, p)),
                (rand(b, heads, dk, h, w), rand(b, heads, dk, h, w), rand(b, heads, dv, h, w)), ())
    if op == "kmeans":
        b, n, d, k = shape
        return (lambda x: K.kmeans(x, k, iters=10, tol=-1.0, init="farthest").centroids), (rand(b, n, d),), ()
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
    differentiable = op not in NO_GRADIENT
    grad_args = [a.requires_grad_(differentiable) for a in grad_args]
    outputs = []

    def forward():
        with torch.no_grad(), K.use_backend(backend):
            outputs[:] = [fn(*grad_args, *other)]

    def full():
        with K.use_backend(backend):
            out = fn(*grad_args, *other)
        if differentiable:
            torch.autograd.grad(out.float().sum(), grad_args)

    t0 = time.perf_counter()
    full()
    forward()  # warm-up; for compiled providers this is the compile
    first_s = time.perf_counter() - t0
    forward()
    full()
    io_bytes = tensor_bytes(tuple(grad_args) + tuple(other)) + tensor_bytes(outputs[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward_ms = _median_ms(forward, device, reps)
    row = {"op": op, "shape": list(shape), "provider": provider, "first_call_s": round(first_s, 3),
           "forward_ms": forward_ms, "full_ms": _median_ms(full, device, reps) if differentiable else None,
           "io_bytes": io_bytes, "forward_gb_per_s": io_bytes / forward_ms / 1e6}
    peak = hbm_bandwidth(device)
    if peak:
        row["forward_share_of_hbm"] = row["forward_gb_per_s"] * 1e9 / peak
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
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all of the size's shapes)")
    parser.add_argument("--skip-compiled", action="store_true", help="no compiled-* providers")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new measurement after this many seconds (the rest are listed as skipped)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and args.size != "tiny" else "cpu")
    reps = args.reps or (20 if device.type == "cuda" else 1)
    compile_backend = args.compile_backend or ("aot_eager" if args.size == "tiny" else "inductor")
    shapes = SHAPES[args.size]
    if args.ops:
        unknown = set(args.ops.split(",")) - set(shapes)
        if unknown:
            parser.error(f"--ops: unknown {sorted(unknown)}; choose from {sorted(shapes)}")
        shapes = {op: shape for op, shape in shapes.items() if op in args.ops.split(",")}
    start = time.perf_counter()
    rows, failures = [], []
    result = {"machine": machine_name(), "device": str(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "size": args.size, "reps": reps,
              "compile_backend": compile_backend, "hbm_bytes_per_s": hbm_bandwidth(device),
              "load": os.getloadavg(), "results": rows}
    for op, shape in shapes.items():
        kernels = kernel_backends(op, device)
        providers = ["reference"] + kernels
        if not args.skip_compiled:
            providers += ["compiled-reference"] + [f"compiled-{b}" for b in kernels]
        for provider in providers:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                row = {"op": op, "shape": list(shape), "provider": provider, "skipped": "time budget"}
            else:
                try:
                    row = bench(op, shape, provider, device, reps, compile_backend)
                except Exception as exc:  # noqa: BLE001 - recorded and reported in the exit status
                    failures.append(f"{op}/{provider}: {type(exc).__name__}: {exc}")
                    row = {"op": op, "shape": list(shape), "provider": provider,
                           "error": f"{type(exc).__name__}: {exc}"[:300]}
            baseline = next((r for r in rows if r["op"] == op and r["provider"] == "reference" and "forward_ms" in r), None)
            if "forward_ms" in row and baseline:
                row["speedup_vs_reference"] = baseline["forward_ms"] / row["forward_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_outputs(result, args)  # after every row: a run cut short keeps what it measured
    for f in failures:
        print("FAILED", f, file=sys.stderr)
    return 1 if failures else 0


def _cell(value, fmt):
    return "" if value is None else format(value, fmt)


def write_outputs(result: dict, args) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if not args.markdown:
        return
    peak = result["hbm_bytes_per_s"]
    lines = [f"## Quick benchmark on {result['machine']} (torch {result['torch']}, {result['size']} shapes, "
             f"median of {result['reps']}, load {result['load'][0]:.2f})", "",
             "Speed-up: forward against `reference` (unfused PyTorch). GB/s: inputs + outputs once over the "
             "forward time" + (f"; % HBM of {peak / 1e12:.2f} TB/s." if peak else "."), "",
             "| op | shape | provider | forward ms | forward+backward ms | speed-up | GB/s | % HBM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r or "skipped" in r:
            note = "error: " + r["error"][:60] if "error" in r else "skipped: " + r["skipped"]
            lines.append(f"| {r['op']} | {shape} | {r['provider']} | {note} | | | | |")
            continue
        share = r.get("forward_share_of_hbm")
        lines.append(f"| {r['op']} | {shape} | {r['provider']} | {r['forward_ms']:.3f} | {_cell(r['full_ms'], '.3f')} | "
                     f"{_cell(r.get('speedup_vs_reference'), '.2f')} | {r['forward_gb_per_s']:.1f} | "
                     f"{_cell(None if share is None else 100 * share, '.1f')} |")
    args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
