"""Data-path throughput: synthetic generation, full-resolution JPEG loading, metric updates.

Run: ``pytest benchmarks/test_bench_data.py --benchmark-json benchmarks/results/<machine>-data.json``.
Synthetic images per second = batch / mean time of one call.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image

from lesionkit.data import SyntheticLesions, load_image
from lesionkit.metrics import SegmentationMetrics

BATCH = 32


@pytest.mark.parametrize("size", [128, 256, 512])
def test_synthetic_lesions(benchmark, size, machine):
    ds = SyntheticLesions(100_000, image_size=size, seed=0)
    ds[0]  # per-size constants (smoothing bases, texture bank) are made once
    start = iter(range(0, 100_000, BATCH))

    def batch():
        i = next(start)
        for j in range(i, i + BATCH):
            ds[j]

    benchmark.group = "synthetic_lesions"
    benchmark.extra_info.update(machine=machine, images_per_call=BATCH, size=size)
    benchmark.pedantic(batch, rounds=10, warmup_rounds=1)


@pytest.fixture(scope="module")
def full_res_jpeg(tmp_path_factory) -> Path:
    item = SyntheticLesions(1, image_size=(400, 600), seed=1)[0]
    path = tmp_path_factory.mktemp("jpeg") / "full.jpg"
    rgb = Image.fromarray((item["image"].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    rgb.resize((6000, 4000), Image.BICUBIC).save(path, quality=92)
    return path


@pytest.mark.parametrize("provider", ["draft", "full_decode"])
def test_isic_full_resolution_jpeg_to_256(benchmark, provider, full_res_jpeg, machine):
    def draft():
        load_image(full_res_jpeg, (256, 384))

    def full_decode():
        t, _ = load_image(full_res_jpeg)
        torch.nn.functional.interpolate(t[None], size=(256, 384), mode="bilinear", antialias=True)

    benchmark.group = "load_6000x4000_jpeg"
    benchmark.extra_info.update(machine=machine)
    benchmark.pedantic(draft if provider == "draft" else full_decode, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("hd95", [False, True], ids=["no_hd95", "hd95"])
def test_metrics_update(benchmark, hd95, machine):
    data = SyntheticLesions(16, 256, seed=2)
    target = torch.stack([data[i]["mask"] for i in range(16)])
    pred = torch.roll(target, 5, dims=-1)
    m = SegmentationMetrics(compute_hd95=hd95)
    benchmark.group = "metrics_update_16x256"
    benchmark.extra_info.update(machine=machine)
    benchmark(m.update, pred, target)
