"""VMamba's cross-scan and its adjoint cross-merge, plain PyTorch (docs/ss2d.md).

cross_scan (B, C, H, W) -> (B, 4, C, H*W) reads the image in four directions (VMamba / VM-UNet
order): 0 row-major, 1 column-major, 2 and 3 the same reversed. cross_merge maps the four
sequences back to their pixels and sums them, so it is cross_scan's adjoint.
"""

from __future__ import annotations

import torch

DIRECTIONS = 4  # VMamba's cross-scan: row-major, column-major and both reversed


def check_spatial_input(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} should be a (B, C, H, W) tensor, got {shape}")


def cross_scan_reference(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    check_spatial_input("x", x)
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def check_cross_merge_inputs(y: torch.Tensor, height: int, width: int) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != DIRECTIONS:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y should be a (B, 4, C, H*W) tensor, got {shape}")
    for name, v in (("H", height), ("W", width)):
        if isinstance(v, torch.SymInt):  # a size traced by torch.compile (dynamic shapes)
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} should be a positive int, got {v!r}")
    if y.shape[-1] != height * width:
        raise ValueError(f"y's last dimension should be H*W = {height}*{width} = {height * width}, "
                         f"got {y.shape[-1]}")


def cross_merge_reference(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Adjoint of cross_scan: (B, 4, C, H*W) -> (B, C, H, W), the four mapped back and summed."""
    check_cross_merge_inputs(y, height, width)
    batch, _, channels, _ = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    cols = cols.view(batch, channels, width, height).transpose(2, 3)
    return rows.view(batch, channels, height, width) + cols


def directions_to_sequences(t: torch.Tensor) -> torch.Tensor:
    """(B, 4, C, H, W) per-direction spatial tensors -> (B, 4, C, H*W), each in its scan order."""
    rows = t.flatten(3)
    cols = t.transpose(3, 4).flatten(3)
    return torch.stack([rows[:, 0], cols[:, 1], rows[:, 2].flip(-1), cols[:, 3].flip(-1)], dim=1)
