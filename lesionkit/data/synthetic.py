"""Synthetic dermoscopy-like images with exact lesion masks: the built-in default dataset.

Each image is drawn from its own random stream, seeded by (seed, index), so any item can be
made alone, in any order, on any worker, and is identical every time. The full-resolution
work is a few dozen vectorised tensor operations: the lesion's level field (which decides the
mask) is built per image as ``Uy @ G @ Ux^T`` (a small random grid G times fixed smoothing
bases) instead of interpolating; the other smooth maps and the fine textures (pigment network,
dots, grain, pores) are random crops of a per-size bank made once with a fixed seed. The bank
holds about ten float32 tiles of (H + 512) x (W + 512) pixels (10 MB at 256 px, 94 MB at
1024 px); for full-resolution files render small and upsample (``write_dataset(save_size=...)``).

What makes it hard for a threshold: skin tones and lesion pigments overlap in brightness,
lesion opacity varies (faint parts stay inside the mask), borders are sharp in places and
diffuse in others, illumination falls off, vignetting darkens the corners, and hairs, ruler
marks and air bubbles add dark and bright structures that are not lesion.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from lesionkit.data.sizes import as_hw

# Dermoscopic skin tones (light to dark, with the pink cast of pressed skin) and lesion pigments.
SKIN_TONES = np.array([
    [0.95, 0.78, 0.72], [0.90, 0.70, 0.62], [0.85, 0.62, 0.52],
    [0.76, 0.55, 0.45], [0.66, 0.46, 0.36], [0.92, 0.66, 0.66],
], dtype=np.float32)
PIGMENTS = np.array([
    [0.62, 0.42, 0.30],  # light brown
    [0.44, 0.27, 0.19],  # dark brown
    [0.22, 0.14, 0.13],  # black
    [0.42, 0.44, 0.55],  # blue-grey (dermal melanin)
    [0.72, 0.38, 0.38],  # red / vascular
    [0.80, 0.62, 0.55],  # pale tan, close to skin (low contrast)
], dtype=np.float32)
_REGRESSION = np.array([0.90, 0.84, 0.84], dtype=np.float32)  # white scar-like areas


def _smoothing_basis(n: int, nodes: int) -> torch.Tensor:
    """(n, nodes) Gaussian basis, rows normalised: maps a coarse random grid to a smooth field."""
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    centres = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes
    sigma = 0.8 / nodes
    basis = torch.exp(-0.5 * ((pos[:, None] - centres[None, :]) / sigma) ** 2)
    basis = basis / basis.sum(1, keepdim=True)
    # Rescale so unit-variance grids give fields of roughly unit variance.
    basis = basis / basis.pow(2).sum(1, keepdim=True).sqrt().mean()
    return basis.float()


class _Canvas:
    """Per-size constants: coordinates, smoothing bases and the texture bank."""

    OCTAVES = (3, 5, 9, 17)

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        scale = 2.0 / min(h, w)  # the shorter side spans [-1, 1]
        self.ys = ((torch.arange(h) + 0.5) - h / 2) * scale
        self.xs = ((torch.arange(w) + 0.5) - w / 2) * scale
        self.r = torch.sqrt(self.ys[:, None] ** 2 + self.xs[None, :] ** 2)
        self.bases = {g: (_smoothing_basis(h, g), _smoothing_basis(w, g).T.contiguous())
                      for g in self.OCTAVES}
        self.bank = self._texture_bank()

    def fields(self, grids: np.ndarray, octaves: tuple[int, ...], weights=None) -> torch.Tensor:
        """(C, K, K) random grids -> (C, H, W) smooth fields summed over `octaves` (K = sum).

        Octave g uses the diagonal g x g block of each grid, so one batched product makes
        every field; `weights` (C, len(octaves)) scales each octave per field.
        """
        uy, uxt = self._stacked(octaves)
        g = torch.from_numpy(grids)
        if weights is not None:
            scale = np.repeat(np.asarray(weights, dtype=np.float32), octaves, axis=1)
            g = g * torch.from_numpy(scale)[:, :, None]
        return uy @ (g * self._block_mask(octaves)) @ uxt

    @lru_cache(maxsize=None)
    def _stacked(self, octaves: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.bases[o][0] for o in octaves], 1).contiguous(),
                torch.cat([self.bases[o][1] for o in octaves], 0).contiguous())

    @lru_cache(maxsize=None)
    def _block_mask(self, octaves: tuple[int, ...]) -> torch.Tensor:
        return torch.block_diag(*[torch.ones(o, o) for o in octaves])

    def _texture_bank(self) -> dict[str, torch.Tensor]:
        # Fixed seed: the bank is part of the generator's definition, not of the dataset seed.
        g = torch.Generator().manual_seed(20181)
        # Tiles a little larger than the image; crops at random offsets vary them per image.
        h2, w2 = self.h + min(self.h, 512), self.w + min(self.w, 512)
        cell = max(4, min(self.h, self.w) // 24)  # pigment-network mesh size in pixels

        def smooth_noise(cells_y: int, cells_x: int) -> torch.Tensor:
            coarse = torch.randn(1, 1, cells_y + 3, cells_x + 3, generator=g)
            up = torch.nn.functional.interpolate(coarse, size=(h2 + 3 * h2 // cells_y, w2 + 3 * w2 // cells_x),
                                                 mode="bicubic", align_corners=False)
            return up[0, 0, :h2, :w2]

        n = smooth_noise(h2 // cell, w2 // cell)
        network = torch.exp(-((n / 0.22) ** 2))  # zero-crossings of noise form a reticular mesh
        impulses = (torch.rand(1, 1, h2, w2, generator=g) < 3.0 / cell**2).float()
        k = max(3, cell // 2) | 1
        dots = torch.nn.functional.avg_pool2d(
            torch.nn.functional.max_pool2d(impulses, k, 1, k // 2), 3, 1, 1)[0, 0]
        pores = smooth_noise(h2 // 3, w2 // 3)
        grain = torch.randn(3, h2, w2, generator=g)
        bank = {"network": network, "dots": dots.clamp(0, 1), "pores": pores, "grain": grain}
        # Smooth fields for the maps whose exact shape matters little (softness, opacity, colour
        # mixing, skin, dots, regression): crops of 2 tiles per octave, same smoothness per image
        # pixel as the fields made per image; only the lesion's level field is made per image.
        def smooth(octave: int) -> torch.Tensor:
            uy = _smoothing_basis(h2, max(2, round(octave * h2 / self.h)))
            ux = _smoothing_basis(w2, max(2, round(octave * w2 / self.w)))
            return uy @ torch.randn(2, uy.shape[1], ux.shape[1], generator=g) @ ux.T

        bank["smooth_low"] = smooth(3) + smooth(5)  # as a per-image field over octaves 3 and 5
        bank["smooth_mid"] = smooth(9)
        return bank

    def crop(self, name: str, rng: np.random.Generator) -> torch.Tensor:
        """A random (H, W) window of a bank tile (a view: never modify it in place)."""
        tile = self.bank[name]
        if name.startswith("smooth"):
            tile = tile[int(rng.integers(tile.shape[0]))]
        y = int(rng.integers(0, tile.shape[-2] - self.h + 1))
        x = int(rng.integers(0, tile.shape[-1] - self.w + 1))
        return tile[..., y:y + self.h, x:x + self.w]


@lru_cache(maxsize=4)
def _canvas(h: int, w: int) -> _Canvas:
    return _Canvas(h, w)


@contextmanager
def _one_thread():
    # Images are small tensors: intra-op threading costs more than it gains (3-10x slower on
    # 2 busy cores), and DataLoader workers run single-threaded anyway.
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _seed_for(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])


def render_lesion(seed: int, index: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic image (3, H, W) in [0, 1] and its exact mask (1, H, W) in {0, 1}."""
    h, w = image_size
    cv = _canvas(h, w)
    rng = _seed_for(seed, index)
    ys, xs = cv.ys, cv.xs

    k = int(rng.integers(2, 4))  # pigment colours
    regress = rng.random() < 0.3  # white regression areas
    # The lesion's level field is made for this image (it decides the mask); the other smooth
    # maps are crops of the bank.
    level_w = ((0.0, 1.0, 0.5, rng.uniform(0.05, 0.25)),)
    level_f = cv.fields(rng.standard_normal((1, 34, 34), dtype=np.float32), (3, 5, 9, 17), weights=level_w)[0]
    soft_f, opac_f, mix1_f = (cv.crop("smooth_low", rng) for _ in range(3))
    skin_f, dots_f = cv.crop("smooth_low", rng), cv.crop("smooth_mid", rng)

    # Lesion geometry (our choice): an ellipse whose level set is bent by multi-octave noise.
    # Area fraction log-uniform in [2 %, 80 %] of the image before the border noise.
    area = math.exp(rng.uniform(math.log(0.02), math.log(0.8)))
    aspect = max(h, w) / min(h, w)
    r0 = math.sqrt(area * 4.0 * aspect / math.pi)
    ecc = rng.uniform(0.7, 1.0)
    ax, ay = r0 / math.sqrt(ecc), r0 * math.sqrt(ecc)
    spread = max(0.0, 0.9 - r0)
    cx, cy = rng.uniform(-spread, spread) * 0.6, rng.uniform(-spread, spread) * 0.6
    th = rng.uniform(0, math.pi)
    c, s = math.cos(th), math.sin(th)
    dx, dy = xs - cx, ys - cy
    u = (dx[None, :] * (c / ax)) + (dy[:, None] * (s / ax))
    v = (dy[:, None] * (c / ay)) - (dx[None, :] * (s / ay))
    irregular = rng.uniform(0.05, 0.35)
    # level > 0 is the lesion; level is ~1 - (elliptic distance) plus border noise.
    level = torch.sqrt(u.mul_(u).addcmul_(v, v)).neg_().add_(1.0).add_(level_f, alpha=irregular)
    # Strong noise can sink the whole ellipse (about 1 image in 3000): lift it so that the
    # lesion always covers its centre.
    iy = min(h - 1, max(0, int(round(cy * min(h, w) / 2 + h / 2 - 0.5))))
    ix = min(w - 1, max(0, int(round(cx * min(h, w) / 2 + w / 2 - 0.5))))
    centre_level = float(level[iy, ix])
    if centre_level < 0.5:
        level.add_(0.5 - centre_level)
    mask = level > 0

    # Border sharpness varies along the border: sharp edges in places, diffuse in others.
    softness = soft_f.mul(0.8).clamp_(-0.85, 2.0).add_(1.0).mul_(rng.uniform(0.02, 0.12)).add_(0.01)
    alpha = torch.sigmoid(level / softness)
    # Opacity (contrast against the skin) varies inside the lesion but never fully vanishes.
    opacity = float(rng.uniform(0.5, 0.95))
    alpha.mul_(opac_f.clamp(-0.6, 1.0).mul_(0.6 * (1 - opacity)).add_(opacity))

    # Pigment: two or three colours mixed by smooth fields, darker (or lighter) towards the centre.
    cols = PIGMENTS[rng.choice(len(PIGMENTS), size=k, replace=False)]
    cols = cols + rng.normal(0, 0.04, cols.shape)
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.85, 1.08) + rng.normal(0, 0.03, 3)
    if rng.random() < 0.9:
        # Most lesions are darker than the skin around them, by a random margin; the rest
        # (amelanotic, regressing) keep their palette colours and may be lighter.
        lum = np.array([0.299, 0.587, 0.114])
        cols = cols * (float(tone @ lum) * rng.uniform(0.4, 0.85) / float((cols @ lum).mean()))
    cols = torch.from_numpy(np.clip(cols, 0.03, 1.0).astype(np.float32))
    # c0 + (c1 - c0) * m: a broadcast lerp takes 4x longer on CPU.
    pigment = torch.sigmoid(2.5 * mix1_f)[None].mul((cols[1] - cols[0])[:, None, None]).add_(cols[0][:, None, None])
    if k == 3:
        m2 = torch.sigmoid(3.0 * cv.crop("smooth_low", rng) - 1.0).mul_((level * 2).clamp_(0, 1))
        pigment.lerp_(cols[2][:, None, None].expand_as(pigment), m2)
    # One multiplicative shade: centre darkening, pigment network, dots / globules.
    centre = float(rng.uniform(-0.35, 0.35))
    shade = level.clamp(0, 1).sub_(0.3).mul_(centre).add_(1.0)
    shade.sub_(cv.crop("network", rng), alpha=rng.uniform(0.0, 0.45))
    shade.sub_(torch.sigmoid(3 * dots_f).mul_(cv.crop("dots", rng)), alpha=rng.uniform(0.0, 0.7))
    pigment.mul_(shade)
    if regress:
        regression = torch.sigmoid(4 * cv.crop("smooth_mid", rng) - 3.0).mul_(rng.uniform(0.3, 0.8))
        pigment.lerp_(torch.from_numpy(_REGRESSION)[:, None, None].expand_as(pigment), regression)

    # Skin: tone, texture and pores, erythema patches.
    tex = cv.crop("pores", rng).mul(0.03 * rng.uniform(0.3, 1.5)).add_(skin_f, alpha=0.05).add_(1.0)
    redness = torch.tensor([0.05, -0.02, -0.015])[:, None, None]
    skin = torch.from_numpy(tone.astype(np.float32))[:, None, None] * tex
    skin.addcmul_(redness, skin_f.clamp(min=0))  # erythema where the skin field is high

    image = skin.lerp_(pigment, alpha)

    # Distractors.
    _draw_hairs(image, cv, rng)
    _draw_ruler(image, rng, h, w)
    _draw_bubbles(image, cv, rng)

    # Illumination falloff from an off-centre light and the dermoscope's circular field.
    lx, ly = rng.uniform(-0.5, 0.5, 2)
    light = ((xs[None, :] - lx) ** 2 + (ys[:, None] - ly) ** 2).mul_(-rng.uniform(0.0, 0.35) / 2).add_(1.0)
    if rng.random() < 0.6:
        radius = rng.uniform(1.05, 1.45)
        light.mul_(torch.sigmoid(cv.r.neg().add_(radius).mul_(1 / rng.uniform(0.02, 0.08))))
    cast = torch.from_numpy(rng.uniform(0.88, 1.08, 3).astype(np.float32))[:, None, None]
    image.mul_(light).mul_(cast)
    image.add_(cv.crop("grain", rng), alpha=rng.uniform(0.005, 0.03))
    return image.clamp_(0, 1), mask.float()[None]


def _draw_hairs(image: torch.Tensor, cv: _Canvas, rng: np.random.Generator) -> None:
    if rng.random() > 0.4:
        return
    h, w = cv.h, cv.w
    n = int(rng.integers(1, 12))
    # Each hair is a bent line: sample points along it (about one per pixel), splat them into
    # a map, then thicken and soften that map with shifted maxima and averages.
    half = rng.uniform(0.4, 1.5, (n, 1))
    steps = int(1.2 * max(h, w) * half.max()) + 2
    t = np.linspace(-1.0, 1.0, steps, dtype=np.float32)[None, :]
    ang = rng.uniform(0, math.pi, (n, 1))
    bend = rng.uniform(-0.5, 0.5, (n, 1))
    px, py = rng.uniform(-1, 1, (n, 1)), rng.uniform(-1, 1, (n, 1))
    along = t * half
    across = bend * along * along
    x = px + along * np.cos(ang) - across * np.sin(ang)
    y = py + along * np.sin(ang) + across * np.cos(ang)
    scale = min(h, w) / 2.0
    col = np.rint(x * scale + w / 2 - 0.5).astype(np.int64).ravel()
    row = np.rint(y * scale + h / 2 - 0.5).astype(np.int64).ravel()
    keep = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    hair = torch.zeros(h, w)
    hair.view(-1)[torch.from_numpy(row[keep] * w + col[keep])] = 1.0
    for _ in range(int(rng.integers(0, 3)) if min(h, w) >= 128 else 0):
        _dilate(hair)
    hair = _soften(hair)
    colour = torch.from_numpy((np.array([0.12, 0.08, 0.06]) * rng.uniform(0.5, 2.5)).astype(np.float32))
    image.lerp_(colour[:, None, None].expand_as(image), hair.mul_(rng.uniform(0.6, 0.95)))


def _dilate(m: torch.Tensor) -> None:
    """In-place 3 x 3 max filter, separable, by shifted maxima."""
    for dim in (0, 1):
        src = m.clone()
        n = m.shape[dim]
        m.narrow(dim, 1, n - 1).copy_(torch.maximum(m.narrow(dim, 1, n - 1), src.narrow(dim, 0, n - 1)))
        m.narrow(dim, 0, n - 1).copy_(torch.maximum(m.narrow(dim, 0, n - 1), src.narrow(dim, 1, n - 1)))


def _soften(m: torch.Tensor) -> torch.Tensor:
    """[1 2 1] / 4 blur along both axes (anti-aliased edges), by shifted sums."""
    for dim in (0, 1):
        n = m.shape[dim]
        out = m * 0.5
        out.narrow(dim, 1, n - 1).add_(m.narrow(dim, 0, n - 1), alpha=0.25)
        out.narrow(dim, 0, n - 1).add_(m.narrow(dim, 1, n - 1), alpha=0.25)
        m = out
    return m.clamp_(max=1.0).mul_(1.6).clamp_(max=1.0)


def _draw_ruler(image: torch.Tensor, rng: np.random.Generator, h: int, w: int) -> None:
    if rng.random() > 0.15:
        return
    # Tick marks along one edge, as on the dermoscope's measuring scale.
    side = int(rng.integers(4))
    length = h if side < 2 else w
    step = max(3, int(length * rng.uniform(0.03, 0.06)))
    start = int(length * rng.uniform(0.05, 0.3))
    stop = int(length * rng.uniform(0.7, 0.95))
    base = int(min(h, w) * rng.uniform(0.02, 0.1))
    thick = max(1, length // 200)
    darkness = float(rng.uniform(0.3, 0.7))
    for j, p in enumerate(range(start, stop, step)):
        tick = max(2, int(min(h, w) * (0.06 if j % 5 == 0 else 0.03)))
        if side == 0:
            image[:, p:p + thick, base:base + tick] *= darkness
        elif side == 1:
            image[:, p:p + thick, w - base - tick:w - base] *= darkness
        elif side == 2:
            image[:, base:base + tick, p:p + thick] *= darkness
        else:
            image[:, h - base - tick:h - base, p:p + thick] *= darkness


def _draw_bubbles(image: torch.Tensor, cv: _Canvas, rng: np.random.Generator) -> None:
    if rng.random() > 0.2:
        return
    h, w = cv.h, cv.w
    px = 2.0 / min(h, w)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.04, 0.25)
        cx, cy = rng.uniform(-1, 1), rng.uniform(-1, 1)
        # Work on the bubble's bounding box only.
        y0 = max(0, int((cy - r) / px + h / 2) - 2); y1 = min(h, int((cy + r) / px + h / 2) + 3)
        x0 = max(0, int((cx - r) / px + w / 2) - 2); x1 = min(w, int((cx + r) / px + w / 2) + 3)
        if y0 >= y1 or x0 >= x1:
            continue
        d = torch.sqrt((cv.ys[y0:y1, None] - cy) ** 2 + (cv.xs[None, x0:x1] - cx) ** 2)
        rim = torch.exp(-(((d - r) / (2.5 * px)) ** 2))
        inside = (d < r).float() * 0.08
        patch = image[:, y0:y1, x0:x1]
        patch.add_((1 - patch) * (0.7 * rim + inside))


class SyntheticLesions(Dataset):
    """Deterministic synthetic dermoscopy dataset (items as every lesionkit dataset).

    Args:
        n: number of images.
        image_size: int or (h, w); default 256.
        seed: dataset seed; item i depends only on (seed, i).
        transform: optional paired transform applied to each item dict.
    """

    def __init__(self, n: int, image_size: int | tuple[int, int] = 256, seed: int = 0,
                 transform=None) -> None:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n should be a non-negative int, got {n!r}")
        self.n = int(n)
        self.image_size = as_hw(image_size, "image_size")
        if min(self.image_size) < 16:
            raise ValueError(f"image_size should be at least 16 pixels, got {image_size!r}")
        self.seed = int(seed)
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for SyntheticLesions of length {self.n}")
        with _one_thread():
            image, mask = render_lesion(self.seed, index, self.image_size)
        item = {"image": image, "mask": mask, "id": f"synthetic_{self.seed}_{index:06d}",
                "orig_size": self.image_size}
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return f"SyntheticLesions(n={self.n}, image_size={self.image_size}, seed={self.seed})"
