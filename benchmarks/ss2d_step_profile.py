"""Where a training step of the SS2D models spends its time, beside unet_tiny (docs/cmssm.md).

One step = forward (with the block outputs when distilling) + the recipe's loss (BCE 0.3 /
Dice 0.7 + CFD + IFD for cmssm_tiny; BCE + Dice for unet_tiny) + backward + AdamW, at 128 px,
batch 8, one thread by default, each model in the precision given (``fp32``, ``bf16`` =
CPU autocast, as the trainer runs it, or ``auto``, as the recipes resolve it; ``+cl`` adds
channels-last input and weights, ``+compile`` runs the model through ``torch.compile``,
``+aten`` / ``+onednn`` run its float32 linears and bmms on that backend of
``lesionkit.layers.linear``, set around each step, so both can alternate in one process;
``+rowln`` gives every lesionkit LayerNorm a row-major copy of a channels-first input, as
before SS2D's out_norm read the scan's output in place, also set around each step).
torch.profiler records ``--steps`` steps after two warm-up steps; every op is put in one
category (below) by its name, the inclusive time of the ops listed in ``WHOLE`` (their
internal copies are theirs), the self time of the rest. Steps are also timed without the
profiler (median of ``--steps``), which is the number to compare; the profile's shares say
where that time goes.

    python benchmarks/ss2d_step_profile.py --threads 1 --cases vmunet_tiny:fp32 cmssm_tiny:fp32 unet_tiny:bf16+cl
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from cmssm_step_time import machine, round_robin, step_arguments  # the side-by-side step timing of docs/cmssm.md

from lesionkit.engine.builders import build_optimizer  # as the trainer builds it (fused AdamW where torch has it)
from lesionkit.engine.config import OptimConfig
from lesionkit.engine.evaluation import autocast_context
from lesionkit.layers.linear import use_fp32_matmul_backend
from lesionkit.losses import create_loss
from lesionkit.losses.feature_distillation import FeatureDistillation
from lesionkit.models import create_model

# Ops timed whole (inclusive): a category each. Backward nodes are matched by the autograd
# node's name inside "autograd::engine::evaluate_function: <Node>".
WHOLE = [
    ("scan (fwd)", ("lesionkit::selective_scan_2d",)),
    ("scan (bwd)", ("selective_scan_2d_backward", "lesionkit_selective_scan_2d")),
    # lesionkit.layers.linear's oneDNN products: _LinearFn / _BmmFn forward, their "...Backward" nodes
    ("linear / einsum (bwd)", ("AddmmBackward", "MmBackward", "BmmBackward", "LinearBackward", "MatmulBackward",
                               "_LinearFnBackward", "_BmmFnBackward")),
    ("linear / einsum (fwd)", ("aten::linear", "aten::einsum", "aten::matmul", "aten::addmm", "aten::mm", "aten::bmm",
                               "_LinearFn", "_BmmFn")),
    ("conv (fwd)", ("aten::conv2d", "aten::convolution")),
    ("conv (bwd)", ("ConvolutionBackward",)),
    ("layer norm (fwd)", ("aten::layer_norm",)),
    ("layer norm (bwd)", ("NativeLayerNormBackward",)),
    ("batch norm", ("aten::batch_norm", "NativeBatchNormBackward", "CudnnBatchNormBackward")),
    ("layout copies (bwd)", ("PermuteBackward", "CloneBackward", "ToCopyBackward", "ViewBackward", "UnsafeViewBackward",
                             "CatBackward", "SplitBackward", "SplitWithSizesBackward", "StackBackward",
                             "TransposeBackward", "ExpandBackward", "SliceBackward", "SelectBackward",
                             "IndexBackward", "RepeatBackward", "ReshapeAliasBackward", "UnbindBackward")),
    ("optimiser", ("Optimizer.step", "Optimizer.zero_grad")),
]
# Ops counted by their self time when not inside a WHOLE op.
LEAF = [
    ("layout copies (fwd)", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack",
                             "aten::_to_copy", "aten::to", "aten::empty_like", "aten::index", "aten::flip",
                             "aten::repeat")),
]


def category(name: str, whole: bool) -> str | None:
    for cat, keys in (WHOLE if whole else LEAF):
        if any(k in name for k in keys):
            return cat
    return None


def attribute(events) -> dict[str, float]:
    """Microseconds per category over the profiled events (a tree walk from the roots)."""
    out: dict[str, float] = defaultdict(float)

    def visit(e) -> None:
        cat = category(e.name, True)
        if cat is not None:
            out[cat] += e.cpu_time_total
            return
        out[category(e.name, False) or "elementwise / other"] += e.self_cpu_time_total
        for c in e.cpu_children:
            visit(c)

    for e in events:
        if e.cpu_parent is not None:
            continue
        if e.name == "step":  # the record_function around each profiled step
            for c in e.cpu_children:
                visit(c)
        elif not e.name.startswith("ProfilerStep"):
            visit(e)
    return dict(out)


@contextlib.contextmanager
def row_major_layer_norm():
    """Inside, lesionkit's LayerNorm copies a channels-first input to rows first (PyTorch's
    LayerNorm in float32, the kernel on the copy in bf16), as it ran before it read such an
    input in place (docs/cmssm.md)."""
    from lesionkit.layers import layer_norm as ln
    forward, view = ln.LayerNorm.forward, ln.channels_first_view

    def rows_first(self, x):
        return forward(self, x.contiguous() if x.dtype in ln._HALF else x)

    ln.LayerNorm.forward, ln.channels_first_view = rows_first, (lambda x: False)
    try:
        yield
    finally:
        ln.LayerNorm.forward, ln.channels_first_view = forward, view


def make_step(spec: str, size: int, batch: int):
    model_name, _, precision = spec.partition(":")
    precision, *flags = (precision or "fp32").split("+")
    if precision not in ("fp32", "bf16", "auto") or not set(flags) <= {"cl", "compile", "aten", "onednn", "rowln"}:
        raise SystemExit(f"case {spec!r}: expected MODEL:PRECISION[+cl][+compile][+aten|+onednn][+rowln] with "
                         f"PRECISION fp32, bf16 or auto")
    matmul = "aten" if "aten" in flags else "onednn" if "onednn" in flags else None
    channels_last = "cl" in flags
    torch.manual_seed(0)
    model = create_model(model_name).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if "compile" in flags else model
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2), model)
    if model_name.startswith(("vmunet", "cmssm")):
        loss_fn = create_loss("bce_dice", bce_weight=0.3, dice_weight=0.7)
    else:
        loss_fn = create_loss("bce_dice")
    fd = FeatureDistillation() if model_name.startswith("cmssm") else None
    x = torch.rand(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()
    device = torch.device("cpu")

    row_ln = row_major_layer_norm if "rowln" in flags else contextlib.nullcontext

    def step():
        with use_fp32_matmul_backend(matmul), row_ln():
            with autocast_context(device, precision):
                if fd is None:
                    out = forward(x)
                    loss = loss_fn(getattr(out, "logits", out), y)  # SegMAE's output holds its logits
                else:
                    logits, features = forward(x, intermediates=True)
                    loss = loss_fn(logits, y) + sum(fd(features, model.block_names()).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=["unet_tiny:bf16+cl", "vmunet_tiny:fp32", "cmssm_tiny:fp32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for spec in args.cases:
        step = make_step(spec, args.size, args.batch)
        step(), step()
        times = round_robin({spec: (step, None)}, args.steps)[spec]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                with record_function("step"):
                    step()
        cats = {k: v / args.steps / 1e3 for k, v in attribute(prof.events()).items()}  # ms per step
        total = sum(cats.values())
        med = statistics.median(times)
        results.append({"case": spec, "s_median": med, "s_all": times, "images_per_s": args.batch / med,
                        "profile_ms_per_step": cats, "profile_total_ms": total})
        print(f"\n{spec}: {med * 1e3:.0f} ms per step ({args.batch / med:.1f} images/s), profiled {total:.0f} ms")
        for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
            print(f"  {k:26s} {v:8.1f} ms  {100 * v / total:5.1f} %")
    load_after = os.getloadavg()
    print(f"load before {load_before}, after {load_after}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(load_before, load_after),
                       "threads": args.threads, "size": args.size, "batch": args.batch, "steps": args.steps,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
