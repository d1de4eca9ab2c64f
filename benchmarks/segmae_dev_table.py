"""The tables of docs/segmae.md from the runs of benchmarks/segmae_isic2018_dev.sh.

    python benchmarks/segmae_dev_table.py runs/segmae_isic2018_dev

Validation Dice (dataset-level and per-image mean) of each arm: the mean over seeds, the spread
(max - min) and each seed, with the epochs and steps each run trained.
"""

from __future__ import annotations

import sys

from cmssm_dev_table import main as table

ARMS = {
    "seg_time": "`segmae_tiny`, equal time (600 s)", "tu_time": "`transunet_tiny`, equal time (600 s)",
    "seg_steps": "`segmae_tiny`, equal segmentation steps", "tu_steps": "`transunet_tiny`, equal segmentation steps",
    "pixel": "`segmae_tiny`, `mask_mode: pixel`, equal time (600 s)",
    "pixel_steps": "`segmae_tiny`, `mask_mode: pixel`, equal segmentation steps", "mae0": "`segmae_tiny`, `mae_epochs: 0` (Table 4 row 6)",
    "ratio05": "`segmae_tiny`, mask ratio 0.5", "pertask": "`segmae_tiny`, `optimizers: per_task`",
    "restart": "`segmae_tiny`, `stage_transition: restart` (the old recipe)",
}

if __name__ == "__main__":
    table(sys.argv[1] if len(sys.argv) > 1 else "runs/segmae_isic2018_dev", ARMS)
