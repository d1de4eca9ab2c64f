"""``lesionkit export``: a checkpoint's model as ONNX, TorchScript or a ``torch.export`` program.

Every export is checked: the exported model runs on a sample input and its logits must match
the checkpoint's model (PyTorch, eval mode) within :data:`RTOL` / :data:`ATOL`. The exported
model takes (N, 3, H, W) images in [0, 1] at the training size and returns the segmentation
logits (N, classes, H, W) - multi-head models are reduced to their logits.

- ``exported-program`` (``.pt2``, ``torch.export``) holds every model, lesionkit ops included;
  loading it needs ``import lesionkit.kernels`` when the model calls them.
- ``torchscript`` (``.ts``) holds models that trace, at the traced input shape; lesionkit ops
  need lesionkit at load time. (PyTorch deprecates TorchScript in favour of ``torch.export``.)
- ``onnx`` (``.onnx``) holds models whose forward uses no lesionkit op (U-Net, TransUNet,
  SegMAE at inference); needs the ``onnx`` extra (``pip install lesionkit[onnx]``), and
  ``onnxruntime`` (in that extra) for the check.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lesionkit.models import segmentation_logits

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
# How close the exported model's logits must be to the checkpoint's (float32 on CPU; kernels
# may reorder sums, nothing else changes).
RTOL, ATOL = 1e-4, 1e-4


class ExportError(ValueError):
    """A format cannot hold this model, or a tool it needs is missing."""


class LogitsOnly(nn.Module):
    """The model's segmentation logits, so every format sees one tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return segmentation_logits(self.model(images))


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    input_shape: tuple[int, ...]


def lesionkit_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the ``torch.ops.lesionkit.*`` operators an exported program calls."""
    names = set()
    for node in program.graph.nodes:
        target = getattr(node.target, "name", None)
        name = target() if callable(target) else str(node.target)
        if node.op == "call_function" and name.startswith("lesionkit::"):
            names.add(name)
    return sorted(names)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None,
                      image_size: int | None = None, batch: int = 1) -> ExportResult:
    """Export ``checkpoint``'s model to ``fmt`` (one of :data:`FORMATS`) and check it reproduces the model."""
    from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint

    if fmt not in FORMATS:
        raise ExportError(f"--format should be one of {list(FORMATS)}, got {fmt!r}")
    state = load_checkpoint(checkpoint)
    model = LogitsOnly(model_from_checkpoint(state, checkpoint)).eval()
    size = image_size or int(state.get("config", {}).get("data", {}).get("image_size", 224))
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(FORMATS[fmt])
    sample = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(sample)
        program = torch.export.export(model, (sample,))
        if fmt == "exported-program":
            torch.export.save(program, out)
            got = torch.export.load(out).module()(sample)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.export, and the models' input checks
                # are constants for the traced shape; the check below proves the trace.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                try:
                    scripted = torch.jit.trace(model, (sample,), check_trace=False)
                except Exception as err:
                    raise ExportError(f"{state['model_name']} cannot be traced to TorchScript ({err}); "
                                      "use --format exported-program") from err
                scripted.save(str(out))
                got = torch.jit.load(str(out))(sample)
        else:
            got = _export_onnx(program, model, sample, out, state["model_name"])
    diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("inf")
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=RTOL, atol=ATOL):
        out.unlink(missing_ok=True)
        raise ExportError(f"the {fmt} export of {state['model_name']} does not reproduce the checkpoint: output "
                          f"{tuple(got.shape)} vs {tuple(want.shape)}, max |difference| {diff:.3g} "
                          f"(allowed rtol {RTOL}, atol {ATOL}); nothing written")
    return ExportResult(out, fmt, diff, tuple(sample.shape))


def _export_onnx(program, model: nn.Module, sample: torch.Tensor, out: Path, name: str) -> torch.Tensor:
    ops = lesionkit_ops_in(program)
    if ops:
        raise ExportError(f"ONNX cannot hold {name}: its forward calls lesionkit operators {ops}, which no ONNX "
                          "runtime implements; use --format exported-program (or torchscript)")
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"--format onnx needs the onnx extra ({err}); install it with: pip install 'lesionkit[onnx]'") from err
    try:
        torch.onnx.export(model, (sample,), str(out), input_names=["images"], output_names=["logits"],
                          dynamo=True, external_data=False)
    except Exception as err:
        raise ExportError(f"ONNX export of {name} failed: {err}") from err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": sample.numpy()})
    return torch.from_numpy(got)


__all__ = ["ATOL", "FORMATS", "RTOL", "ExportError", "ExportResult", "LogitsOnly", "export_checkpoint", "lesionkit_ops_in"]
