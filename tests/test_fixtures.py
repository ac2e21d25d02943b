"""The tiny models build, run, and have the structure later tests rely on."""

from __future__ import annotations

import torch

from fixtures.tiny_models import CROSS_DIM


def test_clip_tokenizer_has_real_clip_ids(clip_tokenizer):
    ids = clip_tokenizer("a photo of a red cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 736, 2368, 49407]
    assert len(clip_tokenizer) == 49408


def test_unet_has_cross_attention_at_two_resolutions(tiny_unet):
    seen = {}

    def hook(name):
        def fn(module, args, kwargs, out):
            seen[name] = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in tiny_unet.named_modules()
               if n.endswith("attn2")]
    with torch.no_grad():
        out = tiny_unet(torch.randn(2, 4, 16, 16), 10, encoder_hidden_states=torch.randn(2, 77, CROSS_DIM)).sample
    for h in handles:
        h.remove()
    assert out.shape == (2, 4, 16, 16)
    assert {256, 64} <= set(seen.values())


def test_vae_round_trip_shapes(tiny_vae):
    with torch.no_grad():
        lat = tiny_vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        img = tiny_vae.decode(lat).sample
    assert lat.shape == (1, 4, 8, 8) and img.shape == (1, 3, 64, 64)


def test_text_vision_t5_encoders(tiny_clip_text, clip_tokenizer, tiny_clip_vision, tiny_t5):
    ids = clip_tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert tiny_clip_text(ids).last_hidden_state.shape == (1, 77, CROSS_DIM)
        v = tiny_clip_vision(pixel_values=torch.rand(1, 3, 32, 32))
        assert v.last_hidden_state.shape == (1, 17, 32) and v.image_embeds.shape == (1, CROSS_DIM)
        assert tiny_t5(torch.tensor([[5, 6, 7, 1]])).last_hidden_state.shape == (1, 4, 32)


def test_models_are_seeded(tiny_unet):
    from fixtures.tiny_models import tiny_unet as build

    again = build()
    a, b = next(iter(tiny_unet.parameters())), next(iter(again.parameters()))
    assert torch.equal(a, b)
