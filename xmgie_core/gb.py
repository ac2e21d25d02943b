"""Gaussian-blur (GB) compositing, xMGIE [xMGIE] §3.6, eqs 18-19.

  D_edit   = distance transform of the binary edit mask M (each edited pixel's distance
             to the nearest unedited pixel);
  sigma(D) = sigma_max * exp(-D^2 / (2 sigma_s^2))                                  (eq 18)
  X_blur   = X_edit * (1 - M) + (X_edit * G_sigma(D)) * M                          (eq 19)

`gb_blur` is eq 19 as written. `gb_composite` blends an edit into its source with a soft edge
from the same machinery: alpha is the profile of a mask edge blurred with sigma(D) at each
pixel's distance D from the mask border (both sides), exactly 0 farther outside than
`edge_width` and exactly 1 farther inside, and out = source * (1 - alpha) + edit * alpha, so
far-outside pixels are the source bit for bit.

Images are [B,H,W,C] in 0..1, masks [B,H,W] or [H,W] (1 = edit), binarised at 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .distance import distance_to_boundary, distance_to_outside, window
from .errors import XMGIEInputError
from .gaussian import snap_sigma, variable_gaussian_blur
from .masks import binarize
from .validation import check_image, check_range, mask_for_image, matching_images

SIGMA_MAX = 5.0
SIGMA_SCALE = 10.0
EDGE_WIDTH = 16.0
SIGMA_MAX_RANGE = (0.0, 16.0)
"""Limits of the parameters (the node's widgets use the same): beyond them the blur's cost and memory grow
with sigma^2 for no visible gain (sigma 200 on a 128x128 image took 95 s)."""
SIGMA_SCALE_RANGE = (0.1, 256.0)
EDGE_WIDTH_RANGE = (0.0, 512.0)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GBResult:
    image: torch.Tensor
    """[B,H,W,C], the input's dtype and device."""
    mask: torch.Tensor
    """[B,H,W] float: blur mode, sigma(D)/sigma_max inside M (blur strength); composite, alpha."""


def sigma_map(distance: torch.Tensor, sigma_max: float = SIGMA_MAX, sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """Eq 18: sigma(D) = sigma_max * exp(-D^2 / (2 sigma_s^2)); +inf distance gives 0."""
    return sigma_max * torch.exp(-(distance * distance) / (2.0 * sigma_scale * sigma_scale))


def _check_params(sigma_max: float, sigma_scale: float) -> None:
    check_range(sigma_max, "sigma_max", *SIGMA_MAX_RANGE, hint="It is the blur at the mask border in pixels "
                "(paper default 5).")
    check_range(sigma_scale, "sigma_scale", *SIGMA_SCALE_RANGE, hint="It is how fast the blur fades with "
                "distance from the border, in pixels (paper default 10).")


def _to_bchw(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 3, 1, 2)


def active_distance(sigma_max: float, sigma_scale: float) -> float:
    """Distance beyond which sigma(D) <= snap_sigma(), i.e. eq 18 blurs nothing any more."""
    snap = snap_sigma()
    return sigma_scale * math.sqrt(2.0 * math.log(sigma_max / snap)) if sigma_max > snap else 0.0


def gb_blur(edited: torch.Tensor, mask: torch.Tensor, sigma_max: float = SIGMA_MAX,
            sigma_scale: float = SIGMA_SCALE, progress: Progress | None = None) -> GBResult:
    """Eq 19: X_blur = X_edit (1 - M) + (X_edit * G_sigma(D)) M, with sigma from eq 18.

    `progress(done, total)` is called per blur level (it may raise to interrupt)."""
    _check_params(sigma_max, sigma_scale)
    check_image(edited, "edited image")
    m = binarize(mask_for_image(mask, edited, "mask", "edited image"))
    d = distance_to_outside(m).to(edited.device)
    sigma = torch.where(m, sigma_map(d, sigma_max, sigma_scale), 0.0)
    image = variable_gaussian_blur(_to_bchw(edited), sigma, sigma_max, progress=progress).permute(0, 2, 3, 1)
    strength = sigma / sigma_max if sigma_max > 0 else sigma
    return GBResult(image, strength.to(edited.dtype))


def edge_alpha(mask: torch.Tensor, d_in: torch.Tensor, d_out: torch.Tensor, sigma_max: float = SIGMA_MAX,
               sigma_scale: float = SIGMA_SCALE, edge_width: float = EDGE_WIDTH) -> torch.Tensor:
    """Composite blend weight [B,H,W]: the profile a straight mask edge takes when blurred with
    the eq-18 sigma at each pixel's own distance D to the border (on either side),

      alpha = Phi((D_in - 1/2) / sigma(D_in)) inside,  Phi(-(D_out - 1/2) / sigma(D_out)) outside

    (the border lies half a pixel from the nearest pixel centres). As in the blur, sigma <=
    snap_sigma() means no blur (alpha = M); alpha is exactly 0 where D_out > edge_width and
    exactly 1 where D_in > edge_width. Computed only on the pixels near the border.
    """
    d = torch.where(mask, d_in, d_out)
    alpha = mask.float()
    band = (d < active_distance(sigma_max, sigma_scale)) & (d <= edge_width)
    db, inside = d[band], mask[band]
    signed = torch.where(inside, db - 0.5, 0.5 - db)
    alpha[band] = torch.special.ndtr(signed / sigma_map(db, sigma_max, sigma_scale))
    return alpha


def gb_composite(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, sigma_max: float = SIGMA_MAX,
                 sigma_scale: float = SIGMA_SCALE, edge_width: float = EDGE_WIDTH) -> GBResult:
    """out = source (1 - alpha) + edited alpha with alpha from `edge_alpha`.

    Pixels with alpha 0 (farther outside the mask than edge_width, or an empty mask) are the
    source exactly; pixels with alpha 1 are the edit exactly; only the others are blended. Work
    is done on the masks' bounding box grown by the edge; elsewhere the output is a source copy.
    """
    _check_params(sigma_max, sigma_scale)
    check_range(edge_width, "edge_width", *EDGE_WIDTH_RANGE, hint="It is the width of the blend zone in pixels.")
    check_image(edited, "edited image")
    check_image(source, "source image")
    edited, source = matching_images(edited, source, "edited image", "source image")
    m = binarize(mask_for_image(mask, edited, "mask", "edited image"))
    image = source.clone()
    alpha = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    if not bool(m.any()):
        return GBResult(image, alpha.to(edited.dtype))
    cap = min(edge_width, active_distance(sigma_max, sigma_scale))  # farther out, alpha is 0 anyway
    rows, cols = window(m.any(dim=0), int(min(cap, max(m.shape[1:]))) + 1)
    m_w, src_w, edit_w = m[:, rows, cols], source[:, rows, cols], edited[:, rows, cols]
    d_in, d_out = (d.to(edited.device) for d in distance_to_boundary(m_w))  # already windowed
    a_w = edge_alpha(m_w, d_in, d_out, sigma_max, sigma_scale, edge_width)
    out_w = torch.where(m_w.unsqueeze(-1), edit_w, src_w)
    soft = (a_w > 0) & (a_w < 1)
    out_w[soft] = torch.lerp(src_w[soft].float(), edit_w[soft].float(), a_w[soft].unsqueeze(-1)).to(image.dtype)
    image[:, rows, cols] = out_w
    alpha[:, rows, cols] = a_w
    return GBResult(image, alpha.to(edited.dtype))


MODES = ("composite", "blur")


def apply_gb(edited: torch.Tensor, mask: torch.Tensor, mode: str = "composite", source: torch.Tensor | None = None,
             sigma_max: float = SIGMA_MAX, sigma_scale: float = SIGMA_SCALE,
             edge_width: float = EDGE_WIDTH, progress: Progress | None = None) -> GBResult:
    """Run GB in `mode`: "composite" (needs `source`) or "blur" (eq 19; `source` unused)."""
    if mode == "blur":
        return gb_blur(edited, mask, sigma_max, sigma_scale, progress)
    if mode != "composite":
        raise XMGIEInputError(f"Unknown GB mode {mode!r}; use one of {', '.join(MODES)}.")
    if source is None:
        raise XMGIEInputError(
            "GB mode 'composite' blends the edit into the source image, but no source image was given: "
            "connect the original (unedited) image to the 'source' input (--source on the command line), "
            "or switch mode to 'blur'."
        )
    return gb_composite(edited, source, mask, sigma_max, sigma_scale, edge_width)
