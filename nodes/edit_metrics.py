"""XMGIE Edit Metrics: an edit against its source on the node, the leak metrics and drift heat map of
xmgie_core.drift (as `python -m xmgie_core eval` reports them, metrics/leak.py) and, with a CLIP model folder from
ComfyUI/models/clip_metrics/ and captions, MagicBrush's CLIP-T and Emu Edit's CLIPdir / CLIPimg / CLIPout
(metrics/semantic.py)."""

from __future__ import annotations

import logging
import math

import torch

from ..xmgie_core import drift
from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.metrics import semantic
from ..xmgie_core.metrics.models import load_clip, reference_note
from ..xmgie_core.validation import matching_images, rgb_image
from .drift_map import XMGIEDriftMap
from .model_folders import find_model_folder, model_folder_names
from .region_predictor import preview_ui_images
from .runtime import device_and_dtype, free_device_cache

FOLDER = "clip_metrics"
NONE = "none"
SCALE_INPUTS = {k: v for k, v in XMGIEDriftMap.INPUT_TYPES()["required"].items() if k in ("full_scale", "margin")}
"""The Drift Map node's full_scale and margin widgets, the same here."""
log = logging.getLogger(__name__)


def clip_lines(clip_model: str, source: torch.Tensor, edit: torch.Tensor, input_caption: str,
               output_caption: str) -> tuple[list[str], str | None]:
    """The report's CLIP lines (per image pair, then the model and its notes) and a warning when the chosen model
    could not be used (missing, unreadable or damaged: named, never raised, so the workflow goes on)."""
    input_caption, output_caption = input_caption.strip(), output_caption.strip()
    if clip_model == NONE:
        return ([f"CLIP metrics: off (choose a CLIP folder from ComfyUI/models/{FOLDER}/ as clip_model"
                 + (" to score the captions)" if input_caption or output_caption else ")")], None)
    try:
        folder = find_model_folder(clip_model, (FOLDER,), "The CLIP metrics model", "clip-vit-base-patch32")
        clip = load_clip(folder, "The CLIP metrics model folder", device_and_dtype()[0])
    except XMGIEInputError as e:
        warning = f"CLIP metrics skipped: {e}"
        log.warning("XMGIE Edit Metrics: %s", warning)
        return [warning], warning
    try:
        lines = []
        for i, (s, e) in enumerate(zip(source, edit)):
            values = semantic.emu_clip(clip, s[None], e[None], input_caption or None, output_caption or None)
            if output_caption:
                values = {"clip_t": semantic.clip_t(clip, e[None], output_caption), **values}
            lines.append(f"image {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    finally:
        free_device_cache()
    lines.append(f"CLIP model: {clip.source} ({clip.architecture}); clip_t with MagicBrush's preprocessing, "
                 "clip_dir / clip_img / clip_out with Emu Edit's (InstructPix2Pix ClipSimilarity)")
    if not output_caption:
        lines.append("clip_t and clip_out need output_caption, clip_dir input_caption too: only clip_img scored")
    elif not input_caption:
        lines.append("clip_dir needs input_caption too: not scored")
    lines += [n for n in (reference_note("clip_t", clip.architecture, "ViT-B/32"),
                          reference_note("clip_dir / clip_img / clip_out", clip.architecture, "ViT-L/14")) if n]
    return lines, None


class XMGIEEditMetrics:
    """Leak metrics and drift map of an edit against its source, and CLIP metrics with a local CLIP model."""

    CATEGORY = "xMGIE/analysis"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("heat_map", "leak_l1", "leak_psnr", "leak_max", "report")
    OUTPUT_IS_LIST = (False, True, True, True, False)
    OUTPUT_TOOLTIPS = (
        "Per-pixel change (largest over the colour channels) outside the mask: black = unchanged, then red, yellow, "
        "white at full_scale and above; the mask (and its margin) shows the source darkened. Also shown on the node.",
        "Per image: mean |edit - source| outside the mask, over pixels and channels (0..1; MagicBrush's L1 there). "
        "NaN when the mask covers the whole image.",
        "Per image: PSNR outside the mask in dB (peak 1; inf = unchanged there). NaN when the mask covers the image.",
        "Per image: the largest change of a pixel outside the mask (0..1; 1/255 = one 8-bit level). NaN when the mask "
        "covers the whole image.",
        "Per image: the leak metrics (also in 8-bit levels), then the CLIP metrics, the CLIP model used and notes "
        "(a missing or broken model is named here, the run goes on). Shown on the node.",
    )
    DESCRIPTION = ("Measures an edit against its source: the leak outside the edit region (L1, PSNR, max change) "
                   "and its drift heat map, as `python -m xmgie_core eval` reports them; with a CLIP model folder "
                   f"(ComfyUI/models/{FOLDER}/) and captions also CLIP-T (MagicBrush) and CLIPdir / CLIPimg / "
                   "CLIPout (Emu Edit). No mask: the whole image counts as outside.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "source": ("IMAGE", {"tooltip": "The original photo. A batch of 1 is compared with every edit; "
                                                "otherwise edit i is compared with source i."}),
                "edited": ("IMAGE", {"tooltip": "The edit at the source's size (e.g. the GB Compositor's image)."}),
                **SCALE_INPUTS,
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "The edit region (1 = edit; soft values count from 0.5): only pixels "
                                             "outside it count as leak. Not connected: the whole image counts."}),
                "clip_model": ([NONE, *model_folder_names(FOLDER)], {
                    "default": NONE, "tooltip": f"A CLIP model folder in ComfyUI/models/{FOLDER}/ (open_clip: "
                    "open_clip_config.json + open_clip_model.safetensors; or a transformers CLIPModel folder), e.g. "
                    "openai/clip-vit-base-patch32 (MagicBrush's) or clip-vit-large-patch14 (Emu Edit's). none: no "
                    "CLIP metrics. A missing or broken folder is named in the report; the workflow goes on."}),
                "input_caption": ("STRING", {"default": "", "tooltip": "A caption of the source (Emu Edit's input "
                                                                       "caption): with output_caption gives CLIPdir."}),
                "output_caption": ("STRING", {"default": "", "tooltip": "A caption of the wanted result (MagicBrush's "
                                              "target caption): gives CLIP-T and CLIPout."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, clip_model: str = NONE) -> bool:
        """Any clip_model name is let through (ComfyUI would refuse one not in the list and stop the workflow): a
        folder missing since the workflow was saved is named in the report instead."""
        return True

    def measure(self, source: torch.Tensor, edited: torch.Tensor, full_scale: float, margin: float,
                mask: torch.Tensor | None = None, clip_model: str = NONE, input_caption: str = "",
                output_caption: str = "") -> dict:
        result = drift.drift_map(source, edited, mask, full_scale, margin)
        pairs = matching_images(rgb_image(source, "source").float(), rgb_image(edited, "edited").float(), "source",
                                "edited")
        lines, warning = clip_lines(clip_model, *pairs, input_caption, output_caption)
        head = [] if mask is not None else ["no mask connected: the whole image counts as outside"]
        report = "\n".join(head + [result.report()] + lines)
        floats = [[math.nan if v is None else v for v in values] for values in
                  zip(*((s.mean_abs, s.psnr, s.max_abs) for s in result.stats))]
        return {"ui": {"images": preview_ui_images(result.heat_map, "xmgie_edit_metrics"), "text": [report],
                       "xmgie_warning": [warning] if warning else []},
                "result": (result.heat_map, *floats, report)}
