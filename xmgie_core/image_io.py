"""Image files <-> ComfyUI tensors, for the headless CLI (PIL).

Read as ComfyUI's LoadImage reads them (EXIF orientation applied; transparent = edit), but without its
losses: 16-bit greyscale keeps its full range (LoadImage clips it), and transparency stored as a palette
or colour key becomes the mask too. Anything that cannot be read faithfully is refused with the reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import XMGIEInputError
from .validation import rgb_image

FORMATS_HINT = "Give a PNG, JPEG, WebP or TIFF image."


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise XMGIEInputError(f"Image file not found: {path}")
    if path.stat().st_size == 0:
        raise XMGIEInputError(f"{path} is empty (0 bytes). {FORMATS_HINT}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise XMGIEInputError(f"{path} could not be read as an image ({e}). {FORMATS_HINT}") from None
    return ImageOps.exif_transpose(img)


def _high_depth(img: Image.Image, path: Path) -> np.ndarray:
    """Greyscale [H,W] in 0..1 from a 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") image."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        return arr.astype(np.float32) / 65535.0
    if img.mode == "F" and arr.min() >= 0 and arr.max() <= 1:
        return arr.astype(np.float32)
    raise XMGIEInputError(
        f"{path} is a {img.mode!r} image with values {arr.min()}..{arr.max()}, which do not map to 0..1 "
        "unambiguously. Save it as an 8- or 16-bit image."
    )


def _pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB [H,W,3], alpha [H,W] or None), float32 in 0..1."""
    if "transparency" in img.info and img.mode in ("1", "L", "P", "RGB"):
        img = img.convert("RGBA")  # palette or colour-key transparency -> an alpha channel
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        grey = _high_depth(img, path)
        return np.repeat(grey[..., None], 3, axis=-1), None
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0 if "A" in img.getbands() else None
    return rgb, alpha


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IMAGE [1,H,W,3] in 0..1, and the MASK [1,H,W] = 1 - alpha if the file has transparency
    (an alpha channel, a palette or a colour key; ComfyUI LoadImage's convention: transparent = edit),
    else None."""
    rgb, alpha = _pixels(_open(path), path)
    mask = None if alpha is None else torch.from_numpy(1.0 - alpha)[None]
    return torch.from_numpy(rgb)[None], mask


def load_mask(path: Path) -> torch.Tensor:
    """MASK [1,H,W] from a greyscale file: white = edit (colour files are converted to luminance)."""
    img = _open(path)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return torch.from_numpy(_high_depth(img, path))[None]
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]


def check_out_dir(out: Path) -> Path:
    """An output folder that exists or can be created, and is writable; checked before any work, so an
    error leaves nothing behind. Nothing is created here."""
    if out.exists() and not out.is_dir():
        raise XMGIEInputError(f"--out {out} is an existing file, not a folder. Give a folder path "
                              "(it is created if missing).")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise XMGIEInputError(f"--out {out} cannot be created: {existing} is a file, not a folder. "
                              "Choose a folder path whose parents are folders.")
    try:  # a real write probe: permissions, read-only file systems and root's bypass of them alike
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise XMGIEInputError(f"--out {out} cannot be created or written in {existing} ({e.strerror}). "
                              "Choose a folder you can write to.") from None
    return out


def unused_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> str:
    """`stem`, else `stem_2`, `stem_3`, ...: the first for which no `folder / (stem + suffix)` exists, so a run never
    replaces an earlier run's files."""
    candidate, n = stem, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def to_rgb8(image: torch.Tensor) -> list[np.ndarray]:
    """IMAGE [B,H,W,C] in 0..1 -> uint8 RGB arrays [H,W,3] (validation.rgb_image: greyscale repeated, alpha
    dropped)."""
    arr = (rgb_image(image).detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [np.ascontiguousarray(a) for a in arr]


def save_image(image: torch.Tensor, path: Path) -> Path:
    """Save the first item of an IMAGE [B,H,W,C] or MASK [B,H,W] as an 8-bit PNG."""
    arr = image[0].detach().float().cpu().clamp(0, 1).numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(path)
    except OSError as e:
        raise XMGIEInputError(f"Could not write {path} ({e}). Check the free space and permissions of the "
                              "output folder.") from None
    return path
