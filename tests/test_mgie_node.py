"""The XMGIE MGIE Guidance node without ComfyUI, on a tiny MGIE folder: conditioning equal to the core's, batch-aware,
freed unless kept, and the errors a user can cause."""

from __future__ import annotations

import sys

import pytest
import torch

from fixtures.tiny_mgie import INSTRUCTION, TEXT, save_tiny_mgie
from xmgie_core.mgie.folder import load_mgie_folder


def loaded(pack) -> list:
    """The MGIE entries of the model cache of the pack's own copy of xmgie_core (the one the node uses)."""
    return sys.modules[f"{pack.__name__}.xmgie_core.model_cache"].MODELS.keys("mgie")


@pytest.fixture(scope="module")
def mgie_dir(tmp_path_factory):
    return save_tiny_mgie(tmp_path_factory.mktemp("LLM") / "mgie-tiny")


def test_node_outputs_the_cores_conditioning_per_image(pack, mgie_dir):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEMGIEGuidance"]()
    images = torch.rand(2, 40, 48, 3)
    (positive,), (negative,), expressive = node.guide(images, INSTRUCTION, str(mgie_dir), 0, 96, False)
    core = load_mgie_folder(mgie_dir)
    results = [core.generate(images[i:i + 1], INSTRUCTION) for i in range(2)]
    torch.testing.assert_close(positive[0], torch.cat([r.positive for r in results]))
    torch.testing.assert_close(negative[0], torch.cat([r.negative for r in results]))
    assert positive[1] == {} and negative[1] == {}
    assert expressive.split("\n") == [r.expressive_instruction for r in results] and TEXT.rstrip(".") in expressive
    assert not torch.allclose(positive[0][0], positive[0][1])  # the image matters
    assert not loaded(pack)  # freed after the run


def test_keep_loaded_keeps_the_model(pack, mgie_dir):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEMGIEGuidance"]()
    node.guide(torch.rand(1, 32, 32, 3), INSTRUCTION, str(mgie_dir), 0, 96, True)
    assert len(loaded(pack)) == 1
    node.guide(torch.rand(1, 32, 32, 3), INSTRUCTION, str(mgie_dir), 0, 96, False)
    assert not loaded(pack)


@pytest.mark.parametrize("change, message", [
    ({"instruction": "  "}, "The instruction is empty"),
    ({"model_folder": "nowhere"}, "Model folder 'nowhere' not found"),
    ({"model_folder": ""}, "needs a model folder"),
])
def test_user_errors(pack, mgie_dir, change, message):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEMGIEGuidance"]()
    args = {"image": torch.rand(1, 32, 32, 3), "instruction": INSTRUCTION, "model_folder": str(mgie_dir), "seed": 0,
            "max_new_tokens": 96, "keep_loaded": False, **change}
    with pytest.raises(ValueError, match=message):
        node.guide(**args)


def test_a_truncated_model_file_is_named(pack, mgie_dir, tmp_path):
    import shutil

    bad = tmp_path / "mgie-cut"
    shutil.copytree(mgie_dir, bad)
    weights = bad / "vision" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    node = pack.NODE_CLASS_MAPPINGS["XMGIEMGIEGuidance"]()
    with pytest.raises(ValueError, match=rf"{weights} \(a file of the MGIE folder\) looks truncated or corrupt.*sha256"):
        node.guide(torch.rand(1, 32, 32, 3), INSTRUCTION, str(bad), 0, 96, False)
