"""ComfyUI's CLIP_VISION (comfy.clip_vision.ClipVisionModel, from models/clip_vision) as the region predictor's
ImageEncoder: the projected CLS token and projected patch tokens F_img (region/encoders.py)."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import XMGIEInputError
from ...region.encoders import clip_normalize, patch_features, square_resize


class ComfyCLIPImageEncoder:
    """F_img from a ComfyUI CLIP vision model; refuses towers without a CLS token and CLIP's post-layernorm."""

    def __init__(self, clip_vision: Any):
        tower = getattr(getattr(clip_vision, "model", None), "vision_model", None)
        if tower is None or getattr(tower, "output_layernorm", True) or not callable(
                getattr(clip_vision.model, "visual_projection", None)):
            raise XMGIEInputError("The region predictor needs a CLIP ViT vision model (e.g. CLIP ViT-L/14 from "
                                  "models/clip_vision); this CLIP_VISION is a SigLIP or DINOv2 model. Load the CLIP "
                                  "named in the predictor's config with a Load CLIP Vision node.")
        self.clip_vision = clip_vision
        self.size = int(clip_vision.image_size)

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import comfy.model_management

        cv = self.clip_vision
        comfy.model_management.load_model_gpu(cv.patcher)
        x = clip_normalize(square_resize(pixels.to(cv.load_device).float(), self.size), tuple(cv.image_mean),
                           tuple(cv.image_std))
        hidden = cv.model.vision_model(x)[0]
        return patch_features(hidden, cv.model.vision_model.post_layernorm, cv.model.visual_projection)
