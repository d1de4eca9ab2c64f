"""torch.compile over every op on every backend, forward + backward, against the reference.

For gpu_check.sh: on a GPU each op runs inside a graph compiled by Inductor (the Triton ops
through ``triton_op`` + ``wrap_triton``, the CUDA ops as opaque custom ops) and must match the
eager reference. ``--size tiny`` runs the same on the CPU backends with small shapes.

    python benchmarks/compile_check.py --size gpu [--backend inductor]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import lesionkit.kernels as K

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_bench import kernel_backends, make_inputs  # noqa: E402

SHAPES = {
    "gpu": {"patchwise_softmax_loss": (4, 3, 64, 96, 16), "selective_scan": (2, 64, 600, 16, 4),
            "selective_scan_2d": (2, 16, 23, 25, 16), "cross_scan": (2, 16, 33, 35), "cross_merge": (2, 16, 33, 35)},
    "tiny": {"patchwise_softmax_loss": (2, 1, 16, 16, 8), "selective_scan": (1, 4, 40, 4, 2),
             "selective_scan_2d": (1, 2, 5, 6, 4), "cross_scan": (1, 2, 5, 6), "cross_merge": (1, 2, 5, 6)},
}


def check(op, shape, backend, device, compile_backend) -> None:
    fn, grad_args, other = make_inputs(op, shape, device)
    got_args = [a.clone().requires_grad_() for a in grad_args]
    want_args = [a.clone().requires_grad_() for a in grad_args]
    with K.use_backend(backend):
        got = torch.compile(fn, backend=compile_backend, fullgraph=True)(*got_args, *other)
    with K.use_backend("reference"):
        want = fn(*want_args, *other)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    cot = torch.randn_like(want)
    for name, g, w in zip("abcd", torch.autograd.grad(got, got_args, cot), torch.autograd.grad(want, want_args, cot)):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="gpu" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager for tiny)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and args.size != "tiny" else "cpu")
    compile_backend = args.backend or ("aot_eager" if args.size == "tiny" else "inductor")
    failures = 0
    for op, shape in SHAPES[args.size].items():
        for backend in kernel_backends(op, device) + ["reference"]:
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
