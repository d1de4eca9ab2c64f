"""Building blocks shared by the models (decoders, embeddings, masking)."""

from lesionkit.layers.cascaded_upsampler import CascadedUpsampler
from lesionkit.layers.grcsf import GlobalCompensationUnit, RegionalCompensationUnit
from lesionkit.layers.mae_decoder import MAEDecoder
from lesionkit.layers.patch_masking import PatchMask, patch_mask_to_pixels, patchify, random_patch_mask, unpatchify
from lesionkit.layers.pos_embed import sincos_pos_embed_2d

__all__ = ["CascadedUpsampler", "GlobalCompensationUnit", "MAEDecoder", "PatchMask", "patch_mask_to_pixels", "patchify", "random_patch_mask",
           "RegionalCompensationUnit", "sincos_pos_embed_2d", "unpatchify"]
