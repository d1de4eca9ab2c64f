"""`lesionkit data check` and the header check `lesionkit train` runs before its first epoch."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit.data import FolderDataset
from lesionkit.data.check import check_dataset, check_headers


def write_folder(root: Path, n: int = 12) -> Path:
    """A folder dataset of n good samples (a disc of 10-16 % of the image each)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:40, :40]
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "images" / f"c{i:02d}.png")
        disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= (7 + i % 3) ** 2).astype(np.uint8) * 255
        Image.fromarray(disc).save(root / "masks" / f"c{i:02d}.png")
    return root


def break_some(root: Path) -> None:
    (root / "images" / "c00.png").write_bytes(b"not an image")                        # unreadable
    Image.new("L", (30, 40)).save(root / "masks" / "c01.png")                          # size mismatch
    data = (root / "images" / "c02.png").read_bytes()
    (root / "images" / "c02.png").write_bytes(data[: len(data) // 2])                  # truncated
    Image.fromarray(np.full((40, 40), 0, np.uint8)).save(root / "masks" / "c03.png")  # empty
    soft = np.zeros((40, 40), np.uint8)
    soft[10:30, 10:30] = 200
    soft[15:25, 15:25] = 255
    Image.fromarray(soft).save(root / "masks" / "c04.png")                             # non-binary
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(root / "masks" / "c05.png")  # 100 % lesion


def test_a_clean_dataset_has_no_findings(tmp_path):
    report = check_dataset(FolderDataset(write_folder(tmp_path)), workers=2, progress=False)
    assert report.checked == 12 and report.findings == []
    assert all(0.05 < f < 0.25 for f in report.lesion_fractions.values())


def test_every_kind_of_problem_is_found(tmp_path):
    root = write_folder(tmp_path)
    break_some(root)
    report = check_dataset(FolderDataset(root), workers=2, progress=False)
    found = {(f.sample, f.problem) for f in report.findings}
    assert found == {("c00", "unreadable"), ("c01", "size_mismatch"), ("c02", "unreadable"), ("c03", "empty_mask"),
                     ("c04", "non_binary_mask"), ("c05", "lesion_fraction_outlier")}
    assert {f.sample for f in report.errors} == {"c00", "c01", "c02"}
    # The header check sees what a header shows: not the truncated file, nor mask contents.
    assert {(f.sample, f.problem) for f in check_headers(FolderDataset(root)).findings} == {
        ("c00", "unreadable"), ("c01", "size_mismatch")}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``lesionkit ARGS`` in this process (a subprocess would spend seconds importing torch)."""
    from lesionkit.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exits_non_zero_on_errors_and_writes_the_fix_report(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    code, out, _ = run_cli(capsys, "data", "check", f"folder:{root}")
    assert code == 0 and "0 error(s), 0 warning(s)" in out
    break_some(root)
    code, out, _ = run_cli(capsys, "data", "check", f"folder:{root}", "--fix-report", tmp_path / "fix.json")
    assert code == 1 and "3 error(s), 3 warning(s)" in out
    report = json.loads((tmp_path / "fix.json").read_text())
    assert report["errors"] == 3 and len(report["findings"]) == 6
    assert all(row["fix"] for row in report["findings"])


def test_train_fails_before_the_first_epoch_on_a_broken_file(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    Image.new("L", (30, 40)).save(root / "masks" / "c07.png")
    code, _, err = run_cli(capsys, "train", "--model", "unet_tiny", "--data", f"folder:{root}", "--image-size", "32",
                           "--epochs", "1", "--out", tmp_path / "run", "--set", "model.kwargs.widths=[4,8,16]",
                           "data.num_workers=0")
    assert code == 2
    assert "size_mismatch" in err and "c07" in err and "lesionkit data check" in err
    assert not (tmp_path / "run" / "log.csv").exists()


def test_datasets_without_files_have_nothing_to_check(capsys):
    code, out, _ = run_cli(capsys, "data", "check", "synthetic:4")
    assert code == 0 and "no image / mask files to check" in out


def test_masks_are_read_as_the_loader_reads_them(tmp_path):
    # 1-bit (PH2), palette and 0/1 label masks: the loader reads their lesion, so must the check.
    root = write_folder(tmp_path)
    clean = check_dataset(FolderDataset(root), workers=1, progress=False).lesion_fractions
    for i, p in enumerate(sorted((root / "masks").iterdir())):
        lesion = np.asarray(Image.open(p)) > 0
        if i % 3 == 0:
            img = Image.fromarray(lesion)  # mode "1"
        elif i % 3 == 1:
            img = Image.fromarray(lesion.astype(np.uint8), "P")  # indices 0/1, white lesion
            img.putpalette([0, 0, 0, 255, 255, 255])
        else:
            img = Image.fromarray(lesion.astype(np.uint8))
        img.save(p)
    report = check_dataset(FolderDataset(root), workers=1, progress=False)
    assert report.findings == [] and report.lesion_fractions == clean


def test_masks_of_exif_rotated_images_are_paired_as_the_loader_pairs_them(tmp_path):
    # The loader takes a mask drawn on the displayed image or, when only those fit, on the stored
    # pixels of a turned non-square image; the header check accepts the same two and nothing else.
    root = write_folder(tmp_path, n=2)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "images" / "c00.jpg", exif=exif)
    (root / "images" / "c00.png").unlink()
    for stored_size in ((60, 40), (40, 60)):  # PIL sizes (W, H): stored pixels, displayed view
        Image.new("L", stored_size, 255).save(root / "masks" / "c00.png")
        assert check_headers(FolderDataset(root)).findings == []
    Image.new("L", (40, 40), 255).save(root / "masks" / "c00.png")
    (finding,) = check_headers(FolderDataset(root)).findings
    assert finding.problem == "size_mismatch" and "EXIF orientation 8" in finding.detail
