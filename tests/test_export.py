"""`lesionkit export`: each format round-trips a checkpoint's model, and clear errors where it cannot."""

import importlib.util

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.engine.export import (
    ExportError,
    LogitsOnly,
    _export_onnx,
    check_onnx_lowerable,
    export_checkpoint,
    lesionkit_ops_in,
)

from test_trainer import Discs, make_config

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from lesionkit.engine import Trainer

    out = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    Trainer(make_config(out, epochs=1), train_data=Discs(8), val_data=Discs(2)).fit()
    return out / "best.pt"


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript"])
def test_round_trip(checkpoint, tmp_path, fmt):
    result = export_checkpoint(checkpoint, fmt, tmp_path / f"model.{fmt}")
    assert result.path.is_file() and result.input_shape == (1, 3, 128, 128)
    assert result.max_abs_diff <= 1e-4


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
def test_onnx_round_trip_through_the_cli(checkpoint, tmp_path, capsys):
    from lesionkit.cli import main

    code = main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--image-size", "64"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "reproduces the checkpoint" in out and (tmp_path / "m.onnx").stat().st_size > 10_000
    assert "graph optimize light" in out  # the default
    code = main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "n.onnx"),
                 "--image-size", "64", "--no-optimize"])
    out, err = capsys.readouterr()
    assert code == 0 and "graph optimize none" in out, err[-2000:]


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
def test_onnx_optimize_levels(tmp_path):
    """--optimize light (the default) folds the translated graph to fewer nodes than none, full
    to no more than light; each file reproduces PyTorch."""
    import onnx

    model = LogitsOnly(CrossScanModel()).eval()
    sample = torch.rand(1, 3, 8, 8)
    nodes = {}
    with K.use_backend("cpu"), torch.no_grad():
        for level in ("none", "light", "full"):
            got, details = _export_onnx(model, sample, tmp_path / f"{level}.onnx", "xs", optimize=level)
            torch.testing.assert_close(got, model(sample), rtol=1e-6, atol=1e-6)
            assert details["optimize"] == level
            nodes[level] = len(onnx.load(str(tmp_path / f"{level}.onnx")).graph.node)
    assert nodes["light"] < nodes["none"] and nodes["full"] <= nodes["light"], nodes
    with pytest.raises(ExportError, match=r"--optimize should be one of \['light', 'full', 'none'\], got 'fast'"):
        _export_onnx(model, sample, tmp_path / "x.onnx", "xs", optimize="fast")
    assert not (tmp_path / "x.onnx").exists()


def test_optimize_is_checked(checkpoint, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"--optimize applies to --format onnx only"):
        export_checkpoint(checkpoint, "torchscript", tmp_path / "m.ts", optimize="none")
    with pytest.raises(ExportError, match=r"--optimize should be one of"):
        export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx", optimize="fast")
    assert not (tmp_path / "m.onnx").exists()


class CrossScanModel(torch.nn.Module):
    """A model whose forward calls lesionkit's cross-scan ops (lowered to plain ops for ONNX)."""

    def forward(self, x):
        return K.cross_merge(K.cross_scan(x), x.shape[-2], x.shape[-1])[:, :1]


class PatchAttentionModel(torch.nn.Module):
    """A model whose forward calls patch cross-attention, which has no ONNX lowering."""

    def forward(self, x):
        q = x[:, None]
        return K.cross_merge(K.cross_scan(K.patch_cross_attention(q, q, q, 4)[:, 0]), x.shape[-2], x.shape[-1])[:, :1]


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built: the reference runs, no lesionkit op")
def test_onnx_refuses_a_model_with_an_op_it_cannot_lower():
    model = LogitsOnly(PatchAttentionModel()).eval()
    sample = torch.rand(1, 3, 8, 8)
    with K.use_backend("cpu"):
        program = torch.export.export(model, (sample,))
    ops = lesionkit_ops_in(program)
    assert any(op.startswith("lesionkit::patch_cross_attention") for op in ops), ops
    # Only the op without a lowering is named; the cross-scan ops it also calls are not.
    with pytest.raises(ExportError, match=r"ONNX cannot hold xs: its forward calls lesionkit operators "
                                          r"\['lesionkit::patch_cross_attention[^,]*'\].*exported-program"):
        check_onnx_lowerable(program, "xs")


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
def test_onnx_lowers_the_cross_scan_ops(tmp_path):
    model = LogitsOnly(CrossScanModel()).eval()
    sample = torch.rand(1, 3, 8, 8)
    with K.use_backend("cpu"), torch.no_grad():
        program = torch.export.export(model, (sample,))
        check_onnx_lowerable(program, "xs")  # cross_scan / cross_merge have a lowering
        got, details = _export_onnx(model, sample, tmp_path / "x.onnx", "xs", optimize=False)
        torch.testing.assert_close(got, model(sample), rtol=1e-6, atol=1e-6)
    assert details["batches_checked"] == [1, 2] and details["opset"] >= 18


def test_scan_chunk_is_checked(checkpoint):
    with pytest.raises(ExportError, match=r"--scan-chunk applies to --format onnx only"):
        export_checkpoint(checkpoint, "torchscript", scan_chunk=8)
    with pytest.raises(ExportError, match=r"--scan-chunk should be a positive int, got 0"):
        export_checkpoint(checkpoint, "onnx", scan_chunk=0)


def test_unknown_format_is_named(checkpoint):
    with pytest.raises(ExportError, match=r"--format should be one of \['onnx', 'torchscript', 'exported-program'\]"):
        export_checkpoint(checkpoint, "tflite")


def grcsf_checkpoint(path, **kwargs):
    """A GRCSF checkpoint carrying its MAE, as the grcsf trainer writes it (narrowed, 32 px)."""
    from lesionkit.engine.checkpoint import checkpoint_header, save_checkpoint
    from lesionkit.models import create_model

    kwargs = {"img_size": 32, "widths": [4, 8, 8, 16, 16], "residual_repeats": 2, "score_hidden": 8,
              "mae": {"name": "mae_vit_tiny", "kwargs": {"img_size": 32, "depth": 1}}, **kwargs}
    torch.manual_seed(0)
    state = checkpoint_header("grcsf_tiny", kwargs, {"data": {"image_size": 32}})
    state["model"] = create_model("grcsf_tiny", **kwargs).state_dict()
    save_checkpoint(state, path)
    return path


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript", "onnx"])
def test_grcsf_export_stops_with_the_reason(tmp_path, capsys, fmt):
    from lesionkit.cli import main

    ckpt = grcsf_checkpoint(tmp_path / "grcsf.pt")
    out = tmp_path / "grcsf.export"
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lesionkit export: error: grcsf_tiny cannot be exported: its RCU needs the MAE residual maps")
    assert "use_rcu=false" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_grcsf_without_the_rcu_exports(tmp_path):
    ckpt = grcsf_checkpoint(tmp_path / "grcsf.pt", use_rcu=False, mae=None)
    result = export_checkpoint(ckpt, "exported-program", tmp_path / "grcsf.pt2")
    assert result.path.is_file() and result.input_shape == (1, 3, 32, 32) and result.max_abs_diff <= 1e-4


def test_a_forward_torch_export_cannot_capture_is_an_export_error(checkpoint, tmp_path, monkeypatch):
    import lesionkit.engine.checkpoint as ckpt

    class HostRoundTrip(torch.nn.Module):  # .numpy() inside forward, as GRCSF's per-image hash does
        def forward(self, x):
            return torch.from_numpy(x.numpy().copy())[:, :1]

    monkeypatch.setattr(ckpt, "model_from_checkpoint", lambda state, path: HostRoundTrip())
    with pytest.raises(ExportError, match=r"torch.export cannot capture the forward of unet_tiny \(.*numpy.*\), so no "
                                          r"format can hold it; nothing written"):
        export_checkpoint(checkpoint, "exported-program", tmp_path / "x.pt2")
    assert not (tmp_path / "x.pt2").exists()


LOAD_PT2 = """
import sys
import torch
import lesionkit.kernels  # registers the lesionkit ops the program calls
program = torch.export.load(sys.argv[1])
torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_exported_program_loads_and_runs_in_a_fresh_process(tmp_path):
    """A .pt2 of a model that calls lesionkit ops (VM-UNet's scans) runs in a new interpreter that
    imports lesionkit.kernels only, and gives the checkpoint's logits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lesionkit.engine.checkpoint import checkpoint_header, load_checkpoint, model_from_checkpoint, save_checkpoint
    from lesionkit.models import create_model

    kwargs = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1], "d_state": 4}
    torch.manual_seed(0)
    state = checkpoint_header("vmunet", kwargs, {"data": {"image_size": 32}})
    state["model"] = create_model("vmunet", **kwargs).state_dict()
    save_checkpoint(state, tmp_path / "vmunet.pt")
    result = export_checkpoint(tmp_path / "vmunet.pt", "exported-program", tmp_path / "vmunet.pt2")
    assert any(op.startswith("lesionkit::") for op in lesionkit_ops_in(torch.export.load(result.path)))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # the exported batch
    torch.save(images, tmp_path / "images.pt")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", LOAD_PT2, str(result.path), str(tmp_path / "images.pt"),
                          str(tmp_path / "logits.pt")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    model = LogitsOnly(model_from_checkpoint(load_checkpoint(tmp_path / "vmunet.pt"))).eval()
    with torch.no_grad():
        want = model(images)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-4, atol=1e-4)
