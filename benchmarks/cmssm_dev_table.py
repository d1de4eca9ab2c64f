"""The tables of docs/cmssm.md from the runs of benchmarks/cmssm_isic2018_dev.sh (and of
benchmarks/vmunet_bf16_isic2018_dev.sh).

    python benchmarks/cmssm_dev_table.py runs/cmssm_isic2018_dev

Validation Dice (dataset-level and per-image mean) of each run: per arm the mean over seeds,
the spread (max - min) and each seed, with the epochs and steps each run trained.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

from amlp_dev_table import read_run  # the same eval/metrics.json + log.csv reading

ARMS = {"vmunet": "`vmunet_tiny` (VM-UNet)", "cmssm": "`cmssm_tiny` (CM-SSM U-Net, Table 4 row 8 = Table 5 row 4)",
        "t4r1": "Table 4 row 1: no SE / CMN / CRA, CFD + IFD on", "t5r1": "Table 5 row 1: SE + CMN + CRA, no FD",
        "cmn2": "`cmssm_tiny`, CMN ratio 2", "dp01": "`cmssm_tiny`, drop path 0.1",
        "fdstart1": "`cmssm_tiny`, distillation from epoch 1 (`cmssm.fd_start_epochs: 1`)",
        "cmssm_steps": "`cmssm_tiny` at equal steps (744 s, as many steps as `vmunet_tiny` in 600 s)",
        "vmunet_bf16": "`vmunet_tiny`, bf16 recipe (December 2026 kernels)",
        "cmssm_bf16": "`cmssm_tiny`, bf16 recipe (December 2026 kernels)",
        # benchmarks/vmunet_bf16_isic2018_dev.sh: the paper-scale model, 256 px, equal epochs
        "vmunet256_fp32": "`vmunet` (paper scale), 256 px, fp32", "vmunet256_bf16": "`vmunet` (paper scale), 256 px, bf16"}


def main(out: str, arms: dict[str, str] = ARMS) -> None:
    root = Path(out)
    print("| arm | seeds | Dice (dataset) mean | spread | per seed | per-image Dice mean | spread | per seed | epochs (steps) per seed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, label in arms.items():
        runs = sorted(p for p in root.glob(f"{arm}_s*") if p.is_dir() and re.fullmatch(rf"{arm}_s\d+", p.name))
        results = [r for r in (read_run(p) for p in runs) if r is not None]
        if not results:
            continue
        dice = [r["dice"] for r in results]
        pid = [r["per_image_dice"] for r in results]
        trained = " / ".join("{} ({})".format(r["epochs"], r["steps"]) for r in results)
        print(f"| {label} | {len(results)} | **{statistics.mean(dice):.4f}** | {max(dice) - min(dice):.4f} "
              f"| {' / '.join(f'{d:.4f}' for d in dice)} | {statistics.mean(pid):.4f} | {max(pid) - min(pid):.4f} "
              f"| {' / '.join(f'{d:.4f}' for d in pid)} | {trained} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cmssm_isic2018_dev")
