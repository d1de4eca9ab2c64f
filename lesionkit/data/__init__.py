"""Datasets (ISIC, PH2, folder, NIfTI slices, synthetic), splits and paired transforms.

Every dataset yields dicts ``{"image": float32 (3, H, W) in [0, 1], "mask": float32 (1, H, W)
in {0, 1}, "id": str, "orig_size": (H, W)}`` (NIfTI slices add "patient").
"""

from lesionkit.data.folder import FolderDataset
from lesionkit.data.image_io import load_image, load_mask
from lesionkit.data.isic import ISICDataset
from lesionkit.data.nifti import NiftiSliceDataset
from lesionkit.data.nnunet import to_nnunet
from lesionkit.data.paired import PairedImageDataset
from lesionkit.data.ph2 import PH2Dataset
from lesionkit.data.spec import SPEC_FORMS, from_spec
from lesionkit.data.splits import kfold_split, labelled_fraction, ratio_split
from lesionkit.data.synth import write_dataset
from lesionkit.data.synthetic import SyntheticLesions
from lesionkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GrayWorld,
    PairedTransform,
    eval_transforms,
    train_transforms,
)


def synth_cli(argv=None) -> int:
    """``lesionkit data synth ...`` as a function (argv without the "data synth" words)."""
    from lesionkit.data.synth import cli

    return cli(argv)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPEC_FORMS",
    "FolderDataset",
    "GrayWorld",
    "ISICDataset",
    "NiftiSliceDataset",
    "PH2Dataset",
    "PairedImageDataset",
    "PairedTransform",
    "SyntheticLesions",
    "eval_transforms",
    "from_spec",
    "kfold_split",
    "labelled_fraction",
    "load_image",
    "load_mask",
    "ratio_split",
    "synth_cli",
    "to_nnunet",
    "train_transforms",
    "write_dataset",
]
