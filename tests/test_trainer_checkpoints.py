"""Mid-epoch checkpoints, stop signals, multi-stage resume hooks, progress output and curves."""

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lesionkit.engine import Stage, Trainer, load_checkpoint

from conftest import assert_same_state
from test_trainer import Discs, fit, make_config

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


class StopAtStep(Trainer):
    """Raises (like a kill) right after global step `stop_step` has been checkpointed."""

    stop_step = 6

    def save(self, path, full=True):
        super().save(path, full)
        if full and self.global_step == self.stop_step and self._epoch_batches:
            raise KeyboardInterrupt


def test_mid_epoch_checkpoint_resumes_at_the_same_batch(tmp_path):
    over = {"epochs": 3, "model.kwargs.dropout": 0.2, "checkpoint.every_steps": 3,
            "data.transforms": "{hflip: 0.5, vflip: 0.5, rot90: 0.5}"}
    full, full_summary = fit(make_config(tmp_path / "a", **over))
    with pytest.raises(KeyboardInterrupt):
        fit(make_config(tmp_path / "b", **over), StopAtStep)
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["global_step"], state["epoch_batches"]) == (1, 6, 2)  # 4 steps per epoch
    resumed, summary = fit(make_config(tmp_path / "b", **over), resume=tmp_path / "b" / "last.pt")
    assert summary["global_step"] == full_summary["global_step"] == 12
    assert_same_weights(full.model, resumed.model)
    # The interrupted epoch's logged loss covers all of its batches, as in the uninterrupted run.
    assert read_csv(tmp_path / "a" / "log.csv")[1]["train_loss"] == read_csv(tmp_path / "b" / "log.csv")[1]["train_loss"]
    steps = read_csv(tmp_path / "b" / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 13))
    assert steps == read_csv(tmp_path / "a" / "steps.csv")


class ScriptedDice(Trainer):
    """Validation Dice from a script (best at epoch 2, worse after), so that a checkpoint's
    best_metric, best_epoch and bad_epochs all differ from a fresh run's; stops like a kill right
    after the mid-epoch checkpoint of ``stop_step`` (None: runs to the end)."""

    dice = (0.5, 0.7, 0.6, 0.65, 0.4)
    stop_step = None
    restored = None

    def validate(self):
        return {"dataset": {"dice": self.dice[self.epoch - 1]}}

    def save(self, path, full=True):
        super().save(path, full)
        if full and self.global_step == self.stop_step and self._epoch_batches:
            raise KeyboardInterrupt

    def load_resume_state(self, state):
        super().load_resume_state(state)
        self.restored = copy.deepcopy(self.state_dict(full=True))  # what the trainer holds once the resume is in


class StopAtStep14(ScriptedDice):
    stop_step = 14  # epoch 4, batch 2


def test_resume_restores_every_field_of_the_checkpoint(tmp_path):
    over = {"epochs": 5, "checkpoint.every_steps": 2, "time_budget": 1e6, "scheduler.name": "cosine",
            "scheduler.warmup_epochs": 1}
    full, full_summary = fit(make_config(tmp_path / "a", **over), ScriptedDice)
    with pytest.raises(KeyboardInterrupt):
        fit(make_config(tmp_path / "b", **over), StopAtStep14)
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    # Every field a fresh run would get wrong: 3 epochs and 2 batches done, Dice best at epoch 2.
    assert (state["epoch"], state["global_step"], state["epoch_batches"]) == (3, 14, 2)
    assert (state["best_metric"], state["best_epoch"], state["bad_epochs"]) == (0.7, 2, 1)
    assert state["elapsed"] > 0 and state["scheduler"]["last_epoch"] == 14 and state["epoch_sums"]

    resumed = ScriptedDice(make_config(tmp_path / "b", **over), train_data=Discs(16), val_data=Discs(6, seed=1))
    resumed.resume(tmp_path / "b" / "last.pt")
    assert resumed.elapsed_before == state["elapsed"]  # the time budget counts the time before the kill
    summary = resumed.fit()
    restored = dict(resumed.restored)
    # The elapsed clock continues from the checkpoint's; loss sums wait in _epoch_sums until the epoch runs.
    assert restored.pop("elapsed") >= state["elapsed"]
    assert restored.pop("epoch_sums") == {} and resumed.restored["epoch_batches"] == 2
    assert_same_state({k: v for k, v in state.items() if k not in ("elapsed", "epoch_sums")}, restored)
    assert summary["elapsed_s"] >= state["elapsed"]

    # The end of the resumed run is the end of the uninterrupted one, field by field.
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a.pop("config")["out_dir"] != b.pop("config")["out_dir"]
    assert a.pop("elapsed") > 0 and b.pop("elapsed") > state["elapsed"]
    assert_same_state(a, b)
    assert (b["best_metric"], b["best_epoch"], b["bad_epochs"], b["epoch"]) == (0.7, 2, 3, 5)
    assert {k: summary[k] for k in ("best_metric", "best_epoch", "global_step", "stop_reason")} == {
        k: full_summary[k] for k in ("best_metric", "best_epoch", "global_step", "stop_reason")}


def test_a_resume_checkpoint_must_fit_the_epoch(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit(make_config(tmp_path, **{"checkpoint.every_steps": 3}), StopAtStep)
    trainer = Trainer(make_config(tmp_path, **{"data.batch_size": 16}), train_data=Discs(16), val_data=Discs(2))
    with pytest.raises(ValueError, match="2 batches into an epoch, but an epoch of this run has 1"):
        trainer.resume(tmp_path / "last.pt")


class Pretrain(Trainer):
    """A pretrain -> fine-tune recipe: the head frozen first, each stage with its own optimiser."""

    optimizer_per_stage = True

    def stages(self):
        return [Stage("pretrain", 1), Stage("finetune", 2)]

    def on_stage_start(self, stage):
        self.model.head.requires_grad_(stage.name != "pretrain")
        self.entered = (stage.name, self.epoch == self.stage_start_epoch)


def test_optimizer_per_stage_rebuilds_and_resumes_at_the_stage_boundary(tmp_path):
    full, _ = fit(make_config(tmp_path / "a"), Pretrain)
    n_head = sum(1 for _ in full.model.head.parameters())
    assert len(full.optimizer.param_groups[0]["params"]) == sum(1 for _ in full.model.parameters())

    class Crash(Pretrain):
        def on_epoch_end(self, epoch, logs):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(make_config(tmp_path / "b"), Crash)
    first, _ = fit(make_config(tmp_path / "c", epochs=0 + 1), Pretrain)  # only to count pretrain params
    assert len(first.optimizer.param_groups[0]["params"]) == sum(1 for _ in first.model.parameters())
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["stage"] == "pretrain" and state["epoch"] == 1  # written at the end of stage 1
    resumed, _ = fit(make_config(tmp_path / "b"), Pretrain, resume=tmp_path / "b" / "last.pt")
    assert resumed.entered == ("finetune", True)
    assert_same_weights(full.model, resumed.model)
    assert n_head > 0


def test_redirected_output_gets_one_line_per_epoch(tmp_path, capfd):
    fit(make_config(tmp_path, epochs=2, progress="true"))
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2 [train] train_loss ") and "images/s" in lines[0]
    assert "\r" not in out + err  # no progress bar redraws in a log file


def test_curves_png_from_steps_and_epochs(tmp_path):
    from PIL import Image

    fit(make_config(tmp_path, epochs=2))
    assert len(read_csv(tmp_path / "steps.csv")) == 8
    with Image.open(tmp_path / "curves.png") as img:
        assert img.size[0] > 600 and img.size[1] > 300


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lesionkit", "train", "--model", "unet_tiny", "--data", "synthetic:4000:3",
            "--val-data", "synthetic:4:4", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
            "--out", str(out), "--seed", "1", "--set", "model.kwargs.widths=[4,8,16]", "data.num_workers=0", *extra]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = _train_cmd(tmp_path, "checkpoint.every_steps=20")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # The first mid-epoch checkpoint says the loop runs, 20 of the epoch's 1000 steps in.
        while not (tmp_path / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and f"lesionkit train --resume {tmp_path}/last.pt" in err
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 0 and 20 < state["epoch_batches"] < 1000 and state["global_step"] == state["epoch_batches"]


SLOW_STEP = """
import sys, time
from lesionkit.engine import TrainConfig, Trainer

class Slow(Trainer):
    def training_step(self, batch):
        print("step", flush=True)
        time.sleep(30)  # the second signal must not wait for this
        return super().training_step(batch)

cfg = TrainConfig().with_overrides(["data.train=synthetic:8", "data.val_fraction=0", "data.image_size=32",
                                    "data.batch_size=4", "model.kwargs.widths=[4,8,16]", "data.num_workers=0",
                                    f"out_dir={sys.argv[1]}", "epochs=1"])
Slow(cfg).fit()
"""


def test_a_second_interrupt_stops_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STEP)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "step\n"  # inside the first step's sleep
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT, proc.stderr.read()[-2000:]  # the default handler: ended at once
    assert not (tmp_path / "out" / "last.pt").exists()
