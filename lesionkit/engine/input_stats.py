"""Input standardisation statistics for ``model.kwargs.input_mean / input_std: dataset``.

AMLP standardises its images by the dataset's mean and standard deviation (paper Sec. 4.1). A
recipe asks for that with ``input_mean: dataset`` and ``input_std: dataset``; before the model
is built the trainer replaces both with numbers:

- the statistics recorded by the ``init_from`` checkpoint, when it has them, so a network
  fine-tuned from a pre-trained one sees its inputs on the scale the pre-training used;
- otherwise the per-channel mean and standard deviation of the run's training images (the
  training part after the validation hold-out, at ``data.image_size``, without augmentation,
  gray-world applied when the recipe uses it), over at most ``MAX_IMAGES`` evenly spaced images.

The numbers then sit in the run's config and in every checkpoint's ``model_kwargs``, so
evaluation, prediction, export and resume apply the same standardisation.
"""

from __future__ import annotations

import warnings

import torch

MAX_IMAGES = 512
_KEYS = ("input_mean", "input_std")


def image_statistics(dataset: torch.utils.data.Dataset, max_images: int = MAX_IMAGES
                     ) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the pixels of up to ``max_images`` images."""
    n = len(dataset)
    if n == 0:
        raise ValueError("input statistics: the training set is empty")
    picks = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique().tolist()
    total = total_sq = None
    count = 0
    for i in picks:
        image = dataset[i]["image"].to(torch.float64)
        flat = image.flatten(1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = flat.square().sum(1) if total_sq is None else total_sq + flat.square().sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def recorded_statistics(path: str) -> tuple[list[float], list[float]] | None:
    """The input_mean / input_std a checkpoint's model was built with, or None."""
    from lesionkit.engine.checkpoint import load_checkpoint

    kwargs = load_checkpoint(path).get("model_kwargs", {})
    mean, std = kwargs.get("input_mean"), kwargs.get("input_std")
    if mean is None or std is None or isinstance(mean, str) or isinstance(std, str):
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def resolve_input_statistics(cfg) -> str | None:
    """Replace ``dataset`` in ``cfg.model.kwargs`` input_mean / input_std by numbers (in place).

    Returns where they came from (for the run log), or None when the recipe did not ask."""
    kwargs = cfg.model.kwargs
    asked = [k for k in _KEYS if kwargs.get(k) == "dataset"]
    if not asked:
        return None
    if len(asked) != 2:
        (other,) = set(_KEYS) - set(asked)
        raise ValueError(f"model.kwargs: {asked[0]} is 'dataset' but {other} is {kwargs.get(other)!r}; "
                         "give both as 'dataset'")
    stats = recorded_statistics(cfg.init_from) if cfg.init_from else None
    source = f"recorded by init_from {cfg.init_from}"
    if stats is None and cfg.init_from:
        warnings.warn(f"init_from {cfg.init_from} was trained on unstandardised [0, 1] inputs, but model.kwargs asks for "
                      "input_mean / input_std 'dataset': the loaded weights will see inputs on another scale (set "
                      "input_mean / input_std to null to keep [0, 1])", stacklevel=2)
    if stats is None:
        stats = _training_statistics(cfg)
        source = f"the training images of {cfg.data.train}"
    kwargs["input_mean"], kwargs["input_std"] = stats
    return f"input standardisation mean {stats[0]} std {stats[1]} ({source})"


def _training_statistics(cfg) -> tuple[list[float], list[float]]:
    from lesionkit.data.splits import holdout_split
    from lesionkit.engine.builders import build_dataset, build_eval_transform

    data = cfg.data
    if not data.train:
        raise ValueError("model.kwargs input_mean 'dataset' needs data.train (the images to measure)")
    dataset = build_dataset(data.train, data.image_size, build_eval_transform(data))
    if not data.val and data.val_fraction > 0:
        dataset, _ = holdout_split(dataset, data.val_fraction, cfg.seed)
    return image_statistics(dataset)
