"""Two CPU processes with gloo: identical weights on both ranks; a dead peer ends the run with an error."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lesionkit.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,  # torchrun subprocesses: the slow stage (make test-slow)
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "train_rank.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from lesionkit.engine import TrainConfig, build_trainer
        cfg = TrainConfig().with_overrides([
            "model.kwargs.widths=[4,8,16]", "data.train=synthetic:20:0", "data.val=synthetic:4:1",
            "data.image_size=32", "data.batch_size=4", "data.num_workers=0", "epochs=2", "progress=false",
            "device=cpu", "dist_timeout=60", "out_dir={tmp_path / 'run'}"])
        trainer = build_trainer(cfg)
        initial = {{k: v.clone() for k, v in trainer.model.state_dict().items()}}
        trainer.fit()
        torch.save({{"final": trainer.model.state_dict(), "initial": initial,
                    "world": trainer.dist.world_size, "steps": trainer.global_step}},
                   "{tmp_path}/rank%d.pt" % trainer.dist.rank)
        trainer.dist.shutdown()
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # 20 images over 2 ranks, batch 4: 10 images per rank, the partial batch dropped: 2 steps per epoch.
    assert r0["steps"] == r1["steps"] == 2 * 2
    changed = 0
    for name, tensor in r0["final"].items():
        assert torch.equal(tensor, r1["final"][name]), name
        changed += not torch.equal(tensor, r0["initial"][name])
    assert changed > 0  # they trained, not merely stayed at the same initialisation
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2
    for name, tensor in last["model"].items():
        assert torch.equal(tensor, r0["final"][name]), name


def test_torchrun_segmae_alternating_steps(tmp_path):
    # Each SegMAE step leaves one decoder without gradients; DDP must not wait for them.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lesionkit", "train", "--config", "segmae_tiny_isic2018",
           "--data", "synthetic:16:0", "--val-data", "synthetic:4:1", "--image-size", "32",
           "--batch-size", "4", "--epochs", "2", "--out", str(out), "--device", "cpu", "--no-progress",
           "--set", "model.kwargs.img_size=32", "segmae.seg_patch_size=8", "segmae.mae_epochs=1",
           "data.num_workers=0", "time_budget=null", "scheduler.horizon=epochs",
           "dist_timeout=60"]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = load_checkpoint(out / "last.pt")
    assert last["world_size"] == 2 and last["epoch"] == 1 + 2  # one MAE epoch, two hybrid


def test_torchrun_amlp_pretrain(tmp_path):
    # AMLP on DDP: k-means masking per rank's batch, frozen segmentation head, CCL on.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lesionkit", "pretrain", "--config", "amlp_pretrain_tiny_isic2018", "--data", "synthetic:16:0",
           "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--out", str(out), "--device", "cpu",
           "--precision", "fp32", "--no-progress", "--set", "model.kwargs.widths=[4,8,16]", "data.num_workers=0",
           "channels_last=false", "dist_timeout=60"]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = load_checkpoint(out / "last.pt")
    assert last["world_size"] == 2 and last["epoch"] == 2 and last["global_step"] == 2 * 2


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_dead_or_hung_peer_ends_the_run_with_an_error(tmp_path, how):
    # killed: its sockets close and the next collective fails at once; hung (SIGSTOP): the
    # sockets stay open and the process-group timeout (dist_timeout) ends the wait.
    port = str(free_port())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lesionkit", "train", "--model", "unet_tiny", "--data", "synthetic:64:0",
           "--val-data", "synthetic:4:1", "--image-size", "32", "--epochs", "200", "--batch-size", "4",
           "--out", str(out), "--no-progress", "--device", "cpu",
           "--set", "model.kwargs.widths=[4,8,16]", "data.num_workers=0", "dist_timeout=10"]
    procs = [subprocess.Popen(cmd, env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.csv").exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=120)  # a hang fails here
        took = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode not in (0, None)
    assert "Error" in err, err[-3000:]
    assert took < 120
    print(f"rank 0 failed {took:.1f} s after its peer was {how}:", err.strip().splitlines()[-1])
