"""Generate the sample images of the GB workflow and its thumbnail (their provenance; deterministic).

- xmgie_astronaut_source.png: scikit-image's `data.astronaut()` (public-domain NASA photo), 512x512 RGB.
- xmgie_astronaut_edit.png: a stand-in for a generator's edit of it, "give her a red scarf": the dark
  collar inside an ellipse around the neck recoloured red, plus a mild global brightness drift (as an
  edit model's output has), so a hard paste would show a seam. Saved RGBA with alpha 0 inside the edit
  region and 255 outside: ComfyUI's LoadImage gives MASK = 1 - alpha = 1 in the region.
- ../xmgie_gb_composite.jpg: source | edit | the pack's own GB composite (xmgie_core.gb, defaults).

Run from anywhere: python workflows/assets/make_samples.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent
REPO_ROOT = ASSETS.parents[1]
SOURCE_PNG = ASSETS / "xmgie_astronaut_source.png"
EDIT_PNG = ASSETS / "xmgie_astronaut_edit.png"
THUMBNAIL = REPO_ROOT / "workflows" / "xmgie_gb_composite.jpg"

CENTER = (214, 218)  # (row, col) of the collar
RADII = (34, 62)  # (rows, cols) of the edit ellipse
SCARF_RGB = np.array([225.0, 35.0, 40.0])
DRIFT_GAIN, DRIFT_OFFSET = 1.06, 6.0  # global brightness drift of the "generated" image


def source_image() -> np.ndarray:
    """The source photo, uint8 [512,512,3]."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, :3])


def edit_region(shape: tuple[int, int]) -> np.ndarray:
    """Boolean [H,W] ellipse around the collar: the edit region (mask = 1)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return ((rows - CENTER[0]) / RADII[0]) ** 2 + ((cols - CENTER[1]) / RADII[1]) ** 2 <= 1.0


def edited_rgba(source: np.ndarray) -> np.ndarray:
    """uint8 [H,W,4]: RGB = drifted source with a red scarf in the region; alpha = 0 in the region."""
    region = edit_region(source.shape[:2])
    rgb = source.astype(np.float64) * DRIFT_GAIN + DRIFT_OFFSET
    luminance = source.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    scarf = (0.55 + 0.9 * luminance)[..., None] * SCARF_RGB
    rgb[region] = scarf[region]
    alpha = np.where(region, 0, 255)[..., None]
    return np.concatenate([np.clip(np.rint(rgb), 0, 255), alpha], axis=-1).astype(np.uint8)


def gb_composite_preview(source: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """The workflow's result computed with the pack's core: uint8 [H,W,3]."""
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from xmgie_core import gb

    def to_image(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0)[None]

    mask = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)[None]
    out = gb.gb_composite(to_image(rgba[..., :3]), to_image(source), mask).image[0].numpy()
    return np.clip(255.0 * out, 0, 255).astype(np.uint8)


def thumbnail(source: np.ndarray, rgba: np.ndarray, panel: int = 256) -> Image.Image:
    """Side by side: source | edit | GB composite, each `panel` pixels square."""
    panels = [source, rgba[..., :3], gb_composite_preview(source, rgba)]
    images = [Image.fromarray(p).resize((panel, panel), Image.LANCZOS) for p in panels]
    sheet = Image.new("RGB", (panel * len(images), panel))
    for i, img in enumerate(images):
        sheet.paste(img, (i * panel, 0))
    return sheet


def main() -> None:
    source = source_image()
    rgba = edited_rgba(source)
    Image.fromarray(source).save(SOURCE_PNG, optimize=True)
    Image.fromarray(rgba).save(EDIT_PNG, optimize=True)
    thumbnail(source, rgba).save(THUMBNAIL, quality=85, optimize=True)
    for path in (SOURCE_PNG, EDIT_PNG, THUMBNAIL):
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
