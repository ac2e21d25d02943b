"""Crop-and-stitch (xmgie_core.crop, the Crop For Edit / Stitch Edit nodes): the box holds every region and stays
in the photo, the work size is the working size in multiples with the box's aspect, a 4000 x 3000 round trip with
an identity edit is exact outside the blend zone (and everywhere when nothing is resized), and the blend zone is
where the mask says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from xmgie_core import crop, gb
from xmgie_core.errors import XMGIEInputError


def smooth_photo(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A photo-like IMAGE [1,H,W,3]: low-frequency colour fields plus a little fine texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    texture = torch.rand(1, 3, height, width, generator=g) * 0.05
    return (field * 0.9 + texture).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def disc_mask(height: int, width: int, centres: list[tuple[int, int]], radius: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    mask = torch.zeros(height, width)
    for cy, cx in centres:
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 1.0
    return mask.unsqueeze(0)


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask[0].numpy() >= 0.5)
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


def check_geometry(geometry: crop.CropGeometry, mask: torch.Tensor, working_size: int, multiple: int) -> None:
    height, width = mask.shape[-2:]
    top, left, bottom, right = geometry.box
    assert 0 <= top < bottom <= height and 0 <= left < right <= width, "box leaves the photo"
    m_top, m_left, m_bottom, m_right = mask_bbox(mask)
    assert top <= m_top and left <= m_left and bottom >= m_bottom and right >= m_right, "box cuts the region"
    h, w = geometry.work_size
    assert h % multiple == 0 and w % multiple == 0
    assert max(h, w) == working_size
    bh, bw = geometry.box_size
    if bh < height and bw < width:  # not clamped by the photo: the aspect is kept to within half a photo pixel
        assert abs(bw / bh - w / h) <= (0.5 + 0.5 * w / h) / bh + 1e-9


# ------------------------------------------------------------------------------------------------
# The 4000 x 3000 round trip
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large():
    photo = smooth_photo(3000, 4000)
    mask = disc_mask(3000, 4000, [(1200, 2500)], 180)
    return photo, mask


def test_large_photo_identity_round_trip_is_exact_outside_the_blend_zone(large):
    photo, mask = large
    geometry = crop.plan_crop(mask)
    assert geometry.work_size == (512, 512) and geometry.scale[0] < 1  # a 540-px box, downscaled to 512
    check_geometry(geometry, mask, 512, 8)
    work = crop.crop_image(photo, geometry)
    assert work.shape == (1, 512, 512, 3)
    stitched = crop.stitch(work, photo, geometry)  # the identity "edit"
    top, left, bottom, right = geometry.box
    outside_box = torch.ones(3000, 4000, dtype=torch.bool)
    outside_box[top:bottom, left:right] = False
    assert torch.equal(stitched[0][outside_box], photo[0][outside_box]), "stitch changed pixels outside the box"
    assert (stitched - photo).abs().max() < 0.08 and (stitched - photo).abs().mean() < 1e-3  # resampled twice
    result = gb.gb_composite(stitched, photo, mask)
    untouched = result.mask[0] == 0
    assert torch.equal(result.image[0][untouched], photo[0][untouched]), "outside the blend zone != the photo"
    far = torch.from_numpy(ndimage.distance_transform_edt(mask[0].numpy() < 0.5) > gb.EDGE_WIDTH)
    assert bool(untouched[far].all()), "the blend zone reaches beyond edge_width from the mask"


def test_an_edit_lands_only_in_the_blend_zone_of_the_mask(large):
    photo, mask = large
    geometry = crop.plan_crop(mask, context_factor=2.0)
    work = crop.crop_image(photo, geometry)
    edited = torch.ones_like(work)  # paint the whole crop white: only the mask's zone may show it
    result = gb.gb_composite(crop.stitch(edited, photo, geometry), photo, mask)
    changed = (result.image[0] != photo[0]).any(dim=-1).numpy()
    region = mask[0].numpy() >= 0.5
    d_out = ndimage.distance_transform_edt(~region)
    assert changed[region].mean() > 0.99, "the edit did not arrive inside the mask"
    assert not changed[d_out > gb.EDGE_WIDTH].any(), "pixels farther than edge_width outside the mask changed"
    deep = ndimage.distance_transform_edt(region) > gb.EDGE_WIDTH + 2
    assert torch.allclose(result.image[0][torch.from_numpy(deep)], torch.tensor(1.0))  # deep inside: the edit


def test_no_resize_means_an_exact_round_trip_everywhere():
    photo = smooth_photo(700, 900, seed=3)
    mask = torch.zeros(1, 700, 900)
    mask[:, 100:484, 200:712] = 1  # 384 x 512: already the work size at context 1
    geometry = crop.plan_crop(mask, context_factor=1.0, max_upscale=1.0)
    assert geometry.box == (100, 200, 484, 712) and geometry.work_size == (384, 512)
    assert torch.equal(crop.crop_image(photo, geometry), photo[:, 100:484, 200:712])
    assert torch.equal(crop.stitch(crop.crop_image(photo, geometry), photo, geometry), photo)


# ------------------------------------------------------------------------------------------------
# The box and the work size
# ------------------------------------------------------------------------------------------------

@given(height=st.integers(9, 1500), width=st.integers(9, 1500), data=st.data(),
       context=st.floats(1.0, 4.0), multiple=st.sampled_from(crop.MULTIPLE_CHOICES),
       working=st.sampled_from([256, 512, 768]), upscale=st.floats(1.0, 8.0))
def test_box_holds_the_region_and_the_work_size_is_valid(height, width, data, context, multiple, working, upscale):
    top = data.draw(st.integers(0, height - 1))
    left = data.draw(st.integers(0, width - 1))
    bottom = data.draw(st.integers(top + 1, height))
    right = data.draw(st.integers(left + 1, width))
    mask = torch.zeros(1, height, width)
    mask[:, top:bottom, left:right] = 1
    try:
        geometry = crop.plan_crop(mask, context, working, multiple, upscale)
    except XMGIEInputError as e:  # only a photo too elongated for a crop of MIN_WORK_SIDE across
        assert "thinner than the 64 px a model can edit" in str(e)
        assert min(height, width) / max(height, width) < crop.MIN_WORK_SIDE / working
        return
    assert min(geometry.work_size) >= crop.MIN_WORK_SIDE
    check_geometry(geometry, mask, working, multiple)
    bh, bw = geometry.box_size
    if bh < height and bw < width:  # the photo did not clamp the box: the enlargement cap holds (to half a pixel)
        assert working / max(bh, bw) <= working / (working / upscale - 0.5) + 1e-9


@pytest.mark.parametrize("corner", [(0, 0), (0, 999), (749, 0), (749, 999)])
def test_a_region_touching_the_border_keeps_the_box_inside(corner):
    mask = disc_mask(750, 1000, [corner], 60)
    geometry = crop.plan_crop(mask)
    check_geometry(geometry, mask, 512, 8)
    photo = smooth_photo(750, 1000, seed=1)
    result = gb.gb_composite(crop.stitch(crop.crop_image(photo, geometry), photo, geometry), photo, mask)
    assert torch.equal(result.image[0][result.mask[0] == 0], photo[0][result.mask[0] == 0])


def test_disjoint_regions_get_one_crop_covering_all():
    mask = disc_mask(1200, 1600, [(200, 200), (1000, 1400)], 40)
    geometry = crop.plan_crop(mask)
    check_geometry(geometry, mask, 512, 8)
    photo = smooth_photo(1200, 1600, seed=2)
    edited = torch.zeros(1, *geometry.work_size, 3)
    result = gb.gb_composite(crop.stitch(edited, photo, geometry), photo, mask)
    for cy, cx in [(200, 200), (1000, 1400)]:
        assert float(result.image[0, cy, cx].max()) == 0.0, "a region was left out of the crop"


def test_batch_masks_share_one_box_and_odd_sizes_work():
    mask = torch.zeros(2, 333, 517)
    mask[0, 10:50, 20:90] = 1
    mask[1, 250:300, 400:500] = 1
    geometry = crop.plan_crop(mask, working_size=256, multiple=64)
    for item in mask:
        check_geometry(geometry, item.unsqueeze(0), 256, 64)
    photo = smooth_photo(333, 517).expand(2, -1, -1, -1)
    assert crop.crop_image(photo, geometry).shape == (2, *geometry.work_size, 3)
    assert crop.crop_mask(mask, geometry, photo).shape == (2, *geometry.work_size)


def test_a_small_region_is_enlarged_at_most_max_upscale():
    mask = torch.zeros(1, 3000, 4000)
    mask[:, 1500:1510, 2000:2010] = 1
    geometry = crop.plan_crop(mask, max_upscale=4.0)
    assert geometry.work_size == (512, 512)
    assert geometry.box_size == (128, 128) and geometry.scale == (4.0, 4.0)


def test_an_empty_mask_crops_the_whole_photo():
    geometry = crop.plan_crop(torch.zeros(1, 300, 400))
    assert geometry.empty and geometry.box == (0, 0, 300, 400) and geometry.work_size == (384, 512)


def test_cropped_mask_follows_the_box():
    mask = disc_mask(600, 800, [(300, 400)], 100)
    photo = smooth_photo(600, 800)
    geometry = crop.plan_crop(mask)
    small = crop.crop_mask(mask, geometry, photo)
    back = torch.nn.functional.interpolate(small[None], size=geometry.box_size, mode="bilinear")[0]
    top, left, bottom, right = geometry.box
    region = mask[:, top:bottom, left:right] >= 0.5
    iou = float(((back >= 0.5) & region).sum() / ((back >= 0.5) | region).sum())
    assert iou > 0.97


# ------------------------------------------------------------------------------------------------
# Errors and the nodes
# ------------------------------------------------------------------------------------------------

def test_errors_say_what_to_connect():
    mask = disc_mask(300, 400, [(150, 200)], 30)
    photo = smooth_photo(300, 400)
    geometry = crop.plan_crop(mask)
    with pytest.raises(XMGIEInputError, match="do not resize it"):
        crop.stitch(torch.rand(1, 64, 64, 3), photo, geometry)
    with pytest.raises(XMGIEInputError, match="same photo to Crop For Edit and Stitch Edit"):
        crop.stitch(torch.rand(1, *geometry.work_size, 3), smooth_photo(301, 400), geometry)
    with pytest.raises(XMGIEInputError, match="multiple must be one of"):
        crop.plan_crop(mask, multiple=12)
    with pytest.raises(XMGIEInputError, match="not a multiple of 64"):
        crop.plan_crop(mask, working_size=520, multiple=64)
    with pytest.raises(XMGIEInputError, match="context_factor must be between"):
        crop.plan_crop(mask, context_factor=0.5)
    with pytest.raises(XMGIEInputError, match="edited batch 3 does not match source batch 2"):
        crop.stitch(torch.rand(3, *geometry.work_size, 3), photo.expand(2, -1, -1, -1), geometry)


def test_nodes_crop_then_stitch(pack):
    crop_node = pack.NODE_CLASS_MAPPINGS["XMGIECropForEdit"]()
    stitch_node = pack.NODE_CLASS_MAPPINGS["XMGIEStitchEdit"]()
    photo = smooth_photo(900, 1200)
    mask = disc_mask(900, 1200, [(450, 600)], 120)
    image, small_mask, geometry = crop_node.crop(photo, mask, 1.5, 512, "64", 4.0)
    assert image.shape[1:3] == small_mask.shape[1:] == geometry.work_size and geometry.work_size[0] % 64 == 0
    candidates = torch.cat([image, 1 - image])  # two edits of one photo
    (stitched,) = stitch_node.stitch(geometry, candidates, photo)
    assert stitched.shape == (2, 900, 1200, 3)
    with pytest.raises(ValueError, match="does not match image size"):  # the pack's own XMGIEInputError
        crop_node.crop(photo, mask[:, :-1], 1.5, 512, "8", 4.0)


# ------------------------------------------------------------------------------------------------
# Crops a model cannot edit, and crops pasted into the wrong photo
# ------------------------------------------------------------------------------------------------

def test_a_photo_too_thin_for_a_crop_is_an_error_naming_the_fix():
    """A 100 x 8000 strip would give an 8 x 512 crop (one latent row): refused, with what to do."""
    with pytest.raises(XMGIEInputError, match=r"100x8000 photo; at working_size 512 its crop would be 8x512 px, "
                                              r"thinner than the 64 px .* pad the photo"):
        crop.plan_crop(torch.ones(1, 100, 8000))
    with pytest.raises(XMGIEInputError, match=r"raise working_size to at least 640"):
        crop.plan_crop(torch.ones(1, 100, 1000))
    assert crop.plan_crop(torch.ones(1, 100, 1000), working_size=640).work_size == (64, 640)


def test_a_thin_region_in_a_large_photo_gets_context_across_it():
    mask = torch.zeros(1, 1500, 1500)
    mask[:, 700:702, 100:1400] = 1  # a 2 px line, 1300 px long
    geometry = crop.plan_crop(mask)
    assert min(geometry.work_size) >= crop.MIN_WORK_SIDE
    check_geometry(geometry, mask, 512, 8)


def test_stitch_refuses_another_photo_of_the_same_size():
    photo_a, photo_b = smooth_photo(300, 400, seed=1), smooth_photo(300, 400, seed=2)
    mask = disc_mask(300, 400, [(150, 200)], 40)
    geometry = crop.plan_crop(mask, photo=photo_a)
    edited = crop.crop_image(photo_a, geometry)
    with pytest.raises(XMGIEInputError, match="source is not the photo this crop was cut from .* connect the very "
                                              "image given to Crop For Edit"):
        crop.stitch(edited, photo_b, geometry)
    with pytest.raises(XMGIEInputError, match="source is not the photo"):  # a batch of two is not that photo either
        crop.stitch(edited, torch.cat([photo_a, photo_a]), geometry)
    reloaded = (photo_a * 255).round() / 255  # the same photo after an 8-bit save and load
    assert torch.equal(crop.stitch(edited, reloaded, geometry)[:, :10], reloaded[:, :10])
    assert "photo" not in geometry.to_dict()


# ------------------------------------------------------------------------------------------------
# The DiT editors' own sizes: FLUX.1 Kontext's buckets, Qwen-Image-Edit's 1 megapixel
# ------------------------------------------------------------------------------------------------

# ComfyUI 0.3.64 comfy_extras/nodes_flux.py PREFERED_KONTEXT_RESOLUTIONS, (width, height), typed out again here
KONTEXT_BUCKETS = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                   (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                   (1456, 720), (1504, 688), (1568, 672)]


def qwen_plus_reference(width: int, height: int) -> tuple[int, int]:
    """TextEncodeQwenImageEditPlus's reference size (comfy_extras/nodes_qwen.py), written out independently."""
    scale = (1024 * 1024 / (width * height)) ** 0.5
    return round(width * scale / 8.0) * 8, round(height * scale / 8.0) * 8


@pytest.mark.parametrize("size", [(900, 1200), (1200, 900), (3000, 4000), (700, 2600), (2048, 2048)])
@pytest.mark.parametrize("editor", ["flux-kontext", "qwen-image-edit"])
def test_dit_editor_work_sizes_are_the_editors_own(editor, size):
    height, width = size
    mask = disc_mask(height, width, [(height // 2, width // 3)], min(size) // 10)
    geometry = crop.plan_crop(mask, editor=editor)
    h, w = geometry.work_size
    top, left, bottom, right = geometry.box
    assert 0 <= top < bottom <= height and 0 <= left < right <= width
    m_top, m_left, m_bottom, m_right = mask_bbox(mask)
    assert top <= m_top and left <= m_left and bottom >= m_bottom and right >= m_right, "box cuts the region"
    bh, bw = geometry.box_size
    if editor == "flux-kontext":
        assert (w, h) in KONTEXT_BUCKETS
        # FluxKontextImageScale's choice for the box's aspect is this bucket (so it would keep the crop's size)
        assert min(KONTEXT_BUCKETS, key=lambda b: (abs(bw / bh - b[0] / b[1]), b)) == (w, h)
    else:
        assert h % 16 == 0 and w % 16 == 0 and abs(h * w / 2**20 - 1) < 0.01
        assert qwen_plus_reference(w, h) == (w, h), "the Plus node would resize this crop for its reference"
    if bh < height and bw < width:  # not clamped by the photo: the box has the work size's aspect
        assert abs(bw / bh - w / h) <= (0.5 + 0.5 * w / h) / bh + 1e-9


def test_every_kontext_bucket_maps_to_itself_and_sd_is_the_default():
    for w, h in KONTEXT_BUCKETS:
        assert crop.editor_size("flux-kontext", h, w) == (h, w)
    mask = disc_mask(900, 1200, [(450, 600)], 120)
    assert crop.plan_crop(mask) == crop.plan_crop(mask, editor="sd")  # the SD behaviour is unchanged by default
    assert max(crop.plan_crop(mask).work_size) == crop.WORKING_SIZE


def test_qwen_edit_sizes_are_every_size_the_plus_node_keeps():
    """Brute force over every pair of multiples of 16 up to 4096: exactly these are fixed points of its scaling."""
    sides = np.arange(16, 4097, 16)
    ww, hh = np.meshgrid(sides, sides, indexing="xy")
    scale = np.sqrt(1024 * 1024 / (ww * hh))
    kept = (np.round(ww * scale / 8.0) * 8 == ww) & (np.round(hh * scale / 8.0) * 8 == hh)
    want = {(int(w), int(h)) for w, h in zip(ww[kept], hh[kept])}
    assert set(crop.qwen_edit_sizes()) == want and (1024, 1024) in want and len(want) > 50


@pytest.mark.parametrize("editor", ["flux-kontext", "qwen-image-edit"])
def test_stitch_at_the_editors_sizes_keeps_every_pixel_outside_the_blend_zone(editor):
    """An edit that paints the whole crop, at the editor's size: outside the box the stitch is the photo, and after
    GB every pixel farther than edge_width from the mask is the photo bit for bit."""
    photo = smooth_photo(1100, 1500, seed=5)
    mask = disc_mask(1100, 1500, [(380, 900)], 140)
    geometry = crop.plan_crop(mask, editor=editor, photo=photo)
    work = crop.crop_image(photo, geometry)
    assert tuple(work.shape[1:3]) == geometry.work_size and geometry.work_size != (512, 512)
    stitched = crop.stitch(torch.ones_like(work), photo, geometry)
    top, left, bottom, right = geometry.box
    outside_box = torch.ones(1100, 1500, dtype=torch.bool)
    outside_box[top:bottom, left:right] = False
    assert torch.equal(stitched[0][outside_box], photo[0][outside_box])
    result = gb.gb_composite(stitched, photo, mask)
    changed = (result.image[0] != photo[0]).any(dim=-1).numpy()
    region = mask[0].numpy() >= 0.5
    assert changed[region].mean() > 0.99, "the edit did not arrive inside the mask"
    assert not changed[ndimage.distance_transform_edt(~region) > gb.EDGE_WIDTH].any()


def test_crop_node_editor_input(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIECropForEdit"]()
    options = node.INPUT_TYPES()["optional"]["editor"]
    assert options[0] == list(crop.EDITORS) and options[1]["default"] == "sd" and options[1]["tooltip"]
    photo = smooth_photo(900, 1200)
    mask = disc_mask(900, 1200, [(450, 600)], 120)
    image, small_mask, geometry = node.crop(photo, mask, 1.5, 520, "64", 4.0, "flux-kontext")  # 520: unused
    assert image.shape[1:3] == small_mask.shape[1:] == geometry.work_size == (1024, 1024)
    with pytest.raises(XMGIEInputError, match="editor must be one of sd, flux-kontext, qwen-image-edit"):
        crop.plan_crop(mask, editor="kontext")
