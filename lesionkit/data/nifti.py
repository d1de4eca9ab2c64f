"""2-D slices of NIfTI volumes (brain, lung, head-and-neck data of GRCSF and AMLP).

nibabel is an optional extra (``pip install nibabel``); it is imported when a dataset is made.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from lesionkit.data.sizes import as_hw

_LAYOUTS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("images", "labels"), ("images", "masks"))


def _case_id(path: Path) -> str:
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    return re.sub(r"_0000$", "", stem)  # nnU-Net's first-channel suffix


def _volumes(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if re.search(r"\.nii(\.gz)?$", p.name, re.IGNORECASE))


class NiftiSliceDataset(Dataset):
    """Every slice along `axis` of every volume, as lesionkit items plus ``"patient"``.

    Layouts: ``imagesTr/CASE_0000.nii.gz`` + ``labelsTr/CASE.nii.gz`` (nnU-Net), or
    ``images/`` + ``labels/`` or ``masks/`` with matching names. Intensities map to [0, 1] by
    `window` (lo, hi) if given, else by each volume's 0.5 / 99.5 percentiles; the slice is
    repeated to 3 channels. Labels > 0 are lesion. ``lesion_slices_only`` keeps slices whose
    mask is non-empty (reads every label volume once at construction).
    """

    def __init__(self, root, image_size=None, axis: int = 2, window: tuple[float, float] | None = None,
                 lesion_slices_only: bool = False, transform=None) -> None:
        try:
            import nibabel
        except ImportError as e:
            raise ImportError("NiftiSliceDataset needs nibabel: pip install nibabel") from e
        self._nib = nibabel
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"NIfTI root {root} is not a folder")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis should be 0, 1 or 2, got {axis!r}")
        if window is not None and not (len(window) == 2 and window[0] < window[1]):
            raise ValueError(f"window should be (lo, hi) with lo < hi, got {window!r}")
        layout = next(((root / a, root / b) for a, b in _LAYOUTS if (root / a).is_dir() and (root / b).is_dir()), None)
        if layout is None:
            tried = ", ".join(f"{a}/ + {b}/" for a, b in _LAYOUTS)
            raise ValueError(f"no NIfTI layout found under {root}; tried {tried}")
        img_dir, lab_dir = layout
        labels = {_case_id(p): p for p in _volumes(lab_dir)}
        self.volumes, missing = [], []
        for p in _volumes(img_dir):
            case = _case_id(p)
            if case not in labels:
                missing.append(p)
                continue
            ishape, lshape = nibabel.load(p).shape[:3], nibabel.load(labels[case]).shape[:3]
            if ishape != lshape:
                raise ValueError(f"volume and label shapes differ: {p} is {ishape}, {labels[case]} is {lshape}")
            if len(ishape) != 3:
                raise ValueError(f"{p}: expected a 3-D volume, got shape {ishape}")
            self.volumes.append((case, p, labels[case], ishape))
        if missing:
            raise ValueError(f"NIfTI volumes without a label under {lab_dir}: {[str(m) for m in missing]}")
        if not self.volumes:
            raise ValueError(f"no NIfTI volumes (.nii / .nii.gz) in {img_dir}")
        self.axis, self.window, self.transform = axis, window, transform
        self.image_size = None if image_size is None else as_hw(image_size, "image_size")
        self.index: list[tuple[int, int]] = []
        for v, (_, _, lab, shape) in enumerate(self.volumes):
            if lesion_slices_only:
                lab_arr = np.asarray(nibabel.load(lab).dataobj) > 0
                keep = np.flatnonzero(lab_arr.any(axis=tuple(a for a in range(3) if a != axis)))
            else:
                keep = range(shape[axis])
            self.index.extend((v, int(z)) for z in keep)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _volume(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        if v not in self._cache:
            if len(self._cache) >= 2:  # neighbouring slices come from the same volume
                self._cache.pop(next(iter(self._cache)))
            case, img_path, lab_path, _ = self.volumes[v]
            img = np.asarray(self._nib.load(img_path).dataobj, dtype=np.float32)
            lo, hi = self.window if self.window is not None else np.percentile(img, (0.5, 99.5))
            img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
            lab = np.asarray(self._nib.load(lab_path).dataobj) > 0
            self._cache[v] = (img, lab)
        return self._cache[v]

    def __getitem__(self, index: int) -> dict:
        v, z = self.index[index]
        img, lab = self._volume(v)
        sl = np.take(img, z, axis=self.axis)
        ml = np.take(lab, z, axis=self.axis)
        image = torch.from_numpy(np.ascontiguousarray(sl))[None].repeat(3, 1, 1)
        mask = torch.from_numpy(np.ascontiguousarray(ml)).float()[None]
        orig = tuple(sl.shape)
        if self.image_size is not None and orig != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", antialias=True,
                                  align_corners=False)[0].clamp_(0, 1)
            mask = F.interpolate(mask[None], size=self.image_size, mode="nearest-exact")[0]
        case = self.volumes[v][0]
        item = {"image": image, "mask": mask, "id": f"{case}_s{z:04d}", "orig_size": orig, "patient": case}
        return self.transform(item) if self.transform is not None else item
