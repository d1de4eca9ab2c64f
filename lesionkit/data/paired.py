"""The file-backed dataset classes: (id, image file[, mask file]) samples -> item dicts."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from lesionkit.data.image_io import load_image, load_mask
from lesionkit.data.sizes import as_hw


class FileSamplesDataset(Dataset):
    """What the file-backed datasets share: ``samples`` whose first entry is the image id, the
    size to load at (None keeps the native resolution; an int or (h, w) resizes), a transform."""

    def __init__(self, samples: list[tuple], image_size=None, transform=None) -> None:
        self.samples = list(samples)
        self.image_size = None if image_size is None else as_hw(image_size, "image_size")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s[0] for s in self.samples]

    def _finish(self, item: dict) -> dict:
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, image_size={self.image_size})"


class PairedImageDataset(FileSamplesDataset):
    """Items: ``{"image": (3, H, W) float32 in [0, 1], "mask": (1, H, W) float32 in {0, 1},
    "id": str, "orig_size": (H, W)}`` from ``(id, image file, mask file)`` samples, then
    ``transform(item)`` if given.

    image_size None keeps the native resolution; an int or (h, w) resizes (area-like bilinear for
    images, nearest for masks; JPEGs are decoded at reduced scale when possible). Images come
    turned by their EXIF orientation; a mask is taken as drawn on the image as displayed, or on
    its stored pixels when only those fit (:func:`~lesionkit.data.image_io.mask_orientation`).
    """

    def __getitem__(self, index: int) -> dict:
        sid, image_path, mask_path = self.samples[index]
        mask, _ = load_mask(mask_path, self.image_size, image=image_path)  # or a size mismatch naming both
        image, size = load_image(image_path, self.image_size)
        return self._finish({"image": image, "mask": mask, "id": sid, "orig_size": size})


def missing_masks_error(kind: str, root: Path, missing: list[Path]) -> ValueError:
    shown = "\n  ".join(str(p) for p in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    return ValueError(f"{kind} under {root}: {len(missing)} image(s) without a mask:\n  {shown}{more}")
