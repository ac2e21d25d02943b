"""The PFB source branch: where the source latent is at each sigma, its features per step, and a cache of
both across runs.

Sigmas are k-diffusion's (x_sigma = z + sigma * eps for eps-prediction models); a host converts its own
parameterisation. Two trajectories:

  noised    x_src(sigma) = noise_scaling(sigma, n, z) with one fixed noise n (ComfyUI's noise_mask semantics)
  inverted  DDIM inversion: Euler steps of the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma
            upward from x(0) = z under the source conditioning,
              x(sigma_{i+1}) = x(sigma_i) + (sigma_{i+1} - sigma_i) * d(x(sigma_i), sigma_i),
            which retraces the source when sampled back down with the same steps (PFB-Diff's source branch).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

Features = dict[str, torch.Tensor]
SIGMA_RTOL = 1e-4
"""Two sigmas closer than this (relative) are the same step (samplers pass sigmas through float conversions)."""


def _same_sigma(a: float, b: float) -> bool:
    return abs(a - b) <= SIGMA_RTOL * max(abs(a), abs(b), 1e-8)


@dataclass
class InvertedTrajectory:
    """Points (sigma_i, x_i) of an inversion, ascending in sigma, and the derivative d_i at each but the last."""

    sigmas: list[float]
    latents: list[torch.Tensor]
    derivatives: list[torch.Tensor]

    def at(self, sigma: float) -> torch.Tensor:
        """x_src(sigma): a stored point, or between points one Euler step up from the nearest one below."""
        i = bisect.bisect_right(self.sigmas, sigma * (1 + SIGMA_RTOL)) - 1
        i = max(i, 0)
        if _same_sigma(self.sigmas[i], sigma) or i >= len(self.derivatives):
            return self.latents[i]
        return self.latents[i] + (sigma - self.sigmas[i]) * self.derivatives[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latents + self.derivatives)


def invert(derivative: Callable[[torch.Tensor, float], torch.Tensor], z: torch.Tensor, sigmas: Sequence[float],
           progress: Callable[[int, int], None] | None = None) -> InvertedTrajectory:
    """DDIM inversion of `z` through the ascending `sigmas` (the first is usually 0, where x = z)."""
    sigmas = [float(s) for s in sigmas]
    if any(b <= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"inversion sigmas must ascend, got {sigmas}")
    latents, derivatives = [z], []
    for i, (a, b) in enumerate(zip(sigmas, sigmas[1:])):
        d = derivative(latents[-1], a)
        derivatives.append(d)
        latents.append(latents[-1] + (b - a) * d)
        if progress is not None:
            progress(i + 1, len(sigmas) - 1)
    return InvertedTrajectory(sigmas, latents, derivatives)


def features_nbytes(features: Features) -> int:
    return sum(t.numel() * t.element_size() for t in features.values())


@dataclass
class SourceRecord:
    """What one source branch produced: features per step (by sigma) and, for `inverted`, the trajectory.
    `keep` holds the objects whose identity is part of the cache key, so their ids cannot be reused."""

    features: list[tuple[float, Features]] = field(default_factory=list)
    trajectory: InvertedTrajectory | None = None
    keep: tuple = ()
    nbytes: int = 0

    def get(self, sigma: float) -> Features | None:
        for s, feats in self.features:
            if _same_sigma(s, sigma):
                return feats
        return None

    def put(self, sigma: float, features: Features) -> None:
        self.features.append((sigma, features))
        self.nbytes += features_nbytes(features)

    def set_trajectory(self, trajectory: InvertedTrajectory) -> None:
        self.trajectory = trajectory
        self.nbytes += trajectory.nbytes


class SourceCache:
    """Source records by key, least recently used first out, at most `max_mb` in all.

    A record may grow during its run (features arrive step by step); `room(record, extra)` says whether it may
    take `extra` more bytes, evicting older records first. A record that alone exceeds the budget stops growing:
    its later steps are recomputed each run instead of stored.
    """

    def __init__(self, max_mb: float = 1024.0):
        self.max_bytes = int(max_mb * 2**20)
        self._records: OrderedDict[Any, SourceRecord] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def resize(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self._evict(keep=None)

    def record(self, key: Any, keep: tuple = ()) -> SourceRecord:
        """The record for `key`, created empty on a miss, and marked most recently used."""
        if key in self._records:
            self.hits += 1
            self._records.move_to_end(key)
            return self._records[key]
        self.misses += 1
        self._records[key] = SourceRecord(keep=keep)
        return self._records[key]

    def room(self, record: SourceRecord, extra: int) -> bool:
        self._evict(keep=record, need=extra)
        return self.nbytes + extra <= self.max_bytes

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def clear(self) -> None:
        self._records.clear()

    def _evict(self, keep: SourceRecord | None, need: int = 0) -> None:
        for key in list(self._records):
            if self.nbytes + need <= self.max_bytes:
                return
            if self._records[key] is not keep:
                del self._records[key]


def fingerprint(*parts: Any) -> str:
    """A digest of tensors (dtype, shape and values), numbers, strings, and containers of them; any other object
    by type and id (keep it alive while the digest is in use: `SourceRecord.keep`)."""
    h = hashlib.sha1()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                feed(item)
            h.update(b"]")
        elif x is None or isinstance(x, (bool, int, float, str, bytes)):
            h.update(repr(x).encode())
        else:
            h.update(f"<{type(x).__qualname__}@{id(x)}>".encode())

    for part in parts:
        feed(part)
    return h.hexdigest()
