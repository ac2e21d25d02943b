"""Progressive Feature Blending (PFB), xMGIE [xMGIE] §3.3, eqs 5-6 (PFB-Diff), and latent blending
([Regions] App. A.3, eq 23).

At a layer l (a U-Net block, or a DiT block's image tokens) the edit branch's features F_G are blended with the source branch's F_X of the same step:

  F_B = alpha_l * F_G + (1 - alpha_l) * F_X                                  (eq 5)
  alpha_l = M_l + (1 - M_l) * w_l                                           (spatial alpha, PFB-Diff)

with M_l the edit mask on layer l's grid (binary, or the covered fraction of each cell for a soft edge) and
w_l the layer's weight outside the mask (0 = pure source, PFB-Diff; 0.5 = the paper's initial alpha). Outside
the mask the latent also stays on the source trajectory for part of the schedule:

  z = m * z_model + (1 - m) * z_src                                          (eq 23)

Layers are named in ComfyUI's terms. U-Net: `input_k` is the output of encoder block k after it was pushed as a
skip (the skip stays unblended), `middle` the middle block's output, `output_k` the output of decoder block k. DiT
(Flux, Qwen-Image): `double_k` is the generated image's tokens after double-stream (joint) block k, `single_k`
after Flux's single-stream block k, laid out on the patchified latent's grid (text and reference-image tokens are
never blended).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..masks import RegionPyramid
from ..errors import XMGIEInputError
from ..validation import check_range


def blend_features(f_edit: torch.Tensor, f_source: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq 5: F_B = alpha * F_G + (1 - alpha) * F_X (alpha broadcasts over channels)."""
    return torch.lerp(f_source, f_edit, alpha.to(f_edit.dtype))


def layer_alpha(region: torch.Tensor, weight: float) -> torch.Tensor:
    """alpha_l = M_l + (1 - M_l) w_l: 1 inside the mask, w_l outside, in between on a soft edge."""
    return region + (1.0 - region) * weight


def latent_blend(z_model: torch.Tensor, z_source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq 23: z = m * z_model + (1 - m) * z_src."""
    return torch.lerp(z_source, z_model, mask.to(z_model.dtype))


# ------------------------------------------------------------------------------------------ layers

@dataclass(frozen=True)
class BlockLayout:
    """The blendable layers of a model, in forward order, with the downsampling factor of each layer's
    input and output (1 = latent resolution), and the layers `auto` selects (None: the U-Net rule)."""

    factors: dict[str, tuple[int, int]]
    auto: tuple[str, ...] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.factors)

    @classmethod
    def from_blocks(cls, encoder: list[int], decoder: list[int]) -> "BlockLayout":
        """From the per-block scale changes: encoder[k] = 2 if encoder block k downsamples else 1, decoder[k]
        = 2 if decoder block k upsamples; the last decoder block feeds the output head and is not blendable."""
        factors: dict[str, tuple[int, int]] = {}
        f = 1
        for k, step in enumerate(encoder):
            factors[f"input_{k}"] = (f, f * step)
            f *= step
        factors["middle"] = (f, f)
        for k, step in enumerate(decoder[:-1]):
            factors[f"output_{k}"] = (f, f // step)
            f //= step
        return cls(factors)

    @classmethod
    def from_dit(cls, double: int, single: int, patch: int) -> "BlockLayout":
        """A DiT's blocks (`double_0..`, then Flux's `single_0..`), all on the patchified grid (factor `patch`).
        `auto` is the first half of the blocks in forward order: layout and identity are settled early in a DiT,
        and PFB's source pass then stops halfway."""
        names = [f"double_{k}" for k in range(double)] + [f"single_{k}" for k in range(single)]
        return cls({n: (patch, patch) for n in names}, tuple(names[:(len(names) + 1) // 2]))

    def default_layers(self) -> list[str]:
        """`auto` where the layout names it (DiT); else every layer whose input and output lie on the U-Net's two
        coarsest grids: SD1.5 input_7-11, middle,
        output_0-4 (PFB-Diff's high-level layers, plus input_11, whose output is the middle block's input on the
        same 8x8 grid); SDXL input_4-8, middle, output_0-4; a one-level U-Net, all of them."""
        if self.auto is not None:
            return list(self.auto)
        coarse = sorted({f for pair in self.factors.values() for f in pair})[-2:]
        return [n for n, (a, b) in self.factors.items() if a in coarse and b in coarse]


@dataclass(frozen=True)
class LayerBlend:
    """Blend layer `name` with outside weight `weight` while the schedule is before `end` (a fraction)."""

    name: str
    weight: float
    end: float


_ENTRY = re.compile(r"^(auto|middle|(input|output|double|single)_(\d+)(?:-(\d+))?)(?::([^@]+))?(?:@(.+))?$")


def parse_layers(spec: str, layout: BlockLayout, weight: float, end: float) -> list[LayerBlend]:
    """Layers from a comma-separated spec: `auto` (layout.default_layers), `middle`, `input_7`, `output_0-4`
    (U-Net), `double_8-14`, `single_0-9` (DiT), each optionally `:w` (outside weight) and `@e` (end fraction),
    e.g. "input_7-10, middle, output_0-4:0.5@0.6".
    Unsuffixed entries take `weight` and `end`. A later entry for the same layer replaces an earlier one."""
    check_range(weight, "outside_weight", 0.0, 1.0, "0 = the source's features outside the mask, 1 = the edit's.")
    check_range(end, "blend_end_percent", 0.0, 1.0)
    chosen: dict[str, LayerBlend] = {}
    for entry in (e.strip().replace(" ", "") for e in spec.split(",")):
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise XMGIEInputError(f"Cannot read the layer entry {entry!r}. Write names such as 'auto', 'middle', "
                                  "'input_7', 'output_0-4' (U-Net) or 'double_8-14', 'single_0-9' (DiT), optionally "
                                  "with ':weight' and '@end', e.g. 'output_0-4:0.5@0.6'.")
        names = _expand(m, layout)
        w = _number(m.group(5), weight, entry, "weight")
        e = _number(m.group(6), end, entry, "end")
        for name in names:
            chosen[name] = LayerBlend(name, w, e)
    if not chosen:
        raise XMGIEInputError("No PFB layer selected: write 'auto' or layer names such as 'middle, output_0-4'. "
                              f"This model's layers: {', '.join(layout.names)}.")
    return [chosen[n] for n in layout.names if n in chosen]


def _expand(m: re.Match, layout: BlockLayout) -> list[str]:
    if m.group(1) == "auto":
        return layout.default_layers()
    if m.group(1) == "middle":
        names = ["middle"]
    else:
        first = int(m.group(3))
        last = int(m.group(4)) if m.group(4) is not None else first
        if last < first:
            raise XMGIEInputError(f"The layer range {m.group(1)!r} runs backwards; write it low to high.")
        names = [f"{m.group(2)}_{k}" for k in range(first, last + 1)]
    missing = [n for n in names if n not in layout.factors]
    if missing:
        raise XMGIEInputError(f"This model has no layer {', '.join(missing)}. Its layers are: "
                              f"{', '.join(layout.names)}.")
    return names


def _number(text: str | None, default: float, entry: str, what: str) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise XMGIEInputError(f"The {what} in layer entry {entry!r} is not a number.") from None
    if not 0.0 <= value <= 1.0:
        raise XMGIEInputError(f"The {what} in layer entry {entry!r} must be between 0 and 1, got {value}.")
    return value


# ------------------------------------------------------------------------------------------ plan

@dataclass
class BlendPlan:
    """Where (layers, mask) and when (sigma thresholds) PFB blends; hosts resolve schedule fractions to
    sigmas with their own percent_to_sigma, so gating is by the current sigma."""

    layers: dict[str, LayerBlend]
    region: RegionPyramid
    soft_edge: bool
    layer_sigma_end: dict[str, float]
    """A layer blends while sigma >= this (its end fraction of the schedule)."""
    latent_sigma_end: float
    """The latent outside the mask stays on the source trajectory while sigma >= this."""
    latent_to_end: bool
    """The latent blend lasts the whole schedule: the result outside the mask is the source exactly."""

    @classmethod
    def build(cls, layers: list[LayerBlend], region: RegionPyramid, soft_edge: bool, latent_end: float,
              percent_to_sigma) -> "BlendPlan":
        check_range(latent_end, "latent_blend_end_percent", 0.0, 1.0)
        return cls({b.name: b for b in layers}, region, soft_edge,
                   {b.name: _sigma_end(b.end, percent_to_sigma) for b in layers},
                   _sigma_end(latent_end, percent_to_sigma), latent_end >= 1.0)

    def active_layers(self, sigma: float) -> list[str]:
        return [n for n, s in self.layer_sigma_end.items() if sigma >= s * (1 - 1e-5)]

    def latent_active(self, sigma: float) -> bool:
        return sigma >= self.latent_sigma_end * (1 - 1e-5)

    def alpha(self, layer: str, h: int, w: int, device: torch.device) -> torch.Tensor:
        """alpha_l [B or 1, 1, h, w] for `layer` at an h x w grid."""
        region = self.region.coverage(h, w, device) if self.soft_edge else \
            self.region.grid(h, w, device).view(-1, h, w)
        return layer_alpha(region, self.layers[layer].weight)[:, None]

    def latent_mask(self, h: int, w: int, device: torch.device, ndim: int = 4) -> torch.Tensor:
        """m [B or 1, 1, h, w] for eq 23 at the latent grid (always the covered fraction: soft at the border);
        [B or 1, 1, 1, h, w] for a 5-d latent [B, C, 1, h, w] (a video VAE's image, e.g. Qwen-Image)."""
        m = self.region.coverage(h, w, device)[:, None]
        return m[:, :, None] if ndim == 5 else m

    def blend(self, layer: str, h: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Eq 5 on a batch h [n*B, C, H, W] whose n row chunks (cond, uncond, ...) each match the source
        features' B rows."""
        b = source.shape[0]
        if h.shape[0] % b:
            raise XMGIEInputError(f"PFB: {h.shape[0]} feature rows at layer {layer} are not a multiple of the "
                                  f"source branch's batch {b}.")
        n = h.shape[0] // b
        alpha = self.alpha(layer, h.shape[-2], h.shape[-1], h.device)
        if alpha.shape[0] not in (1, b):
            raise XMGIEInputError(f"The PFB mask has batch {alpha.shape[0]} but the latent batch is {b}; give one "
                                  "mask, or one per latent.")
        chunks = h.reshape(n, b, *h.shape[1:])  # broadcast the source over the chunks instead of copying it
        return blend_features(chunks, source.to(h.device, h.dtype)[None], alpha[None]).reshape(h.shape)


def _sigma_end(fraction: float, percent_to_sigma) -> float:
    """Blending lasts while sigma >= percent_to_sigma(fraction); fraction 1 means to the end (sigma 0)."""
    return 0.0 if fraction >= 1.0 else float(percent_to_sigma(fraction))
