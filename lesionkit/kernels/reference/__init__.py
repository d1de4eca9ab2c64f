"""Pure-PyTorch references of every lesionkit op: the test oracle, the benchmark baseline and
the fallback where no compiled or Triton kernel can run."""

from lesionkit.kernels.reference.cross_scan import cross_merge_reference, cross_scan_reference
from lesionkit.kernels.reference.gcu_compensate import gcu_compensate_reference
from lesionkit.kernels.reference.export_scan import selective_scan_2d_export, selective_scan_export
from lesionkit.kernels.reference.kmeans import kmeans_reference
from lesionkit.kernels.reference.layer_norm import layer_norm_last_reference
from lesionkit.kernels.reference.patch_cross_attention import (
    patch_cross_attention_mix_reference,
    patch_cross_attention_reference,
)
from lesionkit.kernels.reference.patchwise_softmax_loss import (
    patchwise_softmax_loss_per_image_reference,
    patchwise_softmax_loss_reference,
)
from lesionkit.kernels.reference.selective_scan import (
    selective_scan_2d_reference,
    selective_scan_reference,
    selective_scan_sequential_reference,
)

__all__ = [
    "cross_merge_reference",
    "cross_scan_reference",
    "gcu_compensate_reference",
    "kmeans_reference",
    "layer_norm_last_reference",
    "patch_cross_attention_mix_reference",
    "patch_cross_attention_reference",
    "patchwise_softmax_loss_per_image_reference",
    "patchwise_softmax_loss_reference",
    "selective_scan_2d_export",
    "selective_scan_2d_reference",
    "selective_scan_export",
    "selective_scan_reference",
    "selective_scan_sequential_reference",
]
