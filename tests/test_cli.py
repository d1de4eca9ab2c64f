"""Every CLI command end to end on tiny synthetic data, in-process through ``lesionkit.cli.main``
(one test runs ``python -m lesionkit`` in a subprocess: the entry point and its exit code)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lesionkit.cli import main
from lesionkit.data.image_io import apply_orientation
from lesionkit.engine.prediction import expand_inputs, predict_files

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.kwargs.widths=[4,8,16]", "data.num_workers=0"]


def run_cli(*args, check: bool = True) -> SimpleNamespace:
    """``lesionkit ARGS`` in this process: the exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    result = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check:
        assert code == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    result = run_cli("train", "--model", "unet_tiny", "--data", "synthetic:24:0", "--image-size", "32",
                     "--epochs", "2", "--batch-size", "4", "--out", out, "--no-progress", *TINY)
    assert "wrote" in result.stdout
    return out


def test_train_writes_its_files(trained):
    assert {"best.pt", "last.pt", "log.csv", "config.yaml"} <= {p.name for p in trained.iterdir()}
    log = (trained / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,stage,step,lr,train_loss,val_dice") and len(log) == 3
    config = (trained / "config.yaml").read_text()
    assert "image_size: 32" in config and "synthetic:24:0" in config


def test_train_from_config_file_with_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: unet_tiny\n  kwargs: {widths: [4, 8]}\ndata:\n  image_size: 16\n  batch_size: 4\n"
                   "  num_workers: 0\nepochs: 5\n")
    run_cli("train", "--config", cfg, "--data", "synthetic:12", "--val-data", "synthetic:4:9", "--epochs", "1",
            "--out", tmp_path / "run", "--no-progress", "--set", "optim.lr=0.002")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1" in saved and "lr: 0.002" in saved and "synthetic:4:9" in saved


def test_evaluate_prints_table_and_writes_metrics(trained, tmp_path):
    result = run_cli("evaluate", "--checkpoint", trained / "best.pt", "--data", "synthetic:6:5", "--out", tmp_path,
                     "--no-progress")
    assert "dice" in result.stdout and "per-image" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == 6
    assert {"dataset", "per_image", "isic_jaccard"} <= metrics.keys()
    assert 0.0 <= metrics["dataset"]["dice"] <= 1.0
    assert Image.open(tmp_path / "overlays.png").size[0] > 0


def test_predict_writes_masks_at_original_resolution(trained, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (301, 457, 3), dtype=np.uint8)).save(tmp_path / "wide.jpg", quality=90)
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (50, 37, 3), dtype=np.uint8)).save(folder / "small.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).convert("L").save(folder / "gray.bmp")
    run_cli("predict", "--checkpoint", trained / "last.pt", tmp_path / "wide.jpg", folder, "--out", tmp_path / "out")
    for stem, size in (("wide", (457, 301)), ("small", (37, 50)), ("gray", (64, 64))):
        mask = Image.open(tmp_path / "out" / f"{stem}_mask.png")
        assert mask.size == size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size == size


def test_demo_with_a_tiny_budget(tmp_path):
    run_cli("demo", "--out", tmp_path, "--epochs", "1", "--test-data", "synthetic:4:2", "--no-progress",
            "--threads", "1", "--set", "data.train=synthetic:16:0", "data.val=synthetic:4:1", "data.image_size=32",
            "model.kwargs.widths=[4,8,16]", "data.num_workers=0")
    files = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.json", "report.md", "overlays.png", "curves.png", "best.pt", "log.csv"} <= files
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == 4
    report = (tmp_path / "report.md").read_text()
    assert f"{metrics['dataset']['dice']:.4f}" in report


def test_info_reports_versions_and_kernels():
    out = run_cli("info").stdout
    assert "lesionkit" in out and "torch" in out and "unet_tiny" in out
    if (ROOT / "lesionkit" / "kernels" / "__init__.py").exists():
        assert "patchwise_softmax_loss" in out
    else:
        assert "kernels package is missing" in out


def test_info_names_the_fp32_matmul_backend(monkeypatch):
    from lesionkit.layers import linear as L

    for env, expected in [("aten", "fp32 matmul aten (LESIONKIT_FP32_MATMUL=aten)"),
                          ("auto", f"fp32 matmul {L._auto_backend()} (LESIONKIT_FP32_MATMUL=auto on ")]:
        monkeypatch.setenv("LESIONKIT_FP32_MATMUL", env)
        assert expected in run_cli("info").stdout
    monkeypatch.setenv("LESIONKIT_FP32_MATMUL", "fast")  # a bad value is reported, not a crash
    assert "LESIONKIT_FP32_MATMUL must be one of" in run_cli("info").stdout


def test_user_error_exits_2_with_one_line():
    # Through the interpreter: `python -m lesionkit` passes main()'s exit code on, no traceback.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lesionkit", "train", "--model", "unet_huge", "--data", "synthetic:8"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown model 'unet_huge'; registered models:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "unet_tiny", "--data", "nonsense:8"], "nonsense"),
    (["train", "--model", "unet_tiny", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "--model", "unet_tiny"], "data.train is not set"),
    (["evaluate", "--checkpoint", "missing.pt", "--data", "synthetic:2"], "checkpoint 'missing.pt' does not exist"),
    (["predict", "--checkpoint", "missing.pt", "nothing.png", "--out", "x"], "input 'nothing.png' does not exist"),
    (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["train", "--model", "unet_tiny", "--out", "nowhere", "--resume"], "checkpoint 'nowhere/last.pt' does not exist"),
    # Without --out, --resume looks in the recipe's out_dir; with neither it asks for one.
    (["train", "--config", "unet_tiny_isic2018", "--resume"], "checkpoint 'runs/unet_tiny_isic2018/last.pt' does not exist"),
    (["pretrain", "--resume"], "--resume without a checkpoint needs --out DIR or --config"),
])
def test_errors_name_what_is_wrong(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_resume_of_another_model_says_so(trained, tmp_path, capsys):
    args = ["train", "--model", "unet", "--data", "synthetic:8", "--image-size", "32", "--out", str(tmp_path),
            "--no-progress", "--resume", str(trained / "last.pt")]
    assert main(args) == 2
    assert "holds model 'unet_tiny', but this run trains 'unet'" in capsys.readouterr().err


def test_data_synth_then_evaluate_on_the_written_isic_layout(trained, tmp_path):
    run_cli("data", "synth", "--out", tmp_path / "isic", "--n", "4", "--layout", "isic2018", "--image-size", "48")
    result = run_cli("evaluate", "--checkpoint", trained / "best.pt", "--data", f"isic:{tmp_path / 'isic'}:train",
                     "--out", tmp_path / "eval", "--no-progress")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] == 4
    assert "isic_jaccard" in result.stdout


class Brightness(torch.nn.Module):
    """A stand-in model: lesion where the image it is given is bright."""

    def forward(self, x):
        return (x.mean(1, keepdim=True) - 0.5) * 20


def test_predict_reads_images_as_the_datasets_do(tmp_path):
    # 16-bit, transparent (composited on white, as in training) and WebP images, and a JPEG with an
    # EXIF orientation tag: the model sees the turned image and the mask is written on that view.
    bright = np.zeros((24, 40), bool)
    bright[2:10, 3:15] = True
    Image.fromarray(np.where(bright, 60000, 3000).astype(np.uint16)).save(tmp_path / "deep.png")
    rgba = np.zeros((24, 40, 4), np.uint8)
    rgba[..., 3] = np.where(bright, 0, 255)  # transparent where bright
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    gray = np.where(bright, 250, 5).astype(np.uint8)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "web.webp", lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gray).convert("RGB").save(tmp_path / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(gray).save(tmp_path / "web_overlay.png")  # predict's own outputs are not inputs
    Image.fromarray(gray).save(tmp_path / "web_mask.png")
    files = expand_inputs([str(tmp_path)])
    assert [p.name for p in files] == ["clear.png", "deep.png", "turned.jpg", "web.webp"]
    results = predict_files(Brightness().eval(), files, tmp_path / "out", 32, torch.device("cpu"))
    for r in results:
        mask = np.asarray(Image.open(r.mask_path)) > 127
        want = apply_orientation(torch.from_numpy(bright), 6).numpy() if r.path.name == "turned.jpg" else bright
        assert r.orig_size == want.shape and (mask == want).mean() > 0.97, r.path.name
        assert Image.open(r.overlay_path).size == want.shape[::-1]
