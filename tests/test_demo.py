"""``lesionkit demo`` at a reduced size: a fixed step count, and the same result from two runs."""

import json
import random

import numpy as np
import pytest
import torch

from lesionkit.engine.demo import DEMO_THREADS, demo_config, is_slow, run_demo

# 32 training images in batches of 8 (the recipe's) = 4 steps an epoch; 3 epochs = 12 steps.
SMALL = ["data.train=synthetic:32:0", "data.val=synthetic:8:1", "data.image_size=32", "epochs=3",
         "model.kwargs.widths=[4,8,16]", "data.num_workers=0"]
SMALL_TEST = "synthetic:8:2"


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs, original = [], torch.get_num_threads()
    for i in range(2):
        # Different ambient random state before each run: the demo must seed all it uses itself.
        torch.manual_seed(1000 + i)
        random.seed(1000 + i)
        np.random.seed(1000 + i)
        out = tmp_path_factory.mktemp(f"demo{i}")
        torch.set_num_threads(1 + i)  # the caller's thread count, which the demo replaces and restores
        run = run_demo(out, SMALL, test_spec=SMALL_TEST, progress=False, threads=1)
        run["threads_after"] = torch.get_num_threads()
        runs.append((out, run))
    torch.set_num_threads(original)
    return runs


def test_the_demo_trains_a_fixed_number_of_steps(two_runs):
    out, run = two_runs[0]
    summary = run["summary"]
    assert run["steps_per_epoch"] == 4
    assert summary["global_step"] == 12 and summary["epochs"] == 3 and summary["stop_reason"] == "epochs"
    report = (out / "report.md").read_text()
    assert "training: 12 steps, fixed: 3 epochs of 4 batches of 8" in report
    assert f"**{run['metrics']['dataset']['dice']:.4f}**" in report
    assert "1-minute load average:" in report and "wall time" in report and "images/s" in report
    assert "1 threads" in report


def test_two_demo_runs_give_the_same_weights_and_metrics(two_runs):
    (out_a, a), (out_b, b) = two_runs
    # Exact, not approximately; through JSON so that a NaN (hd95 not computed) equals itself.
    assert json.dumps(a["metrics"], sort_keys=True) == json.dumps(b["metrics"], sort_keys=True)
    assert json.dumps(a["summary"]["last_metrics"], sort_keys=True) == json.dumps(b["summary"]["last_metrics"], sort_keys=True)
    wa, wb = _weights(out_a / "best.pt"), _weights(out_b / "best.pt")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # The per-epoch training losses too (log.csv: everything but the time column).
    rows = [[line.split(",") for line in (out / "log.csv").read_text().splitlines()] for out in (out_a, out_b)]
    time_col = rows[0][0].index("time")
    assert [r[:time_col] + r[time_col + 1:] for r in rows[0]] == [r[:time_col] + r[time_col + 1:] for r in rows[1]]


def test_the_demo_runs_on_its_own_thread_count_and_restores_the_callers(two_runs):
    # The two runs were started from 1 and 2 threads and still agree (previous test).
    assert [run["threads"] for _, run in two_runs] == [1, 1]
    assert [run["threads_after"] for _, run in two_runs] == [1, 2]
    with pytest.raises(ValueError, match="threads"):
        run_demo("unused", SMALL, threads=0)


def test_the_recipe_is_step_based_and_minutes_switch_to_the_clock():
    steps = demo_config("x")
    assert steps.time_budget is None and steps.scheduler.horizon == "epochs" and steps.precision == "fp32"
    timed = demo_config("x", minutes=2)
    assert timed.time_budget == 120.0 and timed.scheduler.horizon == "time_budget"
    assert timed.epochs > steps.epochs  # the clock, not the epochs, ends a timed run
    with pytest.raises(ValueError, match="minutes"):
        demo_config("x", minutes=0)


def test_a_slow_run_is_flagged_as_slow():
    assert is_slow(1.0) and not is_slow(1000.0) and not is_slow(None)
