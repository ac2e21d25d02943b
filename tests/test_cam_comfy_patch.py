"""The ComfyUI CAM patch callables, called with tensors shaped as ComfyUI passes them (no ComfyUI needed).

`run_attn2` replays BasicTransformerBlock's cross-attention step (attention.py; docs/comfyui-internals.md §3.3):
attn2_patch list, then either an attn2_replace (given projected q/k/v) or the stock path through
optimized attention with transformer_options (where an override is honoured), then the
attn2_output_patch list. The real ComfyUI runs in tests/host/.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from xmgie_core.attention import stock_attention
from xmgie_core.cam import TokenRestriction, masked_cross_attention
from xmgie_core.masks import RegionPyramid
from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy.cam import CAMSpec, CrossAttentionMaskPatch, chunk_rows, install
from xmgie_core.hosts.comfy.cam_prompt import PromptEncoding, workflow_texts

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


PROMPT = PromptEncoding("a man wearing a red scarf", (torch.randn(1, CTX, C, generator=torch.Generator().manual_seed(7)),))
"""The node's own prompt encoding; `_setup`'s context carries it in rows 2-3 (cond_or_uncond [1, 0])."""


def _setup(mode="renormalized", levels=("input", "middle", "output"), sigma_start=float("inf"), sigma_end=0.0):
    unet = Unet()
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1
    spec = CAMSpec((3, 4), (), CTX, RegionPyramid(mask), mode, 1.0, frozenset(levels), sigma_start, sigma_end)
    options = {"transformer_options": {}}
    install(options, CrossAttentionMaskPatch(spec, PROMPT, unet))
    g = torch.Generator().manual_seed(1)
    n = torch.randn(4, 16, C, generator=g)
    ctx = torch.cat([torch.randn(1, CTX, C, generator=g).expand(2, -1, -1), PROMPT.tensors[0].expand(2, -1, -1)])
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
    patch = CrossAttentionMaskPatch(spec, PROMPT, unet, options["transformer_options"]["optimized_attention_override"])
    install(options, patch)
    assert options["transformer_options"]["patches"]["attn2_patch"] == [other_patch, patch.arm]
    clone = copy.deepcopy(options)
    assert clone["transformer_options"]["optimized_attention_override"] is patch
    q = torch.randn(1, 16, C)
    patch(attention_pytorch, q, q, q, HEADS)
    assert previous_calls == [1]


def test_chunk_rows_and_mask_batch_errors():
    assert chunk_rows(6, (False, True)).tolist() == [3, 4, 5]
    assert chunk_rows(4, (True, True)).tolist() == [0, 1, 2, 3]
    assert chunk_rows(2, (False,)).tolist() == []
    unet, options, n, ctx, extra = _setup()
    spec = CAMSpec((3,), (), CTX, RegionPyramid(torch.ones(3, 4, 4)))
    with pytest.raises(XMGIEInputError, match="batch 3"):
        CrossAttentionMaskPatch(spec, PROMPT, unet).arm(n, ctx, ctx, extra)


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


def _masked_chunks(options, n, ctx, extra):
    """Which row pairs (chunks of 2) the patch changed against stock attention."""
    unet = Unet()
    with torch.no_grad():
        out = run_attn2(unet.attn, options, n, ctx, extra)
        stock = run_attn2(unet.attn, {"transformer_options": {}}, n, ctx, extra)
    return [not torch.equal(out[i:i + 2], stock[i:i + 2]) for i in range(0, n.shape[0], 2)]


def test_only_the_nodes_own_encoding_is_masked_whatever_its_cond_index():
    """The positive chunk carrying another prompt (same token count) is stock; the node's encoding is masked
    even in a chunk that is not cond index 0 (content decides, not position in calc_cond_batch's list)."""
    _, options, n, ctx, extra = _setup()
    other = torch.randn(1, CTX, C, generator=torch.Generator().manual_seed(3)).expand(2, -1, -1)
    assert _masked_chunks(options, n, ctx, extra) == [False, True]
    assert _masked_chunks(options, n, torch.cat([ctx[:2], other]), extra) == [False, False]
    assert _masked_chunks(options, n, torch.cat([ctx[2:], ctx[:2]]), extra) == [True, False]
    regional = {**extra, "cond_or_uncond": [0, 0]}  # two positive conds: only the node's own is masked
    assert _masked_chunks(options, n, torch.cat([other, ctx[2:]]), regional) == [False, True]


def test_a_context_that_is_no_tiling_of_the_prompt_is_not_masked():
    _, options, n, ctx, extra = _setup()
    assert _masked_chunks(options, n, ctx[:, :7], extra) == [False, False]
    assert _masked_chunks(options, n, torch.cat([ctx, ctx[:, :5]], dim=1), extra) == [False, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encoding_matches_after_a_cast_to_the_model_dtype(dtype):
    enc = PROMPT.tensors[0]
    assert PROMPT.matches(enc.to(dtype))
    assert PROMPT.matches(torch.cat([enc, enc], dim=1).to(dtype))
    assert not PROMPT.matches((enc + 0.05 * torch.randn_like(enc)).to(dtype))


def test_a_new_context_object_is_compared_again():
    """The per-pass cache is keyed by the context object: a new tensor is never taken for the old one."""
    _, options, n, ctx, extra = _setup()
    patch = options["transformer_options"]["optimized_attention_override"]
    patch.arm(n, ctx, ctx, extra)
    assert patch._armed is not None
    other = torch.randn_like(ctx)
    patch.arm(n, other, other, extra)
    assert patch._armed is None


class _Executor:
    """An outer_sample WrapperExecutor stand-in: class_obj is the guider, calling it runs the sampler."""

    def __init__(self, conds):
        self.class_obj = type("Guider", (), {"conds": conds})()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return "samples"


def _cond(tensor):
    return {"cross_attn": tensor, "model_conds": {}, "uuid": object()}


def test_sampler_with_the_nodes_prompt_runs():
    _, options, *_ = _setup()
    (wrapper,) = options["transformer_options"]["wrappers"]["outer_sample"]["xmgie_cam"]
    other = torch.randn(1, CTX, C)
    executor = _Executor({"positive": [_cond(other), _cond(PROMPT.tensors[0])], "negative": [_cond(other)]})
    assert wrapper(executor, "noise", "latent") == "samples" and executor.calls == 1


def test_sampler_without_the_nodes_prompt_stops_before_sampling_naming_both_texts():
    texts = {"a photo of a snowman standing in a park": torch.randn(1, CTX, C),
             "blurry, low quality": torch.randn(1, CTX, C)}
    graph = {"4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a snowman standing in a park"}},
             "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["3", 1]}},
             "8": {"class_type": "XMGIECrossAttentionMask", "inputs": {"prompt": PROMPT.text}},
             "9": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT.text}}}
    assert workflow_texts(graph, exclude=PROMPT.text) == tuple(texts)
    encoding = PromptEncoding(PROMPT.text, PROMPT.tensors, lambda: workflow_texts(graph, exclude=PROMPT.text),
                              texts.__getitem__)
    patch = CrossAttentionMaskPatch(CAMSpec((3,), (), CTX, RegionPyramid(torch.ones(1, 4, 4))), encoding)
    executor = _Executor({"positive": [_cond(texts["a photo of a snowman standing in a park"])],
                          "negative": [_cond(texts["blurry, low quality"])]})
    with pytest.raises(XMGIEInputError) as err:
        patch.check_sampler_conds(executor)
    message = str(err.value)
    assert executor.calls == 0
    assert "'a man wearing a red scarf'" in message and "'a photo of a snowman standing in a park'" in message
    assert "'positive' output" in message
    long_positive = _Executor({"positive": [_cond(torch.randn(1, 2 * CTX, C))], "negative": []})
    with pytest.raises(XMGIEInputError, match=f"positive conditioning \\({2 * CTX} tokens\\) was not encoded"):
        patch.check_sampler_conds(long_positive)
