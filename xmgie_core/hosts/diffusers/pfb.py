"""PFB on a diffusers UNet2DConditionModel: module hooks at the same fusion points as ComfyUI's block patches,
and a small edit loop over any diffusers scheduler of the DDPM family (epsilon prediction).

Fusion points in diffusers modules (LDM block k = the k-th resnet/attention unit in forward order):
- `input_k`: a forward pre-hook on the module after encoder unit k (h after it was kept as a skip, which stays
  unblended), the mid block after the last;
- `middle`: a forward hook on mid_block's output;
- `output_k`: a forward hook on decoder unit k's last module (its upsampler if it has one), i.e. h before the
  next unit concatenates its skip.

The loop works in the scheduler's own state space; the source trajectory lives in k-diffusion's sigma space
(x = z + sigma * eps, sigma_t = sqrt((1 - alphabar_t) / alphabar_t)) and is mapped with scheduler.add_noise,
which is affine in the noise, so any such scheduler (DDIM, Euler, DPM-Solver, ...) works.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ...errors import XMGIEInputError
from ...pfb import FeatureBlender, FeatureRecorder, PFBSettings, SourceBranch, UNetLayout, latent_blend
from ...pfb import run as pfb_run

Hook = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class FusionPoint:
    module: torch.nn.Module
    before: bool
    """True: blend the module's input (pre-hook); False: its output."""


def diffusers_fusion_points(unet: torch.nn.Module) -> tuple[UNetLayout, dict[str, FusionPoint]]:
    """The blendable layers of a UNet2DConditionModel in ComfyUI's names, and where each is blended."""
    enc_units: list[list[torch.nn.Module]] = [[unet.conv_in]]
    enc_scale = [1]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            enc_units.append([resnet] + ([attns[j]] if attns is not None else []))
            enc_scale.append(1)
        if block.downsamplers is not None:
            enc_units.append([block.downsamplers[0]])
            enc_scale.append(2)
    dec_units: list[list[torch.nn.Module]] = []
    dec_scale: list[int] = []
    for block in unet.up_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            unit = [resnet] + ([attns[j]] if attns is not None else [])
            last = j == len(block.resnets) - 1 and block.upsamplers is not None
            dec_units.append(unit + ([block.upsamplers[0]] if last else []))
            dec_scale.append(2 if last else 1)
    layout = UNetLayout.from_blocks(enc_scale, dec_scale)
    points = {f"input_{k}": FusionPoint(enc_units[k + 1][0] if k + 1 < len(enc_units) else unet.mid_block, True)
              for k in range(len(enc_units))}
    points["middle"] = FusionPoint(unet.mid_block, False)
    points.update({f"output_{k}": FusionPoint(unit[-1], False) for k, unit in enumerate(dec_units[:-1])})
    return layout, points


def _replace_first(value, new: torch.Tensor):
    return (new, *value[1:]) if isinstance(value, tuple) else new


@contextmanager
def fusion_hooks(points: dict[str, FusionPoint], layers: list[str], hook: Hook) -> Iterator[None]:
    """Within the block, `hook(layer, h)` runs at each of `layers` (and may replace h). Removed on exit."""
    handles = []
    for layer in layers:
        point = points[layer]
        if point.before:
            def pre(module, args, kwargs, layer=layer):
                if args:
                    return (hook(layer, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hook(layer, kwargs["hidden_states"])}
            handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output, layer=layer):
                h = output[0] if isinstance(output, tuple) else output
                return _replace_first(output, hook(layer, h))
            handles.append(point.module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ScheduleSigmas:
    """k-diffusion sigmas of a DDPM-family scheduler's timesteps, and the way back."""

    def __init__(self, scheduler):
        alphas = scheduler.alphas_cumprod.double()
        self.sigmas = ((1 - alphas) / alphas).sqrt()

    def sigma(self, t) -> float:
        return float(self.sigmas[int(t)])

    def timestep(self, sigma: float) -> int:
        return int((self.sigmas.log() - torch.tensor(max(sigma, 1e-12)).double().log()).abs().argmin())

    def percent_to_sigma(self, percent: float) -> float:
        return self.sigma(round((1 - percent) * (len(self.sigmas) - 1)))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])


@torch.no_grad()
def pfb_edit(unet: torch.nn.Module, scheduler, source: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
             source_cond: torch.Tensor, settings: PFBSettings, steps: int = 20, guidance: float = 7.5,
             strength: float = 1.0, generator: torch.Generator | None = None,
             on_branch: Callable[[SourceBranch], None] | None = None) -> torch.Tensor:
    """Edit `source` (a scaled latent [B,4,h,w]) with PFB; returns the edited latent.

    cond/uncond/source_cond are [1 or B, L, C] text embeddings; `strength` is the fraction of the schedule run
    (PFB-Diff's encode ratio). `on_branch` receives the source branch (its `passes` count the source U-Net passes).
    """
    if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
        raise XMGIEInputError("The diffusers PFB loop supports epsilon-prediction schedulers only.")
    z = source
    b = z.shape[0]
    sig = ScheduleSigmas(scheduler)
    layout, points = diffusers_fusion_points(unet)
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
            eps = unet(x / (1 + sigma**2) ** 0.5, sig.timestep(sigma), encoder_hidden_states=rows(source_cond)).sample
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
