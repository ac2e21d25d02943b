"""PFB on ComfyUI's U-Nets and DiT editors: block patches with ComfyUI's signatures and a CFGGuider subclass that
runs the source branch beside the edit (docs/comfyui-internals.md §2.1, §2.3, §2.4, §3.2, §3.5, §8).

- Fusion points (U-Net, `unet.py`): `input_k` is `input_block_patch_after_skip` at block ("input", k) (h after it was pushed as a
  skip: the skip stays unblended); `middle` is `output_block_patch` at ("output", 0) on h; `output_k` is
  `output_block_patch` at ("output", k + 1) on h. The patches are added to a copy of the model options per pass,
  never to the MODEL.
- Fusion points (Flux / Kontext, Qwen-Image(-Edit), `dit.py`): `double_k` / `single_k` are the generated image's
  tokens after that block (block replace patches); text and reference-image tokens are never blended. The source
  branch gets the positive's reference latents where its conditioning lacks them, so both branches see the same
  reference image.
- Per step, `predict_noise` gets the source features for this sigma (the cache, the inversion's passes, or one
  extra `calc_cond_batch` with the source conditioning alone: one row, no CFG, stopped after the deepest blended
  layer), blends them into every row of the edit's CFG pass, and keeps the latent outside the mask on the
  source trajectory while the latent blend lasts (ComfyUI's noise_mask semantics: the model's input is the source
  there, its denoised output the clean source).
- The source branch is prepared in a SAMPLER_SAMPLE wrapper, where the conds are processed and the latent is in
  model space: `inverted` runs the DDIM inversion there and starts the edit from its top.

ComfyUI is imported only when the guider class is first built (`pfb_guider_class`), so CI can test the patches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...pfb import BlendPlan, FeatureBlender, PFBSettings, SourceBranch, latent_blend
from ...pfb import run as pfb_run
from . import dit, unet

LOG = logging.getLogger("xmgie")
SAMPLER_SAMPLE = "sampler_sample"
"""comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE."""
CONCAT_KEYS = ("concat_latent_image", "concat_mask", "concat_image", "reference_latents", "reference_latents_method")
"""Conditioning extras that feed a 9-channel inpainting / 8-channel IP2P U-Net's extra input channels, and a DiT
editor's reference image (ReferenceLatent: Kontext, Qwen-Image-Edit)."""


def source_conds(source: list | None, negative: list, positive: list) -> list:
    """The source branch's conditioning (default: the negative), given the positive's concat inputs and reference
    latents where it lacks them, so an inpainting or IP2P U-Net gets the same extra channels, and a DiT editor the
    same reference image, on both branches."""
    chosen = source if source else negative
    extras = {k: v for k, v in (positive[0][1] if positive else {}).items() if k in CONCAT_KEYS}
    return [[c[0], {**extras, **c[1]}] for c in chosen]


def model_identity(model_patcher: Any, model_options: dict) -> tuple[list, tuple]:
    """What makes two runs' source features equal besides their inputs: the weights (the base model and its
    weight patches), the object patches (e.g. model_sampling) and every attention/block patch and wrapper that
    could touch the source pass. Objects marked `xmgie_source_neutral` (CAM: masks only its own prompt) are
    left out. Returns (parts for the fingerprint, objects to keep alive while the key is in use)."""
    to = model_options.get("transformer_options", {})
    objects = [model_patcher.model, *getattr(model_patcher, "object_patches", {}).values(),
               model_options.get("model_function_wrapper"), to.get("optimized_attention_override")]
    for group in ("patches", "patches_replace"):
        for value in to.get(group, {}).values():
            objects.extend(value.values() if isinstance(value, dict) else value)
    kept = tuple(o for o in objects if o is not None and not _neutral(o))
    return [getattr(model_patcher, "patches_uuid", None), list(kept)], kept


def cond_content(entries: list[dict]) -> list[dict]:
    """What of processed cond entries the source pass depends on: not the per-run uuid, and the tensors inside
    the model_conds wrappers (CONDRegular / CONDCrossAttn objects are new each run)."""
    return [{k: ({n: getattr(c, "cond", c) for n, c in v.items()} if k == "model_conds" else v)
             for k, v in entry.items() if k != "uuid"} for entry in entries]


def _neutral(obj: Any) -> bool:
    return bool(getattr(getattr(obj, "__self__", obj), "xmgie_source_neutral", False))


@dataclass
class _Run:
    """One sampling run's PFB state, built when the sampler starts."""

    plan: BlendPlan
    hooked: Any
    """hooked(model_options, hook, layers) -> model_options with hook(layer, h) at those layers (the family's seam)."""
    branch: SourceBranch
    source: torch.Tensor
    """The source latent in model space (z)."""


_GUIDER: list[type] = []


def pfb_guider_class() -> type:
    """The PFB guider class (a comfy.samplers.CFGGuider), built on first use."""
    if _GUIDER:
        return _GUIDER[0]
    import comfy.model_management
    import comfy.samplers

    class PFBGuider(comfy.samplers.CFGGuider):
        """CFG guider that runs PFB's source branch beside the edit (see module doc)."""

        def __init__(self, model_patcher: Any, settings: PFBSettings):
            super().__init__(model_patcher)
            self.settings = settings
            self.run: _Run | None = None
            self.image_cfg = 1.5

        def set_conds(self, positive: list, negative: list, source: list | None = None,
                      image_cond: list | None = None) -> None:
            """`image_cond`: InstructPix2Pix's negative *with* the image, for text + image guidance."""
            conds = {"positive": positive, "negative": negative, "source": source_conds(source, negative, positive)}
            if image_cond is not None:
                import node_helpers

                conds["middle"] = node_helpers.conditioning_set_values(image_cond, {"prompt_type": "negative"})
            self.inner_set_conds(conds)

        def set_image_cfg(self, image_cfg: float) -> None:
            self.image_cfg = image_cfg

        def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                   disable_pbar=False, seed=None):
            """An empty mask edits nothing: the source latent is returned bit for bit, as the PFB Sampler does
            (sampling it would let the whole latent drift once the latent blend ends)."""
            if self.settings.empty:
                return latent_image
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

        def guided(self, x, timestep, model_options, seed):
            """CFG, or with an image cond InstructPix2Pix's dual guidance, as ComfyUI's DualCFGGuider ('regular'):
            e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0)), with s_T = cfg and s_I = image_cfg."""
            if "middle" not in self.conds:
                return super().predict_noise(x, timestep, model_options, seed)
            negative, middle, positive = (self.conds[k] for k in ("negative", "middle", "positive"))
            out = comfy.samplers.calc_cond_batch(self.inner_model, [negative, middle, positive], x, timestep,
                                                 model_options)
            return comfy.samplers.cfg_function(self.inner_model, out[1], out[0], self.image_cfg, x, timestep,
                                               model_options=model_options, cond=middle, uncond=negative) \
                + (out[2] - out[1]) * self.cfg

        def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                         seed):
            options = self.model_options
            to = options["transformer_options"] = dict(options.get("transformer_options", {}))
            wrappers = to["wrappers"] = dict(to.get("wrappers", {}))
            wrappers[SAMPLER_SAMPLE] = {**wrappers.get(SAMPLER_SAMPLE, {}), "xmgie_pfb": [self._start]}
            try:
                samples = super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                               disable_pbar, seed)
                if self.run.plan.latent_to_end:  # outside the mask: the input latent, bit for bit
                    m = self.run.plan.latent_mask(*samples.shape[-2:], samples.device, samples.ndim)
                    samples = latent_blend(samples, latent_image.to(samples), m)
                return samples
            finally:
                self.run = None

        # -- SAMPLER_SAMPLE wrapper: (executor, guider, sigmas, extra_args, callback, noise, latent_image, ...)
        def _start(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                   disable_pbar):
            self.run = self._prepare(sigmas, latent_image, extra_args["model_options"])
            if self.settings.source_mode == "inverted":
                noise = self._noise_for_start(executor.class_obj, sigmas, noise, latent_image)
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

        def _prepare(self, sigmas: torch.Tensor, z: torch.Tensor, model_options: dict) -> _Run:
            ms = self.inner_model.model_sampling
            layout, hooked = fusion_points(self.inner_model.diffusion_model)
            blend_plan = pfb_run.plan(self.settings, layout, z, self.inner_model.latent_format.latent_channels,
                                      ms.percent_to_sigma)
            parts, keep = model_identity(self.model_patcher, model_options)
            branch = pfb_run.open_source_branch(
                self.settings, blend_plan, z, [float(v) for v in sigmas], float(ms.sigma_min),
                self._source_pass(model_options, lambda o, h: hooked(o, h, list(blend_plan.layers))),
                (cond_content(self.conds["source"]), parts), keep, comfy.model_management.intermediate_device(),
                lambda sigma, noise, x: ms.noise_scaling(torch.tensor(sigma, device=x.device), noise, x))
            return _Run(blend_plan, hooked, branch, z)

        def _source_pass(self, model_options: dict, hooked):
            def run_pass(x: torch.Tensor, sigma: float, recorder) -> torch.Tensor:
                comfy.model_management.throw_exception_if_processing_interrupted()
                options = hooked(model_options, recorder)
                timestep = x.new_full((x.shape[0],), sigma)
                return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["source"]], x, timestep,
                                                      options)[0]
            return run_pass

        def _noise_for_start(self, sampler, sigmas, noise, z):
            """The noise for which the sampler's first latent, noise_scaling(sigma_0, noise, z), is the inversion's
            top x_inv(sigma_0) (noise_scaling is affine in the noise)."""
            top = self.run.branch.trajectory(float(sigmas[0]))
            return unet.noise_for(self.inner_model.model_sampling, sigmas[0], top, z,
                                  sampler.max_denoise(self, sigmas)).to(noise)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            comfy.model_management.throw_exception_if_processing_interrupted()
            run = self.run
            sigma = float(timestep.max())
            layers = run.plan.active_layers(sigma)
            blending = run.plan.latent_active(sigma)
            if not layers and not blending:
                return self.guided(x, timestep, model_options, seed)
            if layers:
                model_options = run.hooked(model_options, FeatureBlender(run.plan, run.branch.features(sigma), layers),
                                           layers)
            if blending:
                m = run.plan.latent_mask(*x.shape[-2:], x.device, x.ndim)
                x = latent_blend(x, run.branch.trajectory(sigma).to(x), m)
            denoised = self.guided(x, timestep, model_options, seed)
            return latent_blend(denoised, run.source.to(denoised), m) if blending else denoised

    _GUIDER.append(PFBGuider)
    return PFBGuider


def check_model(model_patcher: Any) -> None:
    """PFB runs on SD U-Nets, Flux / FLUX.1 Kontext and Qwen-Image(-Edit); any other model gets a sentence naming
    its architecture (checked by the nodes before any work)."""
    dit.check_supported(model_patcher.model.diffusion_model, "PFB")


def fusion_points(diffusion_model: torch.nn.Module) -> tuple[Any, Any]:
    """(layout, hooked) of the model's family: a U-Net's block patches or a DiT's token patches, where
    hooked(model_options, hook, layers) returns options with hook(layer, h) at those layers."""
    dit.check_supported(diffusion_model, "PFB")
    found = dit.find(diffusion_model)
    if found is not None:
        return found.layout(), lambda options, hook, layers: dit.with_layer_hook(options, found, hook, layers)
    return unet.layout(diffusion_model), lambda options, hook, layers: unet.with_block_patch(options,
                                                                                             unet.BlockPatch(hook))


def warn_empty_mask() -> None:
    LOG.warning("xMGIE PFB: the mask is empty, so nothing is edited: the source latent is returned unchanged. "
                "Paint the region to edit.")
