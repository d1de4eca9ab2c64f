"""Pure-PyTorch references of every lesionkit op: the test oracle, the benchmark baseline and
the fallback where no compiled or Triton kernel can run."""

from lesionkit.kernels.reference.patchwise_softmax_loss import (
    patchwise_softmax_loss_per_image_reference,
    patchwise_softmax_loss_reference,
)

__all__ = ["patchwise_softmax_loss_per_image_reference", "patchwise_softmax_loss_reference"]
