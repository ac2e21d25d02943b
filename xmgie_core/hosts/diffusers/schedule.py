"""Sampling schedules of diffusers' DDPM-family schedulers in k-diffusion's sigma space, x = z + sigma * eps with
sigma_t = sqrt((1 - alphabar_t) / alphabar_t), for every diffusers loop of the pack (PFB, the region modes)."""

from __future__ import annotations

import torch

from ...errors import XMGIEInputError


def epsilon_schedule(scheduler, what: str) -> "ScheduleSigmas":
    """The scheduler's sigmas; the pack's diffusers loops read the U-Net's output as a noise prediction."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind != "epsilon":
        raise XMGIEInputError(f"{what} needs an epsilon-prediction scheduler, got prediction_type {kind!r}: load the "
                              "checkpoint's scheduler with prediction_type='epsilon' (SD1.5 / SDXL base models).")
    return ScheduleSigmas(scheduler)


def unet_eps(unet: torch.nn.Module, x: torch.Tensor, sigma: float, timestep, context: torch.Tensor) -> torch.Tensor:
    """The U-Net's noise prediction for x = z + sigma * eps at `timestep` (its input is x / sqrt(1 + sigma^2))."""
    return unet(x / (1 + sigma**2) ** 0.5, timestep, encoder_hidden_states=context).sample


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
