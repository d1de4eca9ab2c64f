"""``lesionkit data synth``: write a synthetic dataset to disk in an official layout.

Hook into a CLI with ``add_parser(subparsers)`` (sets ``func=main``), or call ``cli(argv)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("isic2016", "isic2017", "isic2018", "ph2", "folder")
_ISIC_SPLIT_WORDS = {
    "isic2016": {"train": "Training", "test": "Test"},
    "isic2017": {"train": "Training", "val": "Validation", "test": "Test_v2"},
    "isic2018": {"train": "Training", "val": "Validation", "test": "Test"},
}


def _paths(layout: str, out: Path, split: str, i: int, sid: str) -> tuple[Path, Path, str]:
    if layout == "ph2":
        cid = f"IMD{i:03d}"
        case = out / "PH2Dataset" / "PH2 Dataset images" / cid
        return case / f"{cid}_Dermoscopic_Image" / f"{cid}.bmp", case / f"{cid}_lesion" / f"{cid}_lesion.bmp", cid
    if layout == "folder":
        return out / split / "images" / f"{sid}.png", out / split / "masks" / f"{sid}.png", sid
    word = _ISIC_SPLIT_WORDS[layout][split]
    cid = f"ISIC_{i:07d}"
    if layout == "isic2016":
        return (out / f"ISBI2016_ISIC_Part1_{word}_Data" / f"{cid}.jpg",
                out / f"ISBI2016_ISIC_Part1_{word}_GroundTruth" / f"{cid}_Segmentation.png", cid)
    if layout == "isic2017":
        return (out / f"ISIC-2017_{word}_Data" / f"{cid}.jpg",
                out / f"ISIC-2017_{word}_Part1_GroundTruth" / f"{cid}_segmentation.png", cid)
    return (out / f"ISIC2018_Task1-2_{word}_Input" / f"{cid}.jpg",
            out / f"ISIC2018_Task1_{word}_GroundTruth" / f"{cid}_segmentation.png", cid)


def write_dataset(dataset, out_dir, layout: str = "isic2018", split: str = "train",
                  save_size: tuple[int, int] | None = None, quality: int = 92, start: int = 0) -> list[Path]:
    """Write every item of `dataset` as image + mask files in `layout` (one of LAYOUTS).

    save_size (h, w) upsamples before writing (bicubic image, nearest mask) - a cheap way to
    make full-resolution files. Returns the image paths written.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout should be one of {LAYOUTS}, got {layout!r}")
    if layout.startswith("isic") and split not in _ISIC_SPLIT_WORDS[layout]:
        raise ValueError(f"split should be one of {sorted(_ISIC_SPLIT_WORDS[layout])} for {layout}, got {split!r}")
    if layout == "folder" and split not in ("train", "val", "test"):
        raise ValueError(f"split should be train, val or test, got {split!r}")
    out = Path(out_dir)
    written = []
    for i in range(len(dataset)):
        item = dataset[i]
        img_path, mask_path, _ = _paths(layout, out, split, start + i, str(item["id"]))
        img_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        rgb = Image.fromarray((item["image"].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), "RGB")
        mask = Image.fromarray((item["mask"][0].numpy() > 0.5).astype(np.uint8) * 255, "L")
        if save_size is not None:
            rgb = rgb.resize((save_size[1], save_size[0]), Image.BICUBIC)
            mask = mask.resize((save_size[1], save_size[0]), Image.NEAREST)
        if img_path.suffix == ".jpg":
            rgb.save(img_path, quality=quality)
        else:
            rgb.save(img_path)
        if layout == "ph2":
            mask = mask.convert("1")  # PH2 ships 1-bit masks (some 24-bit; the loader reads both)
        mask.save(mask_path)
        written.append(img_path)
    return written


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return (int(h), int(w or h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``synth`` command to an argparse subparsers object; sets ``func=main``."""
    p = subparsers.add_parser("synth", help="write a synthetic lesion dataset to disk",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--layout", choices=LAYOUTS, default="isic2018", help="folder layout (default isic2018)")
    p.add_argument("--split", default="train", help="train | val | test (default train)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--image-size", type=_size, default=(256, 256), help="N or HxW (default 256)")
    p.add_argument("--save-size", type=_size, default=None, help="upsample to N or HxW before writing")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from lesionkit.data.synthetic import SyntheticLesions

    if args.n <= 0:
        raise ValueError(f"--n should be positive, got {args.n}")
    ds = SyntheticLesions(args.n, image_size=args.image_size, seed=args.seed)
    paths = write_dataset(ds, args.out, layout=args.layout, split=args.split, save_size=args.save_size)
    print(f"wrote {len(paths)} images and masks ({args.layout}, split {args.split}) to {args.out}")
    return 0


def cli(argv=None) -> int:
    """``lesionkit data synth ...`` and ``lesionkit data check ...`` (a bare argument list means synth)."""
    from lesionkit.data import check

    parser = argparse.ArgumentParser(prog="lesionkit data")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    check.add_parser(sub)
    if argv is not None and not (argv and argv[0] in ("synth", "check", "-h", "--help")):
        argv = ["synth", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(cli())
