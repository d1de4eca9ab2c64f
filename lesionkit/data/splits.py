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


class LabelledSubset:
    """``data.label_fraction``: the seeded part of the labelled training images a run trains on.

    A checkpointed component: :meth:`state_dict` is what every checkpoint records under
    ``label_subset`` (fraction, seed, size of the full set, indices, image ids; ``None`` when
    every image is labelled) and :meth:`load_state_dict` makes a resumed run train on the
    recorded subset. Draws with :func:`labelled_fraction`, so 5 % lies inside 10 % for one seed.
    """

    def __init__(self, dataset: Dataset, fraction: float = 1.0, seed: int = 0) -> None:
        self.dataset = dataset  # all labelled training images
        self.fraction = fraction
        self.record: dict | None = None
        if fraction < 1.0:
            labelled, _ = labelled_fraction(dataset, fraction, seed)
            self.record = {"fraction": fraction, "seed": seed, "of": len(dataset),
                           "indices": [int(i) for i in labelled.indices], "ids": sample_ids(dataset, labelled.indices)}

    @property
    def data(self) -> Dataset:
        """The images to train on: the subset, or the whole dataset."""
        return self.dataset if self.record is None else Subset(self.dataset, self.record["indices"])

    def state_dict(self) -> dict | None:
        return self.record

    def load_state_dict(self, recorded: dict | None, where: str = "checkpoint") -> bool:
        """Take the subset ``recorded`` by a checkpoint (``where`` names it in errors); True if it changed."""
        if recorded is None:
            if self.record is not None:
                raise ValueError(f"{where} trained on all labelled images, but this run sets "
                                 f"data.label_fraction={self.fraction}")
            return False
        if recorded["of"] != len(self.dataset):
            raise ValueError(f"{where} drew its labelled subset from {recorded['of']} training images, "
                             f"this run's training data has {len(self.dataset)}: resume with the same data")
        if self.record is not None and self.record["indices"] == recorded["indices"]:
            return False
        self.record = recorded
        return True


def sample_ids(dataset: Dataset, indices: Sequence[int]) -> list[str] | None:
    """Image ids of ``dataset[indices]`` without loading images, where the dataset lists them."""
    base, mapped = dataset, list(indices)
    while isinstance(base, Subset):
        mapped = [int(base.indices[i]) for i in mapped]
        base = base.dataset
    ids = getattr(base, "ids", None)
    return [str(ids[i]) for i in mapped] if ids is not None else None


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
