"""How far a bf16 (autocast) training step moves from the float32 one (docs/cmssm.md).

One batch of real images, one set of weights (a checkpoint, e.g. a trained ``vmunet`` run's
``best.pt``, or a freshly built model); the loss, the logits and every parameter's gradient
computed in float32 and under bf16 autocast. Reported: the loss and logit differences, and per
parameter tensor the cosine between the two gradients and the relative error of the bf16 one
(||g_bf16 - g_fp32|| / ||g_fp32||), as quantiles over the tensors and the worst tensors by name
(gradients that are zero in exact arithmetic listed apart: see ``split_zero``).
As a yardstick, the same figures between the float32 gradients of two halves of the batch (how
much one mini-batch's gradient differs from another's, which SGD already lives with).

    python benchmarks/bf16_gradient_fidelity.py --checkpoint runs/X/best.pt \
        --data isic:PATH:val --images 8 --size 256 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from lesionkit.engine.builders import build_dataset
from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from lesionkit.losses import create_loss
from lesionkit.models import create_model


def gradients(model, loss_fn, x, y, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
        loss = loss_fn(logits, y)
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), logits.detach().float(), grads


def compare(a: dict, b: dict) -> list[dict]:
    """Per tensor: cosine and relative error of b against a (tensors whose a-gradient is 0 left out)."""
    rows = []
    for name, ga in a.items():
        gb = b[name]
        na = ga.norm()
        if na == 0:
            continue
        cos = float(torch.dot(ga.flatten(), gb.flatten()) / (na * gb.norm()).clamp_min(1e-300))
        rows.append({"name": name, "numel": ga.numel(), "rms": float(na / ga.numel() ** 0.5), "cosine": cos,
                     "rel_error": float((gb - ga).norm() / na)})
    return rows


def split_zero(rows: list[dict], floor: float = 1e-5) -> tuple[list[dict], list[dict]]:
    """(rows, rows whose gradient is zero in exact arithmetic): a bias in front of a training-mode
    BatchNorm has a gradient of exactly 0, which comes out as rounding noise of about 1e-9 in
    either precision, so its cosine and relative error say nothing. Those are told apart by an
    RMS below ``floor`` times the median tensor's."""
    median = float(torch.tensor([r["rms"] for r in rows]).median())
    zero = [r for r in rows if r["rms"] < floor * median]
    return [r for r in rows if r["rms"] >= floor * median], zero


def quantiles(rows: list[dict], key: str) -> dict:
    v = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return {q: float(v.quantile(p)) for q, p in (("min", 0.0), ("p05", 0.05), ("median", 0.5), ("p95", 0.95), ("max", 1.0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a lesionkit checkpoint (default: a freshly built --model)")
    parser.add_argument("--model", default="vmunet")
    parser.add_argument("--data", required=True, help="dataset spec, e.g. isic:PATH:val")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.images < 2 or args.images % 2:
        raise SystemExit(f"--images should be an even number >= 2, got {args.images}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)
        name = args.checkpoint
    else:
        model, name = create_model(args.model), f"fresh {args.model} (seed {args.seed})"
    model.train()
    data = build_dataset(args.data, args.size)
    batch = [data[i] for i in range(args.images)]
    x = torch.stack([b["image"] for b in batch])
    y = torch.stack([b["mask"] for b in batch]).float()
    loss_fn = create_loss("bce_dice", bce_weight=0.3, dice_weight=0.7)

    # Dropout / drop path off so both precisions see the same network.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "DropPath":
            m.eval()
    loss32, logits32, g32 = gradients(model, loss_fn, x, y, bf16=False)
    loss16, logits16, g16 = gradients(model, loss_fn, x, y, bf16=True)
    half = args.images // 2
    _, _, g_first = gradients(model, loss_fn, x[:half], y[:half], bf16=False)
    _, _, g_second = gradients(model, loss_fn, x[half:], y[half:], bf16=False)

    bf16_rows, zero_rows = split_zero(compare(g32, g16))
    batch_rows, _ = split_zero(compare(g_first, g_second))
    agree = float(((logits32 > 0) == (logits16 > 0)).float().mean())
    result = {
        "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "weights": name, "images": args.images, "size": args.size, "tensors": len(bf16_rows),
        "loss_fp32": loss32, "loss_bf16": loss16,
        "logits_max_abs_diff": float((logits16 - logits32).abs().max()),
        "logits_rel_error": float((logits16 - logits32).norm() / logits32.norm()),
        "mask_agreement": agree,
        "bf16_vs_fp32": {"cosine": quantiles(bf16_rows, "cosine"), "rel_error": quantiles(bf16_rows, "rel_error"),
                         "worst": sorted(bf16_rows, key=lambda r: r["cosine"])[:5]},
        "zero_in_exact_arithmetic": [r["name"] for r in zero_rows],
        "half_batch_vs_half_batch_fp32": {"cosine": quantiles(batch_rows, "cosine"),
                                          "rel_error": quantiles(batch_rows, "rel_error")},
    }
    print(f"{name}: {args.images} images at {args.size} px, {len(bf16_rows)} gradient tensors "
          f"(and {len(zero_rows)} zero in exact arithmetic: {', '.join(r['name'] for r in zero_rows) or '-'})")
    print(f"loss fp32 {loss32:.6f}  bf16 {loss16:.6f}; logits rel. error {result['logits_rel_error']:.4f}, "
          f"thresholded masks agree on {agree:.4%} of pixels")
    for label, rows in (("bf16 vs fp32", bf16_rows), ("fp32, one half-batch vs the other", batch_rows)):
        c, r = quantiles(rows, "cosine"), quantiles(rows, "rel_error")
        print(f"{label}: cosine min {c['min']:.4f} p05 {c['p05']:.4f} median {c['median']:.5f}; "
              f"rel. error median {r['median']:.4f} p95 {r['p95']:.4f} max {r['max']:.4f}")
    for w in result["bf16_vs_fp32"]["worst"]:
        print(f"  {w['name']}: cosine {w['cosine']:.4f}, rel. error {w['rel_error']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
