"""lesionkit's hot-path operators: typed functions over ``torch.ops.lesionkit.*``.

Each op runs on one of the backends ``reference`` (pure PyTorch), ``cpu`` / ``cuda`` (the
compiled ``lesionkit._C``) or ``triton``; see :mod:`lesionkit.kernels.backend`.
"""

from lesionkit.kernels.backend import (
    BACKENDS,
    BackendUnavailableError,
    requested_backend,
    select_backend,
    use_backend,
)
from lesionkit.kernels.info import format_info, info
from lesionkit.kernels.patch_cross_attention import patch_cross_attention
from lesionkit.kernels.patchwise_softmax_loss import PatchwiseSoftmaxLoss, patchwise_softmax_loss
from lesionkit.kernels.reference import (
    cross_merge_reference,
    cross_scan_reference,
    patch_cross_attention_reference,
    patchwise_softmax_loss_reference,
    selective_scan_2d_reference,
    selective_scan_reference,
)
from lesionkit.kernels.selective_scan import (
    cross_merge,
    cross_scan,
    selective_scan,
    selective_scan_2d,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "PatchwiseSoftmaxLoss",
    "cross_merge",
    "cross_merge_reference",
    "cross_scan",
    "cross_scan_reference",
    "format_info",
    "info",
    "patch_cross_attention",
    "patch_cross_attention_reference",
    "patchwise_softmax_loss",
    "patchwise_softmax_loss_reference",
    "requested_backend",
    "select_backend",
    "selective_scan",
    "selective_scan_2d",
    "selective_scan_2d_reference",
    "selective_scan_reference",
    "use_backend",
]
