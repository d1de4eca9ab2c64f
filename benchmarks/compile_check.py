"""torch.compile over every op on every backend, forward + backward, against the reference.

For gpu_check.sh: on a GPU each op runs inside a graph compiled by Inductor (the Triton ops
through ``triton_op`` + ``wrap_triton``, the CUDA ops as opaque custom ops) and must match the
eager reference. ``--size tiny`` runs the same on the CPU backends with small shapes. The
kernel backends go first and ``--budget-s`` stops starting new checks after that many seconds
(the rest are printed as skipped), so a cold Inductor cache cannot run the step out of time
before the kernels are checked. k-means has no gradient: forward only.

    python benchmarks/compile_check.py --size gpu [--backend inductor] [--budget-s 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lesionkit.kernels as K

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_bench import NO_GRADIENT, kernel_backends, make_inputs  # noqa: E402

SHAPES = {
    "gpu": {"patchwise_softmax_loss": (4, 3, 64, 96, 16), "selective_scan": (2, 64, 600, 16, 4),
            "selective_scan_2d": (2, 16, 23, 25, 16), "cross_scan": (2, 16, 33, 35), "cross_merge": (2, 16, 33, 35),
            "patch_cross_attention": (2, 1, 8, 16, 32, 48, 16), "kmeans": (3, 1000, 3, 2)},
    "tiny": {"patchwise_softmax_loss": (2, 1, 16, 16, 8), "selective_scan": (1, 4, 40, 4, 2),
             "selective_scan_2d": (1, 2, 5, 6, 4), "cross_scan": (1, 2, 5, 6), "cross_merge": (1, 2, 5, 6),
             "patch_cross_attention": (1, 1, 3, 5, 8, 8, 4), "kmeans": (2, 30, 3, 2)},
}


def check(op, shape, backend, device, compile_backend) -> None:
    fn, grad_args, other = make_inputs(op, shape, device)
    grad = op not in NO_GRADIENT
    got_args = [a.clone().requires_grad_(grad) for a in grad_args]
    want_args = [a.clone().requires_grad_(grad) for a in grad_args]
    with K.use_backend(backend):
        got = torch.compile(fn, backend=compile_backend, fullgraph=True)(*got_args, *other)
    with K.use_backend("reference"):
        want = fn(*want_args, *other)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    if op in NO_GRADIENT:
        return
    cot = torch.randn_like(want)
    for name, g, w in zip("abcd", torch.autograd.grad(got, got_args, cot), torch.autograd.grad(want, want_args, cot)):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="gpu" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager for tiny)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new check after this many seconds (the rest are printed as skipped)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and args.size != "tiny" else "cpu")
    compile_backend = args.backend or ("aot_eager" if args.size == "tiny" else "inductor")
    failures = 0
    start = time.perf_counter()
    checks = [(op, shape, b) for op, shape in SHAPES[args.size].items() for b in kernel_backends(op, device)]
    checks += [(op, shape, "reference") for op, shape in SHAPES[args.size].items()]
    for op, shape, backend in checks:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"skipped {op:24s} {backend:9s} (time budget)", flush=True)
            continue
        torch._dynamo.reset()
        try:
            check(op, shape, backend, device, compile_backend)
            print(f"ok      {op:24s} {backend:9s} torch.compile(backend={compile_backend})", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported and counted
            failures += 1
            print(f"FAILED  {op:24s} {backend:9s} {type(exc).__name__}: {str(exc)[:800]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
