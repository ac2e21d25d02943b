"""Host-agnostic pieces of a PFB run: recording the source branch's features, blending them into the edit
branch (eq 5), and serving each step's source features from the record or from a fresh source pass.

A host adapter calls `hook(layer, h)` at each blendable layer (ComfyUI block patches, diffusers module hooks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .blend import BlendPlan
from .source import Features, InvertedTrajectory, SourceCache, SourceRecord, features_nbytes, invert


class FeaturesComplete(Exception):
    """Raised by a recorder once it holds every layer it needs: the rest of the source pass is not run."""


class FeatureRecorder:
    """hook(layer, h) for the source pass: keeps h of the wanted layers (detached copies on `device`)."""

    def __init__(self, layers: list[str], device: torch.device | str, stop_early: bool):
        self.layers, self.device, self.stop_early = set(layers), device, stop_early
        self.features: Features = {}

    def __call__(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        if layer in self.layers:
            self.features[layer] = h.detach().to(self.device, copy=True)
            if self.stop_early and len(self.features) == len(self.layers):
                raise FeaturesComplete
        return h


class FeatureBlender:
    """hook(layer, h) for the edit pass: eq 5 with the source features on the active layers."""

    def __init__(self, plan: BlendPlan, features: Features, layers: list[str]):
        self.plan, self.features, self.layers = plan, features, set(layers)

    def __call__(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        if layer in self.layers:
            return self.plan.blend(layer, h, self.features[layer])
        return h


SourcePass = Callable[[torch.Tensor, float, FeatureRecorder], torch.Tensor | None]
"""source_pass(x_src, sigma, recorder): runs the host U-Net once on the source branch with `recorder` hooked in
and returns its denoised output (None when the recorder stopped it early)."""


@dataclass
class SourceBranch:
    """Each step's source features: from the record (a cache hit, or recorded during the inversion), else from
    one source pass on x_src(sigma), stored while the cache has room. `passes` counts the U-Net passes run."""

    trajectory: Callable[[float], torch.Tensor] | None
    """x_src(sigma); for `inverted` set once the inversion (which runs through this branch) is done."""
    run_pass: SourcePass
    layers: list[str]
    record: SourceRecord
    cache: SourceCache
    """Across runs (the node's cache), or a private one for this run when caching is off."""
    device: torch.device | str = "cpu"
    passes: int = 0

    def recorder(self, stop_early: bool) -> FeatureRecorder:
        return FeatureRecorder(self.layers, self.device, stop_early)

    def features(self, sigma: float) -> Features:
        found = self.record.get(sigma)
        if found is not None:
            return found
        recorder = self.recorder(stop_early=True)
        self.passes += 1
        try:
            self.run_pass(self.trajectory(sigma), sigma, recorder)
        except FeaturesComplete:
            pass
        self.keep(sigma, recorder.features)
        return recorder.features

    def denoise_and_keep(self, x: torch.Tensor, sigma: float, eval_sigma: float) -> torch.Tensor:
        """One full source pass at x (an inversion step): the denoised output, its features kept for `sigma`."""
        recorder = self.recorder(stop_early=False)
        self.passes += 1
        denoised = self.run_pass(x, eval_sigma, recorder)
        if sigma > 0 and self.record.get(sigma) is None:
            self.keep(sigma, recorder.features)
        return denoised

    def keep(self, sigma: float, features: Features) -> None:
        if self.cache.room(self.record, features_nbytes(features)):
            self.record.put(sigma, features)

    def invert(self, z: torch.Tensor, schedule: list[float], sigma_min: float,
               progress: Callable[[int, int], None] | None = None) -> InvertedTrajectory:
        """DDIM inversion of z up through the schedule's sigmas under the source conditioning, with
        d(x, sigma) = (x - D(x, sigma')) / sigma', sigma' = max(sigma, sigma_min) (the model is not evaluated at 0).
        Each pass's features are kept for its sigma: the edit's source passes at those sigmas are then free."""
        up = sorted({0.0, *(float(s) for s in schedule)})

        def derivative(x: torch.Tensor, sigma: float) -> torch.Tensor:
            at = max(sigma, sigma_min)
            return (x - self.denoise_and_keep(x, sigma, at)) / at

        return invert(derivative, z, up, progress)
