"""Crop-and-stitch for large photos: edit the region's neighbourhood at the model's working size, then put the
edit back.

  box       = bounding box of the (binarised) edit mask, every region of every batch item (one crop covers all),
              its sides times `context_factor`, grown further so the crop is never upscaled more than
              `max_upscale` and its shorter side is at least MIN_WORK_SIDE at the working size (a thin region
              gets context across it; a photo too thin for that is an error), centred on the region and
              shifted (not cut) to stay inside the photo;
  work size = editor "sd": the box resized so its longer side is `working_size`, each side a multiple of
              `multiple`; "flux-kontext" / "qwen-image-edit": the editor's own size nearest the box's aspect
              (KONTEXT_SIZES, qwen_edit_sizes: about 1 megapixel); the box is then widened to that aspect (to
              within half a photo pixel) where the photo allows;
  crop      = photo[box] resized to the work size (antialiased bicubic);
  stitch    = the edited crop resized back to the box and pasted into a copy of the photo.

Stitching leaves every pixel outside the box the photo's; the GB compositor (gb.gb_composite with the full-size
mask) then keeps every pixel outside its blend zone the photo's bit for bit, whatever the resampling did inside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .errors import XMGIEInputError
from .masks import binarize
from .validation import check_image, check_range, mask_for_image

CONTEXT_FACTOR = 1.5
CONTEXT_FACTOR_RANGE = (1.0, 10.0)
WORKING_SIZE = 512
WORKING_SIZE_RANGE = (64, 4096)
MULTIPLE = 8
MULTIPLE_CHOICES = (8, 16, 32, 64)
MAX_UPSCALE = 4.0
MAX_UPSCALE_RANGE = (1.0, 16.0)
MIN_WORK_SIDE = 64
"""The shorter side of a crop the model can edit (8 latent cells of SD's VAE); below it the edit is a smear."""
EDITORS = ("sd", "flux-kontext", "qwen-image-edit")
"""Work-size rules: "sd" = working_size x multiple (SD1.5, SDXL: the default), else a DiT editor's own sizes."""

KONTEXT_SIZES = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                 (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                 (1456, 720), (1504, 688), (1568, 672))
"""(width, height) of FLUX.1 Kontext's resolution buckets, ComfyUI 0.3.64 comfy_extras/nodes_flux.py:80
PREFERED_KONTEXT_RESOLUTIONS (what FluxKontextImageScale resizes to)."""
QWEN_EDIT_PIXELS = 1024 * 1024
QWEN_EDIT_MULTIPLE = 16
"""Qwen-Image-Edit's latent grid: VAE factor 8 x patchify 2 (comfy/ldm/qwen_image/model.py)."""


def qwen_reference_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) TextEncodeQwenImageEditPlus VAE-encodes a width x height image at as the reference latent:
    scaled to QWEN_EDIT_PIXELS, each side rounded to a multiple of 8 (ComfyUI 0.3.64
    comfy_extras/nodes_qwen.py:90-93)."""
    scale = math.sqrt(QWEN_EDIT_PIXELS / (width * height))
    return round(width * scale / 8.0) * 8, round(height * scale / 8.0) * 8


@cache
def qwen_edit_sizes() -> tuple[tuple[int, int], ...]:
    """(width, height) with both sides multiples of QWEN_EDIT_MULTIPLE (at most WORKING_SIZE_RANGE's top) that
    TextEncodeQwenImageEditPlus keeps as they are: a crop at one of these sizes and its reference latent share one
    latent grid, so the generated image and the reference line up pixel for pixel (about 1 megapixel)."""
    step, top = QWEN_EDIT_MULTIPLE, WORKING_SIZE_RANGE[1]
    found = []
    for height in range(step, top + 1, step):
        near = _snap(QWEN_EDIT_PIXELS / height, step)
        found += [(w, height) for w in (near - step, near, near + step)
                  if step <= w <= top and qwen_reference_size(w, height) == (w, height)]
    return tuple(found)


def editor_size(editor: str, height: float, width: float) -> tuple[int, int] | None:
    """(h, w) of the editor's size nearest the aspect width/height, chosen as FluxKontextImageScale chooses
    (smallest |aspect - w/h|, then the smaller w, h; nodes_flux.py:121); None for "sd"."""
    if editor == "sd":
        return None
    sizes = KONTEXT_SIZES if editor == "flux-kontext" else qwen_edit_sizes()
    _, w, h = min((abs(width / height - w / h), w, h) for w, h in sizes)
    return h, w


@dataclass(frozen=True)
class CropGeometry:
    """Where a crop came from and what it was resized to (passed between Crop For Edit and Stitch Edit)."""

    full_size: tuple[int, int]
    """(H, W) of the photo."""
    box: tuple[int, int, int, int]
    """(top, left, bottom, right) in photo pixels, bottom/right exclusive."""
    work_size: tuple[int, int]
    """(h, w) of the crop as the model sees it; multiples of `multiple`."""
    empty: bool = False
    """The mask selected nothing: the box is the whole photo (the edit then changes nothing downstream)."""
    photo: tuple[float, ...] | None = None
    """photo_fingerprint of the photo the crop was cut from (None when planned from the mask alone)."""

    @property
    def box_size(self) -> tuple[int, int]:
        top, left, bottom, right = self.box
        return bottom - top, right - left

    @property
    def scale(self) -> tuple[float, float]:
        """(work h / box h, work w / box w): > 1 means the crop was upscaled."""
        (bh, bw), (h, w) = self.box_size, self.work_size
        return h / bh, w / bw

    def to_dict(self) -> dict:
        fields = asdict(self)
        del fields["photo"]
        return {**fields, "scale": list(self.scale)}


FINGERPRINT_CELLS = 8
FINGERPRINT_TOLERANCE = 2.5 / 255
"""Largest cell difference of the same photo after an 8-bit save and reload (or a float16 round trip)."""


def photo_fingerprint(photo: torch.Tensor) -> tuple[float, ...]:
    """A cheap fingerprint of IMAGE [B,H,W,C]: each item's mean colour on an 8x8 grid of cells, flattened."""
    cells = F.adaptive_avg_pool2d(photo[..., :3].float().permute(0, 3, 1, 2), FINGERPRINT_CELLS)
    return tuple(cells.flatten().tolist())


def check_same_photo(geometry: CropGeometry, source: torch.Tensor) -> None:
    """Stitch only into the photo the crop was cut from (same size is not enough: another photo of that size
    would get this crop pasted in)."""
    if geometry.photo is None:
        return
    found = photo_fingerprint(source)
    same = len(found) == len(geometry.photo) and max(abs(a - b) for a, b in zip(found, geometry.photo)) <= \
        FINGERPRINT_TOLERANCE
    if not same:
        raise XMGIEInputError("source is not the photo this crop was cut from (same size, different pixels or batch); "
                              "connect the very image given to Crop For Edit to Stitch Edit's source.")


def _snap(length: float, multiple: int) -> int:
    """The multiple of `multiple` nearest to `length`, at least `multiple`."""
    return max(multiple, int(round(length / multiple)) * multiple)


def _place(center: float, length: int, limit: int) -> int:
    """Start of a `length`-long interval centred on `center`, shifted to lie within [0, limit)."""
    start = int(math.floor(center - length / 2.0 + 0.5))
    return min(max(start, 0), limit - length)


def _bounding_box(region: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.nonzero(region.any(dim=1)).flatten()
    cols = torch.nonzero(region.any(dim=0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def plan_crop(mask: torch.Tensor, context_factor: float = CONTEXT_FACTOR, working_size: int = WORKING_SIZE,
              multiple: int = MULTIPLE, max_upscale: float = MAX_UPSCALE, photo: torch.Tensor | None = None,
              editor: str = "sd") -> CropGeometry:
    """The crop box and work size for a MASK [B,H,W] or [H,W] (1 = edit), as the module docstring says; with
    `photo` (IMAGE) the geometry remembers it, and stitch refuses any other photo. For a DiT `editor` the work
    size is its own (working_size and multiple are not used)."""
    check_range(context_factor, "context_factor", *CONTEXT_FACTOR_RANGE,
                hint="It multiplies the region's bounding box sides (1 = no context around the region).")
    check_range(working_size, "working_size", *WORKING_SIZE_RANGE,
                hint="It is the longer side of the crop as the model sees it (512 for SD1.5, 1024 for SDXL).")
    check_range(max_upscale, "max_upscale", *MAX_UPSCALE_RANGE, hint="It caps how much a small region is enlarged.")
    if editor not in EDITORS:
        raise XMGIEInputError(f"editor must be one of {', '.join(EDITORS)}, got {editor!r} (sd: working_size x "
                              "multiple, for SD1.5 and SDXL).")
    if multiple not in MULTIPLE_CHOICES:
        raise XMGIEInputError(f"multiple must be one of {', '.join(map(str, MULTIPLE_CHOICES))}, got {multiple} "
                              "(8 suits SD's VAE; 64 every U-Net level).")
    if editor == "sd" and working_size % multiple:
        raise XMGIEInputError(f"working_size {working_size} is not a multiple of {multiple}; use "
                              f"{_snap(working_size, multiple)}.")
    region = binarize(mask.unsqueeze(0) if mask.ndim == 2 else mask).any(dim=0)
    height, width = region.shape
    empty = not bool(region.any())
    top, left, bottom, right = (0, 0, height, width) if empty else _bounding_box(region)
    want_h, want_w = (bottom - top) * context_factor, (right - left) * context_factor
    preferred = editor_size(editor, want_h, want_w)
    if preferred:  # the editor's size for this aspect sets the scale the box is grown for
        working_size = max(preferred)
    grow = working_size / max_upscale / max(want_h, want_w)  # never enlarge more than max_upscale
    if grow > 1:
        want_h, want_w = want_h * grow, want_w * grow
    thinnest = max(want_h, want_w) * MIN_WORK_SIDE / working_size  # a thin region gets context across it
    want_h, want_w = min(max(want_h, thinnest), height), min(max(want_w, thinnest), width)
    to_work = working_size / max(want_h, want_w)
    work_h, work_w = editor_size(editor, want_h, want_w) or (_snap(want_h * to_work, multiple),
                                                              _snap(want_w * to_work, multiple))
    if not empty and min(work_h, work_w) < MIN_WORK_SIDE:
        raise XMGIEInputError(_too_thin(height, width, bottom - top, right - left, (work_h, work_w), working_size,
                                        multiple * math.ceil(MIN_WORK_SIDE * max(want_h, want_w) /
                                                             min(want_h, want_w) / multiple)))
    per_pixel = max(want_h / work_h, want_w / work_w)  # photo pixels per work pixel at the exact aspect
    box_h, box_w = min(height, max(1, round(work_h * per_pixel))), min(width, max(1, round(work_w * per_pixel)))
    y0 = _place((top + bottom) / 2.0, box_h, height)
    x0 = _place((left + right) / 2.0, box_w, width)
    return CropGeometry((height, width), (y0, x0, y0 + box_h, x0 + box_w), (work_h, work_w), empty,
                        None if photo is None else photo_fingerprint(check_image(photo, "photo")))


def _too_thin(height: int, width: int, region_h: int, region_w: int, work: tuple[int, int], working_size: int,
              needed: int) -> str:
    """Why a crop would be thinner than MIN_WORK_SIDE, and what to do (`needed`: the working size that fixes it)."""
    work_h, work_w = work
    fix = (f"raise working_size to at least {needed}" if needed <= WORKING_SIZE_RANGE[1]
           else "the photo is too elongated for one crop")
    return (f"The edit region spans {region_h}x{region_w} px of a {height}x{width} photo; at working_size "
            f"{working_size} its crop would be {work_h}x{work_w} px, thinner than the {MIN_WORK_SIDE} px a model can "
            f"edit. To fix it: {fix}, or edit a less elongated part of the photo (a smaller mask), or pad the photo "
            "to a less extreme aspect first.")


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,h,w]: antialiased bicubic, clamped to 0..1 (bicubic overshoots at hard edges)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0).to(images.dtype)


def _check_photo(geometry: CropGeometry, height: int, width: int, name: str) -> None:
    if (height, width) != geometry.full_size:
        raise XMGIEInputError(
            f"{name} is {height}x{width}, but the crop was planned on a {geometry.full_size[0]}x"
            f"{geometry.full_size[1]} photo; connect the same photo to Crop For Edit and Stitch Edit.")


def crop_image(image: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> the box resized to the work size [B,h,w,C]."""
    check_image(image, "image")
    _check_photo(geometry, image.shape[1], image.shape[2], "image")
    top, left, bottom, right = geometry.box
    part = image[:, top:bottom, left:right].permute(0, 3, 1, 2)
    return _resize(part, geometry.work_size).permute(0, 2, 3, 1).contiguous()


def crop_mask(mask: torch.Tensor, geometry: CropGeometry, image: torch.Tensor) -> torch.Tensor:
    """MASK for `image` -> the box resized to the work size [B,h,w] (soft values kept; binarise downstream)."""
    mask = mask_for_image(mask, image, "mask", "image")
    top, left, bottom, right = geometry.box
    part = mask[:, top:bottom, left:right].unsqueeze(1)
    if tuple(part.shape[-2:]) == geometry.work_size:
        return part[:, 0].contiguous()
    out = F.interpolate(part.float(), size=geometry.work_size, mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].clamp_(0.0, 1.0).to(mask.dtype)


def stitch(edited: torch.Tensor, source: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """The edited crop [B,h,w,C] resized back to the box and pasted into the photo `source` [B or 1,H,W,C].

    Pixels outside the box are the source's. A batch of edits (e.g. best-of-N candidates) over one photo
    gives one stitched photo per edit.
    """
    check_image(edited, "edited crop")
    check_image(source, "source")
    _check_photo(geometry, source.shape[1], source.shape[2], "source")
    check_same_photo(geometry, source)
    if tuple(edited.shape[1:3]) != geometry.work_size:
        raise XMGIEInputError(
            f"edited crop is {edited.shape[1]}x{edited.shape[2]}, but Crop For Edit made a {geometry.work_size[0]}x"
            f"{geometry.work_size[1]} crop; connect the decoded edit of that crop (do not resize it in between).")
    if edited.shape[3] != source.shape[3]:
        raise XMGIEInputError(f"edited crop has {edited.shape[3]} channels, the source {source.shape[3]}.")
    if source.shape[0] not in (1, edited.shape[0]):
        raise XMGIEInputError(f"edited batch {edited.shape[0]} does not match source batch {source.shape[0]}; "
                              "use one source for all edits or one per edit.")
    top, left, bottom, right = geometry.box
    back = _resize(edited.permute(0, 3, 1, 2), geometry.box_size).permute(0, 2, 3, 1)
    out = source.expand(edited.shape[0], *source.shape[1:]).clone()
    out[:, top:bottom, left:right] = back.to(out.dtype)
    return out
