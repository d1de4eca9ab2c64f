"""Reading images and masks into the tensors every lesionkit dataset returns.

Images: any mode PIL reads (RGB, grayscale, palette, RGBA, CMYK, 16-bit) -> float32 (3, H, W) in
[0, 1], EXIF orientation applied. JPEGs are decoded at a reduced scale (``Image.draft``, DCT
scaling by 1/2, 1/4 or 1/8) when the requested size allows, which makes full-resolution ISIC
images (up to 6000 x 4000) several times faster to load. Masks: binarised at > 127 on the 8-bit
scale (> 32767 for 16-bit), at 0.5 when every value lies in [0, 1] (0/1 label masks), any colour
channel counting for 24-bit masks -> float32 (1, H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn import functional as F

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose the image
Header = tuple[tuple[int, int], int]  # (stored (H, W), EXIF orientation), as image_header reads it


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.size  # noqa: B018 - header parsed here so a broken header fails with the file name
        return img
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, 1 (as stored) when absent or invalid."""
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # a corrupt EXIF block must not make a readable image unreadable
        orientation = 1
    return orientation if 1 <= orientation <= 8 else 1


def _displayed_hw(hw: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(H, W) of stored size ``hw`` once EXIF ``orientation`` is applied."""
    return (hw[1], hw[0]) if orientation in _SWAPPING_ORIENTATIONS else (hw[0], hw[1])


def _stored_hw(img: Image.Image) -> tuple[int, int]:
    return img.size[1], img.size[0]


def image_header(path: str | Path) -> Header:
    """((H, W) as stored, EXIF orientation 1-8) of an image file, from its header."""
    with _open(Path(path)) as img:
        return _stored_hw(img), _orientation(img)


def apply_orientation(t: torch.Tensor, orientation: int, inverse: bool = False) -> torch.Tensor:
    """``t`` (..., H, W) turned from its stored pixels to the display of EXIF orientation
    `orientation` (as ``ImageOps.exif_transpose``); inverse=True turns a displayed one back."""
    if inverse and orientation in (6, 8):  # the two turns are each other's inverse; the rest their own
        orientation = 14 - orientation
    if orientation == 2:
        return t.flip(-1)
    if orientation == 3:
        return t.flip((-2, -1))
    if orientation == 4:
        return t.flip(-2)
    if orientation == 5:
        return t.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(t, -1, (-2, -1))
    if orientation == 7:
        return t.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return torch.rot90(t, 1, (-2, -1))
    return t


def mask_orientation(image_path: str | Path, mask_path: str | Path, image: Header | None = None,
                     mask: Header | None = None) -> int:
    """The EXIF orientation that turns ``mask_path``'s stored pixels onto ``image_path`` as
    :func:`load_image` returns it (its own orientation tag applied). ``image`` / ``mask``: the
    files' :func:`image_header` where the caller has read it already.

    A mask whose displayed size (its own tag applied, if any) is the image's displayed size was
    drawn on the image as viewers, annotation tools and OpenCV's ``imread`` show it: the mask's
    own tag (1 when it has none). Otherwise, a mask with the image's stored size was drawn on the
    stored pixels of a turned, non-square image: the image's tag. A square image's two views have
    one size, so there the first reading holds (docs/data.md). Raises ValueError naming both files
    when the mask fits neither."""
    (image_hw, image_tag) = image if image is not None else image_header(image_path)
    (mask_hw, mask_tag) = mask if mask is not None else image_header(mask_path)
    shown = _displayed_hw(image_hw, image_tag)
    if _displayed_hw(mask_hw, mask_tag) == shown:
        return mask_tag
    if mask_hw == image_hw:
        return image_tag
    turned = f" as displayed (EXIF orientation {image_tag}; {image_hw[0]}x{image_hw[1]} as stored)" if image_tag != 1 else ""
    raise ValueError(f"image and mask sizes differ: {image_path} is {shown[0]}x{shown[1]} (HxW){turned}, "
                     f"{mask_path} is {mask_hw[0]}x{mask_hw[1]}")


def _to_float_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.array(img, dtype=np.float32)
        a = a / (65535.0 if img.mode != "I" or a.max() > 255 else 255.0)
        return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=2)
    if img.mode == "F":
        a = np.array(img, dtype=np.float32)
        a = a / 255.0 if a.max() > 1.0 else a
        return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent margins of exported dermoscopy images are background.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.float32) / 255.0


def load_image(path: str | Path, size: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as float32 (3, H, W) in [0, 1], resized to `size` (h, w) if given.

    Returns (image, orig_size) where orig_size is the (H, W) of the file after EXIF orientation.
    """
    path = Path(path)
    img = _open(path)
    with img:
        orig = _displayed_hw(_stored_hw(img), _orientation(img))
        try:
            if size is not None and img.format == "JPEG":
                # draft() takes the size in the file's own orientation.
                want = (size[1], size[0]) if orig == _stored_hw(img) else (size[0], size[1])
                img.draft("RGB", want)
            img = ImageOps.exif_transpose(img)
            if size is not None and img.mode in ("RGB", "L", "RGBA", "P") and img.size != (size[1], size[0]):
                # BILINEAR in PIL widens its support when shrinking: area-like, no aliasing.
                img = img.convert("RGB" if img.mode in ("L", "P") else img.mode)
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = _to_float_array(img)
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot decode image file {path}: {e}") from e
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if size is not None and tuple(t.shape[1:]) != tuple(size):
        t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)
    return t, orig


def mask_levels(img: Image.Image) -> np.ndarray:
    """A mask image as one 2-D array: bool for 1-bit masks, the stored values for 16-bit, 32-bit
    and float masks, and for any other mode the 8-bit levels, the brightest colour channel
    counting (palette masks through their palette; alpha ignored)."""
    if img.mode == "1":
        return np.array(img, dtype=bool)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(img)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    a = np.asarray(img)
    return a[..., :3].max(axis=2) if a.ndim == 3 else a  # 24-bit masks: any channel counts


def mask_foreground(levels: np.ndarray) -> np.ndarray:
    """Lesion pixels of :func:`mask_levels`: a mask whose values all lie in [0, 1] (0/1 label
    masks, float masks) is thresholded at 0.5; others at > 127 on the 8-bit scale (> 32767 when a
    16-bit or wider mask holds values above 255)."""
    if levels.dtype == bool:
        return levels
    top = levels.max() if levels.size else 0
    if top <= 1:
        return levels > 0.5
    return levels > (32767 if top > 255 else 127)


def load_mask(path: str | Path, size: tuple[int, int] | None = None, image: str | Path | None = None
              ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read a mask as float32 (1, H, W) in {0, 1} (nearest resize); returns (mask, orig_size).

    Lesion pixels are those of :func:`mask_foreground`: > 127 for 0/255 masks, 1 for 0/1 masks.
    image: the image file the mask belongs to; the mask is then turned to fit it as
    :func:`load_image` returns it (:func:`mask_orientation`'s rule, a ValueError naming both files
    when it fits neither view). Without it the mask file's own EXIF tag is applied.
    """
    path = Path(path)
    img = _open(path)
    with img:
        orientation = _orientation(img)
        if image is not None:  # the mask file is open: its header comes from here
            orientation = mask_orientation(image, path, mask=(_stored_hw(img), orientation))
        try:
            fg = mask_foreground(mask_levels(img))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot decode mask file {path}: {e}") from e
    m = apply_orientation(torch.from_numpy(np.ascontiguousarray(fg)).float()[None], orientation).contiguous()
    orig = (m.shape[1], m.shape[2])
    if size is not None and tuple(m.shape[1:]) != tuple(size):
        m = F.interpolate(m[None], size=size, mode="nearest-exact")[0]
    return m, orig


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
