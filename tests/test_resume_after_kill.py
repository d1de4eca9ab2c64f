"""A training process killed mid-run and resumed ends with the state of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lesionkit.engine import load_checkpoint

from conftest import assert_same_state

# Builds / subprocess runs: the slow stage (make test-slow). The tests share a module fixture, so
# xdist_group keeps them on one worker under that stage's --dist loadgroup.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume_after_kill")]

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6


def env() -> dict:
    # One thread: fast for tiny shapes, and the same thread count in every run keeps CPU math
    # bit-identical between the runs compared.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lesionkit", "train", "--model", "unet_tiny", "--data", "synthetic:48:3",
            "--val-data", "synthetic:4:4", "--image-size", "64", "--epochs", str(EPOCHS), "--batch-size", "8",
            "--out", str(out), "--no-progress", "--seed", "7",
            "--set", "model.kwargs.widths=[8,16,32]", "model.kwargs.dropout=0.1", "data.num_workers=0", *extra]


def log_rows(out: Path) -> int:
    try:
        return max(0, len((out / "log.csv").read_text().strip().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    full = tmp_path_factory.mktemp("full")
    subprocess.run(train_cmd(full), env=env(), check=True, capture_output=True, timeout=300)
    return full


def resume_and_compare(full: Path, killed: Path) -> None:
    """Resume the killed run and check that it ends where the uninterrupted run ends, in every field
    of last.pt: weights, Adam moments, schedule, scaler, random streams, counters, validation
    metrics, best_metric / best_epoch / bad_epochs; the elapsed time goes on from the kill's."""
    at_kill = load_checkpoint(killed / "last.pt")
    result = subprocess.run(train_cmd(killed, "--resume"), env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["global_step"] == b["global_step"]
    assert a.pop("config")["out_dir"] != b.pop("config")["out_dir"]
    assert a.pop("elapsed") > 0 and b.pop("elapsed") > at_kill["elapsed"]
    assert_same_state(a, b)
    # Adam's state holds both moments and the step count of every parameter.
    assert all(s.keys() >= {"exp_avg", "exp_avg_sq", "step"} for s in a["optimizer"]["state"].values())
    assert a["best_epoch"] is not None and a["metrics"]["dataset"]["dice"] >= 0


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    full = uninterrupted

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while log_rows(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # somewhere in epoch 3 (or while it saves)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    interrupted_at = load_checkpoint(killed / "last.pt")["epoch"]
    assert 2 <= interrupted_at < EPOCHS

    resume_and_compare(full, killed)
    rows = (killed / "log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, EPOCHS + 1))


def mid_epoch_checkpoint(out: Path) -> dict | None:
    try:
        state = load_checkpoint(out / "last.pt")
    except (FileNotFoundError, ValueError):
        return None
    return state if state.get("epoch_batches") else None


def test_kill_inside_an_epoch_and_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    # Mid-epoch checkpoints change nothing in the training: the same uninterrupted run is the reference.
    every = ["checkpoint.every_steps=2"]  # 6 steps per epoch: checkpoints after steps 2 and 4 of each
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *every), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if log_rows(killed) >= 1 and mid_epoch_checkpoint(killed) is not None:
                proc.send_signal(signal.SIGSTOP)  # freeze, then make sure last.pt is still mid-epoch
                if mid_epoch_checkpoint(killed) is not None:
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    state = mid_epoch_checkpoint(killed)
    assert state is not None and 1 <= state["epoch"] < EPOCHS and state["epoch_batches"] in (2, 4)

    resume_and_compare(uninterrupted, killed)
    logs = [(out / "log.csv").read_text().strip().splitlines() for out in (uninterrupted, killed)]
    assert logs[0][0] == logs[1][0]  # the same columns; train_loss (column 5) covers every batch of each epoch
    assert [r.split(",")[4] for r in logs[0][1:]] == [r.split(",")[4] for r in logs[1][1:]]
