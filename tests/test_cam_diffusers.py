"""CAM end to end on the tiny diffusers UNet2DConditionModel (the second host)."""

from __future__ import annotations

import pytest
import torch

from fixtures.tiny_models import CROSS_DIM
from xmgie_core.cam import TokenRestriction
from xmgie_core.hosts.diffusers.cam import CAMAttnProcessor, cross_attention_masking
from xmgie_core.hosts.diffusers.tokens import hf_token_positions

PROMPT = "a photo of a man wearing a red scarf in a snowy park"


@pytest.fixture(scope="module")
def inputs(clip_tokenizer, tiny_clip_text):
    ids = clip_tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = tiny_clip_text(ids).last_hidden_state
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), ctx


def run(unet, x, ctx):
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=ctx).sample


def restriction(edit, background=()):
    return TokenRestriction(torch.tensor(edit), torch.tensor(list(background), dtype=torch.long))


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
def test_full_region_edit_words_equal_stock_unet(tiny_unet, clip_tokenizer, inputs, mode):
    x, ctx = inputs
    edit = hf_token_positions(clip_tokenizer, PROMPT, "red scarf")
    with cross_attention_masking(tiny_unet, restriction(edit), torch.ones(1, 128, 128), mode):
        out = run(tiny_unet, x, ctx)
    assert (out - run(tiny_unet, x, ctx)).abs().max() <= 1e-5


def test_background_words_in_full_region_equal_deleting_them(tiny_unet, clip_tokenizer, inputs):
    """Renormalized: inside the region background tokens get -inf scores, which is the same as
    removing them from the context; with the region everywhere the whole output must match."""
    x, ctx = inputs
    back = hf_token_positions(clip_tokenizer, PROMPT, "snowy park")
    keep = [i for i in range(77) if i not in back]
    with cross_attention_masking(tiny_unet, restriction([], back), torch.ones(1, 64, 64), "renormalized"):
        out = run(tiny_unet, x, ctx)
    deleted = run(tiny_unet, x, ctx[:, keep])
    assert (out - deleted).abs().max() <= 1e-5
    assert (out - run(tiny_unet, x, ctx)).abs().max() > 1e-3


def test_partial_region_changes_output_only_through_masked_tokens(tiny_unet, clip_tokenizer, inputs):
    x, ctx = inputs
    edit = hf_token_positions(clip_tokenizer, PROMPT, "red scarf")
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:100] = 1
    with cross_attention_masking(tiny_unet, restriction(edit), mask):
        masked = run(tiny_unet, x, ctx)
        ctx2 = ctx.clone()
        ctx2[:, edit] = torch.randn(1, len(edit), CROSS_DIM)
        masked_other_words = run(tiny_unet, x, ctx2)
    stock = run(tiny_unet, x, ctx)
    assert (masked - stock).abs().max() > 1e-4
    # swapping the edit words' embeddings changes the result (they still act inside the region) ...
    assert (masked_other_words - masked).abs().max() > 1e-4
    # ... and removing every non-edit difference: unmasked run with the same swap differs from the masked one
    assert (run(tiny_unet, x, ctx2) - masked_other_words).abs().max() > 1e-4


def test_cfg_rows_and_processor_restore(tiny_unet, clip_tokenizer, inputs):
    x, ctx = inputs
    before = dict(tiny_unet.attn_processors)
    edit = hf_token_positions(clip_tokenizer, PROMPT, "red scarf")
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1
    batch_x, batch_ctx = x.repeat(2, 1, 1, 1), ctx.repeat(2, 1, 1)
    with cross_attention_masking(tiny_unet, restriction(edit), mask, rows=slice(1, None)):
        cam = {n for n, p in tiny_unet.attn_processors.items() if isinstance(p, CAMAttnProcessor)}
        assert cam == {n for n in before if ".attn2." in n} and len(cam) == 7
        out = run(tiny_unet, batch_x, batch_ctx)
    stock = run(tiny_unet, x, ctx)
    assert (out[0] - stock[0]).abs().max() <= 1e-5  # the unconditional half is stock
    assert (out[1] - stock[0]).abs().max() > 1e-4
    with pytest.raises(RuntimeError):
        with cross_attention_masking(tiny_unet, restriction(edit), mask):
            raise RuntimeError("boom")
    assert dict(tiny_unet.attn_processors) == before
