"""One PFB run's setup, the same on every host: the blend plan from the settings and the model's layout, the
source latent checked once, and the source branch opened (cache record, fixed noise or DDIM inversion).

A host supplies only what is its own: its layout (which blocks are fusion points), `percent_to_sigma`, a way to
run one source pass (`SourcePass`), what identifies the model and source conditioning in the cache key, and how
its schedule scales noise.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import XMGIEInputError
from .blend import BlendPlan, BlockLayout, parse_layers
from .branch import SourceBranch, SourcePass
from .settings import PFBSettings
from .source import fingerprint

SOURCE_NOISE_SEED = 0
"""`noised` mode's fixed source noise: independent of the edit's seed, so a new seed reuses the source cache."""
NoiseScaling = Callable[[float, torch.Tensor, torch.Tensor], torch.Tensor]
"""noise_scaling(sigma, noise, z): the noised latent at sigma (epsilon models: z + sigma * noise)."""


def check_source_latent(z: torch.Tensor, channels: int, settings: PFBSettings) -> torch.Tensor:
    """The source latent must be in the model's latent format ([B, channels, h, w], or [B, channels, 1, h, w] for a
    video-VAE image model such as Qwen-Image) and match the mask's batch and aspect ratio."""
    image = z.ndim == 4 or (z.ndim == 5 and z.shape[2] == 1)
    if not image or z.shape[1] != channels:
        raise XMGIEInputError(
            f"The latent has shape {tuple(z.shape)} but this model works on [batch, {channels}, height, width] "
            "latents: encode the source image with this model's VAE (VAE Encode), not another model's.")
    b, h, w = z.shape[0], *z.shape[-2:]
    coverage = settings.region.coverage(h, w)  # raises on another aspect ratio
    if coverage.shape[0] not in (1, b):
        raise XMGIEInputError(f"The PFB mask has batch {coverage.shape[0]} but the latent batch is {b}; give one "
                              "mask, or one per latent.")
    return z


def plan(settings: PFBSettings, layout: BlockLayout, z: torch.Tensor, channels: int,
         percent_to_sigma: Callable[[float], float]) -> BlendPlan:
    """The run's BlendPlan (layers parsed against the model's layout, eqs 5 and 23 windows in sigma), after the
    source latent's one check. A layer with outside weight 1 blends nothing (alpha_l = 1, eq 5: F_B = F_G) and is
    left out, so no source pass runs for it: outside_weight 1 is the latent blend (eq 23) alone."""
    check_source_latent(z, channels, settings)
    layers = parse_layers(settings.layers, layout, settings.outside_weight, settings.blend_end)
    return BlendPlan.build([b for b in layers if b.weight < 1.0], settings.region, settings.soft_edge,
                           settings.latent_end, percent_to_sigma)


def epsilon_noise_scaling(sigma: float, noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return z + sigma * noise


def open_source_branch(settings: PFBSettings, blend_plan: BlendPlan, z: torch.Tensor, schedule: list[float],
                       sigma_min: float, run_pass: SourcePass, model_key: tuple, keep: tuple,
                       device: torch.device | str, noise_scaling: NoiseScaling = epsilon_noise_scaling
                       ) -> SourceBranch:
    """The source branch x_src(sigma): `noised`, z plus one fixed noise (SOURCE_NOISE_SEED); `inverted`, the DDIM
    inversion of z along `schedule` (run now unless cached). Its features come from the cache record keyed by the
    mode, z, the blended layers and `model_key` (the host's model and source-conditioning identity); `keep` holds
    the objects that key refers to alive."""
    names = list(blend_plan.layers)
    cache = settings.private_or_shared_cache()
    if settings.source_mode == "noised":
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(SOURCE_NOISE_SEED)).to(z)
        key = fingerprint("noised", z, SOURCE_NOISE_SEED, names, *model_key)
    else:
        key = fingerprint("inverted", z, schedule, names, *model_key)
    record = cache.record(key, keep)
    branch = SourceBranch(None, run_pass, names, record, cache, device)
    if settings.source_mode == "noised":
        branch.trajectory = lambda sigma: noise_scaling(sigma, noise, z)
    else:
        if record.trajectory is None:
            record.set_trajectory(branch.invert(z, schedule, sigma_min, settings.progress))
        branch.trajectory = record.trajectory.at
    return branch
