"""The ComfyUI CAM patch callables, called with tensors shaped as ComfyUI passes them (no ComfyUI needed).

`run_attn2` replays BasicTransformerBlock's cross-attention step (attention.py, COMFY_HOST 2.4):
attn2_patch list, then either an attn2_replace (given projected q/k/v) or the stock path through
optimized attention with transformer_options (where an override is honoured), then the
attn2_output_patch list. The real ComfyUI runs in tests/host/.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from xmgie_core.cam import RegionPyramid, TokenRestriction, masked_cross_attention, stock_attention
from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy_cam import CAMSpec, CrossAttentionMaskPatch, install, positive_rows

HEADS, C, CTX = 2, 16, 12


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(C, C), nn.Dropout(0.0)])


class Unet(nn.Module):
    """Just enough of openaimodel.UNetModel for find_attn2: input_blocks[1][1].transformer_blocks[0].attn2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        st = nn.Module()
        st.transformer_blocks = nn.ModuleList([nn.Module()])
        st.transformer_blocks[0].attn2 = Attn()
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Identity()]), nn.ModuleList([nn.Identity(), st])])

    @property
    def attn(self) -> Attn:
        return self.input_blocks[1][1].transformer_blocks[0].attn2


def attention_pytorch(q, k, v, heads, **kwargs):
    """Stands in for ComfyUI's attention function (accepts its keyword arguments)."""
    return stock_attention(q, k, v, heads)


def optimized_attention(q, k, v, heads, transformer_options=None, **kwargs):
    """ComfyUI's wrap_attn behaviour: an override in transformer_options takes the call."""
    if transformer_options is not None and "optimized_attention_override" in transformer_options:
        return transformer_options["optimized_attention_override"](attention_pytorch, q, k, v, heads,
                                                                   transformer_options=transformer_options)
    return attention_pytorch(q, k, v, heads)


def run_attn2(attn, model_options, n, context, extra, replace=None):
    to = model_options["transformer_options"]
    patches = to.get("patches", {})
    extra = {**{k: v for k, v in to.items() if k != "patches"}, **extra, "n_heads": HEADS}
    value = context
    for p in patches.get("attn2_patch", []):
        n, context, value = p(n, context, value, extra)
    q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(value)
    out = replace(q, k, v, extra) if replace else optimized_attention(q, k, v, HEADS, transformer_options=to)
    out = attn.to_out[1](attn.to_out[0](out))
    for p in patches.get("attn2_output_patch", []):
        out = p(out, extra)
    return out


def ip_adapter_style(q, k, v, extra):
    """Like IP-Adapter's Attn2Replace: its own optimized_attention call (no transformer_options) + its term."""
    return optimized_attention(q, k, v, extra["n_heads"]) + 0.5 * torch.tanh(q)


def _setup(mode="renormalized", levels=("input", "middle", "output"), sigma_start=float("inf"), sigma_end=0.0):
    unet = Unet()
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1
    spec = CAMSpec((3, 4), (), CTX, RegionPyramid(mask), mode, 1.0, frozenset(levels), sigma_start, sigma_end)
    options = {"transformer_options": {}}
    install(options, CrossAttentionMaskPatch(spec, unet))
    g = torch.Generator().manual_seed(1)
    n, ctx = torch.randn(4, 16, C, generator=g), torch.randn(4, CTX, C, generator=g)
    extra = {"block": ("input", 1), "block_index": 0, "cond_or_uncond": [1, 0], "activations_shape": [4, C, 4, 4],
             "sigmas": torch.tensor([5.0] * 4)}
    return unet, options, n, ctx, extra


def _expected(unet, n, ctx, mode, extra_term=None):
    attn = unet.attn
    q, k, v = attn.to_q(n), attn.to_k(ctx), attn.to_v(ctx)
    region = RegionPyramid(torch.ones(1, 4, 4) * torch.tensor([1.0, 1, 0, 0])).grid(4, 4)
    restriction = TokenRestriction(torch.tensor([3, 4]), torch.zeros(0, dtype=torch.long))
    o = stock_attention(q, k, v, HEADS)
    o[2:] = masked_cross_attention(q[2:], k[2:], v[2:], HEADS, region, restriction, mode)
    if extra_term is not None:
        o = o + extra_term(q)
    return attn.to_out[0](o)


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
def test_override_masks_positive_rows_only(mode):
    unet, options, n, ctx, extra = _setup(mode)
    with torch.no_grad():
        out = run_attn2(unet.attn, options, n, ctx, extra)
        stock = run_attn2(unet.attn, {"transformer_options": {}}, n, ctx, extra)
        want = _expected(unet, n, ctx, mode)
    assert torch.equal(out[:2], stock[:2])  # uncond chunk (cond_or_uncond [1, 0]) untouched
    assert torch.allclose(out, want, atol=1e-5)
    assert not torch.allclose(out[2:], stock[2:], atol=1e-3)


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
def test_ip_adapter_style_replace_keeps_both_effects(mode):
    unet, options, n, ctx, extra = _setup(mode)
    with torch.no_grad():
        out = run_attn2(unet.attn, options, n, ctx, extra, replace=ip_adapter_style)
        want = _expected(unet, n, ctx, mode, extra_term=lambda q: 0.5 * torch.tanh(q))
        cam_only = _expected(unet, n, ctx, mode)
    assert torch.allclose(out, want, atol=1e-5)
    assert not torch.allclose(out, cam_only, atol=1e-3)  # the replace's own term is there too


def test_other_attention_calls_pass_through():
    unet, options, n, ctx, extra = _setup()
    patch = options["transformer_options"]["optimized_attention_override"]
    patch.arm(n, ctx, ctx, {**extra, "n_heads": HEADS})
    q = torch.randn(4, 16, C)
    self_attn = patch(attention_pytorch, q, q, q, HEADS)  # attn1-like: 16 keys, not the armed context
    assert torch.equal(self_attn, stock_attention(q, q, q, HEADS))


def test_levels_and_schedule_gate_the_patch():
    unet, options, n, ctx, extra = _setup(levels=("output",))
    with torch.no_grad():
        stock = run_attn2(unet.attn, {"transformer_options": {}}, n, ctx, extra)
        assert torch.equal(run_attn2(unet.attn, options, n, ctx, extra), stock)
        unet, options, n, ctx, extra = _setup(sigma_start=3.0, sigma_end=1.0)
        assert torch.equal(run_attn2(unet.attn, options, n, ctx, extra), stock)
        extra["sigmas"] = torch.tensor([2.0] * 4)
        assert not torch.equal(run_attn2(unet.attn, options, n, ctx, extra), stock)


def test_clone_shares_the_patch_and_install_composes():
    previous_calls = []

    def other_override(func, *args, **kwargs):
        previous_calls.append(1)
        return func(*args, **kwargs)

    def other_patch(n, c, v, e):
        return n, c, v

    unet = Unet()
    options = {"transformer_options": {"patches": {"attn2_patch": [other_patch]},
                                       "optimized_attention_override": other_override}}
    spec = CAMSpec((3,), (), CTX, RegionPyramid(torch.ones(1, 4, 4)))
    patch = CrossAttentionMaskPatch(spec, unet, options["transformer_options"]["optimized_attention_override"])
    install(options, patch)
    assert options["transformer_options"]["patches"]["attn2_patch"] == [other_patch, patch.arm]
    clone = copy.deepcopy(options)
    assert clone["transformer_options"]["optimized_attention_override"] is patch
    q = torch.randn(1, 16, C)
    patch(attention_pytorch, q, q, q, HEADS)
    assert previous_calls == [1]


def test_positive_rows_and_mask_batch_errors():
    assert positive_rows(6, [1, 0]).tolist() == [3, 4, 5]
    assert positive_rows(4, [0, 0]).tolist() == [0, 1, 2, 3]
    assert positive_rows(2, [1]).tolist() == []
    unet, options, n, ctx, extra = _setup()
    spec = CAMSpec((3,), (), CTX, RegionPyramid(torch.ones(3, 4, 4)))
    with pytest.raises(XMGIEInputError, match="batch 3"):
        CrossAttentionMaskPatch(spec, unet).arm(n, ctx, ctx, extra)


def test_tiled_context_masks_every_copy_of_the_words():
    """ComfyUI tiles a 77-token cond to a longer uncond's length: positions repeat per tile."""
    unet, options, n, ctx, extra = _setup("renormalized")
    tiled = torch.cat([ctx, ctx], dim=1)
    with torch.no_grad():
        out = run_attn2(unet.attn, options, n, tiled, extra)
        attn = unet.attn
        q, k, v = attn.to_q(n[2:]), attn.to_k(tiled[2:]), attn.to_v(tiled[2:])
        region = RegionPyramid(torch.ones(1, 4, 4) * torch.tensor([1.0, 1, 0, 0])).grid(4, 4)
        every_copy = TokenRestriction(torch.tensor([3, 4, 3 + CTX, 4 + CTX]), torch.zeros(0, dtype=torch.long))
        want = attn.to_out[0](masked_cross_attention(q, k, v, HEADS, region, every_copy, "renormalized"))
        first_copy_only = TokenRestriction(torch.tensor([3, 4]), torch.zeros(0, dtype=torch.long))
        partial = attn.to_out[0](masked_cross_attention(q, k, v, HEADS, region, first_copy_only, "renormalized"))
    assert torch.allclose(out[2:], want, atol=1e-5)
    assert not torch.allclose(out[2:], partial, atol=1e-4)
    with pytest.raises(XMGIEInputError, match="not a multiple"):
        run_attn2(unet.attn, options, n, ctx[:, :7], extra)
