"""Image files <-> ComfyUI tensors, for the headless CLI (PIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import XMGIEInputError


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise XMGIEInputError(f"Image file not found: {path}")
    return Image.open(path)


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IMAGE [1,H,W,3] in 0..1, and the MASK [1,H,W] = 1 - alpha if the file has an alpha
    channel (ComfyUI LoadImage's convention: transparent = edit), else None."""
    img = _open(path)
    rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
    if "A" not in img.getbands():
        return rgb, None
    alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    return rgb, torch.from_numpy(1.0 - alpha)[None]


def load_mask(path: Path) -> torch.Tensor:
    """MASK [1,H,W] from a greyscale file: white = edit."""
    return torch.from_numpy(np.asarray(_open(path).convert("L"), dtype=np.float32) / 255.0)[None]


def save_image(image: torch.Tensor, path: Path) -> Path:
    """Save the first item of an IMAGE [B,H,W,C] or MASK [B,H,W] as an 8-bit PNG."""
    arr = image[0].detach().float().cpu().clamp(0, 1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(path)
    return path
