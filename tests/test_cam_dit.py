"""CAM in a DiT's joint attention (eqs 10-12 on the image-query -> text-key columns): the core function against a naive
reference over the whole joint sequence, and the ComfyUI override's conventions, rows and chaining (no ComfyUI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xmgie_core import cam
from xmgie_core.cam import TokenRestriction, masked_joint_attention
from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy import cam_dit, dit
from xmgie_core.hosts.comfy.cam import CAMSpec
from xmgie_core.hosts.comfy.cam_prompt import PromptEncoding
from xmgie_core.masks import RegionPyramid

from test_cam import reference


def joint_reference(q, k, v, heads, text, n_img, region, edit, background, strength, mode):
    """Eqs 10-12 with materialised matrices over the joint sequence [text | image | references] (test_cam's naive
    reference): the image rows' softmax over all N keys with M on the edit / background text columns, every other
    row plain softmax attention. q/k/v [B, N, heads*d] -> [B, N, heads*d] float64."""
    rows = slice(text, text + n_img)
    out = reference(q, k, v, heads, torch.ones(1, q.shape[1]), [], [], 1.0, mode)
    out[:, rows] = reference(q[:, rows], k, v, heads, region, edit, background, strength, mode)
    return out


def restriction(edit, background=(), strength=1.0):
    return TokenRestriction(torch.tensor(edit, dtype=torch.long), torch.tensor(background, dtype=torch.long), strength)


def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] -> Flux's [B, heads, N, d]."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2).contiguous()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), text=st.integers(2, 9), n_img=st.integers(1, 20),
       n_ref=st.integers(0, 12), heads=st.sampled_from([1, 2, 4]), d=st.sampled_from([4, 8]),
       mode=st.sampled_from(cam.MODES), strength=st.floats(0.0, 1.0), n_edit=st.integers(0, 2),
       n_back=st.integers(0, 2), flux=st.booleans())
def test_joint_attention_matches_naive_reference(seed, b, text, n_img, n_ref, heads, d, mode, strength, n_edit,
                                                 n_back, flux):
    g = torch.Generator().manual_seed(seed)
    n = text + n_img + n_ref
    q, k, v = torch.randn(3, b, n, heads * d, generator=g)
    region = (torch.rand(b, n_img, generator=g) > 0.5).float()
    perm = torch.randperm(text, generator=g)
    edit, back = perm[:n_edit].tolist(), perm[n_edit:n_edit + n_back].tolist()
    args = (q, k, v) if not flux else tuple(heads_first(t, heads) for t in (q, k, v))
    got = masked_joint_attention(*args, heads, slice(text, text + n_img), region, restriction(edit, back, strength),
                                 mode, heads_first=flux)
    want = joint_reference(q, k, v, heads, text, n_img, region, edit, back, strength, mode)
    assert got.shape == (b, n, heads * d)
    assert torch.allclose(got.double(), want, atol=2e-5), (got.double() - want).abs().max()


def _joint(seed=0, b=2, text=6, n_img=12, n_ref=8, c=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, b, text + n_img + n_ref, c, generator=g).unbind(0)


@pytest.mark.parametrize("mode", cam.MODES)
@pytest.mark.parametrize("flux", [False, True])
def test_all_ones_region_is_stock_attention(mode, flux):
    q, k, v = _joint()
    args = (q, k, v) if not flux else tuple(heads_first(t, 2) for t in (q, k, v))
    out = masked_joint_attention(*args, 2, slice(6, 18), torch.ones(1, 12), restriction([1, 4]), mode,
                                 heads_first=flux)
    stock = F.scaled_dot_product_attention(*(heads_first(t, 2) for t in (q, k, v))).transpose(1, 2).reshape(q.shape)
    assert (out - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", cam.MODES)
def test_text_and_reference_rows_are_the_stock_function_s(mode):
    """Rows outside the generated image come from `stock` unchanged (other packs' overrides do that work) and the
    generated rows do change; the stock function sees exactly the text and reference query rows."""
    q, k, v = _joint()
    seen = []

    def stock(rows):
        seen.append(rows)
        return torch.full((rows.shape[0], rows.shape[1], 16), 7.0)

    region = torch.zeros(1, 12)
    out = masked_joint_attention(q, k, v, 2, slice(6, 18), region, restriction([2]), mode, stock=stock)
    assert torch.equal(seen[0], torch.cat([q[:, :6], q[:, 18:]], 1))
    assert (out[:, :6] == 7).all() and (out[:, 18:] == 7).all()
    plain = masked_joint_attention(q, k, v, 2, slice(6, 18), torch.ones(1, 12), restriction([2]), mode)
    assert (out[:, 6:18] - plain[:, 6:18]).abs().max() > 1e-3  # outside the region the word is masked


@pytest.mark.parametrize("mode", cam.MODES)
def test_masks_cover_only_image_rows_and_one_region_needs_none(monkeypatch, mode):
    """No [B, heads, N, N] probabilities, no full-N mask rows: strength 1 with one region runs mask-free over the keys
    each query keeps; per-latent regions get a boolean [B, 1, image rows, N + R] mask; strength < 1 an additive one.
    Each equals the naive reference."""
    real, masks = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(cam.F, "scaled_dot_product_attention", spy)
    q, k, v = _joint()
    region = (torch.arange(12) % 3 == 0).float()[None]
    cases = [(region, 1.0, None), (torch.cat([region, 1 - region]), 1.0, (torch.bool, (2, 1, 12, 26 + 3))),
             (region, 0.5, (q.dtype, (1, 1, 12, 26 + 3)))]
    for reg, strength, want_mask in cases:
        masks.clear()
        got = masked_joint_attention(q, k, v, 2, slice(6, 18), reg, restriction([1, 2], [3], strength), mode)
        want = joint_reference(q, k, v, 2, 6, 12, reg, [1, 2], [3], strength, mode)
        assert torch.allclose(got.double(), want, atol=2e-5)
        used = [m for m in masks if m is not None]
        if want_mask is None:
            assert used == [] and len(masks) == 3  # inside rows, outside rows, text + reference rows
        else:
            assert [(m.dtype, tuple(m.shape)) for m in used] == [want_mask]


def test_restricted_position_must_be_text():
    q, k, v = _joint()
    with pytest.raises(XMGIEInputError, match="not a text token"):
        masked_joint_attention(q, k, v, 2, slice(6, 18), torch.ones(1, 12), restriction([7]))


# ------------------------------------------------------------------------------ the ComfyUI override (no ComfyUI)

TEXT, H, W, REF, HEADS, C = 5, 3, 4, 6, 2, 16
PROMPT_CONTEXT = torch.randn(1, TEXT, 8, generator=torch.Generator().manual_seed(3))
OTHER_CONTEXT = torch.randn(1, TEXT, 8, generator=torch.Generator().manual_seed(4))


def _patch(levels=frozenset(cam_dit.LEVELS), previous=None, family=dit.FLUX, mode="renormalized", strength=1.0,
           sigmas=(float("inf"), 0.0)):
    mask = torch.zeros(1, 6, 8)
    mask[:, :, :4] = 1  # left half of the 3x4 grid
    spec = CAMSpec((1, 2), (4,), TEXT, RegionPyramid(mask, 0.5), mode, strength, levels, *sigmas)
    editor = dit.DiT(family, 2, 1 if family == dit.FLUX else 0, 2)
    return cam_dit.JointCrossAttentionMask(spec, PromptEncoding("a prompt", (PROMPT_CONTEXT,)), editor, previous)


def _forward_options(patch, context, cond_or_uncond=(0, 1), sigma=1.0):
    """The options one forward's attention sees: what the DIFFUSION_MODEL wrappers (geometry, rows) put in."""
    seen = {}

    def executor(*args, **kwargs):
        seen.update(args[dit._OPTIONS_INDEX[patch.dit.family]])

    args = [torch.zeros(context.shape[0], 16, 2 * H, 2 * W), torch.zeros(1), context] + [None] * 4
    options = {"cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([sigma])}
    args = args[:dit._OPTIONS_INDEX[patch.dit.family]] + [options]
    dit.GeometryWrapper(patch.dit)(lambda *a, **kw: patch.find_rows(executor, *a, **kw), *args)
    return seen


def _stock(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's attention_pytorch contract for both conventions."""
    qh, kh, vh = (t if skip_reshape else heads_first(t, heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])


def _call(patch, options, q, k, v, family, func=_stock):
    if family == dit.FLUX:
        return patch(func, *(heads_first(t, HEADS) for t in (q, k, v)), HEADS, skip_reshape=True, mask=None,
                     transformer_options=options)
    return patch(func, q, k, v, HEADS, None, transformer_options=options)


@pytest.mark.parametrize("family", [dit.FLUX, dit.QWEN_IMAGE])
@pytest.mark.parametrize("mode", cam.MODES)
def test_override_masks_only_the_prompt_rows_in_both_conventions(family, mode):
    patch = _patch(family=family, mode=mode)
    context = torch.cat([OTHER_CONTEXT, OTHER_CONTEXT, PROMPT_CONTEXT, PROMPT_CONTEXT])  # uncond x2, cond x2
    options = _forward_options(patch, context)
    assert options[cam_dit.ROWS].rows.tolist() == [2, 3]
    q, k, v = (t.repeat(2, 1, 1) for t in _joint(b=2, text=TEXT, n_img=H * W, n_ref=REF, c=C))
    out = _call(patch, options, q, k, v, family)
    region = patch.spec.region.grid(H, W, torch.device("cpu"))
    want = joint_reference(q, k, v, HEADS, TEXT, H * W, region, [1, 2], [4], 1.0, mode)
    stock = joint_reference(q, k, v, HEADS, TEXT, H * W, region, [], [], 1.0, mode)
    assert torch.allclose(out[2:].double(), want[2:], atol=2e-5)
    assert torch.allclose(out[:2].double(), stock[:2], atol=2e-5)
    assert (want[2:] - stock[2:]).abs().max() > 1e-3


def test_override_chains_the_previous_override_for_unmasked_work():
    calls = []

    def previous(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs) * 2  # another pack's override that changes its result

    patch = _patch(previous=previous)
    options = _forward_options(patch, torch.cat([OTHER_CONTEXT, PROMPT_CONTEXT]))
    q, k, v = _joint(b=2, text=TEXT, n_img=H * W, n_ref=REF, c=C)
    out = _call(patch, options, q, k, v, dit.FLUX)
    stock = _stock(*(heads_first(t, HEADS) for t in (q, k, v)), HEADS, skip_reshape=True)
    assert torch.allclose(out[0], 2 * stock[0], atol=1e-6)  # the uncond row: all theirs
    assert torch.allclose(out[1, :TEXT], 2 * stock[1, :TEXT], atol=1e-6)  # text / reference rows: theirs
    assert torch.allclose(out[1, TEXT + H * W:], 2 * stock[1, TEXT + H * W:], atol=1e-6)
    assert calls == [(1, HEADS, TEXT + REF, C // HEADS), (1, HEADS, TEXT + H * W + REF, C // HEADS)]


def test_override_passes_through_outside_window_levels_and_rows():
    q, k, v = _joint(b=1, text=TEXT, n_img=H * W, n_ref=REF, c=C)
    stock = _stock(q, k, v, HEADS)
    windowed = _patch(sigmas=(0.5, 0.0))
    assert torch.equal(_call(windowed, _forward_options(windowed, PROMPT_CONTEXT, (0,), sigma=0.9), q, k, v,
                             dit.QWEN_IMAGE), stock)
    assert not torch.equal(_call(windowed, _forward_options(windowed, PROMPT_CONTEXT, (0,), sigma=0.4), q, k, v,
                                 dit.QWEN_IMAGE), stock)
    patch = _patch()
    assert torch.equal(_call(patch, _forward_options(patch, OTHER_CONTEXT, (0,)), q, k, v, dit.QWEN_IMAGE), stock)
    only_output = _patch(levels=frozenset({"output"}))
    options = _forward_options(only_output, PROMPT_CONTEXT, (0,))
    assert torch.equal(_call(only_output, {**options, cam_dit.LEVEL: "input"}, q, k, v, dit.QWEN_IMAGE), stock)
    assert not torch.equal(_call(only_output, {**options, cam_dit.LEVEL: "output"}, q, k, v, dit.QWEN_IMAGE), stock)


def test_override_refuses_an_existing_attention_mask():
    patch = _patch()
    options = _forward_options(patch, PROMPT_CONTEXT, (0,))
    q, k, v = _joint(b=1, text=TEXT, n_img=H * W, n_ref=REF, c=C)
    with pytest.raises(XMGIEInputError, match="already has an attention mask"):
        patch(_stock, q, k, v, HEADS, torch.zeros(1, 1, 23, 23), transformer_options=options)


def test_block_levels_are_depth_thirds():
    assert cam_dit.block_levels(dit.DiT(dit.FLUX, 2, 4, 2)) == {
        ("double_block", 0): "input", ("double_block", 1): "input", ("single_block", 0): "middle",
        ("single_block", 1): "middle", ("single_block", 2): "output", ("single_block", 3): "output"}
    assert set(cam_dit.block_levels(dit.DiT(dit.QWEN_IMAGE, 60, 0, 2)).values()) == set(cam_dit.LEVELS)


def test_install_copies_options_and_composes_block_patches():
    earlier = {"transformer_options": {"patches_replace": {"dit": {("double_block", 0): "theirs"}}}}
    snapshot = {"transformer_options": {"patches_replace": {"dit": {("double_block", 0): "theirs"}}}}
    patch = _patch(levels=frozenset({"input"}))
    options = cam_dit.install(earlier, patch)
    assert earlier == snapshot
    to = options["transformer_options"]
    assert to["optimized_attention_override"] is patch
    assert to["wrappers"][dit.DIFFUSION_MODEL]["xmgie_cam_dit"] == [patch.find_rows]
    assert isinstance(to["wrappers"][dit.DIFFUSION_MODEL]["xmgie_dit"][0], dit.GeometryWrapper)
    assert to["wrappers"]["outer_sample"]["xmgie_cam"] == [patch.check_sampler_conds]
    block = to["patches_replace"]["dit"][("double_block", 0)]
    assert block.previous == "theirs" and block.level == "input"
    ran = []
    block = cam_dit.LevelPatch("middle")
    block({"img": 1, "transformer_options": {"a": 1}},
          {"original_block": lambda args: ran.append(args["transformer_options"])})
    assert ran == [{"a": 1, cam_dit.LEVEL: "middle"}]
