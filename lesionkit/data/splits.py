"""Seeded, deterministic dataset splits: ratio (7:1:2 as in SegMAE), k-fold, labelled fraction,
and the training run's validation hold-out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, n]).permutation(n)


def _length(data) -> int:
    n = data if isinstance(data, (int, np.integer)) else len(data)
    if n < 0:
        raise ValueError(f"dataset length should be >= 0, got {n}")
    return int(n)


def _subsets(data, parts: list[np.ndarray]):
    if isinstance(data, (int, np.integer)):
        return tuple(parts)
    return tuple(Subset(data, p.tolist()) for p in parts)


def ratio_split(data: Dataset | int, ratios: Sequence[float] = (7, 1, 2), seed: int = 0):
    """Split into len(ratios) disjoint parts covering every item, sizes proportional to ratios.

    Returns Subsets of `data`, or sorted index arrays when `data` is a length.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 1 or r.size < 2 or np.any(r < 0) or r.sum() <= 0:
        raise ValueError(f"ratios should be >= 2 non-negative numbers with a positive sum, got {ratios!r}")
    n = _length(data)
    bounds = np.rint(np.cumsum(r) / r.sum() * n).astype(int)
    perm = _permutation(n, seed)
    parts = np.split(perm, bounds[:-1])
    return _subsets(data, [np.sort(p) for p in parts])


def kfold_split(data: Dataset | int, k: int = 5, fold: int = 0, seed: int = 0):
    """(train, val) for fold `fold` of a seeded k-fold partition; folds differ in size by <= 1."""
    n = _length(data)
    if not isinstance(k, (int, np.integer)) or k < 2 or k > max(n, 2):
        raise ValueError(f"k should be an int in [2, {max(n, 2)}], got {k!r}")
    if not 0 <= fold < k:
        raise ValueError(f"fold should be in [0, {k}), got {fold!r}")
    folds = np.array_split(_permutation(n, seed), k)
    val = np.sort(folds[fold])
    train = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != fold]))
    return _subsets(data, [train, val])


def labelled_fraction(data: Dataset | int, fraction: float, seed: int = 0):
    """(labelled, unlabelled): a seeded `fraction` of the items (at least one) and the rest.

    Smaller fractions are prefixes of larger ones for the same seed (5 % inside 10 %), so
    semi-supervised runs at several label budgets share their labelled images.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction should be in (0, 1], got {fraction!r}")
    n = _length(data)
    m = min(n, max(1, int(round(fraction * n))))
    perm = _permutation(n, seed)
    return _subsets(data, [np.sort(perm[:m]), np.sort(perm[m:])])


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Seeded (train, val) subsets with ``round(fraction * n)`` (at least 1) images held out.

    The engine's ``data.val_fraction``; indices come from torch's generator, so they are the
    same on every platform for one seed.
    """
    n = len(dataset)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ValueError(f"cannot hold out {fraction:.0%} of {n} images for validation and keep any for training")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[n_val:])), Subset(dataset, sorted(perm[:n_val]))
