"""`lesionkit export`: each format round-trips a checkpoint's model, and clear errors where it cannot."""

import importlib.util

import pytest
import torch

import lesionkit.kernels as K
from lesionkit.kernels import _library
from lesionkit.engine.export import ExportError, LogitsOnly, _export_onnx, export_checkpoint, lesionkit_ops_in

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


class CrossScanModel(torch.nn.Module):
    """A model whose forward calls a lesionkit operator."""

    def forward(self, x):
        return K.cross_merge(K.cross_scan(x), x.shape[-2], x.shape[-1])[:, :1]


@pytest.mark.skipif(not _library.HAS_OPS, reason="compiled library not built: the reference runs, no lesionkit op")
def test_onnx_refuses_a_model_with_lesionkit_ops(tmp_path):
    model = LogitsOnly(CrossScanModel()).eval()
    sample = torch.rand(1, 3, 8, 8)
    with K.use_backend("cpu"):
        program = torch.export.export(model, (sample,))
        ops = lesionkit_ops_in(program)
        assert ops and all(op.startswith("lesionkit::cross_") for op in ops)
        with pytest.raises(ExportError, match=r"ONNX cannot hold xs: its forward calls lesionkit operators.*exported-program"):
            _export_onnx(program, model, sample, tmp_path / "x.onnx", "xs")


def test_unknown_format_is_named(checkpoint):
    with pytest.raises(ExportError, match=r"--format should be one of \['onnx', 'torchscript', 'exported-program'\]"):
        export_checkpoint(checkpoint, "tflite")
