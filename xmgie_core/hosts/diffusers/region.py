"""Zero-shot region maps on a diffusers UNet2DConditionModel (the second host): DiffEdit's noise difference and
the edit words' cross-attention (math in xmgie_core.region.zeroshot).

Latents are the scaled VAE latents the U-Net works on ([B,4,h,w], vae latents * scaling_factor). The passes run in
k-diffusion's sigma space (x = z + sigma * eps, sigma_t = sqrt((1 - alphabar_t) / alphabar_t), U-Net input
x / sqrt(1 + sigma^2)) with the scheduler's alphas_cumprod, as the PFB loop does, so both hosts visit the same
timesteps and sigmas. Only epsilon-prediction schedulers are supported.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...masks import infer_grid
from ...errors import XMGIEInputError
from ...region.zeroshot import (DEFAULT_STRENGTH_RANGE, AttentionMaps, attend_and_record, check_count, check_latent,
                               denoising_timesteps, euler_step, noise_difference_map, noise_difference_timesteps,
                               seeded_noise)
from .schedule import epsilon_schedule, unet_eps
from .unet import check_plain_cross_attention, cross_attention_processors

Progress = Callable[[int, int], None]


class AttentionRecorder:
    """Cross-attention processor that computes the stock output and records the edit words' probabilities."""

    def __init__(self, positions: torch.Tensor, maps: AttentionMaps, latent_hw: tuple[int, int]):
        self.positions, self.maps, self.latent_hw = positions, maps, latent_hw

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        check_plain_cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    "The attention recorder")
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        grid = infer_grid(q.shape[1], self.latent_hw)
        out = attend_and_record(q, k, v, attn.heads, self.positions.to(q.device), grid, self.maps)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _rows(embeddings: torch.Tensor, batch: int) -> torch.Tensor:
    """[1 or B, L, C] prompt embeddings as [B, L, C]."""
    if embeddings.ndim != 3 or embeddings.shape[0] not in (1, batch):
        raise XMGIEInputError(f"Prompt embeddings must be [1 or {batch}, tokens, channels] for a batch of {batch} "
                              f"latents, got shape {tuple(embeddings.shape)}.")
    return embeddings.expand(batch, -1, -1)


@torch.no_grad()
def diffusers_noise_difference(unet: torch.nn.Module, scheduler, latents: torch.Tensor,
                               target_embeddings: torch.Tensor, source_embeddings: torch.Tensor, draws: int,
                               seed: int, strength_range: tuple[float, float] = DEFAULT_STRENGTH_RANGE,
                               progress: Progress | None = None) -> torch.Tensor:
    """DiffEdit's noise-difference map [B, h, w] >= 0 (float32, on the latents' device).

    Each of `draws` seeded noises is added at its own strength (spread over `strength_range`); target and source
    predictions share one U-Net pass (2B rows). `progress(done, draws)` is called after each draw.
    """
    check_count(draws, "draws", "noise samples averaged into the map")
    sig = epsilon_schedule(scheduler, "The diffusers region modes")
    z = check_latent(latents, unet.config.in_channels)
    b = z.shape[0]
    timesteps = noise_difference_timesteps(strength_range, draws, len(sig.sigmas))
    context = torch.cat([_rows(target_embeddings, b), _rows(source_embeddings, b)])
    noise = seeded_noise(seed, tuple(z.shape), draws, z.device, z.dtype)
    eps_target, eps_source = [], []
    for d, t in enumerate(timesteps):
        sigma = sig.sigma(t)
        x = z + sigma * noise[d]
        eps = unet_eps(unet, torch.cat([x, x]), sigma, t, context)
        eps_target.append(eps[:b])
        eps_source.append(eps[b:])
        if progress is not None:
            progress(d + 1, draws)
    return noise_difference_map(torch.stack(eps_target), torch.stack(eps_source))


@torch.no_grad()
def diffusers_edit_attention(unet: torch.nn.Module, scheduler, latents: torch.Tensor,
                             target_embeddings: torch.Tensor, positions: Sequence[int], steps: int, seed: int,
                             strength: float, progress: Progress | None = None) -> torch.Tensor:
    """The edit words' cross-attention map [B, h, w] >= 0 (float32, on the latents' device).

    The latents are noised to `strength`, then `steps` Euler steps with the target description run down to sigma 0
    while every cross-attention layer records the probabilities of the context `positions` (from
    hosts.diffusers.tokens.hf_token_positions). `progress(done, steps)` is called after each step.
    """
    check_count(steps, "steps", "denoising steps whose attention is averaged")
    sig = epsilon_schedule(scheduler, "The diffusers region modes")
    z = check_latent(latents, unet.config.in_channels)
    b = z.shape[0]
    context = _rows(target_embeddings, b)
    if not positions or not all(0 <= p < context.shape[1] for p in positions):
        raise XMGIEInputError(f"The edit words' token positions {list(positions)} must be a non-empty list within "
                              f"the prompt's {context.shape[1]} tokens: find them with "
                              "hosts.diffusers.tokens.hf_token_positions(tokenizer, prompt, words).")
    timesteps = denoising_timesteps(strength, steps, len(sig.sigmas))
    sigmas = [sig.sigma(t) for t in timesteps] + [0.0]
    x = z + sigmas[0] * seeded_noise(seed, tuple(z.shape), 1, z.device, z.dtype)[0]
    maps = AttentionMaps(tuple(z.shape[-2:]), b)
    recorder = AttentionRecorder(torch.tensor(list(positions), dtype=torch.long), maps, tuple(z.shape[-2:]))
    with cross_attention_processors(unet, recorder):
        for i, t in enumerate(timesteps):
            denoised = x - sigmas[i] * unet_eps(unet, x, sigmas[i], t, context)
            x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
            if progress is not None:
                progress(i + 1, steps)
    return maps.mean()
