"""XMGIE GB Compositor node: Gaussian-blur compositing ([xMGIE] eqs 18-19)."""

from __future__ import annotations

import torch

from ..xmgie_core import gb
from .runtime import comfy_progress


class XMGIEGBCompositor:
    """Blend an edit back into its source with a distance-aware soft edge, or blur the edit's seam (eq 19)."""

    CATEGORY = "xMGIE/compositing"
    FUNCTION = "composite"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "blend_mask")
    OUTPUT_TOOLTIPS = (
        "The composited (composite mode) or seam-blurred (blur mode) image.",
        "composite: the soft blend weight alpha (1 = edit). blur: the blur strength sigma(D)/sigma_max inside the mask.",
    )
    DESCRIPTION = (
        "Gaussian-blur compositing. composite: out = source*(1-alpha) + edited*alpha with a soft edge whose blur "
        "sigma(D) = sigma_max*exp(-D^2/(2*sigma_scale^2)) decays with distance D from the mask border; pixels farther "
        "outside than edge_width are the source exactly. blur: the paper's eq 19, the edit blurred inside the mask "
        "with sigma(D), D = distance to the nearest unedited pixel."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "edited": ("IMAGE", {"tooltip": "The edited image (same size as the mask)."}),
                "mask": ("MASK", {"tooltip": "Edit region, 1 = edited. Soft masks are binarised at 0.5 for the "
                                             "distance transform. One mask for the batch or one per image."}),
                "mode": (list(gb.MODES), {"default": "composite", "tooltip": "composite: blend the edit into the "
                         "source with a soft edge (needs source). blur: eq 19, blur the edit near the mask border."}),
                "sigma_max": ("FLOAT", {"default": gb.SIGMA_MAX, "min": gb.SIGMA_MAX_RANGE[0],
                                        "max": gb.SIGMA_MAX_RANGE[1], "step": 0.1,
                                        "tooltip": "Blur sigma at the mask border, in pixels (paper default 5)."}),
                "sigma_scale": ("FLOAT", {"default": gb.SIGMA_SCALE, "min": gb.SIGMA_SCALE_RANGE[0],
                                          "max": gb.SIGMA_SCALE_RANGE[1], "step": 0.1,
                                          "tooltip": "sigma_s: how fast the blur fades with distance from the border, "
                                                     "in pixels (paper default 10)."}),
                "edge_width": ("FLOAT", {"default": gb.EDGE_WIDTH, "min": gb.EDGE_WIDTH_RANGE[0],
                                         "max": gb.EDGE_WIDTH_RANGE[1], "step": 1.0,
                                         "tooltip": "composite only: pixels farther than this (pixels) outside the "
                                                    "mask are the source exactly, farther inside the edit exactly."}),
            },
            "optional": {
                "source": ("IMAGE", {"tooltip": "The original image; required in composite mode, unused in blur mode."}),
            },
        }

    def composite(self, edited: torch.Tensor, mask: torch.Tensor, mode: str, sigma_max: float, sigma_scale: float,
                  edge_width: float, source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        res = gb.apply_gb(edited, mask, mode, source, sigma_max, sigma_scale, edge_width, comfy_progress())
        return res.image, res.mask
