"""MAE-style random patch masking and the pixel <-> patch reshapes it needs.

Patches are numbered row-major over the (H / P) x (W / P) grid, the order
``lesionkit.kernels.patchwise_softmax_loss`` uses for its patch mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PatchMask:
    """One random masking of N patches per image.

    ``ids_keep`` (B, K) lists the visible patches (ascending), ``ids_restore`` (B, N) maps the
    sequence ``[visible..., masked...]`` back to grid order, and ``mask`` (B, N) is True where a
    patch is masked (removed), the convention of MAE and of the patch-wise loss.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def random_patch_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> PatchMask:
    """Mask ``round(mask_ratio * N)`` patches per image, uniformly at random (MAE's per-sample shuffle).

    At least one patch stays visible and, for ``mask_ratio > 0``, at least one is masked.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio should be in [0, 1), got {mask_ratio}")
    if num_patches < 1:
        raise ValueError(f"num_patches should be >= 1, got {num_patches}")
    n_mask = round(mask_ratio * num_patches)
    if mask_ratio > 0:
        n_mask = min(max(n_mask, 1), num_patches - 1)
    n_keep = num_patches - n_mask
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    # Visible patches in ascending grid order keep the token sequence spatially ordered.
    ids_keep = ids_shuffle[:, :n_keep].sort(dim=1).values
    ids_masked = ids_shuffle[:, n_keep:]
    order = torch.cat([ids_keep, ids_masked], dim=1)
    ids_restore = order.argsort(dim=1)
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, ids_keep, False)
    return PatchMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


# The order of a patch's values in its vector: "pqc" pixel row, column, then channel (MAE's, the
# order its decoder predicts and unpatchify inverts); "cpq" channel first (AMLP's k-means pixel
# vectors and per-patch errors, kept so that its selections stay what they were).
PATCH_LAYOUTS = ("pqc", "cpq")


def _check_layout(layout: str) -> None:
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"layout should be one of {list(PATCH_LAYOUTS)}, got {layout!r}")


def patchify(images: torch.Tensor, patch_size: int, layout: str = "pqc") -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P * P * C), patches row-major over the grid; ``layout`` orders each
    patch's values: "pqc" (p, q, c) or "cpq" (c, p, q)."""
    _check_layout(layout)
    if images.ndim != 4:
        raise ValueError(f"images should be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image height and width should be multiples of patch_size={p}, got {h}x{w}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    order = (0, 2, 4, 3, 5, 1) if layout == "pqc" else (0, 2, 4, 1, 3, 5)
    return x.permute(*order).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int,
               layout: str = "pqc") -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, P * P * C) -> (B, C, gh * P, gw * P)."""
    _check_layout(layout)
    b, n, d = patches.shape
    gh, gw = grid_size
    p = patch_size
    if n != gh * gw or d != p * p * channels:
        raise ValueError(f"patches should be (B, {gh * gw}, {p * p * channels}) for a {gh}x{gw} grid of "
                         f"{p}x{p}x{channels} patches, got {tuple(patches.shape)}")
    if layout == "pqc":
        return patches.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)
    return patches.reshape(b, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, gh * p, gw * p)


def patch_mask_to_pixels(mask: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, N) bool patch mask -> (B, 1, gh * P, gw * P) bool pixel mask."""
    b = mask.shape[0]
    gh, gw = grid_size
    m = mask.reshape(b, 1, gh, 1, gw, 1).expand(b, 1, gh, patch_size, gw, patch_size)
    return m.reshape(b, 1, gh * patch_size, gw * patch_size)


__all__ = ["PATCH_LAYOUTS", "PatchMask", "patch_mask_to_pixels", "patchify", "random_patch_mask", "unpatchify"]
