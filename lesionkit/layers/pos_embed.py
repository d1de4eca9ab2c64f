"""Fixed 2-D sine-cosine position embeddings (the MAE decoder's, He et al. 2022)."""

from __future__ import annotations

import torch


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], temperature: float = 10000.0,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(gh * gw, dim) embedding of a row-major grid: half the channels encode the row, half the column.

    Each half holds ``sin(pos * w_k)`` then ``cos(pos * w_k)`` for ``w_k = temperature ** (-k / (dim / 4))``,
    as in the Transformer's 1-D encoding applied per axis.
    """
    if dim <= 0 or dim % 4:
        raise ValueError(f"dim should be a positive multiple of 4 for a 2-D sin-cos embedding, got {dim}")
    gh, gw = (int(s) for s in grid_size)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid_size should be two positive sizes, got {tuple(grid_size)}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    rows = torch.arange(gh, device=device, dtype=torch.float64)[:, None] * omega  # (gh, D/4)
    cols = torch.arange(gw, device=device, dtype=torch.float64)[:, None] * omega  # (gw, D/4)
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(gh, gw, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(gh, gw, 2 * quarter)
    return torch.cat([row_emb, col_emb], dim=-1).reshape(gh * gw, dim).to(dtype)


__all__ = ["sincos_pos_embed_2d"]
