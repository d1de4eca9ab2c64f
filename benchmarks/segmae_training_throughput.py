"""Training throughput of the tiny SegMAE / TransUNet configs on ISIC 2018 (docs/segmae.md).

Runs a config through the engine for a short time budget and prints the engine's own counter,
``summary["train_images_per_s"]`` (images / seconds inside the training loop). Validation runs
on 16 images only: this measures training speed, not accuracy. The MAE stage is skipped, so
``segmae_tiny`` reports its hybrid stage (a segmentation and a reconstruction step per image).

    OMP_NUM_THREADS=1 python benchmarks/segmae_training_throughput.py segmae_tiny \\
        --data ../shared/data/isic2018-dev --seconds 90
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch

from lesionkit.engine import build_trainer, load_train_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["segmae_tiny", "transunet_tiny"])
    parser.add_argument("--data", required=True, help="an ISIC 2018 folder with train and val splits")
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"data.train=isic:{args.data}:train", f"data.val=isic:{args.data}:val",
                     f"time_budget={args.seconds}", "progress=false", f"out_dir={out}", "segmae.mae_epochs=0"]
        cfg = load_train_config(f"{args.model}_isic2018").with_overrides(overrides)
        trainer = build_trainer(cfg)
        trainer.val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(trainer.val_data, range(16)), batch_size=32)
        summary = trainer.fit()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}: {summary['train_images_per_s']:.2f} training images/s over {summary['global_step']} batches "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average {load:.1f})")


if __name__ == "__main__":
    main()
