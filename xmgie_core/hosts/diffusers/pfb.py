"""PFB on a diffusers UNet2DConditionModel: module hooks at the same fusion points as ComfyUI's block patches
(unet.fusion_points), and a small edit loop over any diffusers scheduler of the DDPM family (epsilon prediction).

The loop works in the scheduler's own state space; the source trajectory lives in k-diffusion's sigma space
(x = z + sigma * eps, sigma_t = sqrt((1 - alphabar_t) / alphabar_t)) and is mapped with scheduler.add_noise,
which is affine in the noise, so any such scheduler (DDIM, Euler, DPM-Solver, ...) works.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...pfb import FeatureBlender, FeatureRecorder, PFBSettings, SourceBranch, latent_blend
from ...pfb import run as pfb_run
from .schedule import epsilon_schedule, unet_eps
from .unet import fusion_hooks, fusion_points


@torch.no_grad()
def pfb_edit(unet: torch.nn.Module, scheduler, source: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
             source_cond: torch.Tensor, settings: PFBSettings, steps: int = 20, guidance: float = 7.5,
             strength: float = 1.0, generator: torch.Generator | None = None,
             on_branch: Callable[[SourceBranch], None] | None = None) -> torch.Tensor:
    """Edit `source` (a scaled latent [B,4,h,w]) with PFB; returns the edited latent.

    cond/uncond/source_cond are [1 or B, L, C] text embeddings; `strength` is the fraction of the schedule run
    (PFB-Diff's encode ratio). `on_branch` receives the source branch (its `passes` count the source U-Net passes).
    """
    sig = epsilon_schedule(scheduler, "The diffusers PFB loop")
    z = source
    b = z.shape[0]
    layout, points = fusion_points(unet)
    plan = pfb_run.plan(settings, layout, z, unet.config.out_channels, sig.percent_to_sigma)
    m = plan.latent_mask(*z.shape[-2:], z.device)
    scheduler.set_timesteps(steps)
    start = len(scheduler.timesteps) - max(1, round(steps * strength))
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    names = list(plan.layers)
    rows = lambda c: c.expand(b, -1, -1) if c.shape[0] == 1 else c  # noqa: E731

    def run_pass(x: torch.Tensor, sigma: float, recorder: FeatureRecorder) -> torch.Tensor:
        with fusion_hooks(points, names, recorder):
            eps = unet_eps(unet, x, sigma, sig.timestep(sigma), rows(source_cond))
        return x - sigma * eps

    schedule = [sig.sigma(t) for t in timesteps]
    branch = pfb_run.open_source_branch(settings, plan, z, schedule, sig.sigma_min, run_pass,
                                        ("diffusers", id(unet), source_cond), (unet,), z.device)
    if on_branch is not None:
        on_branch(branch)

    def state(sigma: float, t) -> torch.Tensor:
        """x_src(sigma) in the scheduler's state space at timestep t (add_noise is affine in the noise)."""
        return scheduler.add_noise(z, (branch.trajectory(sigma) - z) / sigma, torch.tensor([int(t)]))

    x = state(schedule[0], timesteps[0]) if settings.source_mode == "inverted" else \
        scheduler.add_noise(z, torch.randn(z.shape, generator=generator).to(z), timesteps[:1])
    for i, t in enumerate(timesteps):
        sigma = schedule[i]
        layers = plan.active_layers(sigma)
        blender = FeatureBlender(plan, branch.features(sigma), layers) if layers else (lambda layer, h: h)
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        with fusion_hooks(points, layers, blender):
            eps_u, eps_c = unet(x_in, t, encoder_hidden_states=torch.cat([rows(uncond), rows(cond)])).sample.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        if plan.latent_active(sigma):
            x = latent_blend(x, state(schedule[i + 1], timesteps[i + 1]) if i + 1 < len(timesteps) else z, m)
    return latent_blend(x, z, m) if plan.latent_to_end else x
