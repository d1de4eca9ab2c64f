"""Images without masks, for self-supervised pre-training (``lesionkit pretrain``).

:func:`images_from_spec` takes the same specs as :func:`lesionkit.data.from_spec` and yields
``{"image", "id", "orig_size"}`` items only: masks, where the dataset has them, are neither
required nor decoded. ``folder:PATH[:split]`` also reads a folder of images without a ``masks``
folder: ``PATH[/split]/images`` if it exists, else the images directly in ``PATH[/split]``.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from lesionkit.data.image_io import list_images, load_image
from lesionkit.data.paired import FileSamplesDataset


class ImageOnlyDataset(FileSamplesDataset):
    """Items ``{"image": (3, H, W) float32 in [0, 1], "id": str, "orig_size": (H, W)}`` from
    ``(id, image file)`` samples; ``transform(item)`` if given."""

    def __init__(self, samples: list[tuple[str, Path]], image_size=None, transform=None) -> None:
        if not samples:
            raise ValueError("ImageOnlyDataset: no images")
        super().__init__(samples, image_size, transform)

    def __getitem__(self, index: int) -> dict:
        sid, path = self.samples[index]
        image, size = load_image(path, self.image_size)
        return self._finish({"image": image, "id": sid, "orig_size": size})


class WithoutMasks(Dataset):
    """A labelled dataset's items without their ``mask`` (synthetic, NIfTI: masks come with the image)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item.pop("mask", None)
        return item


def _image_folder(spec: str, rest: str, image_size, transform) -> ImageOnlyDataset:
    from lesionkit.data.spec import _path_and_split

    path, split = _path_and_split(rest)
    base = Path(path) if split is None else Path(path) / split
    folder = base / "images" if (base / "images").is_dir() else base
    if not folder.is_dir():
        raise ValueError(f"data spec {spec!r}: {folder} is not a folder")
    files = list_images(folder)
    if not files:
        raise ValueError(f"data spec {spec!r}: no images in {folder}")
    return ImageOnlyDataset([(p.stem, p) for p in files], image_size, transform)


def images_from_spec(spec: str, image_size=None, transform=None) -> Dataset:
    """The images of a data spec (``lesionkit.data.SPEC_FORMS``), without masks."""
    from lesionkit.data.paired import PairedImageDataset
    from lesionkit.data.spec import SPEC_FORMS, from_spec

    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"data spec should look like one of {list(SPEC_FORMS)}, got {spec!r}")
    kind, rest = spec.split(":", 1)
    if kind.lower() == "folder":
        path_split = rest
        try:
            dataset = from_spec(spec, image_size=image_size, transform=None)
        except ValueError:
            # No masks folder (or images without masks): the images alone.
            return _image_folder(spec, path_split, image_size, transform)
    else:
        dataset = from_spec(spec, image_size=image_size, transform=None)
    if isinstance(dataset, PairedImageDataset):
        # Image files only: masks are not decoded.
        return ImageOnlyDataset([(sid, image) for sid, image, _ in dataset.samples], image_size, transform)
    if transform is not None:
        raise ValueError(f"data spec {spec!r}: per-image transforms are not supported for {type(dataset).__name__} "
                         "when pre-training; use the per-batch flips only")
    return WithoutMasks(dataset)


__all__ = ["ImageOnlyDataset", "WithoutMasks", "images_from_spec"]
