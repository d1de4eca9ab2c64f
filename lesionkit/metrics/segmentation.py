"""Streaming binary segmentation metrics with dataset-level and per-image aggregation (docs/data.md, Metrics).

Definitions (pred and target binarised; tp, fp, fn, tn counted over pixels):

    dice = 2tp / (2tp + fp + fn)      iou = tp / (tp + fp + fn)      voe = 1 - iou
    sensitivity = tp / (tp + fn)      specificity = tn / (tn + fp)   fpr = fp / (fp + tn)
    precision = tp / (tp + fp)        accuracy = (tp + tn) / (tp + fp + fn + tn)
    hd95 = max(P95 of distances from pred's boundary to target's, P95 of target's to pred's)

Empty masks:
- pred and target both empty: dice = iou = 1, voe = 0, hd95 = 0 (perfect agreement).
- any other zero denominator (sensitivity with an empty target, precision with an empty
  prediction, ...) makes that value undefined: NaN for the image, and the per-image mean
  skips it (``counts`` in the result says how many images each mean covers).
- exactly one of pred / target empty: hd95 is the image diagonal (in spacing units), the
  largest distance the image allows - a missed lesion must not vanish from the mean.

"dataset" pools one confusion matrix over all pixels of all images; its hd95 is the 95th
percentile of all boundary distances of all images (both directions) pooled, kept as a count of
each distinct distance so memory does not grow with the number of images. "per_image" averages
the per-image values. ``isic_jaccard`` is the ISIC 2018 Task 1 score: per-image IoU, set to 0
below 0.65, averaged over images.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from scipy import ndimage

METRIC_NAMES = ("dice", "iou", "sensitivity", "specificity", "accuracy", "precision", "fpr",
                "voe", "hd95")
ISIC_JACCARD_THRESHOLD = 0.65


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def confusion_metrics(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Confusion-matrix metrics (all but hd95) as float64 arrays; conventions as the module says."""
    tp, fp, fn, tn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn, tn))
    union = tp + fp + fn
    nothing = union == 0  # pred and target both empty
    dice = np.where(nothing, 1.0, _div(2 * tp, 2 * tp + fp + fn))
    iou = np.where(nothing, 1.0, _div(tp, union))
    return {
        "dice": dice,
        "iou": iou,
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
        "precision": _div(tp, tp + fp),
        "fpr": _div(fp, fp + tn),
        "voe": 1.0 - iou,
    }


def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (the image edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, target: np.ndarray, spacing=None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances from pred's boundary pixels to target's boundary and back (both non-empty)."""
    bp, bt = boundary(pred), boundary(target)
    dt_t = ndimage.distance_transform_edt(~bt, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~bp, sampling=spacing)
    return dt_t[bp], dt_p[bt]


def hd95(pred: np.ndarray, target: np.ndarray, spacing=None) -> float:
    """95th-percentile Hausdorff distance of two binary masks (conventions as the module says)."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    has_p, has_t = pred.any(), target.any()
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return _diagonal(pred.shape, spacing)
    d_pt, d_tp = surface_distances(pred, target, spacing)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _diagonal(shape, spacing) -> float:
    sp = np.ones(len(shape)) if spacing is None else np.broadcast_to(np.asarray(spacing, float), (len(shape),))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp))))


class SegmentationMetrics:
    """Streaming binary segmentation metrics.

    Args:
        threshold: probability at which pred counts as foreground (pred > threshold).
        from_logits: pred holds logits; thresholded at logit(threshold) without a sigmoid.
        spacing: pixel size (float or (dy, dx)) for hd95 in physical units; None = pixels.
        compute_hd95: hd95 costs two distance transforms per image; False leaves it NaN.

    ``update(pred, target, groups=None)`` takes (B, 1, H, W) or (B, H, W) tensors or arrays;
    target is foreground where > 0.5. ``groups`` (B strings, e.g. patient ids) adds a
    "per_group" aggregation (confusion matrix pooled per group, then averaged over groups).
    """

    def __init__(self, threshold: float = 0.5, from_logits: bool = False, spacing=None,
                 compute_hd95: bool = True) -> None:
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold should be in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        if spacing is not None:
            sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
            if sp.size not in (1, 2) or not np.all(sp > 0):
                raise ValueError(f"spacing should be a positive float or (dy, dx), got {spacing!r}")
            spacing = tuple(np.broadcast_to(sp, (2,)).tolist())
        self.spacing = spacing
        self.compute_hd95 = bool(compute_hd95)
        self.reset()

    def reset(self) -> None:
        self._cm = np.zeros(4, dtype=np.int64)  # tp, fp, fn, tn over all pixels
        self._sums = dict.fromkeys(METRIC_NAMES, 0.0)
        self._counts = dict.fromkeys(METRIC_NAMES, 0)
        self._isic = 0.0
        self._n = 0
        self._distances: Counter = Counter()
        self._groups: dict[str, np.ndarray] = {}

    def _binarise(self, pred, target) -> tuple[torch.Tensor, torch.Tensor]:
        pred = torch.as_tensor(pred).detach()
        target = torch.as_tensor(target).detach()
        if pred.shape != target.shape:
            raise ValueError(f"pred and target should have the same shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        if pred.dim() == 4:
            if pred.shape[1] != 1:
                raise ValueError(f"pred should have one channel (B, 1, H, W), got {tuple(pred.shape)}")
            pred, target = pred[:, 0], target[:, 0]
        elif pred.dim() != 3:
            raise ValueError(f"pred should be (B, 1, H, W) or (B, H, W), got {tuple(pred.shape)}")
        if pred.dtype == torch.bool:
            p = pred
        else:
            thr = math.log(self.threshold / (1 - self.threshold)) if self.from_logits else self.threshold
            p = pred > thr
        t = target if target.dtype == torch.bool else target > 0.5
        return p, t

    def update(self, pred, target, groups=None) -> None:
        p, t = self._binarise(pred, target)
        b = p.shape[0]
        if groups is not None and len(groups) != b:
            raise ValueError(f"groups should have one entry per image ({b}), got {len(groups)}")
        if b == 0:
            return
        # Three counts give the whole confusion matrix; uint8 sums are the fastest count on CPU.
        def count(x: torch.Tensor) -> torch.Tensor:
            return x.view(torch.uint8).flatten(1).sum(1, dtype=torch.int64)

        tp, n_p, n_t = count(p & t), count(p), count(t)
        n_pix = p[0].numel()
        cm = torch.stack([tp, n_p - tp, n_t - tp, n_pix - n_p - n_t + tp], 1).cpu().numpy()
        self._cm += cm.sum(0)
        values = confusion_metrics(*cm.T)
        if self.compute_hd95:
            values["hd95"] = self._hd95_batch(p.cpu().numpy(), t.cpu().numpy())
        else:
            values["hd95"] = np.full(b, np.nan)
        for k in METRIC_NAMES:
            ok = ~np.isnan(values[k])
            self._sums[k] += float(values[k][ok].sum())
            self._counts[k] += int(ok.sum())
        iou = values["iou"]
        self._isic += float(np.where(iou >= ISIC_JACCARD_THRESHOLD, iou, 0.0).sum())
        self._n += b
        if groups is not None:
            for g, row in zip(groups, cm):
                g = str(g)
                self._groups[g] = self._groups.get(g, 0) + row

    def _hd95_batch(self, p: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = np.empty(p.shape[0])
        for i in range(p.shape[0]):
            has_p, has_t = p[i].any(), t[i].any()
            if has_p and has_t:
                d_pt, d_tp = surface_distances(p[i], t[i], self.spacing)
                out[i] = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
                # Distinct distances are few (square roots of integer sums on a pixel grid).
                vals, cnt = np.unique(np.round(np.concatenate([d_pt, d_tp]), 6), return_counts=True)
                self._distances.update(dict(zip(vals.tolist(), cnt.tolist())))
            elif has_p or has_t:
                out[i] = _diagonal(p[i].shape, self.spacing)
            else:
                out[i] = 0.0
        return out

    def _pooled_hd95(self) -> float:
        if not self.compute_hd95 or self._n == 0:
            return float("nan")
        if not self._distances:
            # No image had both masks: 0 when every image was empty on both sides.
            return 0.0 if self._cm[:3].sum() == 0 else float("nan")
        vals = np.array(sorted(self._distances))
        cnt = np.array([self._distances[v] for v in vals])
        cum = np.cumsum(cnt)
        # Inverted CDF: the smallest distance with at least 95 % of the distances at or below it.
        return float(vals[np.searchsorted(cum, 0.95 * cum[-1])])

    def compute(self) -> dict:
        """{"dataset", "per_image", "isic_jaccard", "n_images", "counts"[, "per_group"]}."""
        dataset = {k: float(v[()]) for k, v in confusion_metrics(*self._cm).items()}
        dataset["hd95"] = self._pooled_hd95()
        per_image = {k: (self._sums[k] / self._counts[k] if self._counts[k] else float("nan"))
                     for k in METRIC_NAMES}
        out = {
            "dataset": dataset,
            "per_image": per_image,
            "isic_jaccard": self._isic / self._n if self._n else float("nan"),
            "n_images": self._n,
            "counts": dict(self._counts),
        }
        if self._groups:
            rows = np.stack(list(self._groups.values()))
            vals = confusion_metrics(*rows.T)
            out["per_group"] = {k: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
                                for k, v in vals.items()}
            out["n_groups"] = len(self._groups)
        return out
