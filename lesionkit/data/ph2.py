"""The official PH2 tree (docs/data.md): ``PH2 Dataset images/IMDxxx/...`` with BMP files."""

from __future__ import annotations

from pathlib import Path

from lesionkit.data.paired import PairedImageDataset, missing_masks_error

IMAGES_FOLDER = "PH2 Dataset images"  # with spaces, as distributed


def find_ph2_cases(root: Path) -> Path | None:
    """The folder holding the IMDxxx case folders, searched from `root` down two levels."""
    for cand in (root, root / IMAGES_FOLDER, root / "PH2Dataset" / IMAGES_FOLDER):
        if cand.is_dir() and any(p.is_dir() and p.name.upper().startswith("IMD") for p in cand.iterdir()):
            return cand
    return None


class PH2Dataset(PairedImageDataset):
    """PH2: 200 dermoscopic images (768 x 560 BMP) with lesion masks (1-bit or 24-bit BMP).

    `root` may be the PH2Dataset folder, its parent, or ``PH2 Dataset images`` itself.
    """

    def __init__(self, root, image_size=None, transform=None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"PH2 root {root} is not a folder")
        cases_dir = find_ph2_cases(root)
        if cases_dir is None:
            raise ValueError(f"no PH2 layout found under {root}; tried '{IMAGES_FOLDER}/IMDxxx/"
                             f"IMDxxx_Dermoscopic_Image/IMDxxx.bmp' in {root}, {root / 'PH2Dataset'} "
                             f"and IMDxxx folders directly in {root}")
        samples, missing = [], []
        for case in sorted(p for p in cases_dir.iterdir() if p.is_dir() and p.name.upper().startswith("IMD")):
            cid = case.name
            image = _find(case / f"{cid}_Dermoscopic_Image", cid)
            mask = _find(case / f"{cid}_lesion", f"{cid}_lesion")
            if image is None:
                raise ValueError(f"PH2 case folder {case} has no {cid}_Dermoscopic_Image/{cid}.bmp")
            if mask is None:
                missing.append(image)
            else:
                samples.append((cid, image, mask))
        if missing:
            raise missing_masks_error("PH2", root, missing)
        self.root = root
        super().__init__(samples, image_size, transform)


def _find(folder: Path, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.stem.lower() == stem.lower():
            return p
    return None
