"""XMGIE PFB Sampler and XMGIE PFB Guider: progressive feature blending with a source branch ([xMGIE] eqs 5-6,
PFB-Diff), on ComfyUI's own sampling."""

from __future__ import annotations

import torch

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.hosts.comfy.pfb import LOG, check_model, pfb_guider_class, warn_empty_mask
from ..xmgie_core.identity.faces import IdEmbed
from ..xmgie_core.identity.protect import protected_mask, rank_by_ips
from ..xmgie_core.identity.scoring import score_images
from ..xmgie_core.pfb import SOURCE_MODES, PFBSettings, SourceCache
from ..xmgie_core.validation import check_range
from .identity import recognizer_for
from .runtime import comfy_progress

SOURCE_CACHE = SourceCache()
"""Source features and inversions shared by every PFB node of this ComfyUI process."""


def sampler_choices() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (outside ComfyUI, e.g. when CI reads the node's inputs: one each)."""
    try:
        import comfy.samplers
    except ImportError:
        return ["euler"], ["normal"]
    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


PFB_INPUTS = {
    "mask": ("MASK", {"tooltip": "Edit region (1 = edit), any resolution with the latent's aspect ratio; one mask, "
                                 "or one per latent. Outside it the source is kept (features and latent)."}),
    "source_mode": (list(SOURCE_MODES), {"default": "noised", "tooltip": "How the source branch follows the "
                    "schedule. noised: the source latent plus one fixed noise (cheap, ComfyUI's noise-mask way). "
                    "inverted: a DDIM inversion of the source under the source conditioning (PFB-Diff's way; "
                    "reconstructs the source faithfully; one extra pass per step, cached)."}),
    "layers": ("STRING", {"default": "auto", "tooltip": "Layers to blend, comma-separated. U-Net (SD1.5, SDXL): "
               "input_k, middle, output_k; auto = every layer on the two coarsest grids (SD1.5: input_7-11, middle, "
               "output_0-4). DiT (FLUX.1 Kontext, Qwen-Image-Edit): double_k = the generated image's tokens after "
               "double-stream block k (all of Qwen-Image's blocks), single_k = after Flux's single-stream block k; "
               "auto = the first half of the blocks (FLUX.1: double_0-18, single_0-9; Qwen-Image: double_0-29). "
               "Text and reference-image tokens are never blended. Each entry optionally ':weight' (outside weight) "
               "and '@end' (end fraction), e.g. 'auto, output_3-4:0.5@0.6' or 'double_8-14:0.3'. A layer the model "
               "lacks gives an error listing its layers."}),
    "outside_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "alpha outside the "
                       "mask: 0 = the source's features (PFB-Diff), 0.5 = the paper's initial alpha, 1 = no feature "
                       "blending (no source pass: the latent blend alone)."}),
    "blend_end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Blend features "
                          "until this fraction of the schedule (1 = every step)."}),
    "latent_blend_end_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Keep the "
                                 "latent outside the mask on the source trajectory until this fraction of the schedule "
                                 "(PFB-Diff: the first half). 1 = to the end: outside the mask the result is the "
                                 "source latent exactly."}),
    "soft_edge": ("BOOLEAN", {"default": True, "tooltip": "Use the fraction of each coarse cell the mask covers as the "
                  "blend weight at the border (off: a cell is inside when half of it is covered)."}),
    "cache": ("BOOLEAN", {"default": True, "tooltip": "Keep the source branch's features (and inversion) for the next "
              "run: editing the same image again (new prompt, mask or seed) skips the source pass. Off frees the cache."}),
    "cache_mb": ("INT", {"default": 1024, "min": 0, "max": 65536, "step": 64, "tooltip": "Size of the source cache in "
                 "MB (kept in system memory). Per step with the auto layers: about 8 MB for SD1.5 at 512x512; about "
                 "0.7 GB for FLUX.1 Kontext or Qwen-Image-Edit at 1024x1024 (25 MB per blended block in bf16), so "
                 "raise it or blend fewer blocks (e.g. double_8-14) to cache a whole DiT edit."}),
}
SOURCE_INPUT = {
    "source": ("CONDITIONING", {"tooltip": "Conditioning of the source branch, e.g. a description of the source image. "
                                           "Default: the negative."}),
    "id_embed": ("ID_EMBED", {"tooltip": "The source's faces (XMGIE ID Embedder): where the edit region overlaps a "
                              "face, the face keeps the source's features and latent (unless the edit covers most of "
                              "that face, i.e. targets it)."}),
    "face_protection": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "With id_embed: "
                        "how strongly protected faces stay the source (1 = fully, 0 = not at all)."}),
}


def pfb_settings(mask: torch.Tensor, source_mode: str, layers: str, outside_weight: float, blend_end_percent: float,
                 latent_blend_end_percent: float, soft_edge: bool, cache: bool, cache_mb: int,
                 id_embed: IdEmbed | None = None, face_protection: float = 1.0) -> tuple[PFBSettings, str]:
    """The guider settings from the nodes' shared inputs (the mask with protected faces taken out) and a note on
    the faces; the shared cache is resized, or freed when off."""
    check_range(cache_mb, "cache_mb", 0, 65536)
    note = ""
    if id_embed is not None and not id_embed.empty:
        mask, notes = protected_mask(mask, id_embed, face_protection)
        note = "Face protection: " + "; ".join(notes)
        LOG.info("xMGIE PFB %s", note)
    if cache:
        SOURCE_CACHE.resize(cache_mb)
    else:
        SOURCE_CACHE.clear()
    return PFBSettings(mask, layers, outside_weight, blend_end_percent, latent_blend_end_percent, soft_edge,
                       source_mode, SOURCE_CACHE if cache else None, cache_mb, comfy_progress()), note


def make_guider(model, positive, negative, source, cfg: float, settings: PFBSettings, image_cond=None,
                image_cfg: float = 1.5):
    guider = pfb_guider_class()(model, settings)
    guider.set_conds(positive, negative, source, image_cond)
    guider.set_cfg(cfg)
    guider.set_image_cfg(image_cfg)
    return guider


class XMGIEPFBGuider:
    """PFB as a GUIDER for SamplerCustomAdvanced: its latent_image is the VAE-encoded source."""

    CATEGORY = "xMGIE/sampling"
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("CFG guidance with PFB's source branch; give SamplerCustomAdvanced the VAE-encoded source as "
                       "latent_image. Outside the mask the result is the source latent exactly only with "
                       "latent_blend_end_percent 1.0 (below it the outside may drift after that fraction); an empty "
                       "mask returns the source latent unchanged.",)
    DESCRIPTION = ("Progressive feature blending (PFB-Diff): a source branch runs beside the edit and its features "
                   "(an SD U-Net's blocks, or the generated image's tokens in a FLUX.1 Kontext / Qwen-Image-Edit "
                   "DiT) replace the edit's outside the mask at the chosen layers; the latent outside the mask stays "
                   "on the source trajectory for part of the schedule.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model (not changed): SD1.5 / SDXL (or their inpainting and "
                                             "InstructPix2Pix versions), FLUX.1 Kontext / Flux, or Qwen-Image-Edit / "
                                             "Qwen-Image."}),
                "positive": ("CONDITIONING", {"tooltip": "The edit prompt."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale of the edit branch (FLUX.1 Kontext: "
                                             "1, with FluxGuidance; Qwen-Image-Edit: about 4)."}),
                **PFB_INPUTS,
            },
            "optional": {
                **SOURCE_INPUT,
                "image_cond": ("CONDITIONING", {"tooltip": "InstructPix2Pix: the InstructPixToPixConditioning node's "
                               "negative (the negative with the image). Turns on text + image guidance, as "
                               "DualCFGGuider: cfg is the text scale, image_cfg the image scale; 'negative' is then "
                               "the negative without the image."}),
                "image_cfg": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                        "tooltip": "With image_cond: the image guidance scale (InstructPix2Pix and "
                                                   "MGIE use 1.5)."}),
            },
        }

    def get_guider(self, model, positive, negative, cfg: float, mask: torch.Tensor, source_mode: str, layers: str,
                   outside_weight: float, blend_end_percent: float, latent_blend_end_percent: float,
                   soft_edge: bool, cache: bool, cache_mb: int, source=None, id_embed: IdEmbed | None = None,
                   face_protection: float = 1.0, image_cond=None, image_cfg: float = 1.5) -> tuple:
        check_model(model)
        settings, _ = pfb_settings(mask, source_mode, layers, outside_weight, blend_end_percent,
                                   latent_blend_end_percent, soft_edge, cache, cache_mb, id_embed, face_protection)
        if settings.empty:
            warn_empty_mask()
        return (make_guider(model, positive, negative, source, cfg, settings, image_cond, image_cfg),)


class XMGIEPFBSampler:
    """A KSampler with PFB: the edit is sampled beside a source branch and blended with it outside the mask."""

    CATEGORY = "xMGIE/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "FLOAT", "STRING")
    RETURN_NAMES = ("latent", "ips", "report")
    OUTPUT_IS_LIST = (False, True, False)
    OUTPUT_TOOLTIPS = ("The edited latent; with best-of-N, the candidates, highest identity preservation score "
                       "first. Outside the mask it is the source latent exactly only with latent_blend_end_percent "
                       "1.0; below that the outside follows the source until that fraction and may drift after it "
                       "(the GB Compositor then restores the source's pixels there). An empty mask returns the "
                       "source latent unchanged.",
                       "Best-of-N: each candidate's IPS, in the latent's order (empty otherwise).",
                       "Which faces were protected, and with best-of-N the IPS report per candidate and face.")
    DESCRIPTION = XMGIEPFBGuider.DESCRIPTION

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        samplers, schedulers = sampler_choices()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model (not changed): SD1.5 / SDXL (or their inpainting and "
                                             "InstructPix2Pix versions), FLUX.1 Kontext / Flux, or Qwen-Image-Edit / "
                                             "Qwen-Image."}),
                "positive": ("CONDITIONING", {"tooltip": "The edit prompt (e.g. the Cross-Attention Mask node's "
                                                         "'positive')."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
                "latent_image": ("LATENT", {"tooltip": "The VAE-encoded source image (with the model's VAE; a "
                                                       "Qwen-Image latent may be 4-d or 5-d); a noise_mask on it is "
                                                       "honoured as in KSampler."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the edit's noise (the source branch's noise is fixed)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale of the edit branch (FLUX.1 Kontext: "
                                             "1, with FluxGuidance; Qwen-Image-Edit: about 4)."}),
                "sampler_name": (samplers, {"tooltip": "The sampling algorithm (any of KSampler's)."}),
                "scheduler": (schedulers, {"tooltip": "The noise schedule (any of KSampler's)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "How much "
                                      "of the schedule to run from the source (PFB-Diff's encode ratio)."}),
                **PFB_INPUTS,
            },
            "optional": {
                **SOURCE_INPUT,
                "candidates": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "With id_embed and vae: sample "
                               "this many edits as one batch and return them sorted by IPS (1 = off). Costs about N "
                               "times the sampling plus N VAE decodes and face embeddings."}),
                "vae": ("VAE", {"tooltip": "Best-of-N: decodes the candidates to score their faces."}),
            },
        }

    def sample(self, model, positive, negative, latent_image: dict, seed: int, steps: int, cfg: float,
               sampler_name: str, scheduler: str, denoise: float, mask: torch.Tensor, source_mode: str, layers: str,
               outside_weight: float, blend_end_percent: float, latent_blend_end_percent: float, soft_edge: bool,
               cache: bool, cache_mb: int, source=None, id_embed: IdEmbed | None = None, face_protection: float = 1.0,
               candidates: int = 1, vae=None) -> tuple:
        check_model(model)
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        settings, note = pfb_settings(mask, source_mode, layers, outside_weight, blend_end_percent,
                                      latent_blend_end_percent, soft_edge, cache, cache_mb, id_embed, face_protection)
        # in the model's latent format as KSampler and SamplerCustomAdvanced take it (Qwen-Image: 4-d -> 5-d);
        # checked once, by the guider before any model pass
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        if settings.empty:
            warn_empty_mask()
            return {**latent_image, "samples": samples}, [], "The mask is empty: the source latent is returned " \
                                                             "unchanged."
        best_of = candidates if id_embed is not None and not id_embed.empty and candidates > 1 else 1
        if best_of > 1:
            if vae is None:
                raise XMGIEInputError("Best-of-N decodes the candidates to score their faces: connect the vae input "
                                      "(or set candidates to 1).")
            if samples.shape[0] != 1:
                raise XMGIEInputError(f"Best-of-N samples candidates of one image, but the latent batch is "
                                      f"{samples.shape[0]}: use a batch of 1 (or set candidates to 1).")
            samples = samples.repeat(best_of, *[1] * (samples.ndim - 1))
        guider = make_guider(model, positive, negative, source, cfg, settings)
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index") if best_of == 1 else None)
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        out = guider.sample(noise, samples, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent_image.get("noise_mask"),
                            callback=latent_preview.prepare_callback(model, sigmas.shape[-1] - 1),
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = out.to(comfy.model_management.intermediate_device())
        result = latent_image.copy()
        if best_of == 1:
            result["samples"] = out
            return result, [], note
        values, report = score_images(recognizer_for(id_embed), id_embed, vae.decode(out))
        order = rank_by_ips(values)
        lines = report.splitlines()
        result["samples"] = out[order]
        ranked = "\n".join(f"candidate {rank} ({lines[i]})" for rank, i in enumerate(order))
        return result, [values[i] for i in order], f"{note}\n{ranked}" if note else ranked
