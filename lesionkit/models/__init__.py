"""Segmentation models behind a timm-style registry."""

from lesionkit.models.output import SegmentationOutput, segmentation_logits
from lesionkit.models.registry import create_model, is_model, list_models, register_model, smoke_test_config

# Importing a model module registers its entry points.
from lesionkit.models import unet as _unet  # noqa: E402,F401
from lesionkit.models import transunet as _transunet  # noqa: E402,F401
from lesionkit.models import segmae as _segmae  # noqa: E402,F401
from lesionkit.models import unetpp as _unetpp  # noqa: E402,F401
from lesionkit.models import grcsf as _grcsf  # noqa: E402,F401
from lesionkit.models import mae as _mae  # noqa: E402,F401
from lesionkit.models import vmunet as _vmunet  # noqa: E402,F401
from lesionkit.models import cmssm as _cmssm  # noqa: E402,F401
from lesionkit.models import amlp as _amlp  # noqa: E402,F401

__all__ = ["SegmentationOutput", "create_model", "is_model", "list_models", "register_model", "segmentation_logits",
           "smoke_test_config"]
