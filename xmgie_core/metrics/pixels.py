"""Pixel metrics on IMAGE tensors [1,H,W,3] in 0..1 (as read from 8-bit files, like the references read them).

  L1   = mean |x_edit - x_ref|            over channels and pixels     MagicBrush evaluation/image_eval.py eval_distance
  L2   = mean (x_edit - x_ref)^2          (nn.L1Loss / nn.MSELoss on ToTensor images; the edit is first resized to the
                                           reference's size with PIL bicubic, as `gen_img.resize(gt_img.size)` does)
  PSNR = 10 log10(1 / L2)                 data range 1 (skimage.metrics.peak_signal_noise_ratio); identical images: +inf
  SSIM = mean over RGB channels and the valid window positions of Wang et al. 2004 eq 13,
         (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
         Gaussian window 11x11, sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1; moments are Gaussian-weighted (no
         sample-covariance correction), computed PER CHANNEL on RGB (not on luminance), positions whose window would
         leave the image are not counted: skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
         use_sample_covariance=False, data_range=1, channel_axis=-1).
  IoU  = |P and G| / |P or G|             predicted vs ground-truth region, each binarised at 0.5 (masks.INSIDE)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import XMGIEInputError
from ..gaussian import gaussian_kernel_1d
from ..image_io import to_rgb8
from ..masks import binarize
from ..validation import check_mask

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
"""11x11 window: skimage's radius int(truncate * sigma + 0.5) with truncate 3.5."""
SSIM_K = (0.01, 0.03)


def resized_like(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`image` at the reference's size: unchanged when the sizes match, else its 8-bit RGB resized with PIL bicubic
    (MagicBrush's `gen_img.resize(gt_img.size)`, whose default filter is bicubic)."""
    h, w = reference.shape[1:3]
    if tuple(image.shape[1:3]) == (h, w):
        return image
    pil = Image.fromarray(to_rgb8(image)[0]).resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]


def _pair(edit: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return resized_like(edit, reference)[..., :3].double(), reference[..., :3].double()


def l1(edit: torch.Tensor, reference: torch.Tensor) -> float:
    """MagicBrush L1: mean absolute difference of the [0,1] images (module docstring)."""
    a, b = _pair(edit, reference)
    return float((a - b).abs().mean())


def l2(edit: torch.Tensor, reference: torch.Tensor) -> float:
    """MagicBrush L2: mean squared difference of the [0,1] images (nn.MSELoss; no square root)."""
    a, b = _pair(edit, reference)
    return float(((a - b) ** 2).mean())


def psnr(edit: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR = 10 log10(1 / MSE) in dB for data range 1; +inf for identical images."""
    mse = l2(edit, reference)
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _blur_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over [C,1,H,W], only where the whole window lies inside the image."""
    k = kernel.to(x)
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def ssim(edit: torch.Tensor, reference: torch.Tensor) -> float:
    """SSIM of Wang et al. 2004, per RGB channel, Gaussian 11x11 sigma 1.5 (module docstring)."""
    a, b = _pair(edit, reference)
    side = 2 * SSIM_RADIUS + 1
    if min(a.shape[1:3]) < side:
        raise XMGIEInputError(f"SSIM needs images of at least {side}x{side} pixels (its Gaussian window), got "
                              f"{a.shape[1]}x{a.shape[2]}. Evaluate larger images.")
    x, y = a[0].permute(2, 0, 1)[:, None], b[0].permute(2, 0, 1)[:, None]
    g = torch.from_numpy(gaussian_kernel_1d(SSIM_SIGMA, SSIM_RADIUS))
    mx, my = _blur_valid(x, g), _blur_valid(y, g)
    sxx = _blur_valid(x * x, g) - mx * mx
    syy = _blur_valid(y * y, g) - my * my
    sxy = _blur_valid(x * y, g) - mx * my
    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def region_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float | None:
    """IoU of two MASKs (same size, binarised at 0.5); None when both are empty (IoU undefined)."""
    p, g = binarize(check_mask(predicted, "predicted mask")), binarize(check_mask(truth, "ground-truth mask"))
    if p.shape != g.shape:
        raise XMGIEInputError(f"The predicted mask is {p.shape[1]}x{p.shape[2]} but the ground-truth mask "
                              f"{g.shape[1]}x{g.shape[2]}; region IoU compares masks of the same photo size.")
    union = int((p | g).sum())
    return None if union == 0 else int((p & g).sum()) / union
