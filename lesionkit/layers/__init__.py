"""Building blocks shared by the models (decoders, embeddings, masking, SS2D / VSS blocks)."""

from lesionkit.layers.cascaded_upsampler import CascadedUpsampler
from lesionkit.layers.grcsf import GlobalCompensationUnit, RegionalCompensationUnit
from lesionkit.layers.cross_region_attention import CrossRegionAttention
from lesionkit.layers.mae_decoder import MAEDecoder
from lesionkit.layers.patch_masking import PatchMask, patch_mask_to_pixels, patchify, random_patch_mask, unpatchify
from lesionkit.layers.pos_embed import sincos_pos_embed_2d
from lesionkit.layers.ss2d import SS2D, mark_no_weight_decay
from lesionkit.layers.vss_block import ChannelMixing, DropPath, SqueezeExcitation, VSSBlock
from lesionkit.layers.vss_patches import FinalPatchExpand2D, PatchEmbed2D, PatchExpand2D, PatchMerging2D

__all__ = [
    "CascadedUpsampler",
    "ChannelMixing",
    "CrossRegionAttention",
    "DropPath",
    "FinalPatchExpand2D",
    "GlobalCompensationUnit",
    "MAEDecoder",
    "PatchEmbed2D",
    "PatchExpand2D",
    "PatchMask",
    "PatchMerging2D",
    "RegionalCompensationUnit",
    "SS2D",
    "SqueezeExcitation",
    "VSSBlock",
    "mark_no_weight_decay",
    "patch_mask_to_pixels",
    "patchify",
    "random_patch_mask",
    "sincos_pos_embed_2d",
    "unpatchify",
]
