"""ComfyUI node contracts, checked without ComfyUI: mappings, tooltips, and running the GB node."""

from __future__ import annotations

import pytest
import torch


def test_every_node_is_mapped_with_a_display_name(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"
    for name, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert display.startswith("XMGIE ")


@pytest.mark.parametrize("name", ["XMGIEGBCompositor"])
def test_node_contract(pack, name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    assert cls.CATEGORY.startswith("xMGIE/")
    assert callable(getattr(cls, cls.FUNCTION))
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for inp, spec in inputs.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert all(cls.OUTPUT_TOOLTIPS)


def test_gb_node_runs_both_modes(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    src, edit = torch.zeros(1, 48, 48, 3), torch.ones(1, 48, 48, 3)
    mask = torch.zeros(1, 48, 48)
    mask[:, 12:36, 12:36] = 1
    image, blend = node.composite(edit, mask, "composite", 5.0, 10.0, 16.0, source=src)
    assert image.shape == src.shape and blend.shape == mask.shape
    assert float(image[0, 24, 24, 0]) == pytest.approx(1.0, abs=1e-5) and float(image[0, 0, 0, 0]) == 0.0
    image, strength = node.composite(edit, mask, "blur", 5.0, 10.0, 16.0)
    assert torch.allclose(image, edit, atol=1e-6)  # a flat image is unchanged by blurring
    assert float(strength[0, 12, 12]) == pytest.approx(torch.exp(torch.tensor(-1 / 200)).item(), abs=1e-6)


def test_gb_node_composite_needs_source(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    with pytest.raises(ValueError, match="connect the original"):
        node.composite(torch.rand(1, 8, 8, 3), torch.ones(1, 8, 8), "composite", 5.0, 10.0, 16.0)


def test_samples_are_copied_into_comfy_input_without_overwriting(pack, tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("folder_paths")
    fake.get_input_directory = lambda: str(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    (tmp_path / "xmgie_astronaut_source.png").write_bytes(b"user's own file")
    copied = pack.nodes.samples.install_samples()
    assert [p.name for p in copied] == ["xmgie_astronaut_edit.png"]
    assert (tmp_path / "xmgie_astronaut_source.png").read_bytes() == b"user's own file"
    assert pack.nodes.samples.install_samples() == []
