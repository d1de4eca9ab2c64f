"""GRCSF's MAE residual maps (Sec. 3.3.1, Eq. 3-5): computing them, caching them, pairing them with images.

For an image I and each mask ratio r (default 0.5 and 0.75): n random maskings (default 5) are
reconstructed by the trained MAE, R_r is their pixel-wise mean, and RM_r = residual(I, R_r).

- **Mean of the reconstructions (our reading).** The MAE is trained on the masked patches only,
  so its output at a visible patch is unconstrained; MAE's own pictures paste the visible input
  there. We do the same: R_r at a pixel is the mean of the reconstructions in which that pixel
  was masked, and I itself where it was masked in none of the n runs (residual 0 there; at
  r = 0.5 and n = 5 that is 1/32 of the patches on average).
- **residual** (Table 7): ``absdiff`` |I - R| (Eq. 3, the paper's choice), ``mse`` (I - R)^2,
  ``ssim`` (1 - SSIM(I, R)) / 2 with SSIM's local statistics over an 11x11 Gaussian window
  (sigma 1.5, constants (0.01)^2 and (0.03)^2 for [0, 1] images). Each is averaged over the
  image's channels: one map per ratio, in [0, 1].
- **Seeding.** The maskings of an image come from a generator seeded with the image's content
  hash and ``seed``, and the n reconstructions of one image are one MAE batch, so a map does
  not depend on which images are processed with it, in what order, or by which command (the
  cache here and GRCSF's on-the-fly maps at evaluation give the same maps).
- **Cache.** ``OUT/<MAE hash>-<settings>/<image hash>.pt`` holds the (ratios, H, W) float16
  maps of one image; the image hash is over the image tensor as the model sees it (after
  resizing), the MAE hash over the checkpoint file. A rerun computes only the images whose
  content, MAE or settings changed. ``--png`` also writes each map as a 16-bit PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lesionkit.layers.residual_maps import (  # noqa: F401  (re-exported: the command's public names)
    IMAGES_PER_FORWARD,
    RESIDUAL_KINDS,
    ResidualMapSettings,
    image_hash,
    residual,
    residual_maps,
    ssim_map,
)

MAE_MODELS = ("mae_vit_base", "mae_vit_tiny")


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- cache


class ResidualMapCache:
    """``root/<MAE hash>-<settings key>/<image hash>.pt``: one image's (ratios, H, W) maps."""

    def __init__(self, root: str | Path, mae_hash: str, settings: ResidualMapSettings) -> None:
        self.root, self.mae_hash, self.settings = Path(root), mae_hash, settings
        self.dir = self.root / f"{mae_hash}-{settings.key()}"

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.pt"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def load(self, digest: str) -> torch.Tensor:
        return torch.load(self.path(digest), map_location="cpu", weights_only=True).float()

    def save(self, digest: str, maps: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(digest).with_suffix(f".tmp{os.getpid()}")
        torch.save(maps.detach().to("cpu", torch.float16).contiguous(), tmp)
        tmp.replace(self.path(digest))  # atomic: an interrupted run leaves no half-written map


def load_mae(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict, str]:
    """(the MAE in eval mode, its checkpoint dict, the checkpoint file's hash)."""
    from lesionkit.engine.checkpoint import load_checkpoint, model_from_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"MAE checkpoint {str(path)!r} does not exist; train one with "
                                "lesionkit train --config grcsf_mae_tiny_isic2018 --data SPEC")
    state = load_checkpoint(path, map_location="cpu")
    if state["model_name"] not in MAE_MODELS:
        raise ValueError(f"checkpoint {str(path)!r} holds model {state['model_name']!r}, not an MAE "
                         f"({', '.join(MAE_MODELS)}); residual maps need a checkpoint of trainer: mae")
    model = model_from_checkpoint(state, path).to(device).eval()
    model.requires_grad_(False)
    return model, state, file_hash(path)


def make_command(mae_checkpoint: str | Path, spec: str, out: str | Path, image_size: int,
                 settings: ResidualMapSettings) -> str:
    flags = settings.cli_flags()
    return (f"lesionkit residual-maps --checkpoint {mae_checkpoint} --data {spec} --out {out} "
            f"--image-size {image_size}" + (f" {flags}" if flags else ""))


@dataclass
class ResidualMapRun:
    total: int
    computed: int
    cached: int
    seconds: float
    dir: Path


def write_residual_maps(checkpoint: str | Path, spec: str, out: str | Path,
                        settings: ResidualMapSettings = ResidualMapSettings(), image_size: int | None = None,
                        device: torch.device | str = "cpu", png: bool = False, progress: bool = True,
                        num_workers: int = 0) -> ResidualMapRun:
    """Maps of every image of ``spec`` not yet in the cache under ``out`` (the residual-maps command)."""
    from tqdm import tqdm

    from lesionkit.engine.builders import build_dataset, build_eval_transform
    from lesionkit.engine.runtime import on_terminal

    start = time.monotonic()
    device = torch.device(device)
    mae, state, mae_hash = load_mae(checkpoint, device)
    data_cfg = (state.get("config") or {}).get("data", {})
    size = int(image_size or data_cfg.get("image_size", mae.cfg.img_size))
    dataset = build_dataset(spec, size, build_eval_transform(data_cfg))
    cache = ResidualMapCache(out, mae_hash, settings)
    loader = torch.utils.data.DataLoader(dataset, batch_size=IMAGES_PER_FORWARD, num_workers=num_workers)
    computed = cached = 0
    index: dict[str, str] = {}
    bar = tqdm(total=len(dataset), desc="residual maps", disable=not (progress and on_terminal()), mininterval=1.0)
    try:
        for batch in loader:
            todo = []  # the batch's images without maps: one batched MAE pass for them all
            for k, (image, image_id) in enumerate(zip(batch["image"], batch["id"])):
                digest = image_hash(image)
                index[str(image_id)] = digest
                if cache.has(digest) or any(d == digest for _, d, _ in todo):  # a duplicate: made once
                    cached += 1
                else:
                    todo.append((k, digest, str(image_id)))
            if todo:
                images = batch["image"][[k for k, _, _ in todo]].to(device)
                for (_, digest, image_id), maps in zip(todo, residual_maps(mae, images, settings)):
                    cache.save(digest, maps)
                    computed += 1
                    if png:
                        _write_pngs(cache.dir / "png", image_id, maps, settings)
            bar.update(len(batch["id"]))
    finally:
        bar.close()
    cache.dir.mkdir(parents=True, exist_ok=True)
    manifest = {"mae_checkpoint": str(checkpoint), "mae_hash": mae_hash, "data": spec, "image_size": size,
                "settings": {"ratios": list(settings.ratios), "repeats": settings.repeats, "kind": settings.kind,
                             "seed": settings.seed},
                "images": index}
    (cache.dir / f"manifest-{hashlib.sha256(spec.encode()).hexdigest()[:8]}.json").write_text(json.dumps(manifest, indent=1))
    return ResidualMapRun(len(dataset), computed, cached, time.monotonic() - start, cache.dir)


def _write_pngs(folder: Path, image_id: str, maps: torch.Tensor, settings: ResidualMapSettings) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for ratio, rm in zip(settings.ratios, maps):
        values = (rm.float().clamp(0, 1) * 65535).round().to(torch.int32).numpy().astype(np.uint16)
        Image.fromarray(values).save(folder / f"{image_id}_r{ratio:g}.png")


# ----------------------------------------------------------------------------- dataset


class ResidualMapDataset(torch.utils.data.Dataset):
    """Items of ``base`` with ``"residual_maps"`` (ratios, H, W) from a :class:`ResidualMapCache`.

    A missing map is a ``ValueError`` naming the image and the command that makes it."""

    def __init__(self, base: torch.utils.data.Dataset, cache: ResidualMapCache, command: str) -> None:
        self.base, self.cache, self.command = base, cache, command

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        digest = image_hash(item["image"])
        if not self.cache.has(digest):
            raise ValueError(f"no residual maps for image {item.get('id', index)!r} (image hash {digest}) in "
                             f"{self.cache.dir}; make them with: {self.command}")
        maps = self.cache.load(digest)
        if maps.shape[-2:] != item["image"].shape[-2:] or maps.shape[0] != len(self.cache.settings.ratios):
            raise ValueError(f"residual maps of image {item.get('id', index)!r} are {tuple(maps.shape)}, expected "
                             f"({len(self.cache.settings.ratios)}, {item['image'].shape[-2]}, {item['image'].shape[-1]})")
        return {**item, "residual_maps": maps}


def summary_line(run: ResidualMapRun) -> str:
    rate = f"{run.computed / run.seconds:.1f} images/s" if run.computed and run.seconds > 0 else "nothing to compute"
    return (f"residual maps: {run.total} images, {run.computed} computed, {run.cached} cached, "
            f"{run.seconds:.1f} s ({rate}); in {run.dir}")


__all__ = ["MAE_MODELS", "RESIDUAL_KINDS", "ResidualMapCache", "ResidualMapDataset", "ResidualMapRun",
           "ResidualMapSettings", "file_hash", "image_hash", "load_mae", "make_command", "residual", "residual_maps",
           "ssim_map", "summary_line", "write_residual_maps"]
