"""Training throughput of vmunet_tiny, cmssm_tiny and vmunet with the scan on the cpu kernel vs
the pure-PyTorch reference, side by side in one run (docs/cmssm.md).

One training step = forward + loss (BCE 0.3 + Dice 0.7, plus the CM-SSM FD terms) + backward +
AdamW step, on random images of batch 8 at 128 and 256 px. Steps are timed after warm-up,
alternating backends step by step so that both see the same machine load; a profiled step per
case gives the share of step time in the scan ops: for the cpu backend the profiler's CPU time
of ``lesionkit::selective_scan_2d`` and its backward op; for both backends the "replayed" share,
the scan's forward + backward timed alone on the inputs each SS2D received in the step, over
the median step time (the reference scan is many small ops, which the profiler cannot assign).

The reference scan keeps every step's (b, d, n) state for autograd: at batch 8 it needs about
5 GB for the tiny models at 128 px and far more than a 24 GiB machine has for ``vmunet`` (and
for the tiny models at 256 px), so those cases run at a smaller batch, both backends at the
same batch (``--cases model:size:batch``; the default list says which).

    python benchmarks/vmunet_training_throughput.py --steps 3 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import lesionkit.kernels as K
from lesionkit.layers import ss2d as ss2d_module
from lesionkit.losses import create_loss
from lesionkit.losses.feature_distillation import FeatureDistillation
from lesionkit.models import create_model, segmentation_logits
from lesionkit.engine.builders import build_optimizer  # as the trainer builds it (fused AdamW where torch has it)
from lesionkit.engine.config import OptimConfig

SCAN_OPS = ("lesionkit::selective_scan_2d", "lesionkit::selective_scan_2d_backward")
_captured: list | None = None


def _capturing(fn):
    def wrapped(*args, **kwargs):
        if _captured is not None:
            _captured.append(([a.detach().clone() if torch.is_tensor(a) else a for a in args], kwargs))
        return fn(*args, **kwargs)
    return wrapped


def _replay_scan_seconds(calls) -> float:
    """Forward + backward time of the scan alone on the captured inputs, on the current backend."""
    total = 0.0
    for args, kwargs in calls:
        leaves = [a.clone().requires_grad_(True) if torch.is_tensor(a) and i < 5 else a for i, a in enumerate(args)]
        t0 = time.perf_counter()
        out = K.selective_scan_2d(*leaves, **kwargs)
        out.backward(torch.ones_like(out))
        total += time.perf_counter() - t0
    return total


_DISTILLATION = FeatureDistillation()  # the CM-SSM recipe's CFD + IFD, 0.015 each


def _step(model, opt, loss_fn, x, y):
    if name_is_cmssm(model):
        logits, features = model.forward_intermediates(x)
        loss = loss_fn(logits, y) + sum(_DISTILLATION(features, model.block_names()).values())
    else:
        loss = loss_fn(segmentation_logits(model(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def name_is_cmssm(model) -> bool:
    sw = getattr(model, "switches", None)
    return sw is not None and (sw.se or sw.cmn or sw.cra)


def measure(name: str, size: int, batch: int, steps: int, backends: list[str]) -> dict:
    torch.manual_seed(0)
    model = create_model(name).train()
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-4, weight_decay=1e-2), model)
    loss_fn = create_loss("bce_dice", bce_weight=0.3, dice_weight=0.7)
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()
    global _captured
    times = {b: [] for b in backends}
    calls = {}
    for b in backends:  # warm-up, recording what each SS2D hands the scan
        _captured = []
        with K.use_backend(b):
            _step(model, opt, loss_fn, x, y)
        calls[b], _captured = _captured, None
    for _ in range(steps):
        for b in backends:
            with K.use_backend(b):
                t0 = time.perf_counter()
                _step(model, opt, loss_fn, x, y)
                times[b].append(time.perf_counter() - t0)
            print(f"  {name} {size}px b{batch} {b}: step {times[b][-1]:.2f} s", flush=True)
    result = {"model": name, "image_size": size, "batch": batch, "steps": steps,
              "params": sum(p.numel() for p in model.parameters()), "backends": {}}
    for b in backends:
        ops = total = None
        if b != "reference":  # the reference is thousands of small ops: profiling costs more than the step
            with K.use_backend(b), profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("step"):
                    _step(model, opt, loss_fn, x, y)
            events = prof.key_averages()
            total = next(e.cpu_time_total for e in events if e.key == "step")
            ops = sum(e.cpu_time_total for e in events if e.key in SCAN_OPS)
        with K.use_backend(b):
            replay = _replay_scan_seconds(calls[b])
        med = statistics.median(times[b])
        result["backends"][b] = {"step_s_median": med, "step_s_all": times[b], "images_per_s": batch / med,
                                 "scan_share_replayed": replay / med,
                                 "scan_share_profiled_ops": ops / total if total else None}
    if "cpu" in backends and "reference" in backends:
        r = result["backends"]
        result["cpu_vs_reference"] = r["cpu"]["images_per_s"] / r["reference"]["images_per_s"]
    return result


DEFAULT_CASES = ["vmunet_tiny:128:8", "vmunet:256:1", "cmssm_tiny:128:8", "vmunet:128:2", "vmunet_tiny:256:2",
                 "cmssm_tiny:256:2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL:SIZE:BATCH")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["cpu", "reference"])
    parser.add_argument("--out", default=None, help="write the results here as JSON (after every case)")
    args = parser.parse_args()
    ss2d_module.selective_scan_2d = _capturing(ss2d_module.selective_scan_2d)
    machine = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "load_average_before": os.getloadavg()}
    rows = []
    for case in args.cases:
        name, size, batch = case.split(":")
        r = measure(name, int(size), int(batch), args.steps, args.backends)
        r["load_average_after"] = os.getloadavg()
        rows.append(r)
        cells = "  ".join(f"{b}: {v['images_per_s']:.2f} img/s (scan {100 * v['scan_share_replayed']:.0f}%)"
                          for b, v in r["backends"].items())
        print(f"{name:12s} {size:>4s}px b{batch}  {cells}  cpu/ref {r.get('cpu_vs_reference', float('nan')):.2f}x  "
              f"load {r['load_average_after'][0]:.1f}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"machine": machine, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
