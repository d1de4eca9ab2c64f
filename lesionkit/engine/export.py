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
  SegMAE at inference) and the SS2D models (VM-UNet, CM-SSM U-Net): their ``selective_scan`` /
  ``selective_scan_2d`` / ``cross_scan`` / ``cross_merge`` calls are traced inside
  :func:`lesionkit.kernels.export_mode` as plain tensor ops (the scan in chunks, stepped within
  each and composed across them by a prefix scan, :mod:`lesionkit.kernels.reference.export_scan`), so the file runs in plain ONNX
  Runtime without lesionkit. The batch size is dynamic, the image size fixed at export. Other
  lesionkit ops (patch cross-attention, k-means, the patch-wise loss) have no lowering and are
  refused by name. Needs the ``onnx`` extra (``pip install lesionkit[onnx]``: onnx, onnxscript,
  and onnxruntime for the check, which runs the file in ONNX Runtime on the CPU).

GRCSF with its RCU is refused with the reason (its residual maps are made from the image's
bytes at run time, which no format holds); GRCSF without the RCU exports like UNet++. A model
that ``torch.export`` cannot capture stops with :class:`ExportError`, never a traceback.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lesionkit.models import segmentation_logits

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
# How close the exported model's logits must be to the checkpoint's (float32 on CPU; kernels
# may reorder sums, nothing else changes).
RTOL, ATOL = 1e-4, 1e-4
# lesionkit ops that export_mode turns into plain tensor ops (their _triton twins included).
ONNX_LOWERED_OPS = ("selective_scan", "selective_scan_2d", "cross_scan", "cross_merge")


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
    # Format-specific facts for the report: for onnx the opset, file size, ONNX Runtime version,
    # the batch sizes checked, the probabilities' max |difference| and the scan chunk size.
    details: dict = field(default_factory=dict)


def lesionkit_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the ``torch.ops.lesionkit.*`` operators an exported program calls."""
    names = set()
    for node in program.graph.nodes:
        target = getattr(node.target, "name", None)
        name = target() if callable(target) else str(node.target)
        if node.op == "call_function" and name.startswith("lesionkit::"):
            names.add(name)
    return sorted(names)


def _op_base_name(name: str) -> str:
    """``lesionkit::cross_scan_triton.default`` -> ``cross_scan``."""
    base = name.split("::", 1)[-1].split(".", 1)[0]
    return base.removesuffix("_triton")


# How the ONNX graph is tidied after translation (``--optimize``). "light": inline functions,
# fold constants, drop unused nodes, lift and deduplicate initializers, merge common
# subexpressions - what halves the SS2D models' files and cuts their nodes by three quarters.
# "full": onnxscript's whole optimizer (torch.onnx's optimize=True), which adds its pattern
# rewriter and ONNX fusions: on vmunet_tiny / cmssm_tiny at 128 px it took 43-49 s against
# light's 1.1 s, for files 2 % smaller and ONNX Runtime 0-5 % faster, which fuses on load
# itself (docs/engine.md). "none": the graph as translated (twice the size).
ONNX_OPTIMIZE = ("light", "full", "none")


def _onnx_optimize_level(optimize: str | bool | None) -> str:
    if optimize is None:
        return "light"
    if isinstance(optimize, bool):  # the former flag: True ran the whole optimizer
        return "full" if optimize else "none"
    if optimize not in ONNX_OPTIMIZE:
        raise ExportError(f"--optimize should be one of {list(ONNX_OPTIMIZE)}, got {optimize!r}")
    return optimize


def _optimize_onnx(program: torch.onnx.ONNXProgram, level: str) -> None:
    """Tidy the translated ``program`` in place at ``level`` (:data:`ONNX_OPTIMIZE`)."""
    if level == "none":
        return
    if level == "full":
        program.optimize()  # what torch.onnx.export(optimize=True) runs
        return
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes import common

    model = program.model
    onnxscript.optimizer.inline(model)
    for _ in range(2):  # as the full optimizer's loop, without its rewrite rules
        folded = onnxscript.optimizer.fold_constants(model)
        onnxscript.optimizer.remove_unused_nodes(model)
        if not folded.modified:
            break
    ir.passes.Sequential(
        common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass())(model)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None,
                      image_size: int | None = None, batch: int = 1, scan_chunk: int | None = None,
                      optimize: str | bool | None = None) -> ExportResult:
    """Export ``checkpoint``'s model to ``fmt`` (one of :data:`FORMATS`) and check it reproduces the model.

    `scan_chunk` (onnx only): steps per chunk of the exported selective scan (default
    :data:`lesionkit.kernels.reference.export_scan.DEFAULT_CHUNK`). `optimize` (onnx only): how
    the graph is tidied, one of :data:`ONNX_OPTIMIZE` (None: "light"; True / False: "full" / "none").
    """
    from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint

    if fmt not in FORMATS:
        raise ExportError(f"--format should be one of {list(FORMATS)}, got {fmt!r}")
    if optimize is not None and fmt != "onnx":
        raise ExportError(f"--optimize applies to --format onnx only, got --format {fmt}")
    optimize = _onnx_optimize_level(optimize)
    if scan_chunk is not None and fmt != "onnx":
        raise ExportError(f"--scan-chunk applies to --format onnx only, got --format {fmt}")
    if scan_chunk is not None and (isinstance(scan_chunk, bool) or not isinstance(scan_chunk, int) or scan_chunk < 1):
        raise ExportError(f"--scan-chunk should be a positive int, got {scan_chunk!r}")
    state = load_checkpoint(checkpoint)
    model = LogitsOnly(model_from_checkpoint(state, checkpoint)).eval()
    check_exportable(model.model, state["model_name"])
    size = image_size or int(state.get("config", {}).get("data", {}).get("image_size", 224))
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(FORMATS[fmt])
    sample = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    details: dict = {}
    with torch.no_grad():
        want = model(sample)
        try:
            program = torch.export.export(model, (sample,))
        except Exception as err:  # every format starts from this program: say so, not a traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"torch.export cannot capture the forward of {state['model_name']} ({first}), so no "
                              f"format can hold it; nothing written") from err
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
            check_onnx_lowerable(program, state["model_name"])
            got, details = _export_onnx(model, sample, out, state["model_name"], scan_chunk, optimize)
    diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("inf")
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=RTOL, atol=ATOL):
        out.unlink(missing_ok=True)
        raise ExportError(f"the {fmt} export of {state['model_name']} does not reproduce the checkpoint: output "
                          f"{tuple(got.shape)} vs {tuple(want.shape)}, max |difference| {diff:.3g} "
                          f"(allowed rtol {RTOL}, atol {ATOL}); nothing written")
    return ExportResult(out, fmt, diff, tuple(sample.shape), details)


def check_exportable(model: nn.Module, name: str) -> None:
    """Raise :class:`ExportError` for models whose forward no format can hold, saying why."""
    from lesionkit.models.grcsf import GRCSF

    if isinstance(model, GRCSF) and model.cfg.use_rcu:
        # The maps come from the carried MAE per image, seeded by a hash of the image's bytes
        # (lesionkit.layers.residual_maps), or from the caller: neither fits one image input.
        raise ExportError(f"{name} cannot be exported: its RCU needs the MAE residual maps (GRCSF Eq. 3-5), which "
                          "the model makes from the image's bytes at run time (a hashed, seeded loop that "
                          "torch.export, TorchScript and ONNX cannot hold); the exported model takes images only. "
                          "Run the checkpoint with lesionkit predict / evaluate, or export a GRCSF without the RCU "
                          "(model.kwargs.use_rcu=false)")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel probabilities from (N, classes, H, W) logits: sigmoid for one class, else softmax."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def check_onnx_lowerable(program: torch.export.ExportedProgram, name: str) -> None:
    """Raise :class:`ExportError` naming every lesionkit op in ``program`` that ONNX cannot hold."""
    unlowered = [op for op in lesionkit_ops_in(program) if _op_base_name(op) not in ONNX_LOWERED_OPS]
    if unlowered:
        raise ExportError(f"ONNX cannot hold {name}: its forward calls lesionkit operators {unlowered}, which have "
                          f"no ONNX lowering (only {', '.join(ONNX_LOWERED_OPS)} do); use --format "
                          "exported-program (or torchscript)")


def _translate_onnx(model: nn.Module, pair: torch.Tensor, chunk: int) -> torch.onnx.ONNXProgram:
    """``model`` traced on ``pair`` under ``export_mode(chunk)`` and translated to ONNX, input
    "images" with a dynamic batch, output "logits", not yet tidied (:func:`_optimize_onnx`)."""
    from lesionkit.kernels import export_mode

    with export_mode(chunk), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.onnx.export(model, (pair,), None, input_names=["images"], output_names=["logits"],
                                 dynamo=True, optimize=False, verbose=False,
                                 dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})


def _export_onnx(model: nn.Module, sample: torch.Tensor, out: Path, name: str,
                 scan_chunk: int | None = None, optimize: str | bool | None = None) -> tuple[torch.Tensor, dict]:
    """Write ``model`` as ONNX (batch dynamic) and run it in ONNX Runtime on ``sample``.

    Call :func:`check_onnx_lowerable` first. Returns ONNX Runtime's logits for ``sample`` and
    the report's details; the export is also checked on a batch of two images against PyTorch,
    so the dynamic batch is proven too. Call it under ``torch.no_grad()``.
    """
    from lesionkit.kernels.reference.export_scan import DEFAULT_CHUNK

    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates with it)
    except ImportError as err:
        raise ExportError(f"--format onnx needs the onnx extra ({err}); install it with: pip install 'lesionkit[onnx]'") from err
    optimize = _onnx_optimize_level(optimize)
    chunk = DEFAULT_CHUNK if scan_chunk is None else scan_chunk
    # Traced on a batch of two, not `sample`: a batch of one would be specialised to 1. ONNX
    # Runtime then runs `sample` and this pair, so the dynamic batch is checked at two sizes.
    pair = torch.rand(2, *sample.shape[1:], generator=torch.Generator().manual_seed(1))
    try:
        program = _translate_onnx(model, pair, chunk)
        _optimize_onnx(program, optimize)
        program.save(str(out), external_data=False)
    except Exception as err:
        out.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {name} failed: {err}") from err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": sample.numpy()})
    got = torch.from_numpy(got)
    (got_pair,) = session.run(None, {"images": pair.numpy()})
    got_pair = torch.from_numpy(got_pair)
    want_pair = model(pair)
    prob_diff = max((probabilities(got) - probabilities(model(sample))).abs().max().item(),
                    (probabilities(got_pair) - probabilities(want_pair)).abs().max().item())
    if got_pair.shape != want_pair.shape or not torch.allclose(got_pair, want_pair, rtol=RTOL, atol=ATOL):
        diff = (got_pair - want_pair).abs().max().item() if got_pair.shape == want_pair.shape else float("inf")
        out.unlink(missing_ok=True)
        raise ExportError(f"the onnx export of {name} does not reproduce the checkpoint on a batch of 2: output "
                          f"{tuple(got_pair.shape)} vs {tuple(want_pair.shape)}, max |difference| {diff:.3g} "
                          f"(allowed rtol {RTOL}, atol {ATOL}); nothing written")
    opset = next(o.version for o in onnx.load(str(out), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    details = {"opset": opset, "size_bytes": out.stat().st_size, "onnxruntime": onnxruntime.__version__,
               "batches_checked": [sample.shape[0], 2], "max_abs_diff_batch_2": (got_pair - want_pair).abs().max().item(),
               "probabilities_max_abs_diff": prob_diff, "scan_chunk": chunk, "optimize": optimize}
    return got, details


__all__ = ["ATOL", "FORMATS", "ONNX_LOWERED_OPS", "ONNX_OPTIMIZE", "RTOL", "ExportError", "ExportResult", "LogitsOnly",
           "check_exportable", "check_onnx_lowerable", "export_checkpoint", "lesionkit_ops_in", "probabilities"]
