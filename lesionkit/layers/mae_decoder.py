"""The MAE decoder (He et al. 2022): visible tokens plus mask tokens -> pixels of every patch.

SegMAE Eq. 3-4: ``Z_dec = Concat(Z_V, Z_M) + E_pos``, a few Transformer blocks, and a linear
layer to the P x P x C pixels of each patch. The MAE-B decoder is 512 wide, 8 blocks, 16 heads
(26.0M parameters with a 768-dim encoder and 16x16x3 patches); the position embedding is the
fixed 2-D sin-cos one, computed for the grid of each input so any image size works.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lesionkit.layers.pos_embed import sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    """Reconstructs (B, N, P * P * C) patch pixels from (B, K, in_dim) visible tokens."""

    def __init__(self, in_dim: int, patch_size: int, out_chans: int = 3, embed_dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0) -> None:
        from timm.models.vision_transformer import Block  # imported on use: timm is slow to import

        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) should be a multiple of num_heads ({num_heads})")
        self.patch_size, self.out_chans, self.embed_dim = patch_size, out_chans, embed_dim
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)  # MAE's LayerNorm eps
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)))
        self.norm = norm(embed_dim)
        self.pred = nn.Linear(embed_dim, patch_size * patch_size * out_chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MAE's initialisation: xavier-uniform linears, N(0, 0.02) mask token.
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int],
                select: torch.Tensor | None = None, pixels: bool = True) -> torch.Tensor:
        """``visible`` (B, K, in_dim) in the order of ``ids_restore``'s first K entries; returns (B, N, P*P*C).

        With ``select`` (B, N) bool, only the selected tokens go through the final norm and pixel
        head: (S, P*P*C) for the S selected (row, patch) pairs in row-major order. With
        ``pixels=False`` the pixel head is left out: the normalised tokens (..., embed_dim) that
        ``self.pred`` (a linear layer) maps to pixels."""
        b, k, _ = visible.shape
        n = ids_restore.shape[1]
        if n != grid_size[0] * grid_size[1] or k > n:
            raise ValueError(f"ids_restore should index the {grid_size[0]}x{grid_size[1]} grid with >= {k} entries, "
                             f"got shape {tuple(ids_restore.shape)}")
        x = self.embed(visible)
        x = torch.cat([x, self.mask_token.expand(b, n - k, -1).to(x.dtype)], dim=1)  # Eq. 3: Concat(Z_V, Z_M)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, self.embed_dim))  # back to grid order
        pos = sincos_pos_embed_2d(self.embed_dim, grid_size, device=x.device, dtype=x.dtype)
        x = x + pos  # + E_pos
        if select is None:
            x = self.blocks(x)
        elif len(self.blocks) == 0:
            x = x[select]
        else:
            x = _block_at(self.blocks[-1], self.blocks[:-1](x), select)
        x = self.norm(x)
        return self.pred(x) if pixels else x  # Eq. 4


def _block_at(block: nn.Module, x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``block(x)[select]`` for a timm ViT block, computed for the selected tokens only: their
    queries attend to every token's keys and values, and the projection and MLP run on them
    alone (a block mixes tokens only in the attention's keys and values). Needs the same number
    of selected tokens in every row (a mask ratio's maskings); otherwise, in training, or for
    blocks with parts this does not model (gates, attention masks), the whole block runs."""
    counts = select.sum(1)
    attn = block.attn
    plain = (not block.training and counts.numel() > 0 and bool((counts == counts[0]).all())
             and getattr(attn, "gate", None) is None and isinstance(block.ls1, nn.Identity)
             and isinstance(block.ls2, nn.Identity))
    if not plain:
        return block(x)[select]
    b, n, d = x.shape
    m = int(counts[0])
    h = block.norm1(x)
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = nn.functional.linear(h[select], w[:width], None if bias is None else bias[:width])
    kv = nn.functional.linear(h, w[width:], None if bias is None else bias[width:])
    q = attn.q_norm(q.view(b, m, heads, head_dim).transpose(1, 2))
    k, v = kv.view(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    k = attn.k_norm(k)
    if attn.fused_attn:
        o = nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    o = attn.proj(attn.norm(o.transpose(1, 2).reshape(b, m, width)))
    y = x[select].view(b, m, d) + o
    y = y + block.mlp(block.norm2(y))
    return y.view(b * m, d)


__all__ = ["MAEDecoder"]
