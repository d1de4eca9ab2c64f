"""SegmentationMetrics against independent computations (scikit-learn, brute-force numpy)."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import confusion_matrix, f1_score, jaccard_score, precision_score, recall_score

from lesionkit.metrics import METRIC_NAMES, SegmentationMetrics, hd95


def _blobs(n, h, w, seed):
    """Random masks and imperfect predictions (probabilities) with lesion-like blobs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = torch.randint(2, h - 2, (n, 1, 1), generator=g), torch.randint(2, w - 2, (n, 1, 1), generator=g)
    r = torch.randint(2, min(h, w) // 2, (n, 1, 1), generator=g)
    target = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
    noise = torch.rand(n, h, w, generator=g)
    shift = torch.roll(target, shifts=int(torch.randint(-3, 4, (1,), generator=g)), dims=2)
    prob = (0.7 * shift + 0.3 * noise).clamp(0, 1)
    return prob[:, None], target[:, None]


def _brute_directed(p, t):
    """Boundary pixels by their 4-neighbourhood, then every pairwise distance: the distances from
    p's boundary to t's nearest boundary pixel and back (no distance transform involved)."""
    def edge(m):
        pad = np.pad(m, 1)
        inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return np.argwhere(m & ~inner)
    d = cdist(edge(p), edge(t))
    return d.min(1), d.min(0)


def _brute_hd95(p, t):
    """MONAI's definition written out: boundary pixels, all pairwise distances, directed P95."""
    d_pt, d_tp = _brute_directed(p, t)
    return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))


def test_per_image_and_dataset_match_sklearn():
    prob, target = _blobs(9, 24, 31, seed=4)
    m = SegmentationMetrics()
    m.update(prob[:4], target[:4])
    m.update(prob[4:], target[4:])  # streaming over two batches
    out = m.compute()
    p = (prob > 0.5).numpy().reshape(9, -1)
    t = (target > 0.5).numpy().reshape(9, -1)
    per = {k: [] for k in ("dice", "iou", "sensitivity", "precision", "specificity", "accuracy")}
    for pi, ti in zip(p, t):
        tn, fp, fn, tp = confusion_matrix(ti, pi, labels=[0, 1]).ravel()
        per["dice"].append(f1_score(ti, pi))
        per["iou"].append(jaccard_score(ti, pi))
        per["sensitivity"].append(recall_score(ti, pi))
        per["precision"].append(precision_score(ti, pi))
        per["specificity"].append(tn / (tn + fp))
        per["accuracy"].append((tp + tn) / ti.size)
    for k, v in per.items():
        assert out["per_image"][k] == pytest.approx(np.mean(v), rel=1e-12), k
    assert out["per_image"]["voe"] == pytest.approx(1 - np.mean(per["iou"]))
    assert out["per_image"]["fpr"] == pytest.approx(1 - np.mean(per["specificity"]))
    pf, tf = p.ravel(), t.ravel()
    assert out["dataset"]["dice"] == pytest.approx(f1_score(tf, pf), rel=1e-12)
    assert out["dataset"]["iou"] == pytest.approx(jaccard_score(tf, pf), rel=1e-12)
    assert out["dataset"]["sensitivity"] == pytest.approx(recall_score(tf, pf), rel=1e-12)
    assert out["dataset"]["precision"] == pytest.approx(precision_score(tf, pf), rel=1e-12)
    iou = np.array(per["iou"])
    assert (iou >= 0.65).any() and (iou < 0.65).any()  # both sides of the ISIC cut-off occur
    assert out["isic_jaccard"] == pytest.approx(np.where(iou >= 0.65, iou, 0).mean())
    assert out["n_images"] == 9
    # Dataset-level and per-image aggregation genuinely differ on this data.
    assert abs(out["dataset"]["dice"] - out["per_image"]["dice"]) > 1e-4


def test_hd95_matches_brute_force_and_spacing_scales():
    prob, target = _blobs(6, 28, 22, seed=2)
    m = SegmentationMetrics()
    m.update(prob, target)
    p = (prob > 0.5).numpy()[:, 0]
    t = (target > 0.5).numpy()[:, 0]
    ref = [_brute_hd95(pi, ti) for pi, ti in zip(p, t)]
    assert m.compute()["per_image"]["hd95"] == pytest.approx(np.mean(ref), rel=1e-9)
    for pi, ti, r in zip(p, t, ref):
        assert hd95(pi, ti) == pytest.approx(r, rel=1e-9)
        assert hd95(pi, ti, spacing=0.5) == pytest.approx(r * 0.5, rel=1e-9)


def test_pooled_hd95_is_the_p95_of_all_distances():
    prob, target = _blobs(4, 20, 20, seed=5)
    m = SegmentationMetrics()
    m.update(prob[:1], target[:1])
    m.update(prob[1:], target[1:])  # pooled across batches
    p, t = (prob > 0.5).numpy()[:, 0], (target > 0.5).numpy()[:, 0]
    # The oracle is scipy's brute-force pairwise distances, not lesionkit's distance transform.
    d = np.concatenate([np.concatenate(_brute_directed(pi, ti)) for pi, ti in zip(p, t)])
    want = np.percentile(d, 95, method="inverted_cdf")
    # The pooled value differs from a mean of per-image values and from either direction alone,
    # so pooling the wrong set of distances cannot pass.
    assert want != pytest.approx(np.mean([_brute_hd95(pi, ti) for pi, ti in zip(p, t)]))
    assert m.compute()["dataset"]["hd95"] == pytest.approx(want, abs=1e-6)


def test_empty_mask_conventions():
    z = torch.zeros(1, 1, 8, 8)
    one = z.clone()
    one[..., 2:5, 2:5] = 1
    m = SegmentationMetrics()
    m.update(z, z)  # both empty: perfect agreement
    both = m.compute()["per_image"]
    assert both["dice"] == 1 and both["iou"] == 1 and both["voe"] == 0 and both["hd95"] == 0
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])
    m = SegmentationMetrics()
    m.update(z, one)  # missed lesion
    out = m.compute()
    assert out["per_image"]["dice"] == 0 and out["per_image"]["sensitivity"] == 0
    assert out["per_image"]["hd95"] == pytest.approx(math.hypot(8, 8))
    assert math.isnan(out["per_image"]["precision"]) and out["counts"]["precision"] == 0
    assert out["isic_jaccard"] == 0
    m.update(one, one)  # undefined values are skipped, defined ones averaged
    out = m.compute()
    assert out["per_image"]["precision"] == 1 and out["counts"]["precision"] == 1
    assert out["per_image"]["dice"] == 0.5 and out["counts"]["dice"] == 2


def test_from_logits_threshold_and_bool_inputs():
    logits = torch.tensor([[[[-1.0, 0.3], [2.0, -0.2]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    a = SegmentationMetrics(from_logits=True, compute_hd95=False)
    a.update(logits, target)
    b = SegmentationMetrics(compute_hd95=False)
    b.update(torch.sigmoid(logits), target)
    c = SegmentationMetrics(compute_hd95=False)
    c.update(logits > 0, target.bool())
    ra, rb, rc = a.compute(), b.compute(), c.compute()
    for k in METRIC_NAMES[:-1]:  # hd95 is off (NaN)
        assert ra["dataset"][k] == rb["dataset"][k] == rc["dataset"][k], k
    assert ra["per_image"]["dice"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    hi = SegmentationMetrics(threshold=0.8, from_logits=True, compute_hd95=False)
    hi.update(logits, target)
    assert hi.compute()["per_image"]["sensitivity"] == pytest.approx(1 / 3)


def test_groups_pool_per_patient_and_reset():
    prob, target = _blobs(6, 16, 16, seed=4)
    m = SegmentationMetrics(compute_hd95=False)
    m.update(prob, target, groups=["a", "a", "b", "b", "b", "c"])
    out = m.compute()
    assert out["n_groups"] == 3
    p, t = (prob > 0.5).numpy().reshape(6, -1), (target > 0.5).numpy().reshape(6, -1)
    ref = np.mean([f1_score(t[s].ravel(), p[s].ravel()) for s in (slice(0, 2), slice(2, 5), slice(5, 6))])
    assert out["per_group"]["dice"] == pytest.approx(ref)
    m.reset()
    assert m.compute()["n_images"] == 0


def test_bad_inputs_raise():
    m = SegmentationMetrics()
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="one channel"):
        m.update(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="groups"):
        m.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), groups=["a"])
    with pytest.raises(ValueError, match="threshold"):
        SegmentationMetrics(threshold=1.0)
    with pytest.raises(ValueError, match="spacing"):
        SegmentationMetrics(spacing=(1.0, -1.0))
