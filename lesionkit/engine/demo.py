"""``lesionkit demo``: train ``unet_tiny`` on synthetic lesions, evaluate on held-out ones, report.

Needs no download. The recipe is the shipped ``demo_unet_tiny_synthetic`` (lesionkit/configs/).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

import lesionkit
from lesionkit.engine.builders import build_dataset
from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from lesionkit.engine.config import TrainConfig
from lesionkit.engine.evaluation import evaluate
from lesionkit.engine.registry import build_trainer, load_train_config
from lesionkit.engine.reporting import best_worst_grid, metrics_table, write_metrics_json

# Held-out synthetic images are drawn with a seed the training and validation data never use.
TEST_SPEC = "synthetic:200:2"


def fast_precision() -> str:
    """bf16 where the hardware runs it natively (AVX-512 BF16 CPUs, Ampere+ GPUs), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if native else "fp32"


DEMO_RECIPE = "demo_unet_tiny_synthetic"


def demo_config(out_dir: str | Path = "demo_out") -> TrainConfig:
    """The demo recipe (``lesionkit/configs/demo_unet_tiny_synthetic.yaml``) writing to ``out_dir``,
    in bf16 where the hardware runs it natively.

    The cosine schedule runs over the time budget, so a slower machine still anneals and stops
    in time (with fewer steps); a faster one simply sees more images.
    """
    from lesionkit.configs import recipe_path

    data = load_train_config(recipe_path(DEMO_RECIPE)).to_dict()
    data.update(out_dir=str(out_dir), precision=fast_precision())
    return TrainConfig.from_dict(data)


def run_demo(out_dir: str | Path = "demo_out", overrides: list[str] | None = None, test_spec: str = TEST_SPEC,
             progress: bool = True) -> dict:
    """Train, evaluate ``best.pt`` on ``test_spec``, write metrics.json, report.md, overlays.png, curves.png."""
    start = time.monotonic()
    out = Path(out_dir)
    cfg = demo_config(out).with_overrides(list(overrides or []) + [f"progress={str(progress).lower()}"])
    trainer = build_trainer(cfg)
    summary = trainer.fit()

    state = load_checkpoint(out / "best.pt", map_location=trainer.device)
    model = model_from_checkpoint(state, out / "best.pt").to(trainer.device)
    test = build_dataset(test_spec, cfg.data.image_size)
    loader = torch.utils.data.DataLoader(test, batch_size=2 * cfg.data.batch_size)
    result = evaluate(model, loader, trainer.device, cfg.threshold, progress=progress, desc="test")
    write_metrics_json(result.metrics, out / "metrics.json")
    best_worst_grid(model, test, result, out / "overlays.png", trainer.device, threshold=cfg.threshold)
    wall = time.monotonic() - start
    params = sum(p.numel() for p in model.parameters())
    report = _report(cfg, summary, result.metrics, params, wall, test_spec, state["epoch"])
    (out / "report.md").write_text(report)
    return {"metrics": result.metrics, "summary": summary, "wall_s": wall, "params": params}


def _report(cfg: TrainConfig, summary: dict, metrics: dict, params: int, wall: float, test_spec: str, best_epoch: int) -> str:
    dice = metrics["dataset"]["dice"]
    ips = summary.get("train_images_per_s")
    lines = [
        "# lesionkit demo",
        "",
        f"`{cfg.model.name}` ({params:,} parameters) trained on `{cfg.data.train}` at {cfg.data.image_size} px, "
        f"validated on `{cfg.data.val}`, tested on the held-out `{test_spec}`.",
        "",
        f"- test Dice (dataset-level): **{dice:.4f}** (target >= 0.85: {'met' if dice >= 0.85 else 'NOT met'})",
        f"- epochs: {summary['epochs']} (stopped by {summary['stop_reason']}), best epoch {best_epoch}, steps {summary['global_step']}",
        f"- training throughput: {ips:.1f} images/s" if ips else "- training throughput: -",
        f"- wall time (train + evaluate): {wall:.0f} s",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"torch {torch.__version__}, lesionkit {lesionkit.__version__}"
        # Other processes on the machine slow the run; the load average says how busy it was.
        + (f"; 1-minute load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
           if hasattr(os, "getloadavg") else ""),
        "",
        "## Test metrics",
        "",
        "```",
        metrics_table(metrics),
        "```",
        "",
        "Files: `best.pt`, `last.pt`, `log.csv`, `config.yaml`, `metrics.json`, `curves.png` (loss and "
        "validation curves), `overlays.png` (best and worst test cases; green = ground truth, red = prediction).",
        "",
    ]
    return "\n".join(lines)
