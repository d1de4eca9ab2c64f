"""``lesionkit demo``: train ``unet_tiny`` on synthetic lesions, evaluate on held-out ones, report.

Needs no download. The recipe is the shipped ``demo_unet_tiny_synthetic`` (lesionkit/configs/).

The demo trains for a fixed number of optimiser steps (the recipe's epochs of a fixed synthetic
training set), with every random stream seeded, in fp32 and on a fixed number of threads, so the
result does not depend on how busy the machine is: a loaded machine takes longer and reaches the
same Dice. What may still differ between machines (docs/engine.md, "The demo"): CPUs whose
kernels round differently (an AVX2 CPU and an AVX-512 one), another thread count, a GPU.
``minutes=`` (``lesionkit demo --minutes``) trains against the clock instead, as earlier
versions did: then the number of steps, and the result, follow the machine's speed.
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
from lesionkit.host import cpu_info

DEMO_RECIPE = "demo_unet_tiny_synthetic"
# Held-out synthetic images are drawn with a seed the training and validation data never use.
TEST_SPEC = "synthetic:200:2"
TARGET_DICE = 0.85  # held-out dataset-level Dice the demo is sized to pass
# Intra-op threads of the demo's run, whatever the core count: the reductions inside the
# convolution and loss kernels are split by thread, so another count gives other roundings.
DEMO_THREADS = 2
# Training images/s of the fixed-step demo on an idle 2-core Intel Xeon (docs/engine.md); a run
# under half of it is reported as slow.
IDLE_IMAGES_PER_S = 38.0
# The epoch cap of the time-budgeted mode (`minutes`): the clock stops it long before.
TIME_MODE_MAX_EPOCHS = 100


def demo_config(out_dir: str | Path = "demo_out", minutes: float | None = None) -> TrainConfig:
    """The demo recipe (``lesionkit/configs/demo_unet_tiny_synthetic.yaml``) writing to ``out_dir``.

    ``minutes=None``: its fixed number of steps (``epochs`` x the batches of an epoch), the
    cosine schedule over those steps. ``minutes``: train until that much time has passed, the
    cosine schedule over the time budget (``scheduler.horizon: time_budget``), so a slower
    machine still anneals and stops in time, with fewer steps.
    """
    from lesionkit.configs import recipe_path

    data = load_train_config(recipe_path(DEMO_RECIPE)).to_dict()
    data["out_dir"] = str(out_dir)
    if minutes is not None:
        if not minutes > 0:
            raise ValueError(f"minutes should be > 0, got {minutes}")
        data.update(time_budget=60.0 * minutes, epochs=TIME_MODE_MAX_EPOCHS)
        data["scheduler"]["horizon"] = "time_budget"
    return TrainConfig.from_dict(data)


def run_demo(out_dir: str | Path = "demo_out", overrides: list[str] | None = None, test_spec: str = TEST_SPEC,
             progress: bool = True, minutes: float | None = None, threads: int = DEMO_THREADS) -> dict:
    """Train, evaluate ``best.pt`` on ``test_spec``, write metrics.json, report.md, overlays.png, curves.png.

    ``minutes``: the time-budgeted mode (see :func:`demo_config`). ``threads``: torch's intra-op
    threads during the run (restored after); the fixed default keeps results equal across core counts.
    """
    if threads < 1:
        raise ValueError(f"threads should be >= 1, got {threads}")
    start = time.monotonic()
    load_start = _load_average()
    out = Path(out_dir)
    cfg = demo_config(out, minutes).with_overrides(list(overrides or []) + [f"progress={str(progress).lower()}"])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer = build_trainer(cfg)
        summary = trainer.fit()
        if not (out / "best.pt").is_file():  # stopped by a signal before the first epoch ended
            raise ValueError(f"training stopped ({summary['stop_reason']}) after {summary['global_step']} steps, "
                             f"before the first epoch ended: there is no {out / 'best.pt'} to evaluate")

        state = load_checkpoint(out / "best.pt", map_location=trainer.device)
        model = model_from_checkpoint(state, out / "best.pt").to(trainer.device)
        test = build_dataset(test_spec, cfg.data.image_size)
        loader = torch.utils.data.DataLoader(test, batch_size=2 * cfg.data.batch_size)
        result = evaluate(model, loader, trainer.device, cfg.threshold, progress=progress, desc="test")
        write_metrics_json(result.metrics, out / "metrics.json")
        best_worst_grid(model, test, result, out / "overlays.png", trainer.device, threshold=cfg.threshold)
    finally:
        torch.set_num_threads(previous_threads)
    wall = time.monotonic() - start
    params = sum(p.numel() for p in model.parameters())
    run = {"metrics": result.metrics, "summary": summary, "wall_s": wall, "params": params,
           "steps_per_epoch": trainer.steps_per_epoch, "threads": threads, "minutes": minutes,
           "load_start": load_start, "load_end": _load_average(), "best_epoch": state["epoch"]}
    run["slow"] = is_slow(summary.get("train_images_per_s"))
    (out / "report.md").write_text(_report(cfg, run, test_spec))
    return run


def is_slow(images_per_s: float | None) -> bool:
    """Whether a run trained at under half the reference machine's images/s (``IDLE_IMAGES_PER_S``)."""
    return images_per_s is not None and images_per_s < 0.5 * IDLE_IMAGES_PER_S


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _report(cfg: TrainConfig, run: dict, test_spec: str) -> str:
    summary, metrics = run["summary"], run["metrics"]
    dice = metrics["dataset"]["dice"]
    ips = summary.get("train_images_per_s")
    steps, epochs = summary["global_step"], summary["epochs"]
    timed = run["minutes"] is not None
    met = dice >= TARGET_DICE
    if met:
        verdict = "met"
    elif timed and summary["stop_reason"] == "time_budget":
        verdict = (f"not reached within the {run['minutes']:g}-minute budget ({steps} steps); the fixed-step "
                   f"demo (without --minutes) trains every machine for the same steps")
    else:
        verdict = "NOT met"
    if timed:
        training = (f"- training: {steps} steps, {epochs} epochs of {run['steps_per_epoch']} batches of "
                    f"{cfg.data.batch_size} (time-budgeted: {run['minutes']:g} minutes; stopped by {summary['stop_reason']})")
    else:
        training = (f"- training: {steps} steps, fixed: {epochs} epochs of {run['steps_per_epoch']} batches of "
                    f"{cfg.data.batch_size} (stopped by {summary['stop_reason']})")
    cores = os.cpu_count()
    load = "-" if run["load_start"] is None else (
        f"{run['load_start']:.1f} at the start, {run['load_end']:.1f} at the end (counting the demo's own "
        f"{run['threads']} threads), on {cores} cores")
    if run["slow"]:
        speed = (f"- **slow run**: {ips:.1f} training images/s, under half of the ~{IDLE_IMAGES_PER_S:.0f} of an "
                 f"idle 2-core Xeon (other work on the machine? see the load above). "
                 + ("A time-budgeted run sees fewer steps on a slow machine." if timed else
                    "The step count is fixed, so this changes the wall time, not the result."))
    else:
        speed = None
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() and cfg.device != "cpu" else "CPU only"
    lines = [
        "# lesionkit demo",
        "",
        f"`{cfg.model.name}` ({run['params']:,} parameters) trained on `{cfg.data.train}` at {cfg.data.image_size} px, "
        f"validated on `{cfg.data.val}`, tested on the held-out `{test_spec}`.",
        "",
        f"- test Dice (dataset-level): **{dice:.4f}** (target >= {TARGET_DICE}: {verdict})",
        training,
        f"- best epoch (validation {cfg.monitor}): {run['best_epoch']}",
        f"- training throughput: {ips:.1f} images/s" if ips else "- training throughput: -",
        f"- wall time (train + evaluate): {run['wall_s']:.0f} s",
        f"- 1-minute load average: {load}",
        *([speed] if speed else []),
        f"- machine: {_cpu_name()}, {run['threads']} threads, {device}, "
        f"{cfg.precision}, kernels {torch.backends.cpu.get_cpu_capability()}; "
        f"torch {torch.__version__}, lesionkit {lesionkit.__version__}, seed {cfg.seed}",
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
