"""XMGIE Region Predictor node: where to edit, from the image and the instruction ([Regions] eqs 1-3, multi-scale),
or without trained weights (DiffEdit noise difference, the edit words' cross-attention, CLIPSeg). The noise-difference
and attention modes run on SD U-Nets and on the DiT editors Flux / FLUX.1 Kontext and Qwen-Image(-Edit)."""

from __future__ import annotations

import logging
import os
import random

import torch

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.region.clipseg import clipseg_probabilities, unload_clipseg
from ..xmgie_core.region.encoders import load_t5_instruction_encoder
from ..xmgie_core.region.learned import predict_learned
from ..xmgie_core.masks import empty_items
from ..xmgie_core.model_cache import MODELS
from ..xmgie_core.region.postprocess import GROW_RANGE, SMOOTH_RANGE, Finish, finish_region, region_preview
from ..xmgie_core.region.predictor import load_predictor
from ..xmgie_core.region.zeroshot import spread_around, working_pixels
from ..xmgie_core.tokens import parse_words
from ..xmgie_core.validation import rgb_image
from .model_folders import find_model_file, find_model_folder, model_file_names

LOG = logging.getLogger("xmgie")
from .runtime import comfy_progress, device_and_dtype, free_device_cache
MODES = ("learned", "noise-difference", "attention", "clipseg")
NONE = "none"
DRAWS = 10
STEPS = 10


def parse_scales(text: str) -> tuple[int, ...] | None:
    """'auto' -> None (the predictor's own scales); '1, 2' -> (1, 2)."""
    if text.strip().lower() in ("", "auto"):
        return None
    try:
        scales = tuple(int(s) for s in text.replace(" ", "").split(","))
    except ValueError:
        scales = ()
    if not scales or min(scales) < 1 or max(scales) > 8:
        raise XMGIEInputError(f"scales {text!r} must be 'auto' or comma-separated integers 1..8, e.g. '1, 2' (1 = the "
                              "whole image, 2 = a 2 x 2 grid of crops for small targets).")
    return scales


def learned_models(predictor_name: str, t5_folder: str, keep_loaded: bool) -> tuple:
    """The predictor (models/xmgie) and its FLAN-T5 encoder (models/text_encoders or models/LLM), cached on request."""
    if predictor_name in ("", NONE):
        raise XMGIEInputError("The learned mode needs trained weights: put a region predictor .safetensors file in "
                              "ComfyUI/models/xmgie/ and choose it as 'predictor' (or use a zero-shot mode).")
    path = find_model_file(predictor_name, "xmgie", "Region predictor")
    folder = find_model_folder(t5_folder, ("text_encoders", "LLM"), "The learned mode's instruction encoder",
                               "flan-t5-base")
    key = ("region-learned", str(path), path.stat().st_mtime, str(folder))
    MODELS.unload(lambda k: k[0] == "region-learned" and k != key)  # another file, or this one changed

    def load() -> tuple:
        device, dtype = device_and_dtype()
        return load_predictor(path, device, dtype), load_t5_instruction_encoder(folder, device, dtype)

    models = MODELS.get(key, load)
    if not keep_loaded:
        MODELS.unload(lambda k: k == key)
    return models


def working_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """VAE latent of the image at the working size (zeroshot.working_pixels), RGB only. A video VAE (Qwen-Image's
    Wan 2.1, latent_dim 3) would read a batch as the frames of one clip, so each image is encoded alone and a batch
    stays a batch [B, C, 1, h, w]."""
    pixels = working_pixels(image)
    if getattr(vae, "latent_dim", 2) == 3:
        return torch.cat([vae.encode(p[None]) for p in pixels])
    return vae.encode(pixels)


def preview_ui_images(preview: torch.Tensor, prefix: str = "xmgie_region") -> list[dict]:
    """Save the preview into ComfyUI's temp folder exactly as its PreviewImage node does (PNG, compress level 1,
    a random '_temp_xxxxx' suffix, folder_paths.get_save_image_path's counter) and return the node's ui "images"
    entries {"filename", "subfolder", "type": "temp"}, which the frontend draws on the node. Outside ComfyUI
    (folder_paths not importable) nothing is saved: []."""
    try:
        import folder_paths
    except ImportError:
        return []
    import numpy as np
    from PIL import Image

    prefix += "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), preview.shape[2], preview.shape[1])
    entries = []
    for batch_number, picture in enumerate(preview):
        pixels = np.clip(255.0 * picture.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        Image.fromarray(pixels).save(os.path.join(folder, name), compress_level=1)
        entries.append({"filename": name, "subfolder": subfolder, "type": "temp"})
        counter += 1
    return entries


class XMGIERegionPredictor:
    """Predict the edit region: MASK, the soft probability map and a preview."""

    CATEGORY = "xMGIE/region"
    FUNCTION = "predict"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("mask", "probability", "preview")
    OUTPUT_TOOLTIPS = (
        "The edit region, 1 = edit (thresholded, grown or shrunk): connect to Cross-Attention Mask, PFB and GB.",
        "The soft map in 0..1 before thresholding (the predictor's P_region, or the normalised zero-shot score).",
        "The region over the photo (red), for checking it at a glance.",
    )
    DESCRIPTION = (
        "Where to edit. learned: the learnable-regions paper's predictor (CLIP ViT-L/14 patches x FLAN-T5 instruction, cross- and "
        "self-attention, MLP + sigmoid) at several scales. noise-difference: DiffEdit, the model's noise predictions "
        "(a flow DiT's velocities) under the target vs the source description. attention: the edit words' cross- or "
        "joint attention during a short denoising pass. Both run on SD1.x / SD2 / SDXL, Flux / FLUX.1 Kontext and "
        "Qwen-Image(-Edit). clipseg: CLIPSeg prompted with the edit words. An empty region is reported, not an error."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photo to edit."}),
                "mode": (list(MODES), {"default": "noise-difference", "tooltip": "learned: trained weights from "
                         "models/xmgie + CLIP vision + FLAN-T5. noise-difference / attention: the checkpoint's U-Net "
                         "or Flux / Kontext / Qwen-Image DiT (connect model, clip, vae). clipseg: a CLIPSeg folder in "
                         "models/clipseg."}),
                "instruction": ("STRING", {"multiline": True, "default": "give the man a red scarf",
                                           "tooltip": "learned: the edit instruction (t_ins)."}),
                "target_description": ("STRING", {"multiline": True, "default": "a man wearing a red scarf",
                                                  "tooltip": "noise-difference, attention: what the edited image shows "
                                                             "(the Instruction node's target_description)."}),
                "source_description": ("STRING", {"multiline": True, "default": "a man",
                                                  "tooltip": "noise-difference: what the photo shows now (the "
                                                             "Instruction node's source_description)."}),
                "edit_words": ("STRING", {"default": "red scarf", "tooltip": "attention, clipseg: comma-separated "
                               "phrases of the target description that change (the Instruction node's edit_words)."}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Pixels whose soft value reaches this are in the mask."}),
                "grow": ("INT", {"default": 0, "min": GROW_RANGE[0], "max": GROW_RANGE[1],
                                 "tooltip": "Grow (> 0) or shrink (< 0) the mask by this many pixels."}),
                "smoothing": ("FLOAT", {"default": 0.0, "min": SMOOTH_RANGE[0], "max": SMOOTH_RANGE[1], "step": 0.5,
                                        "tooltip": "Gaussian sigma in pixels applied to the soft map before "
                                                   "thresholding; 0 = none."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "noise-difference, attention: seed of the noise draws."}),
                "draws": ("INT", {"default": DRAWS, "min": 1, "max": 64, "tooltip": "noise-difference: noise draws "
                              "averaged into the map, spread over strength +- 0.1 (DiffEdit uses 10)."}),
                "steps": ("INT", {"default": STEPS, "min": 1, "max": 50, "tooltip": "attention: denoising steps "
                              "whose cross-attention (U-Net) or joint-attention (DiT) maps are averaged."}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 1.0, "step": 0.05,
                                       "tooltip": "noise-difference, attention: how far the photo is noised (0..1 of "
                                                  "the schedule) before the model reads it (DiffEdit: 0.5)."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "noise-difference, attention: the checkpoint's model (SD U-Net, Flux / "
                                              "Kontext or Qwen-Image(-Edit))."}),
                "clip": ("CLIP", {"tooltip": "noise-difference, attention: the checkpoint's CLIP (for a DiT its "
                                             "text encoders: Flux t5xxl + clip_l, Qwen-Image qwen_2.5_vl_7b)."}),
                "vae": ("VAE", {"tooltip": "noise-difference, attention: the checkpoint's VAE (encodes the photo)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "learned: CLIP ViT-L/14 from Load CLIP Vision "
                                                           "(models/clip_vision)."}),
                "predictor": ([NONE] + model_file_names("xmgie"), {"default": NONE, "tooltip": "learned: the "
                              "trained region predictor (.safetensors in models/xmgie)."}),
                "t5_folder": ("STRING", {"default": "flan-t5-base", "tooltip": "learned: the FLAN-T5-base folder "
                              "under models/text_encoders or models/LLM (or an absolute path)."}),
                "scales": ("STRING", {"default": "auto", "tooltip": "learned: 'auto' (the predictor's own) or e.g. "
                           "'1, 2': 1 = the whole image, k = a k x k grid of crops for small targets."}),
                "clipseg_folder": ("STRING", {"default": "clipseg-rd64-refined", "tooltip": "clipseg: the CLIPSeg "
                                   "folder under models/clipseg (or an absolute path)."}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": "learned, clipseg: keep the models in "
                                "memory for the next run."}),
            },
        }

    def predict(self, image: torch.Tensor, mode: str, instruction: str, target_description: str,
                source_description: str, edit_words: str, threshold: float, grow: int, smoothing: float, seed: int,
                draws: int, steps: int, strength: float, model=None, clip=None, vae=None, clip_vision=None,
                predictor: str = NONE, t5_folder: str = "flan-t5-base", scales: str = "auto",
                clipseg_folder: str = "clipseg-rd64-refined", keep_loaded: bool = False) -> dict:
        image = rgb_image(image, "image")
        finish = Finish(threshold, grow, smoothing, normalise=mode in ("noise-difference", "attention"))
        score = self.score(image, mode, instruction, target_description, source_description, edit_words, seed,
                           draws, steps, strength, model, clip, vae, clip_vision, predictor, t5_folder, scales,
                           clipseg_folder, keep_loaded)
        mask, soft = finish_region(score, image.shape[1], image.shape[2], finish)
        empty = empty_items(mask)
        warning = ""
        if empty:
            same = [i for i in empty if mode == "noise-difference" and not score[i].any()]
            advice = (f"The noise difference is zero everywhere for image(s) {same}: the target and source "
                      "descriptions give the model the same predictions. Describe the edited image in "
                      "target_description and the photo as it is now in source_description." if same else
                      "Lower the threshold, check the words/descriptions, or try another mode.")
            warning = f"The predicted region is empty for image(s) {empty}: nothing will be edited there. {advice}"
            LOG.warning("xMGIE Region Predictor: %s", warning)
        preview = region_preview(image, mask, soft)
        return {"ui": {"images": preview_ui_images(preview), "xmgie_warning": [warning] if warning else []},
                "result": (mask, soft, preview)}

    def score(self, image, mode, instruction, target, source, words, seed, draws, steps, strength, model, clip, vae,
              clip_vision, predictor, t5_folder, scales, clipseg_folder, keep_loaded) -> torch.Tensor:
        progress = comfy_progress()
        if mode == "learned":
            if clip_vision is None:
                raise XMGIEInputError("The learned mode needs CLIP vision: connect a Load CLIP Vision node with the "
                                      "CLIP ViT-L/14 the predictor was trained with (models/clip_vision).")
            from ..xmgie_core.hosts.comfy.clip_vision import ComfyCLIPImageEncoder

            net, t5 = learned_models(predictor, t5_folder, keep_loaded)
            try:
                return predict_learned(net, ComfyCLIPImageEncoder(clip_vision), t5, image, instruction,
                                       parse_scales(scales), progress)
            finally:
                if not keep_loaded:
                    free_device_cache()
        if mode == "clipseg":
            folder = find_model_folder(clipseg_folder, ("clipseg",), "The clipseg mode", "clipseg-rd64-refined")
            device, _ = device_and_dtype()
            try:
                return clipseg_probabilities(image, parse_words(words), folder, device)
            finally:
                if not keep_loaded:
                    unload_clipseg()
                    free_device_cache()
        if mode in ("noise-difference", "attention"):
            missing = [n for n, v in (("model", model), ("clip", clip), ("vae", vae)) if v is None]
            if missing:
                raise XMGIEInputError(f"The {mode} mode runs the checkpoint's diffusion model: connect "
                                      f"{', '.join(missing)} (from Load Checkpoint, or Load Diffusion Model, "
                                      "Load CLIP and Load VAE for a DiT).")
            return zero_shot_score(mode, model, clip, vae, image, target, source, words, seed, draws, steps,
                                   strength, progress)
        raise XMGIEInputError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")


def zero_shot_score(mode: str, model, clip, vae, image: torch.Tensor, target: str, source: str, words: str,
                    seed: int, draws: int, steps: int, strength: float, progress) -> torch.Tensor:
    """The noise-difference or attention score on the MODEL's U-Net or DiT. A DiT editor's conditionings carry the
    photo's latent as their reference image (as ReferenceLatent / the Qwen edit encoders give it), on both branches."""
    from ..xmgie_core.hosts.comfy import dit
    from ..xmgie_core.hosts.comfy.region import (comfy_edit_attention, comfy_noise_difference, encode,
                                                 noise_difference)

    dit.check_supported(model.model.diffusion_model, f"The {mode} mode")
    found = dit.find(model.model.diffusion_model)
    latent = working_latent(vae, image)
    if found is None:
        if mode == "noise-difference":
            return comfy_noise_difference(model, clip, target, source, latent, draws, seed, spread_around(strength),
                                          progress)
        return comfy_edit_attention(model, clip, target, words, latent, steps, seed, strength, progress)
    import node_helpers
    from ..xmgie_core.hosts.comfy.region_dit import dit_edit_attention
    from ..xmgie_core.hosts.comfy.tokens import dit_token_positions

    target_cond = node_helpers.conditioning_set_values(encode(clip, target), {"reference_latents": [latent]},
                                                       append=True)
    if mode == "noise-difference":
        return noise_difference(model, target_cond, encode(clip, source), latent, draws, seed,
                                spread_around(strength), progress)
    positions = dit_token_positions(clip, found.family, target, words, target_cond[0][0].shape[1])
    return dit_edit_attention(model, target_cond, positions, latent, steps, seed, strength, progress)
