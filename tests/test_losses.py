"""Losses against straightforward references and for gradient correctness (float64 gradcheck)."""

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from lesionkit.losses import (
    BCEDiceLoss,
    DiceFocalLoss,
    MAEReconstructionLoss,
    PatchwiseSoftmaxLoss,
    SegmentationLoss,
    create_loss,
    dice_loss,
    focal_loss,
    list_losses,
)
from lesionkit.layers import patchify, unpatchify


def _data(shape=(3, 1, 10, 12), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=dtype) * 2
    target = (torch.rand(shape, generator=g) > 0.6).to(dtype)
    return logits, target


def test_dice_sample_and_batch_aggregation():
    logits, target = _data()
    p = torch.sigmoid(logits)
    per = [1 - (2 * (p[i] * target[i]).sum() + 1) / (p[i].sum() + target[i].sum() + 1) for i in range(3)]
    assert dice_loss(logits, target) == pytest.approx(torch.stack(per).mean().item(), rel=1e-6)
    assert torch.allclose(dice_loss(logits, target, reduction="none"), torch.stack(per))
    pooled = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert dice_loss(logits, target, aggregation="batch") == pytest.approx(pooled.item(), rel=1e-6)
    # A confident perfect prediction has (almost) zero loss.
    assert dice_loss((target * 2 - 1) * 50, target) < 1e-6


def test_focal_matches_torchvision():
    logits, target = _data(seed=1)
    ref = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="mean")
    assert focal_loss(logits, target) == pytest.approx(ref.item(), rel=1e-6)
    ref = sigmoid_focal_loss(logits, target, alpha=-1, gamma=0.0, reduction="mean")  # plain BCE
    assert focal_loss(logits, target, alpha=None, gamma=0.0) == pytest.approx(ref.item(), rel=1e-6)


def test_combined_losses_are_weighted_sums():
    logits, target = _data(seed=2)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), target)
    assert BCEDiceLoss(0.3, 0.7)(logits, target) == pytest.approx(
        (0.3 * bce + 0.7 * dice_loss(logits, target)).item(), rel=1e-5)
    assert DiceFocalLoss(1.0, 2.0)(logits, target) == pytest.approx(
        (dice_loss(logits, target) + 2 * focal_loss(logits, target)).item(), rel=1e-6)
    terms = SegmentationLoss(bce=1, dice=1, focal=1).terms(logits, target)
    assert set(terms) == {"bce", "dice", "focal"}
    assert set(list_losses()) >= {"dice", "bce_dice", "focal", "dice_focal", "patchwise", "segmentation"}
    assert create_loss("dice")(logits, target) == pytest.approx(dice_loss(logits, target).item())


@pytest.mark.parametrize("loss", [
    lambda x, t: dice_loss(x, t),
    lambda x, t: dice_loss(x, t, smooth=0.0, aggregation="batch"),
    lambda x, t: focal_loss(x, t),
    lambda x, t: SegmentationLoss(bce=0.5, dice=1.0, focal=2.0, pos_weight=3.0)(x, t),
], ids=["dice", "dice_batch", "focal", "combined"])
def test_gradcheck(loss):
    logits, target = _data((2, 1, 4, 5), seed=3, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_patchwise_loss_module_over_the_kernel_op():
    K = pytest.importorskip("lesionkit.kernels")
    logits, target = _data((2, 1, 8, 8), seed=4)
    ref = K.patchwise_softmax_loss_reference(torch.sigmoid(logits), target, 4, 0.5)
    assert PatchwiseSoftmaxLoss(4, 0.5)(logits, target) == pytest.approx(ref.item(), rel=1e-5)
    probs = torch.sigmoid(logits)
    assert PatchwiseSoftmaxLoss(4, 0.5, from_logits=False)(probs, target) == pytest.approx(ref.item(), rel=1e-5)
    combined = SegmentationLoss(bce=0, dice=1, patchwise=2, patch_size=4, beta=0.5)
    assert combined(logits, target) == pytest.approx((dice_loss(logits, target) + 2 * ref).item(), rel=1e-5)
    x = logits.double().requires_grad_(True)
    with K.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda v: PatchwiseSoftmaxLoss(4, 0.5)(v, target.double()), (x,))


def test_mae_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 3, 8, 12, generator=g), torch.randn(2, 3, 8, 12, generator=g)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    loss = MAEReconstructionLoss(patch_size=4)(pred, target, mask)
    per_patch = []
    for b in range(2):
        for i in range(6):
            r, c = divmod(i, 3)
            if mask[b, i]:
                sl = (b, slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
                per_patch.append(((pred[sl] - target[sl]) ** 2).mean())
    assert loss == pytest.approx(torch.stack(per_patch).mean().item(), rel=1e-6)
    # Unmasked patches do not matter.
    changed = pred.clone()
    changed[0, :, 0:4, 4:8] += 10  # patch 1 of image 0, not masked
    assert MAEReconstructionLoss(4)(changed, target, mask) == pytest.approx(loss.item(), rel=1e-6)
    assert torch.equal(unpatchify(patchify(pred, 4), 4, (2, 3), 3), pred)


def test_mae_loss_norm_pix_and_softmax_weighting():
    K = pytest.importorskip("lesionkit.kernels")
    g = torch.Generator().manual_seed(6)
    pred, target = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    t = patchify(target, 4)
    tn = unpatchify((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt(), 4, (2, 2), 3)
    assert MAEReconstructionLoss(4, norm_pix=True)(pred, target, mask) == pytest.approx(
        F.mse_loss(pred, tn).item(), rel=1e-5)
    ref = K.patchwise_softmax_loss_reference(pred, target, 4, 0.3, mask=mask)
    assert MAEReconstructionLoss(4, beta=0.3)(pred, target, mask) == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5)), "same shape"),
    (lambda: dice_loss(torch.zeros(2, 4), torch.zeros(2, 4), aggregation="pixel"), "aggregation"),
    (lambda: focal_loss(torch.zeros(2, 4), torch.zeros(2, 4), gamma=-1), "gamma"),
    (lambda: SegmentationLoss(bce=0, dice=0), "at least one"),
    (lambda: create_loss("lovasz"), "loss name"),
    (lambda: MAEReconstructionLoss(4)(torch.zeros(1, 3, 6, 8), torch.zeros(1, 3, 6, 8),
                                      torch.ones(1, 2, dtype=torch.bool)), "divisible"),
    (lambda: MAEReconstructionLoss(4)(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8),
                                      torch.ones(1, 3, dtype=torch.bool)), "mask should be"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mae_loss_gradcheck():
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    for loss in (MAEReconstructionLoss(2), MAEReconstructionLoss(2, norm_pix=True)):
        assert torch.autograd.gradcheck(lambda p: loss(p, target, mask), (pred,))
