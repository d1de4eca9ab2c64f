"""lesionkit's hot-path operators: typed functions over ``torch.ops.lesionkit.*``.

Each op runs on one of the backends ``reference`` (pure PyTorch), ``cpu`` / ``cuda`` (the
compiled ``lesionkit._C``) or ``triton``; see :mod:`lesionkit.kernels.backend`. Inside
:func:`export_mode` they run as plain tensor ops that export to ONNX.
"""

from lesionkit.kernels.backend import (
    BACKENDS,
    BackendUnavailableError,
    export_mode,
    requested_backend,
    select_backend,
    use_backend,
)
from lesionkit.kernels.cross_scan import cross_merge, cross_scan
from lesionkit.kernels.gcu_compensate import gcu_compensate
from lesionkit.kernels.info import format_info, info
from lesionkit.kernels.kmeans import KMeansResult, kmeans
from lesionkit.kernels.layer_norm import layer_norm_last
from lesionkit.kernels.patch_cross_attention import patch_cross_attention, patch_cross_attention_mix
from lesionkit.kernels.patchwise_softmax_loss import patchwise_softmax_loss
from lesionkit.kernels.reference import (
    cross_merge_reference,
    cross_scan_reference,
    gcu_compensate_reference,
    kmeans_reference,
    layer_norm_last_reference,
    patch_cross_attention_mix_reference,
    patch_cross_attention_reference,
    patchwise_softmax_loss_reference,
    selective_scan_2d_export,
    selective_scan_2d_reference,
    selective_scan_export,
    selective_scan_reference,
)
from lesionkit.kernels.selective_scan import selective_scan, selective_scan_2d

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "KMeansResult",
    "cross_merge",
    "cross_merge_reference",
    "cross_scan",
    "cross_scan_reference",
    "export_mode",
    "format_info",
    "gcu_compensate",
    "gcu_compensate_reference",
    "info",
    "kmeans",
    "kmeans_reference",
    "layer_norm_last",
    "layer_norm_last_reference",
    "patch_cross_attention",
    "patch_cross_attention_mix",
    "patch_cross_attention_mix_reference",
    "patch_cross_attention_reference",
    "patchwise_softmax_loss",
    "patchwise_softmax_loss_reference",
    "requested_backend",
    "select_backend",
    "selective_scan",
    "selective_scan_2d",
    "selective_scan_2d_export",
    "selective_scan_2d_reference",
    "selective_scan_export",
    "selective_scan_reference",
    "use_backend",
]
