"""Shape and value checks on ComfyUI's data conventions.

IMAGE is float [B,H,W,C] in 0..1, MASK is float [B,H,W] or [H,W] in 0..1 with 1 = edit.
Nothing is resized or silently changed: mismatches raise XMGIEInputError naming both shapes.
"""

from __future__ import annotations

import torch

from .errors import XMGIEInputError


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def check_finite(t: torch.Tensor, name: str) -> None:
    """Reject NaN or infinite values, which would spread through every blend.

    A finite sum proves every element finite (cheap); otherwise the elements are checked.
    """
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise XMGIEInputError(
            f"{name} contains NaN or infinite values; check the node that produced it (a float16 overflow "
            "in a VAE decode or a division by zero in a mask operation are the usual causes)."
        )


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Validate an IMAGE [B,H,W,C]; returns it unchanged."""
    if image.ndim != 4:
        raise XMGIEInputError(
            f"{name} must be an IMAGE of shape [batch, height, width, channels], got shape {_shape(image)}."
        )
    _check_values(image, name, "IMAGE")
    return image


def rgb_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A checked IMAGE as the RGB a model reads: greyscale (1 channel) and greyscale + alpha (2) repeated to three
    channels, RGBA's alpha dropped (nothing in the colours changes); any other channel count is an error."""
    check_image(image, name)
    channels = image.shape[-1]
    if channels in (1, 2):
        return image[..., :1].expand(*image.shape[:-1], 3)
    if channels in (3, 4):
        return image[..., :3]
    raise XMGIEInputError(f"{name} has {channels} channels (shape {_shape(image)}); an IMAGE has 3 (RGB), or 1, 2 "
                          "or 4 (greyscale, greyscale + alpha, RGBA). Convert it to RGB first.")


def check_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Validate a MASK [B,H,W] or [H,W] (float, finite); returns it as [B,H,W]."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise XMGIEInputError(
            f"{name} must be a MASK of shape [batch, height, width] or [height, width], got shape {_shape(mask)}."
        )
    _check_values(mask, name, "MASK")
    return mask


def _check_values(t: torch.Tensor, name: str, kind: str) -> None:
    """Float, at least one element, finite."""
    if not t.is_floating_point():
        raise XMGIEInputError(f"{name} must be a float {kind} in 0..1, got dtype {t.dtype}.")
    if min(t.shape) == 0:
        raise XMGIEInputError(f"{name} is empty (shape {_shape(t)}); connect a {kind.lower()} with at least one "
                              "pixel.")
    check_finite(t, name)


def check_range(value: float, name: str, low: float, high: float, hint: str = "") -> float:
    """A finite number within [low, high] (the node widget's limits), else an error saying the allowed range."""
    if not low <= value <= high:  # also false for NaN
        raise XMGIEInputError(f"{name} must be between {low:g} and {high:g}, got {value}.{' ' + hint if hint else ''}")
    return float(value)


def check_percent_window(start: float, end: float) -> None:
    """A start/end fraction of the sampling schedule: 0 <= start < end <= 1."""
    check_range(start, "start_percent", 0.0, 1.0)
    check_range(end, "end_percent", 0.0, 1.0)
    if start >= end:
        raise XMGIEInputError(f"start_percent ({start}) must be below end_percent ({end}); "
                              "with start >= end the node would never act.")


def mask_for_image(mask: torch.Tensor, image: torch.Tensor, mask_name: str = "mask",
                   image_name: str = "image") -> torch.Tensor:
    """Return `mask` as [B,H,W] matching `image` [B,H,W,C].

    A [H,W] or batch-1 mask broadcasts over the image batch; any other batch or size
    mismatch raises an error naming both shapes (no silent resize).
    """
    mask = check_mask(mask, mask_name)
    b, h, w = image.shape[0], image.shape[1], image.shape[2]
    if tuple(mask.shape[1:]) != (h, w):
        raise XMGIEInputError(
            f"{mask_name} size {mask.shape[1]}x{mask.shape[2]} (shape {_shape(mask)}) does not match "
            f"{image_name} size {h}x{w} (shape {_shape(image)}). Resize one of them first "
            "(e.g. with ComfyUI's ImageScale / a mask resize node)."
        )
    if mask.shape[0] not in (1, b):
        raise XMGIEInputError(
            f"{mask_name} batch {mask.shape[0]} (shape {_shape(mask)}) does not match {image_name} batch {b} "
            f"(shape {_shape(image)}); give one mask per image or a single mask for all."
        )
    return mask.expand(b, h, w)


def matching_images(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast two IMAGEs over batch (size 1 broadcasts); sizes and channels must match."""
    if a.shape[1:] != b.shape[1:]:
        raise XMGIEInputError(
            f"{a_name} (shape {_shape(a)}) and {b_name} (shape {_shape(b)}) differ in size or channels; "
            "they must have the same height, width and channels."
        )
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise XMGIEInputError(
            f"{a_name} batch {a.shape[0]} (shape {_shape(a)}) does not match {b_name} batch {b.shape[0]} "
            f"(shape {_shape(b)}); use equal batches or a batch of 1."
        )
    n = max(a.shape[0], b.shape[0])
    return a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])
