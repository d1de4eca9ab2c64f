"""Dataset loaders on fake trees in every official layout, decoding corner cases, bad data,
the real isic2018-dev folder (skipped when absent), nnU-Net export and `data synth`."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lesionkit.data import (
    FolderDataset,
    ISICDataset,
    PH2Dataset,
    SyntheticLesions,
    from_spec,
    load_image,
    load_mask,
    synth_cli,
    to_nnunet,
    write_dataset,
)
from lesionkit.data import synth
from lesionkit.data.image_io import apply_orientation

REAL_ISIC = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2018-dev"


@pytest.fixture(scope="module")
def small():
    return SyntheticLesions(3, image_size=(40, 48), seed=2)


def _rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _mask(h, w, value=255, mode="L"):
    a = np.zeros((h, w), np.uint8)
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = value
    return Image.fromarray(a, "L").convert(mode)


# ---- official layouts -------------------------------------------------------------------------

def test_isic2018_layout_train_and_val(tmp_path, small):
    write_dataset(small, tmp_path, "isic2018", "train")
    write_dataset(small, tmp_path, "isic2018", "val", start=10)
    ds = ISICDataset(tmp_path)
    assert ds.year == 2018 and len(ds) == 6
    assert ds.ids[:3] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    val = ISICDataset(tmp_path, split="val", image_size=(20, 24))
    assert val.ids == ["ISIC_0000010", "ISIC_0000011", "ISIC_0000012"]
    item = ISICDataset(tmp_path, split="train")[1]
    assert item["image"].shape == (3, 40, 48) and item["orig_size"] == (40, 48)
    assert torch.equal(item["mask"], small[1]["mask"])  # PNG masks survive exactly
    assert (item["image"] - small[1]["image"]).abs().mean() < 0.03  # JPEG, close
    resized = val[0]
    assert resized["image"].shape == (3, 20, 24) and resized["mask"].shape == (1, 20, 24)
    assert resized["orig_size"] == (40, 48)
    with pytest.raises(ValueError, match="split 'test'"):
        ISICDataset(tmp_path, split="test")


def test_isic2017_superpixels_nested_folder_and_test_v2(tmp_path, small):
    write_dataset(small, tmp_path / "unzipped", "isic2017", "test")
    data = tmp_path / "unzipped" / "ISIC-2017_Test_v2_Data"
    # Archives unpack into a folder of the same name: move the image folder one level down.
    nested = tmp_path / "ISIC-2017_Test_v2_Data"
    nested.mkdir()
    data.rename(nested / data.name)
    (tmp_path / "unzipped" / "ISIC-2017_Test_v2_Part1_GroundTruth").rename(
        tmp_path / "ISIC-2017_Test_v2_Part1_GroundTruth")
    _rgb(40, 48).save(nested / data.name / "ISIC_0000000_superpixels.png")
    ds = ISICDataset(tmp_path, split="test")
    assert ds.year == 2017 and len(ds) == 3 and "ISIC_0000000_superpixels" not in ds.ids


def test_isic2016_uppercase_suffix_and_image_folder_as_root(tmp_path, small):
    write_dataset(small, tmp_path, "isic2016", "train")
    gt = tmp_path / "ISBI2016_ISIC_Part1_Training_GroundTruth"
    assert sorted(p.name for p in gt.iterdir())[0] == "ISIC_0000000_Segmentation.png"
    ds = ISICDataset(tmp_path / "ISBI2016_ISIC_Part1_Training_Data")
    assert ds.year == 2016 and len(ds) == 3
    assert from_spec(f"isic:{tmp_path}:train").year == 2016


def test_isic_several_years_need_year(tmp_path, small):
    write_dataset(small, tmp_path, "isic2017", "train")
    write_dataset(small, tmp_path, "isic2018", "train")
    with pytest.raises(ValueError, match=r"ISIC \[2017, 2018\]: pass year="):
        ISICDataset(tmp_path)
    assert len(ISICDataset(tmp_path, year=2017)) == 3


def test_ph2_tree_with_1bit_and_24bit_masks(tmp_path, small):
    write_dataset(small, tmp_path, "ph2")
    cases = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    m = cases / "IMD001" / "IMD001_lesion" / "IMD001_lesion.bmp"
    assert Image.open(m).mode == "1"
    Image.open(m).convert("RGB").save(m)  # a 24-bit mask, as some PH2 masks are
    for root in (tmp_path, tmp_path / "PH2Dataset", cases):
        ds = PH2Dataset(root)
        assert ds.ids == ["IMD000", "IMD001", "IMD002"]
    for i in range(3):
        assert torch.equal(ds[i]["mask"], small[i]["mask"])
    assert len(from_spec(f"ph2:{tmp_path}")) == 3


def test_folder_layout(tmp_path, small):
    write_dataset(small, tmp_path, "folder", "train")
    write_dataset(SyntheticLesions(2, 32, seed=9), tmp_path, "folder", "val")
    # Masks named <stem>_segmentation are matched too.
    for p in (tmp_path / "val" / "masks").iterdir():
        p.rename(p.with_name(p.stem + "_segmentation.png"))
    assert len(FolderDataset(tmp_path, "train")) == 3
    val = from_spec(f"folder:{tmp_path}:val", image_size=16)
    assert len(val) == 2 and val[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"splits found: \['train', 'val'\]"):
        FolderDataset(tmp_path)


# ---- decoding ---------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    img = _rgb(30, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    t, size = load_image(tmp_path / "o.jpg")
    assert size == (50, 30) and t.shape == (3, 50, 30)
    t2, size2 = load_image(tmp_path / "o.jpg", (25, 15))
    assert size2 == (50, 30) and t2.shape == (3, 25, 15)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_turns_as_pil_does(tmp_path, orientation):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a, "L").save(tmp_path / "o.png", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    turned = apply_orientation(torch.from_numpy(a), orientation)
    assert np.array_equal(turned.numpy(), want)
    assert torch.equal(apply_orientation(turned, orientation, inverse=True), torch.from_numpy(a))


@pytest.mark.parametrize("h, w", [(40, 40), (30, 50)])
def test_exif_orientation_pairs_the_mask_with_the_displayed_image(tmp_path, h, w):
    # A phone or camera JPEG with an orientation tag (6: turned a quarter clockwise for display).
    # A mask drawn on the displayed image (annotation tools, OpenCV) is read as it is; one drawn on
    # the stored pixels of a non-square image (it fits only those) is turned with the image. The
    # second used to fail as a size mismatch; a mask of neither size is an error naming both.
    a = np.zeros((h, w, 3), np.uint8)
    a[2:12, 3:20] = 255  # bright lesion near the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    Image.fromarray(a).save(tmp_path / "train" / "images" / "p.jpg", exif=exif, quality=95)
    drawn_on = {"displayed": np.rot90(a[..., 0], -1)}
    if h != w:
        drawn_on["stored"] = a[..., 0]
    for view, mask in drawn_on.items():
        Image.fromarray(np.ascontiguousarray(mask)).save(tmp_path / "train" / "masks" / "p.png")
        for size in (None, (20, 20)):
            item = FolderDataset(tmp_path, "train", image_size=size)[0]
            assert item["orig_size"] == (w, h)
            lesion = item["image"].mean(0) > 0.5
            assert (lesion == (item["mask"][0] > 0.5)).float().mean() > 0.97, (view, size)
    Image.fromarray(np.zeros((h + 2, w), np.uint8)).save(tmp_path / "train" / "masks" / "p.png")
    with pytest.raises(ValueError, match=rf"p\.jpg is {w}x{h} \(HxW\) as displayed \(EXIF orientation 6.*p\.png is {h + 2}x{w}"):
        FolderDataset(tmp_path, "train")[0]


def test_grayscale_rgba_and_16bit_images(tmp_path):
    Image.fromarray(np.full((6, 7), 128, np.uint8), "L").save(tmp_path / "g.png")
    t, _ = load_image(tmp_path / "g.png")
    assert t.shape == (3, 6, 7) and torch.allclose(t, torch.full_like(t, 128 / 255))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    t, _ = load_image(tmp_path / "a.png")
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 0, 0])) and torch.allclose(t[:, 3, 0], torch.ones(3))
    Image.fromarray(np.full((5, 5), 65535 // 4, np.uint16)).save(tmp_path / "d.png")
    t, _ = load_image(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    assert t.shape == (3, 5, 5) and torch.allclose(t, torch.full_like(t, (65535 // 4) / 65535))


def test_masks_binarise_above_127_in_any_mode(tmp_path):
    a = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "l.png")
    assert load_mask(tmp_path / "l.png")[0].flatten().tolist() == [0, 0, 1, 1]
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 1] = (127, 127, 127)
    rgb[0, 2] = (200, 0, 0)  # coloured lesion in a 24-bit mask
    rgb[0, 3] = (255, 255, 255)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.bmp")
    assert load_mask(tmp_path / "rgb.bmp")[0].flatten().tolist() == [0, 0, 1, 1]
    Image.fromarray(a, "L").convert("1").save(tmp_path / "b.bmp")
    assert load_mask(tmp_path / "b.bmp")[0].flatten().tolist() == [0, 0, 1, 1]
    Image.fromarray((a.astype(np.uint16) * 257)).save(tmp_path / "w.png")
    assert load_mask(tmp_path / "w.png")[0].flatten().tolist() == [0, 0, 1, 1]
    m, size = load_mask(tmp_path / "l.png", (2, 8))
    assert size == (1, 4) and m.shape == (1, 2, 8) and set(m.unique().tolist()) == {0.0, 1.0}


def test_0_1_label_masks_mark_lesion_with_1(tmp_path):
    # Label masks (nnU-Net, many exports) store lesion as 1, not 255: > 127 would read them empty.
    a = np.array([[0, 1, 1, 0]], np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "l.png")
    Image.fromarray(a.astype(np.uint16)).save(tmp_path / "w.png")
    Image.fromarray(a.astype(np.float32) * 0.9, "F").save(tmp_path / "f.tif")
    for name in ("l.png", "w.png", "f.tif"):
        assert load_mask(tmp_path / name)[0].flatten().tolist() == [0, 1, 1, 0], name
    Image.fromarray(np.zeros((1, 4), np.uint8), "L").save(tmp_path / "empty.png")  # empty stays empty
    assert load_mask(tmp_path / "empty.png")[0].sum() == 0


def test_full_resolution_jpeg_decodes_at_reduced_scale(tmp_path, monkeypatch):
    src = SyntheticLesions(1, image_size=(200, 300), seed=4)
    write_dataset(src, tmp_path, "isic2018", save_size=(2000, 3000))
    calls = []
    from PIL.JpegImagePlugin import JpegImageFile

    real_draft = JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        calls.append((size, self.size))
        return out
    monkeypatch.setattr(JpegImageFile, "draft", spy)
    item = ISICDataset(tmp_path, image_size=(200, 300))[0]
    assert calls and calls[0][1] == (375, 250)  # the decoder ran at 1/8 scale (still >= 300x200)
    assert item["orig_size"] == (2000, 3000) and item["image"].shape == (3, 200, 300)
    monkeypatch.undo()
    full, _ = load_image(next((tmp_path / "ISIC2018_Task1-2_Training_Input").iterdir()))
    ref = torch.nn.functional.interpolate(full[None], size=(200, 300), mode="area")[0]
    assert (item["image"] - ref).abs().mean() < 0.02
    assert (item["mask"] != src[0]["mask"]).float().mean() < 0.01


# ---- bad data ---------------------------------------------------------------------------------

def test_unreadable_image_names_its_file(tmp_path, small):
    write_dataset(small, tmp_path, "folder", "train")
    bad = tmp_path / "train" / "images" / f"{small[0]['id']}.png"
    bad.write_bytes(b"not an image at all")
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(ValueError, match=f"cannot read image file .*{bad.name}"):
        ds[0]
    trunc = tmp_path / "train" / "images" / f"{small[1]['id']}.png"
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(ValueError, match=trunc.name):
        ds[1]


def test_size_mismatch_names_both_files_and_sizes(tmp_path, small):
    write_dataset(small, tmp_path, "isic2018")
    m = tmp_path / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000002_segmentation.png"
    _mask(30, 20).save(m)
    ds = ISICDataset(tmp_path)
    with pytest.raises(ValueError, match=r"ISIC_0000002\.jpg is 40x48.*ISIC_0000002_segmentation\.png is 30x20"):
        ds[2]


def test_images_without_masks_are_listed(tmp_path, small):
    write_dataset(small, tmp_path / "isic", "isic2018")
    for i in (0, 2):
        (tmp_path / "isic" / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_000000{i}_segmentation.png").unlink()
    with pytest.raises(ValueError, match=r"2 image\(s\) without a mask:\n.*ISIC_0000000\.jpg\n.*ISIC_0000002\.jpg"):
        ISICDataset(tmp_path / "isic")
    write_dataset(small, tmp_path / "ph2", "ph2")
    lesion = tmp_path / "ph2" / "PH2Dataset" / "PH2 Dataset images" / "IMD001" / "IMD001_lesion"
    for p in lesion.iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask:\n.*IMD001\.bmp"):
        PH2Dataset(tmp_path / "ph2")
    write_dataset(small, tmp_path / "f", "folder")
    next((tmp_path / "f" / "train" / "masks").iterdir()).unlink()
    with pytest.raises(ValueError, match="without a mask"):
        FolderDataset(tmp_path / "f", "train")


def test_empty_or_unrecognised_folders_say_what_was_tried(tmp_path):
    (tmp_path / "random_stuff").mkdir()
    with pytest.raises(ValueError, match=r"no ISIC layout found .*ISIC 2016.*ISIC 2017.*ISIC 2018"):
        ISICDataset(tmp_path)
    with pytest.raises(ValueError, match="no PH2 layout found .*PH2 Dataset images"):
        PH2Dataset(tmp_path)
    with pytest.raises(ValueError, match=r"no folder layout .*\{train,val,test\}/\{images,masks\}"):
        FolderDataset(tmp_path, "train")
    (tmp_path / "ISIC2018_Task1-2_Training_Input").mkdir()
    with pytest.raises(ValueError, match="hold no images"):
        ISICDataset(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        ISICDataset(tmp_path / "missing")


@pytest.mark.parametrize("spec, match", [
    ("isic", "should look like"),
    ("coco:/data", "unknown kind 'coco'"),
    ("synthetic:ten", "synthetic:N"),
    ("folder:", "nothing after"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        from_spec(spec)


# ---- the real data beside the project ---------------------------------------------------------

@pytest.mark.skipif(not REAL_ISIC.is_dir(), reason="../shared/data/isic2018-dev not present")
def test_real_isic2018_dev():
    train = ISICDataset(REAL_ISIC, split="train", image_size=96)
    val = from_spec(f"isic:{REAL_ISIC}:val")
    assert train.year == 2018 and len(train) == 1212 and len(val) == 301
    assert not set(train.ids) & set(val.ids)
    for ds, size in ((train, (96, 96)), (val, (256, 256))):
        for i in (0, len(ds) - 1):
            item = ds[i]
            assert item["image"].shape == (3, *size) and item["mask"].shape == (1, *size)
            assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
            assert 0 <= item["image"].min() < item["image"].max() <= 1
            assert item["orig_size"] == (256, 256)


# ---- export and the synth command -------------------------------------------------------------

def test_to_nnunet_round_trip(tmp_path, small):
    folder = to_nnunet(small, tmp_path, 501, name="SynthLesion")
    assert folder.name == "Dataset501_SynthLesion"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".png"
    case = small[0]["id"]
    lab = np.asarray(Image.open(folder / "labelsTr" / f"{case}.png"))
    assert set(np.unique(lab).tolist()) <= {0, 1}
    assert np.array_equal(lab, small[0]["mask"][0].numpy().astype(np.uint8))
    img = np.asarray(Image.open(folder / "imagesTr" / f"{case}_0000.png"))
    assert img.shape == (40, 48, 3)
    assert np.abs(img / 255.0 - small[0]["image"].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="not empty"):
        to_nnunet(small, tmp_path, 501, name="SynthLesion")
    with pytest.raises(ValueError, match="dataset_id"):
        to_nnunet(small, tmp_path, 1000)


def test_synth_command(tmp_path, capsys):
    assert synth_cli(["--out", str(tmp_path / "a"), "--n", "3", "--layout", "ph2", "--image-size", "32x40"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    ds = PH2Dataset(tmp_path / "a")
    assert len(ds) == 3 and ds[0]["image"].shape == (3, 32, 40)
    # The hook the main CLI uses.
    parser = argparse.ArgumentParser(prog="lesionkit")
    data = parser.add_subparsers(dest="cmd").add_parser("data").add_subparsers(dest="data_cmd")
    synth.add_parser(data)
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "b"), "--n", "2", "--seed", "4",
                              "--image-size", "32", "--layout", "isic2018", "--split", "val"])
    assert args.func(args) == 0
    got = ISICDataset(tmp_path / "b", split="val")
    assert len(got) == 2
    assert torch.equal(got[1]["mask"], SyntheticLesions(2, 32, seed=4)[1]["mask"])
    with pytest.raises(ValueError, match="split should be one of"):
        write_dataset(SyntheticLesions(1, 32), tmp_path / "c", "isic2016", "val")
