"""The tables of docs/grcsf.md from the runs of benchmarks/grcsf_isic2018_dev.sh.

    python benchmarks/grcsf_dev_table.py runs/grcsf_isic2018_dev

Validation Dice (dataset-level and per-image mean) of each arm: the mean over seeds, the spread
(max - min) and each seed, with the epochs and steps each run trained.
"""

from __future__ import annotations

import sys

from cmssm_dev_table import main as table

ARMS = {
    "unetpp": "`unetpp_tiny` (Table 3 row 1 at seed 0)", "grcsf": "`grcsf_tiny` (Table 3 row 4 at seed 0)",
    "no_rcu": "`grcsf_tiny` w/o RCU (Table 3 row 2)", "no_importance": "`grcsf_tiny` w/o importance score (Table 3 row 3)",
    "unetpp_focal": "`unetpp_tiny`, Dice + focal (the paper's loss)", "grcsf_focal": "`grcsf_tiny`, Dice + focal (the paper's loss)",
    "grcsf_steps": "`grcsf_tiny` given `unetpp_tiny`'s 7 epochs (its steps in 600 s)",
    "grcsf_notop": "`grcsf_tiny`, RCU disconnected from the top stage (`rcu_disconnected: [0]`)",
    "grcsf_notop_longmae": "`grcsf_tiny`, `rcu_disconnected: [0]`, MAE pre-trained 540 s instead of 180 s",
    "unetpp_oldgrcsf": "`unetpp_tiny` under GRCSF's first tiny recipe (Adam 1e-3, Dice + focal, 0.5-epoch warm-up)",
}

if __name__ == "__main__":
    table(sys.argv[1] if len(sys.argv) > 1 else "runs/grcsf_isic2018_dev", ARMS)
