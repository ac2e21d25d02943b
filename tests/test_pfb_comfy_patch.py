"""The ComfyUI PFB callables without ComfyUI: the block patch's layer names at ComfyUI's call sites, the
copy-on-write options, the source conditioning's concat inputs, cond content for the cache key, and the
layout of a UNetModel-shaped module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy.pfb import cond_content, source_conds
from xmgie_core.hosts.comfy.unet import BlockPatch, layout, with_block_patch


class Downsample(nn.Identity):
    pass


class Upsample(nn.Identity):
    pass


class FakeUNet(nn.Module):
    """openaimodel.UNetModel's block lists: conv, res, down, res | res, up, res, out."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity()),
                                           nn.Sequential(Downsample()), nn.Sequential(nn.Identity())])
        self.middle_block = nn.Sequential(nn.Identity())
        self.output_blocks = nn.ModuleList([nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity(), Upsample()),
                                            nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity())])


def test_layout_of_a_unet_and_refusal_of_a_dit():
    found = layout(FakeUNet())
    assert found.names == ["input_0", "input_1", "input_2", "input_3", "middle", "output_0", "output_1", "output_2"]
    assert found.factors["input_2"] == (1, 2) and found.factors["output_1"] == (2, 1)
    with pytest.raises(XMGIEInputError, match="a DiT such as Flux or SD3"):
        layout(nn.Linear(2, 2))


def test_block_patch_names_the_layers_as_comfyui_calls_them():
    seen = []
    patch = BlockPatch(lambda layer, h: seen.append(layer) or h + 1)
    h, hsp = torch.zeros(1), torch.zeros(1)
    assert patch.after_skip(h, {"block": ("input", 7)}) == 1
    out, skip = patch.output(h, hsp, {"block": ("output", 0)})
    assert out == 1 and skip is hsp  # the skip is never blended
    patch.output(h, hsp, {"block": ("output", 3)})
    assert seen == ["input_7", "middle", "output_2"]


def test_with_block_patch_copies_on_write():
    other = object()
    options = {"transformer_options": {"patches": {"output_block_patch": [other]}, "x": 1}}
    patch = BlockPatch(lambda layer, h: h)
    new = with_block_patch(options, patch)
    assert options == {"transformer_options": {"patches": {"output_block_patch": [other]}, "x": 1}}
    patches = new["transformer_options"]["patches"]
    assert patches["output_block_patch"] == [other, patch.output]
    assert patches["input_block_patch_after_skip"] == [patch.after_skip] and new["transformer_options"]["x"] == 1


def test_source_conds_get_the_positives_concat_inputs():
    concat = torch.ones(1, 4, 8, 8)
    positive = [[torch.zeros(1, 77, 8), {"concat_latent_image": concat, "concat_mask": concat[:, :1],
                                         "pooled_output": torch.ones(1, 8)}]]
    negative = [[torch.ones(1, 77, 8), {"concat_latent_image": concat * 2}]]
    source = [[torch.full((1, 77, 8), 3.0), {}]]
    (s_cond, s_extra), = source_conds(source, negative, positive)
    assert s_extra["concat_latent_image"] is concat and "pooled_output" not in s_extra
    (n_cond, n_extra), = source_conds(None, negative, positive)  # default: the negative, its own concat kept
    assert torch.equal(n_extra["concat_latent_image"], concat * 2)
    assert n_extra["concat_mask"] is positive[0][1]["concat_mask"]


def test_cond_content_ignores_per_run_objects():
    class Wrapped:
        def __init__(self, cond):
            self.cond = cond

    from xmgie_core.pfb import fingerprint

    t = torch.ones(2)
    a = [{"cross_attn": t, "uuid": "run-1", "model_conds": {"c_crossattn": Wrapped(t)}}]
    b = [{"cross_attn": t, "uuid": "run-2", "model_conds": {"c_crossattn": Wrapped(t)}}]
    assert fingerprint(cond_content(a)) == fingerprint(cond_content(b))
    b[0]["model_conds"]["c_crossattn"] = Wrapped(t + 1)
    assert fingerprint(cond_content(a)) != fingerprint(cond_content(b))
