"""The user's PFB choices, as a host's node or API passes them to its sampling loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..masks import RegionPyramid, is_empty
from ..errors import XMGIEInputError
from .source import SourceCache

SOURCE_MODES = ("noised", "inverted")


@dataclass
class PFBSettings:
    """Mask, layers (parse_layers' grammar), outside weight w, end fractions of the feature and latent blends,
    soft edge, source mode, and the source cache (None: a private cache of `cache_mb` for one run only)."""

    mask: torch.Tensor
    layers: str = "auto"
    outside_weight: float = 0.0
    blend_end: float = 1.0
    latent_end: float = 0.5
    soft_edge: bool = True
    source_mode: str = "noised"
    cache: SourceCache | None = None
    cache_mb: float = 1024.0
    progress: Callable[[int, int], None] | None = None
    """Progress of the inversion (and a place to raise on interrupt)."""

    def __post_init__(self) -> None:
        if self.source_mode not in SOURCE_MODES:
            raise XMGIEInputError(f"Unknown source_mode {self.source_mode!r}; use one of {', '.join(SOURCE_MODES)}.")
        self.region = RegionPyramid(self.mask, 0.5, name="The PFB mask", allow_empty=True)

    @property
    def empty(self) -> bool:
        return is_empty(self.region.mask)

    def private_or_shared_cache(self) -> SourceCache:
        return self.cache if self.cache is not None else SourceCache(self.cache_mb)
