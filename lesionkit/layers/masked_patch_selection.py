"""AMLP's masked patch selection (MPS, Sec. 3.1) and adaptive masking ratio (AMR, Eq. 9).

MPS: the patches of every image, as vectors, are split into two clusters by k-means
(:func:`lesionkit.kernels.kmeans`, all images in one call); the smaller cluster is the
foreground (lesion, label 1). Patches are ranked by their distance to the foreground centroid,
closest first, and n_m = floor(N * sigma) of them are masked. Strategies (the paper's masking
strategy ablation): ``hard_to_easy`` masks the n_m patches closest to the foreground centroid
(lesion-like first, AMLP's choice), ``easy_to_hard`` the n_m farthest from it (background
first), ``random`` n_m patches drawn uniformly (plain MAE masking, the BASE row). With
``pool`` > 0 (ours; 0 is the paper's deterministic selection) the ranked strategies draw their
n_m patches at random from the ceil(n_m * (1 + pool)) first-ranked ones, so that the patches at
the edge of the selection are sometimes visible: with ``hard_to_easy`` a small lesion is
otherwise masked in every step once n_m exceeds its patch count.

AMR (Eq. 9): sigma = sigma0 + ln(epoch) / tau with epochs counted from 1, capped. The paper
gives sigma0 = 0.25 but neither tau nor the cap; :func:`amr_tau` picks tau so that sigma reaches
the cap at a chosen epoch (our choice: the last configured epoch). The epoch may be fractional
(1 + steps done / steps per epoch), so that the ratio grows every step rather than jumping once
an epoch: a short run of a few epochs follows the curve instead of a staircase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lesionkit.kernels import kmeans

STRATEGIES = ("random", "hard_to_easy", "easy_to_hard")


@dataclass
class PatchSelection:
    """Result of :func:`select_masked_patches` for B images of N patches.

    mask: (B, N) bool, True where a patch is masked (MAE's convention).
    foreground: (B, N) bool, k-means label_ori: True for the smaller cluster.
    foreground_distance: (B, N) squared distance of every patch to its image's foreground
        centroid (float32, or float64 for float64 vectors).
    rank: (B, N) int64, patch indices ordered from closest to farthest from that centroid.
    """

    mask: torch.Tensor
    foreground: torch.Tensor
    foreground_distance: torch.Tensor
    rank: torch.Tensor

    @property
    def num_masked(self) -> int:
        return int(self.mask[0].sum()) if self.mask.shape[0] else 0


def num_masked_patches(num_patches: int, ratio: float) -> int:
    """n_m = floor(N * sigma) (Algorithm 1, line 5)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio should be in [0, 1], got {ratio}")
    return math.floor(num_patches * ratio + 1e-9)  # 1e-9: 0.3 * 10 is 2.9999999999999996


def select_masked_patches(
    vectors: torch.Tensor,
    ratio: float,
    strategy: str = "hard_to_easy",
    iters: int = 20,
    tol: float = 1e-4,
    init: str = "farthest",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pool: float = 0.0,
) -> PatchSelection:
    """MPS for a batch: vectors (B, N, D) -> which floor(N * ratio) patches to mask.

    The foreground is the smaller of the two k-means clusters (equal sizes: cluster 1).
    `iters`, `tol`, `init` and `seed` go to :func:`lesionkit.kernels.kmeans`; `generator`
    drives the ``random`` strategy and the draw from the ranked ``pool`` (module docstring).
    The clustering runs on the vectors' device, batched.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy should be one of {STRATEGIES}, got {strategy!r}")
    if not (pool >= 0 and math.isfinite(pool)):
        raise ValueError(f"pool should be a finite number >= 0, got {pool}")
    if vectors.dim() != 3:
        raise ValueError(f"vectors should be a (B, N, D) tensor, got shape {tuple(vectors.shape)}")
    batch, n, _ = vectors.shape
    n_mask = num_masked_patches(n, ratio)
    result = kmeans(vectors.detach(), k=2, iters=iters, tol=tol, init=init, seed=seed)
    counts = torch.stack([(result.labels == 0).sum(dim=1), (result.labels == 1).sum(dim=1)], 1)
    fg_cluster = (counts[:, 1] <= counts[:, 0]).long()  # the smaller one; ties -> cluster 1
    foreground = result.labels == fg_cluster.unsqueeze(1)
    distance = result.distances.gather(2, fg_cluster.view(-1, 1, 1).expand(-1, n, 1)).squeeze(2)
    # Stable sort: equal distances keep the patch order, so the selection is deterministic.
    rank = distance.argsort(dim=1, stable=True)
    if strategy != "random":
        ordered = rank if strategy == "hard_to_easy" else rank.flip(1)  # easy_to_hard: farthest first
        n_pool = min(n, math.ceil(n_mask * (1.0 + pool) - 1e-9))
        if n_pool > n_mask:
            noise = torch.rand(batch, n_pool, generator=generator, device="cpu").to(vectors.device)
            chosen = ordered[:, :n_pool].gather(1, noise.argsort(dim=1)[:, :n_mask])
        else:
            chosen = ordered[:, :n_mask]
    else:
        noise = torch.rand(batch, n, generator=generator, device="cpu").to(vectors.device)
        chosen = noise.argsort(dim=1)[:, :n_mask]
    mask = torch.zeros(batch, n, dtype=torch.bool, device=vectors.device)
    mask.scatter_(1, chosen, True)
    return PatchSelection(mask=mask, foreground=foreground, foreground_distance=distance, rank=rank)


def amr_tau(sigma0: float, cap: float, reach_epoch: int) -> float:
    """tau of Eq. 9 such that sigma0 + ln(reach_epoch) / tau = cap (our choice of tau)."""
    if not 0.0 <= sigma0 < cap <= 1.0:
        raise ValueError(f"need 0 <= sigma0 < cap <= 1, got sigma0={sigma0}, cap={cap}")
    if reach_epoch < 2:
        raise ValueError(f"reach_epoch should be >= 2 (ln(1) = 0), got {reach_epoch}")
    return math.log(reach_epoch) / (cap - sigma0)


def amr_mask_ratio(epoch: float, sigma0: float = 0.25, tau: float = 5.0, cap: float = 0.75) -> float:
    """Eq. 9: sigma = min(cap, sigma0 + ln(epoch) / tau), epochs counted from 1 (fractions allowed)."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not epoch >= 1 or not math.isfinite(epoch):
        raise ValueError(f"epoch should be a number >= 1 (Eq. 9 counts from 1), got {epoch!r}")
    if not tau > 0:
        raise ValueError(f"tau should be > 0, got {tau}")
    if not 0.0 <= sigma0 <= cap <= 1.0:
        raise ValueError(f"need 0 <= sigma0 <= cap <= 1, got sigma0={sigma0}, cap={cap}")
    return min(cap, sigma0 + math.log(epoch) / tau)
