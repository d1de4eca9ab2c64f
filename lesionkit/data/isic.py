"""The official ISIC 2016 / 2017 / 2018 Task 1 (lesion segmentation) folders (docs/data.md)."""

from __future__ import annotations

import re
from pathlib import Path

from lesionkit.data.image_io import list_images
from lesionkit.data.paired import PairedImageDataset, missing_masks_error

SPLITS = ("train", "val", "test")
_SPLIT_WORDS = {"training": "train", "validation": "val", "test": "test", "test_v2": "test"}

# year -> (image folder pattern, mask folder pattern); group 1 is the split word.
LAYOUTS = {
    2016: (r"ISBI2016_ISIC_Part1_(Training|Test)_Data", r"ISBI2016_ISIC_Part1_(Training|Test)_GroundTruth"),
    2017: (r"ISIC-2017_(Training|Validation|Test_v2)_Data", r"ISIC-2017_(Training|Validation|Test_v2)_Part1_GroundTruth"),
    2018: (r"ISIC2018_Task1-2_(Training|Validation|Test)_Input", r"ISIC2018_Task1_(Training|Validation|Test)_GroundTruth"),
}
MASK_SUFFIX = "_segmentation"  # matched case-insensitively (ISIC 2016 writes _Segmentation)


def _tried() -> str:
    return "; ".join(f"ISIC {y}: {img.replace('(', '{').replace(')', '}').replace('|', ',')} + "
                     f"{gt.replace('(', '{').replace(')', '}').replace('|', ',')}"
                     for y, (img, gt) in LAYOUTS.items())


def _candidate_dirs(root: Path) -> list[Path]:
    # Archives often unpack into a folder of the same name: look one level further down too.
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        out.append(d)
        out.extend(sorted(p for p in d.iterdir() if p.is_dir()))
    return out


def find_isic_folders(root: Path) -> dict[tuple[int, str], tuple[Path, Path | None]]:
    """{(year, split): (image folder, mask folder or None)} found under `root`."""
    images: dict[tuple[int, str], Path] = {}
    masks: dict[tuple[int, str], Path] = {}
    for d in _candidate_dirs(root):
        for year, (img_pat, gt_pat) in LAYOUTS.items():
            for pat, found in ((img_pat, images), (gt_pat, masks)):
                m = re.fullmatch(pat, d.name, flags=re.IGNORECASE)
                if m:
                    key = (year, _SPLIT_WORDS[m.group(1).lower()])
                    # An outer folder holding only its same-named twin gives way to the twin.
                    if key not in found or not list_images(found[key]):
                        found[key] = d
    return {k: (v, masks.get(k)) for k, v in images.items()}


def _is_image(p: Path) -> bool:
    stem = p.stem.lower()
    return not stem.endswith("_superpixels") and not stem.endswith(MASK_SUFFIX)


class ISICDataset(PairedImageDataset):
    """ISIC 2016 / 2017 / 2018 Task 1 images with lesion masks.

    Args:
        root: the folder holding the official ``*_Input`` / ``*_Data`` and ``*_GroundTruth``
            folders (or one image folder itself, which selects its year and split).
        split: "train" | "val" | "test" or None for every split found.
        year: 2016 | 2017 | 2018 or None to detect (an error if several are present).
        image_size, transform: as :class:`PairedImageDataset`.
    """

    def __init__(self, root, split: str | None = None, year: int | None = None, image_size=None,
                 transform=None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"ISIC root {root} is not a folder")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split should be one of {SPLITS} or None, got {split!r}")
        if year is not None and year not in LAYOUTS:
            raise ValueError(f"year should be one of {sorted(LAYOUTS)} or None, got {year!r}")
        folders = find_isic_folders(root)
        if not folders:
            for y, (img_pat, _) in LAYOUTS.items():  # root is an image folder itself
                m = re.fullmatch(img_pat, root.name, flags=re.IGNORECASE)
                if m:
                    sp = _SPLIT_WORDS[m.group(1).lower()]
                    folders = {k: v for k, v in find_isic_folders(root.parent).items() if k == (y, sp)}
        if not folders:
            raise ValueError(f"no ISIC layout found under {root}; tried {_tried()}")
        years = sorted({y for y, _ in folders})
        if year is None:
            if len(years) > 1:
                raise ValueError(f"{root} holds ISIC {years}: pass year= to choose one")
            year = years[0]
        chosen = {s: v for (y, s), v in folders.items() if y == year and (split is None or s == split)}
        if not chosen:
            found = sorted(f"{y}/{s}" for y, s in folders)
            raise ValueError(f"no ISIC {year} split {split!r} under {root}; found {found}")
        samples, missing = [], []
        for s in sorted(chosen, key=SPLITS.index):
            img_dir, gt_dir = chosen[s]
            gt = {} if gt_dir is None else {p.stem.lower(): p for p in list_images(gt_dir)}
            for p in filter(_is_image, list_images(img_dir)):
                mask = gt.get(p.stem.lower() + MASK_SUFFIX)
                if mask is None:
                    missing.append(p)
                else:
                    samples.append((p.stem, p, mask))
        if missing:
            raise missing_masks_error(f"ISIC {year}", root, missing)
        if not samples:
            raise ValueError(f"ISIC {year} folders under {root} hold no images: "
                             f"{[str(v[0]) for v in chosen.values()]}")
        self.root, self.year, self.split = root, year, split
        super().__init__(samples, image_size, transform)
