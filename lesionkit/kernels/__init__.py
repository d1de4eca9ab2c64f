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
from lesionkit.kernels.patchwise_softmax_loss import PatchwiseSoftmaxLoss, patchwise_softmax_loss
from lesionkit.kernels.reference import patchwise_softmax_loss_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "PatchwiseSoftmaxLoss",
    "format_info",
    "info",
    "patchwise_softmax_loss",
    "patchwise_softmax_loss_reference",
    "requested_backend",
    "select_backend",
    "use_backend",
]
