"""Metrics and losses against outside libraries (MONAI, torchmetrics) where they are installed.

Each comparison names the settings that make the two definitions the same; images where a
definition is undefined (an empty mask) are kept out, those conventions are tested in
test_metrics.py.
"""

import numpy as np
import pytest
import torch

from lesionkit.losses import DiceFocalLoss, dice_loss, focal_loss
from lesionkit.metrics import SegmentationMetrics, hd95


def _masks(n=6, h=30, w=26, seed=0):
    """Non-empty lesion-like masks and imperfect predictions (binary, float)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = torch.randint(8, h - 8, (n, 1, 1), generator=g), torch.randint(8, w - 8, (n, 1, 1), generator=g)
    r = torch.randint(3, 7, (n, 1, 1), generator=g)
    target = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
    pred = (((yy - cy - 2) ** 2 + ((xx - cx + 1) ** 2) * 1.5) < (r + 1) ** 2).float()
    flips = torch.rand(n, h, w, generator=g) < 0.03  # scattered false positives / negatives
    pred = torch.where(flips, 1 - pred, pred)
    return pred[:, None], target[:, None]


def _lesionkit(pred, target):
    m = SegmentationMetrics()
    m.update(pred, target)
    return m.compute()


# --- MONAI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monai():
    return pytest.importorskip("monai")


def test_monai_dice_iou_and_confusion_metrics(monai):
    from monai.metrics import ConfusionMatrixMetric, DiceMetric, MeanIoU

    pred, target = _masks()
    ours = _lesionkit(pred, target)["per_image"]
    dice = DiceMetric(include_background=True, reduction="mean")
    dice(pred, target)
    iou = MeanIoU(include_background=True, reduction="mean")
    iou(pred, target)
    names = ["sensitivity", "precision", "specificity", "accuracy"]
    cm = ConfusionMatrixMetric(include_background=True, metric_name=names, compute_sample=True, reduction="mean")
    cm(pred, target)
    assert ours["dice"] == pytest.approx(dice.aggregate().item(), rel=1e-6)
    assert ours["iou"] == pytest.approx(iou.aggregate().item(), rel=1e-6)
    for name, value in zip(names, cm.aggregate()):
        assert ours[name] == pytest.approx(value.item(), rel=1e-6), name


def test_monai_hd95(monai):
    from monai.metrics import HausdorffDistanceMetric

    pred, target = _masks(seed=3)
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    theirs = metric(pred, target).flatten().numpy()
    ours = [hd95(p[0].numpy(), t[0].numpy()) for p, t in zip(pred, target)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert _lesionkit(pred, target)["per_image"]["hd95"] == pytest.approx(theirs.mean(), rel=1e-5)


def _logits(seed=1, shape=(4, 1, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2, (torch.rand(shape, generator=g) > 0.6).double()


def test_monai_dice_focal_and_dice_focal_losses(monai):
    from monai.losses import DiceFocalLoss as MonaiDiceFocal
    from monai.losses import DiceLoss as MonaiDice
    from monai.losses import FocalLoss as MonaiFocal

    logits, target = _logits()
    # Per image and channel: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), then the batch mean.
    theirs = MonaiDice(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    torch.testing.assert_close(dice_loss(logits, target), theirs.double(), rtol=1e-6, atol=1e-7)
    # Sigmoid focal loss, alpha on the positives, mean over every element.
    theirs = MonaiFocal(gamma=2.0, alpha=0.25, use_softmax=False)(logits, target)
    torch.testing.assert_close(focal_loss(logits, target, alpha=0.25, gamma=2.0), theirs.double(), rtol=1e-6, atol=1e-7)
    theirs = MonaiDiceFocal(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, gamma=2.0, alpha=0.25,
                            lambda_dice=0.7, lambda_focal=1.3)(logits, target)
    ours = DiceFocalLoss(dice_weight=0.7, focal_weight=1.3, focal_alpha=0.25, focal_gamma=2.0)(logits, target)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-7)


# --- torchmetrics ----------------------------------------------------------------------------


def test_torchmetrics_dataset_metrics():
    tm = pytest.importorskip("torchmetrics.classification")
    pred, target = _masks(seed=5)
    ours = _lesionkit(pred, target)["dataset"]
    p, t = pred.long().flatten(), target.long().flatten()
    pairs = {"dice": tm.BinaryF1Score(), "iou": tm.BinaryJaccardIndex(), "sensitivity": tm.BinaryRecall(),
             "precision": tm.BinaryPrecision(), "specificity": tm.BinarySpecificity(),
             "accuracy": tm.BinaryAccuracy()}
    for name, metric in pairs.items():
        assert ours[name] == pytest.approx(metric(p, t).item(), rel=1e-6), name


def test_torchmetrics_per_image_dice():
    tmf = pytest.importorskip("torchmetrics.functional.segmentation")
    pred, target = _masks(seed=6)
    # Label maps with classes {0: background, 1: lesion}; the lesion's Dice per image.
    theirs = tmf.dice_score(pred[:, 0].long(), target[:, 0].long(), num_classes=2, include_background=False,
                            average="micro", input_format="index")
    assert _lesionkit(pred, target)["per_image"]["dice"] == pytest.approx(theirs.mean().item(), rel=1e-6)
