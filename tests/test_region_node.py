"""The XMGIE Region Predictor node without ComfyUI: the clipseg mode end to end on a tiny CLIPSeg folder, the learned
mode's model lookup, an empty region (a warning, not an error) and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch

from fixtures.tiny_clipseg import save_tiny_clipseg

ARGS = dict(mode="clipseg", instruction="give the man a red scarf", target_description="a man wearing a red scarf",
            source_description="a man", edit_words="red scarf", threshold=0.5, grow=0, smoothing=0.0, seed=0, draws=2,
            steps=2, strength=0.5)


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    return save_tiny_clipseg(tmp_path_factory.mktemp("models") / "clipseg-tiny")


@pytest.fixture()
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["XMGIERegionPredictor"]()


def test_clipseg_mode_gives_mask_soft_map_and_preview(node, clipseg_dir):
    image = torch.rand(2, 40, 56, 3)
    out = node.predict(image, **{**ARGS, "threshold": 0.0}, clipseg_folder=str(clipseg_dir))
    mask, soft, preview = out["result"]
    assert mask.shape == soft.shape == (2, 40, 56) and preview.shape == (2, 40, 56, 3)
    assert bool(mask.eq(1).all()) and out["ui"]["xmgie_warning"] == []
    grown = node.predict(image, **{**ARGS, "threshold": float(soft.median()), "grow": 3},
                         clipseg_folder=str(clipseg_dir))["result"][0]
    plain = node.predict(image, **{**ARGS, "threshold": float(soft.median())}, clipseg_folder=str(clipseg_dir))["result"][0]
    assert bool((grown >= plain).all()) and grown.sum() > plain.sum()


def test_empty_region_is_a_warning_with_an_empty_mask(node, clipseg_dir, caplog):
    with caplog.at_level("WARNING", logger="xmgie"):
        out = node.predict(torch.rand(1, 32, 32, 3), **{**ARGS, "threshold": 1.0}, clipseg_folder=str(clipseg_dir))
    mask, _, preview = out["result"]
    assert not bool(mask.any())
    assert "region is empty for image(s) [0]" in out["ui"]["xmgie_warning"][0]
    assert "region is empty" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"mode": "noise-difference"}, "connect model, clip, vae"),
    ({"mode": "attention"}, "connect model, clip, vae"),
    ({"mode": "learned"}, "needs CLIP vision: connect a Load CLIP Vision"),
    ({"mode": "clipseg", "clipseg_folder": "nowhere"}, "Model folder 'nowhere' not found"),
    ({"mode": "clipseg", "edit_words": " , "}, "needs at least one phrase"),
    ({"mode": "sketch"}, "Unknown mode 'sketch'"),
    ({"threshold": 2.0}, "threshold must be between 0 and 1"),
])
def test_user_errors(node, clipseg_dir, change, message):
    kwargs = {**ARGS, "clipseg_folder": str(clipseg_dir), **change}
    with pytest.raises(ValueError, match=message):
        node.predict(torch.rand(1, 32, 32, 3), **kwargs)


def test_learned_mode_needs_a_predictor_file(pack):
    module = pack.nodes.region_predictor
    with pytest.raises(ValueError, match="put a region predictor .safetensors file in ComfyUI/models/xmgie"):
        module.learned_models("none", "flan-t5-base", False)


@pytest.mark.parametrize("text, expected", [("auto", None), ("", None), ("1, 2", (1, 2)), ("3", (3,))])
def test_scales_parse(pack, text, expected):
    assert pack.nodes.region_predictor.parse_scales(text) == expected


@pytest.mark.parametrize("text", ["0", "1,x", "9"])
def test_bad_scales(pack, text):
    with pytest.raises(ValueError, match="must be 'auto' or comma-separated integers"):
        pack.nodes.region_predictor.parse_scales(text)


def test_working_size_keeps_aspect_in_multiples_of_64():
    from xmgie_core.region.zeroshot import working_size as size

    assert size(3000, 4000) == (384, 512)
    assert size(512, 512) == (512, 512)
    assert size(100, 30) == (128, 64)


def test_preview_is_saved_for_the_node_as_preview_image_does(pack, tmp_path, monkeypatch):
    """With ComfyUI's folder_paths, the preview goes to its temp folder and the ui entries name the files."""
    import sys
    import types

    import numpy as np
    from PIL import Image

    from xmgie_pack.nodes.region_predictor import preview_ui_images

    def get_save_image_path(prefix, folder, width, height):
        return str(tmp_path), prefix, 1, "", prefix

    fake = types.SimpleNamespace(get_temp_directory=lambda: str(tmp_path), get_save_image_path=get_save_image_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    preview = torch.rand(2, 24, 32, 3)
    entries = preview_ui_images(preview)
    assert [e["type"] for e in entries] == ["temp", "temp"] and entries[0]["filename"] != entries[1]["filename"]
    for entry, picture in zip(entries, preview):
        saved = np.array(Image.open(tmp_path / entry["filename"]))
        assert saved.shape == (24, 32, 3)
        assert np.abs(saved.astype(float) - picture.numpy() * 255).max() <= 1.0


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_greyscale_and_alpha_images_are_read_as_their_rgb(node, clipseg_dir, channels):
    """A 1-channel (greyscale), 2-channel (greyscale + alpha) or RGBA IMAGE is the same picture as its RGB: same
    region, same preview (not a conv error about 3 channels)."""
    grey = torch.rand(1, 40, 56, 1)
    rgb = grey.expand(-1, -1, -1, 3) if channels < 4 else torch.rand(1, 40, 56, 3)
    image = {1: grey, 2: torch.cat([grey, torch.rand_like(grey)], -1), 4: torch.cat([rgb, torch.rand_like(grey)], -1)}
    args = {**ARGS, "threshold": 0.4}
    expected = node.predict(rgb, **args, clipseg_folder=str(clipseg_dir))["result"]
    got = node.predict(image[channels], **args, clipseg_folder=str(clipseg_dir))["result"]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_image_with_five_channels_is_an_error(node, clipseg_dir):
    with pytest.raises(ValueError, match="image has 5 channels .* Convert it to RGB first"):
        node.predict(torch.rand(1, 32, 32, 5), **ARGS, clipseg_folder=str(clipseg_dir))
