"""SyntheticLesions: item format, determinism, size range, and that a threshold cannot solve it."""

import numpy as np
import pytest
import torch

from lesionkit.data import SyntheticLesions, from_spec


def test_item_format_and_ranges():
    ds = SyntheticLesions(3, image_size=(48, 80), seed=5)
    item = ds[1]
    assert set(item) == {"image", "mask", "id", "orig_size"}
    assert item["image"].shape == (3, 48, 80) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 48, 80) and item["mask"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["orig_size"] == (48, 80)
    assert item["id"] == "synthetic_5_000001"
    assert len(ds) == 3


def test_deterministic_and_order_independent():
    a = SyntheticLesions(6, image_size=64, seed=3)
    b = SyntheticLesions(6, image_size=64, seed=3)
    late = b[5]  # made first, in another dataset object
    for i in range(6):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert torch.equal(a[5]["image"], late["image"])
    assert torch.equal(a[-1]["image"], late["image"])


def test_seeds_and_indices_differ():
    a, b = SyntheticLesions(2, 64, seed=0), SyntheticLesions(2, 64, seed=1)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["mask"], b[0]["mask"])


def test_lesion_sizes_span_the_range():
    ds = SyntheticLesions(120, image_size=64, seed=0)
    frac = np.array([ds[i]["mask"].mean().item() for i in range(len(ds))])
    assert frac.min() < 0.04 and frac.max() > 0.55, (frac.min(), frac.max())
    assert np.all(frac > 0), "every image holds a lesion"


def _otsu_threshold(gray: np.ndarray) -> float:
    hist, edges = np.histogram(gray, bins=256, range=(0.0, 1.0))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(centres[np.nanargmax(between)])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_otsu_threshold_scores_clearly_below_ground_truth():
    # Lesions are darker on average, so Otsu's dark class is the lesion guess. The ground truth
    # scores Dice 1; Otsu - and even the best single threshold chosen with the ground truth -
    # must stay far below, or a model could learn a threshold instead of shape and colour.
    ds = SyntheticLesions(48, image_size=128, seed=11)
    lum = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    otsu, oracle = [], []
    for i in range(len(ds)):
        item = ds[i]
        gray = (item["image"] * lum).sum(0).numpy()
        gt = item["mask"][0].numpy() > 0.5
        otsu.append(_dice(gray < _otsu_threshold(gray), gt))
        oracle.append(max(_dice(gray < t, gt) for t in np.linspace(0.02, 0.98, 49)))
    assert np.mean(otsu) < 0.6, np.mean(otsu)
    assert np.mean(oracle) < 0.75, np.mean(oracle)
    # ... but the lesions are there to be found: darker than the skin in most images.
    darker = [(ds[i]["image"] * lum).sum(0)[ds[i]["mask"][0] > 0].mean()
              < (ds[i]["image"] * lum).sum(0)[ds[i]["mask"][0] == 0].mean() for i in range(16)]
    assert sum(darker) >= 11


def test_from_spec_synthetic():
    ds = from_spec("synthetic:4:7", image_size=32)
    assert isinstance(ds, SyntheticLesions) and len(ds) == 4 and ds.seed == 7
    assert ds[0]["image"].shape == (3, 32, 32)
    assert from_spec("synthetic:2").image_size == (256, 256)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": -1}, "n should be"),
    ({"n": 2, "image_size": 8}, "at least 16"),
    ({"n": 2, "image_size": (32, 0)}, "positive"),
    ({"n": 2, "image_size": "big"}, "image_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticLesions(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        SyntheticLesions(2, 32)[2]
