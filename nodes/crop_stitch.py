"""XMGIE Crop For Edit and XMGIE Stitch Edit: edit a large photo at the model's working size (xmgie_core.crop)."""

from __future__ import annotations

import logging

import torch

from ..xmgie_core import crop as cs
from ..xmgie_core.validation import mask_for_image

LOG = logging.getLogger("xmgie")
CROP_TYPE = "XMGIE_CROP"


class XMGIECropForEdit:
    """Crop the edit region's neighbourhood out of a photo and resize it to the model's working size."""

    CATEGORY = "xMGIE/compositing"
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE", "MASK", CROP_TYPE)
    RETURN_NAMES = ("image", "mask", "crop")
    OUTPUT_TOOLTIPS = (
        "The crop at the working size: VAE-encode it for the sampler (and give it to CAM's mask, PFB, ...).",
        "The mask cropped and resized the same way (for CAM and the PFB sampler).",
        "Where the crop came from: connect to Stitch Edit.",
    )
    DESCRIPTION = (
        "Crop-and-stitch for large photos. The box is the bounding box of every region of the mask (one crop covers "
        "all of them), its sides times context_factor, centred on the region and kept inside the photo; it is "
        "resized so its longer side is working_size (each side a multiple of 'multiple', aspect kept), or to the DiT "
        "editor's own size (FLUX.1 Kontext's buckets, Qwen-Image-Edit's 1 megapixel). Edit the crop, "
        "then Stitch Edit puts it back and the GB Compositor (with the full-size mask) blends it in, so pixels "
        "outside the blend zone stay the photo bit for bit."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The full-size photo."}),
                "mask": ("MASK", {"tooltip": "Edit region at the photo's size (1 = edit), e.g. the Region "
                                             "Predictor's mask. An empty mask crops the whole photo (nothing will "
                                             "change downstream)."}),
                "context_factor": ("FLOAT", {"default": cs.CONTEXT_FACTOR, "min": cs.CONTEXT_FACTOR_RANGE[0],
                                             "max": cs.CONTEXT_FACTOR_RANGE[1], "step": 0.05,
                                             "tooltip": "The crop's sides are the region's bounding box sides times "
                                                        "this (1 = the region only; more gives the model context)."}),
                "working_size": ("INT", {"default": cs.WORKING_SIZE, "min": cs.WORKING_SIZE_RANGE[0],
                                         "max": cs.WORKING_SIZE_RANGE[1], "step": 8,
                                         "tooltip": "Longer side of the crop as the model sees it, in pixels (SD1.5 "
                                                    "512, SDXL 1024)."}),
                "multiple": ([str(m) for m in cs.MULTIPLE_CHOICES], {"default": str(cs.MULTIPLE),
                             "tooltip": "Both sides of the crop are multiples of this (8 for SD's VAE; 64 makes "
                                        "every U-Net level divide evenly)."}),
                "max_upscale": ("FLOAT", {"default": cs.MAX_UPSCALE, "min": cs.MAX_UPSCALE_RANGE[0],
                                          "max": cs.MAX_UPSCALE_RANGE[1], "step": 0.5,
                                          "tooltip": "A small region is enlarged at most this much; beyond it the "
                                                     "crop takes in more context instead."}),
            },
            "optional": {
                "editor": (list(cs.EDITORS), {"default": "sd", "tooltip": "Which model edits the crop, i.e. the "
                           "crop's size. sd: longer side working_size, sides multiples of 'multiple' (SD1.5, SDXL). "
                           "flux-kontext: the Kontext resolution bucket nearest the box's aspect (as "
                           "FluxKontextImageScale picks; about 1 megapixel). qwen-image-edit: about 1 megapixel, sides "
                           "multiples of 16, a size TextEncodeQwenImageEditPlus keeps, so its reference image lines "
                           "up with the crop (give it the crop as image1). For the DiT editors working_size and "
                           "multiple are not used."}),
            },
        }

    def crop(self, image: torch.Tensor, mask: torch.Tensor, context_factor: float, working_size: int, multiple: str,
             max_upscale: float, editor: str = "sd") -> tuple[torch.Tensor, torch.Tensor, cs.CropGeometry]:
        geometry = cs.plan_crop(mask_for_image(mask, image), context_factor, working_size, int(multiple),
                                max_upscale, photo=image, editor=editor)
        if geometry.empty:
            LOG.warning("xMGIE Crop For Edit: the mask is empty; cropping the whole photo (nothing will be edited).")
        return cs.crop_image(image, geometry), cs.crop_mask(mask, geometry, image), geometry


class XMGIEStitchEdit:
    """Resize an edited crop back and paste it into the full photo (then GB-composite with the full mask)."""

    CATEGORY = "xMGIE/compositing"
    FUNCTION = "stitch"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The photo with the edited crop pasted back (the source outside the crop box). Connect it to "
                       "the GB Compositor's 'edited', with the full-size mask and the photo as 'source'.",)
    DESCRIPTION = ("Puts an edit made on Crop For Edit's crop back into the full photo: the crop is resized back to "
                   "its box and pasted. Follow it with the GB Compositor (composite mode, the full-size mask, the "
                   "photo as source) so only the masked region and its soft edge change.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "crop": (CROP_TYPE, {"tooltip": "The 'crop' output of Crop For Edit."}),
                "edited": ("IMAGE", {"tooltip": "The decoded edit of the crop (its size unchanged). A batch of edits "
                                                "gives one stitched photo each."}),
                "source": ("IMAGE", {"tooltip": "The full-size photo the crop was taken from."}),
            },
        }

    def stitch(self, crop: cs.CropGeometry, edited: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor]:
        return (cs.stitch(edited, source, crop),)
