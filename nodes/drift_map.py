"""XMGIE Drift Map: how much an edit changed the photo outside the edit region (xmgie_core.drift)."""

from __future__ import annotations

import torch

from ..xmgie_core import drift
from .region_predictor import preview_ui_images


class XMGIEDriftMap:
    """Heat map and numbers of the change outside the mask between a source and its edit."""

    CATEGORY = "xMGIE/analysis"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("heat_map", "report")
    OUTPUT_TOOLTIPS = (
        "Per-pixel change (largest over the colour channels) outside the mask: black = unchanged, then red, yellow, "
        "white at full_scale and above. The mask (and its margin) shows the source darkened. Also shown on the node.",
        "Per image: the pixels compared, mean and max absolute change outside the mask (0..1 and in 8-bit levels) "
        "and the PSNR there (inf = identical).",
    )
    DESCRIPTION = ("Measures drift: the difference between an edit and its source outside the edit region, where "
                   "nothing should change. Compare an editor alone with the same editor inside xMGIE.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "source": ("IMAGE", {"tooltip": "The original photo (or crop). A batch of 1 is compared with every "
                                                "edit."}),
                "edited": ("IMAGE", {"tooltip": "The edit, at the source's size (e.g. the GB Compositor's image)."}),
                "mask": ("MASK", {"tooltip": "The edit region at that size (1 = edit; soft values count from 0.5). "
                                             "Only pixels outside it are compared."}),
                "full_scale": ("FLOAT", {"default": drift.FULL_SCALE, "min": drift.FULL_SCALE_RANGE[0],
                                         "max": drift.FULL_SCALE_RANGE[1], "step": 0.005,
                                         "tooltip": "The change drawn white on the heat map (0.05 = 5% of the range, "
                                                    "about 13 of 255 levels); smaller shows faint drift."}),
                "margin": ("FLOAT", {"default": drift.MARGIN, "min": drift.MARGIN_RANGE[0],
                                     "max": drift.MARGIN_RANGE[1], "step": 1.0,
                                     "tooltip": "Leave out pixels within this many pixels of the mask (e.g. the GB "
                                                "Compositor's edge_width + 1, where it blends on purpose). 0 = "
                                                "compare everything outside the mask."}),
            },
        }

    def measure(self, source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor, full_scale: float,
                margin: float) -> dict:
        result = drift.drift_map(source, edited, mask, full_scale, margin)
        report = result.report()
        return {"ui": {"images": preview_ui_images(result.heat_map, "xmgie_drift"), "text": [report]},
                "result": (result.heat_map, report)}
