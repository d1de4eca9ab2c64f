"""The table of docs/amlp.md from the runs of benchmarks/amlp_isic2018_dev.sh.

    python benchmarks/amlp_dev_table.py runs/amlp_isic2018_dev

Validation Dice (dataset-level and per-image mean) of every fine-tuned run, per label fraction
and initialisation: the mean over seeds and each seed, plus the steps each run trained.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

INITS = {"amlp": "AMLP pre-trained", "base": "BASE pre-trained (random 75 %)", "scratch": "from scratch",
         "mps": "MPS only (Table 3 row 2)", "amr": "AMR only (row 3)", "crcl": "CRCL only (row 4)",
         "h2e": "AMLP, hard-to-easy order (Table 4 row 2)"}


def read_run(run: Path) -> dict | None:
    metrics = run / "eval" / "metrics.json"
    if not metrics.is_file():
        return None
    m = json.loads(metrics.read_text())
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"dice": m["dataset"]["dice"], "per_image_dice": m["per_image"]["dice"],
            "steps": int(rows[-1]["step"]) if rows else 0, "epochs": len(rows)}


def main(out: str) -> None:
    root = Path(out)
    print("| labels | initialisation | Dice (dataset) mean | spread | per seed | per-image Dice mean | per seed | steps per seed |")
    print("|---|---|---|---|---|---|---|---|")
    for frac in ("0.05", "0.1"):
        for init, label in INITS.items():
            runs = sorted(root.glob(f"finetune_{init}_f{frac}_s*"))
            results = [r for r in (read_run(p) for p in runs if p.is_dir()) if r is not None]
            if not results:
                continue
            dice = [r["dice"] for r in results]
            pid = [r["per_image_dice"] for r in results]
            print(f"| {float(frac):.0%} | {label} | **{sum(dice) / len(dice):.4f}** | {max(dice) - min(dice):.4f} "
                  f"| {' / '.join(f'{d:.4f}' for d in dice)} "
                  f"| {sum(pid) / len(pid):.4f} | {' / '.join(f'{d:.4f}' for d in pid)} "
                  f"| {' / '.join(str(r['steps']) for r in results)} |")
    for arm in ("amlp", "base", "mps", "amr", "crcl", "h2e"):
        for run in sorted(root.glob(f"pretrain_{arm}_s*")):
            log = run / "log.csv"
            if log.is_file():
                with open(log, newline="") as f:
                    rows = list(csv.DictReader(f))
                last = rows[-1]
                print(f"pretrain {run.name}: {len(rows)} epochs, {last['step']} steps, {float(last['time']):.0f} s, "
                      f"last-epoch masked-patch MSE {float(last['train_pred']):.4f}, ratio {float(last['train_mask_ratio']):.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/amlp_isic2018_dev")
