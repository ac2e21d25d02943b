"""Zero-shot region maps on ComfyUI objects (MODEL, CONDITIONING or CLIP, a VAE-encoded latent): DiffEdit's noise
difference and the edit words' attention (math in xmgie_core.region.zeroshot), on SD U-Nets and, through
region_dit.py, on the DiT editors (Flux / Kontext, Qwen-Image(-Edit)).

Each mode runs inside comfy.samplers.CFGGuider.sample with a stand-in sampler (docs/comfyui-internals.md §2.1): the guider loads
the model, merges wrappers and hooks, processes the conditioning (SDXL's size conds, a DiT editor's reference
latents included) and moves the latent into model space (process_latent_in); the stand-in then runs its model
passes with comfy.samplers.calc_cond_batch. Latents are noised with the model's model_sampling.noise_scaling. The
noise difference compares what `model_prediction` recovers from the denoised output: the noise for EPS and
v-prediction models (so both give the same eps), the velocity for flow-matching (CONST) models. The source branch
gets the target's reference latents (and inpainting concat inputs) where it lacks them, so both branches see the
same reference image. The caller's MODEL is never patched: the attention mode patches a clone.

ComfyUI is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...cam import tiled_positions
from ...region.zeroshot import (DEFAULT_STRENGTH_RANGE, AttentionMaps, attend_and_record, check_count, check_latent,
                               denoising_timesteps, euler_step, flow_velocity, noise_difference_map,
                               noise_difference_timesteps, seeded_noise)
from .pfb import source_conds
from .tokens import comfy_token_positions
from . import unet

Progress = Callable[[int, int], None]
Run = Callable[[Any, torch.Tensor, torch.Tensor, dict], torch.Tensor]
Prediction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CrossAttentionRecorder:
    """attn2 replace patch, out = p(q, k, v, extra_options): the stock attention output, and the edit words'
    probabilities added to `maps` (positions of the prompt, tiled as ComfyUI tiles shorter contexts)."""

    def __init__(self, positions: list[int], prompt_tokens: int, maps: AttentionMaps):
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.prompt_tokens, self.maps = prompt_tokens, maps

    def __deepcopy__(self, memo: dict) -> "CrossAttentionRecorder":
        return self  # clones share the recording

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        positions = tiled_positions(self.positions.to(q.device), self.prompt_tokens, k.shape[1])
        grid = tuple(int(s) for s in extra_options["activations_shape"][-2:])
        return attend_and_record(q, k, v, extra_options["n_heads"], positions, grid, self.maps)


def encode(clip: Any, text: str) -> list:
    """CONDITIONING of `text`, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def timestep_sigmas(model_sampling: Any, timesteps: list[int]) -> list[float]:
    """The model's sigmas at training timesteps, read from its own table model_sampling.sigmas: sigmas[t] is
    sigma(t) of a discrete schedule, and a flow model's table holds its shifted sigmas at t / T (its sigma() takes a
    fraction or time, not a timestep index)."""
    return [float(model_sampling.sigmas[t]) for t in timesteps]


def model_prediction(model_sampling: Any) -> Prediction:
    """(sigma, x, denoised) -> what the noise difference compares: the noise for EPS / v-prediction models
    (unet.noise_for, DiffEdit's eps), the velocity (x - denoised) / sigma for flow-matching CONST models
    (zeroshot.flow_velocity, which says why)."""
    import comfy.model_sampling

    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return lambda sigma, x, denoised: flow_velocity(x, denoised, sigma)
    return lambda sigma, x, denoised: unet.noise_for(model_sampling, sigma, x, denoised)


class _Procedure:
    """Stands in for a sampler inside CFGGuider.sample: `run(guider, z, sigmas, model_options)` does the model passes
    once the guider has prepared the model, the conds (guider.conds) and the latent z in model space."""

    def __init__(self, run: Run):
        self.run = run
        self.result: torch.Tensor | None = None

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        self.result = self.run(guider, latent_image, sigmas, extra_args["model_options"])
        return latent_image


def _run_in_guider(model: Any, conds: dict[str, list], latent: torch.Tensor, sigmas: list[float], seed: int,
                   run: Run) -> torch.Tensor:
    import comfy.model_management
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds(conds)
    procedure = _Procedure(run)
    guider.sample(torch.zeros_like(latent), latent, procedure, torch.tensor(sigmas), disable_pbar=True, seed=seed)
    return procedure.result.to(comfy.model_management.intermediate_device())


def _model_pass(guider: Any, keys: list[str], x: torch.Tensor, sigma: torch.Tensor,
                model_options: dict) -> list[torch.Tensor]:
    """Denoised outputs for the conds `keys`, one model call (after an interrupt check)."""
    import comfy.model_management
    import comfy.samplers

    comfy.model_management.throw_exception_if_processing_interrupted()
    timestep = sigma.expand(x.shape[0])
    return comfy.samplers.calc_cond_batch(guider.inner_model, [guider.conds[k] for k in keys], x, timestep,
                                          model_options)


def _checked_latent(model: Any, latent: torch.Tensor) -> torch.Tensor:
    latent_format = model.get_model_object("latent_format")
    return check_latent(latent, latent_format.latent_channels, frames=latent_format.latent_dimensions == 3)


def _image_dims(prediction: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w], or a one-frame [B, C, 1, h, w] with the frame folded into the channels."""
    return prediction.flatten(1, -3)


def noise_difference(model: Any, target: list, source: list, latent: torch.Tensor, draws: int, seed: int,
                     strength_range: tuple[float, float] = DEFAULT_STRENGTH_RANGE,
                     progress: Progress | None = None) -> torch.Tensor:
    """DiffEdit's noise-difference map [B, h, w] >= 0 (float32, on ComfyUI's intermediate device) between the
    CONDITIONINGs `target` and `source` (the source gets the target's reference latents where it lacks them).

    `latent` is the raw VAE latent [B, C, h, w] (Qwen-Image: [B, C, 1, h, w]), VAE Encode's samples. Each of `draws`
    seeded noises (one per image of the batch) is added at its own strength, spread over `strength_range`; the
    target and source predictions share one calc_cond_batch and are compared as `model_prediction` reads them.
    Equal conditionings give an all-zero map (no region). `progress(done, draws)` is called after each draw.
    """
    check_count(draws, "draws", "noise samples averaged into the map")
    latent = _checked_latent(model, latent)
    ms = model.get_model_object("model_sampling")
    sigmas = timestep_sigmas(ms, noise_difference_timesteps(strength_range, draws, len(ms.sigmas)))
    noise = seeded_noise(seed, tuple(latent.shape), draws)
    predict = model_prediction(ms)

    def run(guider: Any, z: torch.Tensor, sigmas: torch.Tensor, model_options: dict) -> torch.Tensor:
        pred_target, pred_source = [], []
        for d, sigma in enumerate(sigmas):
            x = ms.noise_scaling(sigma, noise[d].to(z), z)
            denoised = _model_pass(guider, ["target", "source"], x, sigma, model_options)
            pred_target.append(_image_dims(predict(sigma, x, denoised[0])))
            pred_source.append(_image_dims(predict(sigma, x, denoised[1])))
            if progress is not None:
                progress(d + 1, draws)
        return noise_difference_map(torch.stack(pred_target), torch.stack(pred_source))

    conds = {"target": target, "source": source_conds(source, source, target)}
    return _run_in_guider(model, conds, latent, sigmas, seed, run)


def comfy_noise_difference(model: Any, clip: Any, target_text: str, source_text: str, latent: torch.Tensor,
                           draws: int, seed: int, strength_range: tuple[float, float] = DEFAULT_STRENGTH_RANGE,
                           progress: Progress | None = None) -> torch.Tensor:
    """`noise_difference` between `target_text` and `source_text` encoded with `clip` (CLIPTextEncode)."""
    return noise_difference(model, encode(clip, target_text), encode(clip, source_text), latent, draws, seed,
                            strength_range, progress)


def denoising_attention(patched: Any, target: list, latent: torch.Tensor, steps: int, seed: int, strength: float,
                        maps: AttentionMaps, progress: Progress | None = None) -> torch.Tensor:
    """maps.mean() [B, h, w] after a short denoising pass of `patched` (a clone whose attention patch records into
    `maps`): the latent noised to the sigma at `strength`, then `steps` Euler steps under `target` down to sigma 0.
    `progress(done, steps)` is called after each step."""
    check_count(steps, "steps", "denoising steps whose attention is averaged")
    latent = _checked_latent(patched, latent)
    ms = patched.get_model_object("model_sampling")
    sigmas = timestep_sigmas(ms, denoising_timesteps(strength, steps, len(ms.sigmas))) + [0.0]
    noise = seeded_noise(seed, tuple(latent.shape), 1)[0]

    def run(guider: Any, z: torch.Tensor, sigmas: torch.Tensor, model_options: dict) -> torch.Tensor:
        x = ms.noise_scaling(sigmas[0], noise.to(z), z)
        for i in range(steps):
            denoised = _model_pass(guider, ["target"], x, sigmas[i], model_options)[0]
            x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
            if progress is not None:
                progress(i + 1, steps)
        return maps.mean()

    return _run_in_guider(patched, {"target": target}, latent, sigmas, seed, run)


def comfy_edit_attention(model: Any, clip: Any, target_text: str, edit_words: str, latent: torch.Tensor, steps: int,
                         seed: int, strength: float, progress: Progress | None = None) -> torch.Tensor:
    """The edit words' cross-attention map [B, h, w] >= 0 of an SD U-Net (float32, on ComfyUI's intermediate device).

    `latent` is the raw VAE latent [B, C, h, w]. `denoising_attention` under `target_text` while an attn2 replace
    patch on a clone of `model` records, in every cross-attention layer, the probabilities of `edit_words`
    (comma-separated phrases of `target_text`).
    """
    check_count(steps, "steps", "denoising steps whose attention is averaged")
    latent = _checked_latent(model, latent)
    positions, prompt_tokens = comfy_token_positions(clip, target_text, edit_words)
    maps = AttentionMaps(tuple(latent.shape[-2:]), latent.shape[0])
    patched = model.clone()
    recorder = CrossAttentionRecorder(positions, prompt_tokens, maps)
    for key in unet.attn2_keys(patched.model.diffusion_model):
        patched.set_model_attn2_replace(recorder, *key)
    return denoising_attention(patched, encode(clip, target_text), latent, steps, seed, strength, maps, progress)
