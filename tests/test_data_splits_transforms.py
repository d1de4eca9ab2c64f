"""Seeded splits, paired transforms (torchvision v2 + tv_tensors.Mask) and NIfTI slices."""

import numpy as np
import pytest
import torch

from lesionkit.data import (
    GrayWorld,
    NiftiSliceDataset,
    PairedTransform,
    SyntheticLesions,
    eval_transforms,
    from_spec,
    kfold_split,
    labelled_fraction,
    ratio_split,
    train_transforms,
)
from lesionkit.metrics import SegmentationMetrics


def test_ratio_split_7_1_2_is_a_seeded_partition():
    tr, va, te = ratio_split(1000)
    assert (len(tr), len(va), len(te)) == (700, 100, 200)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(1000))
    again = ratio_split(1000)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = ratio_split(1000, seed=1)
    assert not np.array_equal(tr, other[0])
    assert [len(p) for p in ratio_split(7, (0.5, 0.5))] in ([4, 3], [3, 4])


def test_ratio_split_of_a_dataset_gives_subsets():
    ds = SyntheticLesions(10, 32)
    parts = ratio_split(ds)
    assert [len(p) for p in parts] == [7, 1, 2]
    i = parts[1].indices[0]
    assert torch.equal(parts[1][0]["image"], ds[i]["image"])


def test_kfold_covers_every_item_once():
    vals = [kfold_split(23, k=5, fold=f, seed=3)[1] for f in range(5)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(23))
    assert {len(v) for v in vals} == {4, 5}
    tr, va = kfold_split(23, k=5, fold=2, seed=3)
    assert not set(tr) & set(va) and len(tr) + len(va) == 23


def test_labelled_fraction_nests_smaller_budgets():
    five, rest = labelled_fraction(400, 0.05, seed=7)
    ten, _ = labelled_fraction(400, 0.10, seed=7)
    assert len(five) == 20 and len(ten) == 40 and len(rest) == 380
    assert set(five) <= set(ten) and not set(five) & set(rest)
    assert len(labelled_fraction(10, 0.01)[0]) == 1


@pytest.mark.parametrize("call, match", [
    (lambda: ratio_split(10, (1,)), "ratios"),
    (lambda: ratio_split(10, (1, -1, 2)), "ratios"),
    (lambda: kfold_split(10, k=1), "k should be"),
    (lambda: kfold_split(10, k=3, fold=3), "fold should be"),
    (lambda: labelled_fraction(10, 0.0), "fraction"),
])
def test_split_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_paired_geometry_moves_image_and_mask_together():
    item = SyntheticLesions(1, (48, 64), seed=1)[0]
    # Encode the mask in the image's red channel: after any geometric transform they must agree.
    item["image"] = item["image"].clone()
    item["image"][0] = item["mask"][0]
    torch.manual_seed(0)
    t = train_transforms(image_size=(40, 40), hflip=1.0, vflip=1.0, rotation=30)
    out = t(item)
    assert out["image"].shape == (3, 40, 40) and out["mask"].shape == (1, 40, 40)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}  # nearest for the mask
    agree = ((out["image"][0] > 0.5) == (out["mask"][0] > 0.5)).float().mean()
    assert agree > 0.97
    assert out["id"] == item["id"] and out["orig_size"] == item["orig_size"]
    flipped = PairedTransform(__import__("torchvision").transforms.v2.RandomHorizontalFlip(1.0))(item)
    assert torch.equal(flipped["mask"], item["mask"].flip(-1))
    assert torch.equal(flipped["image"], item["image"].flip(-1))


def test_colour_transforms_leave_the_mask_alone():
    item = SyntheticLesions(1, 32, seed=2)[0]
    torch.manual_seed(0)
    out = train_transforms(hflip=0, vflip=0, brightness=0.5, contrast=0.5, gray_world=True,
                           normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))(item)
    assert torch.equal(out["mask"], item["mask"])
    assert not torch.allclose(out["image"], item["image"])


def test_gray_world_equalises_channel_means():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(3, 20, 20, generator=g) * torch.tensor([0.9, 0.6, 0.4])[:, None, None]
    from torchvision import tv_tensors

    out = GrayWorld()(tv_tensors.Image(img))
    means = out.mean(dim=(1, 2))
    assert torch.allclose(means, means.mean().expand(3), atol=1e-5)
    assert torch.allclose(means.mean(), img.mean(), atol=1e-5)
    ev = eval_transforms(16, gray_world=True)({"image": img, "mask": torch.zeros(1, 20, 20), "id": "x"})
    assert ev["image"].shape == (3, 16, 16)


def test_dataset_transform_argument():
    ds = SyntheticLesions(2, 48, transform=eval_transforms(24))
    assert ds[0]["image"].shape == (3, 24, 24)


# ---- NIfTI ------------------------------------------------------------------------------------

def test_nifti_slices_keep_the_patient(tmp_path):
    nib = pytest.importorskip("nibabel")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    vols = {}
    for case, depth in (("case_a", 3), ("case_b", 4)):
        img = rng.normal(100, 20, (12, 10, depth)).astype(np.float32)
        lab = np.zeros((12, 10, depth), np.uint8)
        lab[3:8, 2:6, 1] = 1
        vols[case] = (img, lab)
        nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "labelsTr" / f"{case}.nii.gz")
    ds = from_spec(f"nifti:{tmp_path}")
    assert isinstance(ds, NiftiSliceDataset) and len(ds) == 7
    item = ds[1]
    assert item["patient"] == "case_a" and item["id"] == "case_a_s0001"
    assert item["image"].shape == (3, 12, 10) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert torch.equal(item["mask"][0], torch.from_numpy(vols["case_a"][1][:, :, 1]).float())
    assert [ds[i]["patient"] for i in range(len(ds))] == ["case_a"] * 3 + ["case_b"] * 4
    only = NiftiSliceDataset(tmp_path, lesion_slices_only=True, image_size=8)
    assert len(only) == 2 and only[0]["image"].shape == (3, 8, 8)
    # Per-patient metrics through the "patient" key.
    m = SegmentationMetrics(compute_hd95=False)
    items = [ds[i] for i in range(len(ds))]
    m.update(torch.stack([it["mask"] for it in items]), torch.stack([it["mask"] for it in items]),
             groups=[it["patient"] for it in items])
    assert m.compute()["n_groups"] == 2 and m.compute()["per_group"]["dice"] == 1.0
    # Shape mismatch and missing labels name the files.
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 2), np.uint8), np.eye(4)), tmp_path / "labelsTr" / "case_b.nii.gz")
    with pytest.raises(ValueError, match=r"case_b_0000\.nii\.gz is \(12, 10, 4\).*case_b\.nii\.gz is \(12, 10, 2\)"):
        NiftiSliceDataset(tmp_path)
    (tmp_path / "labelsTr" / "case_b.nii.gz").unlink()
    with pytest.raises(ValueError, match="without a label"):
        NiftiSliceDataset(tmp_path)


def test_batch_flips_move_extra_keys_with_the_image():
    from lesionkit.data.transforms import BatchFlips

    torch.manual_seed(0)
    image = torch.rand(16, 3, 8, 8)
    batch = {"image": image, "mask": image[:, :1].clone(), "residual_maps": image[:, 1:].clone(), "id": list(range(16))}
    out = BatchFlips(0.5, 0.5, 0.5, extra_keys=("residual_maps",))(batch)
    torch.testing.assert_close(out["mask"], out["image"][:, :1])
    torch.testing.assert_close(out["residual_maps"], out["image"][:, 1:])
    assert not torch.equal(out["image"], image)  # something was flipped
