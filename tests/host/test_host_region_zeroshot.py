"""Zero-shot region modes in a real ComfyUI on the tiny SD1.5 checkpoint: the noise-difference map (against a pass
written out with BaseModel.apply_model), the edit words' attention map, seeds and batches, the input MODEL untouched,
the recording replace patch leaving sampling unchanged, interruption, and user errors."""

from __future__ import annotations

import pytest
import torch

PROMPT = "a photo of a man wearing a red scarf"
SOURCE = "a photo of a man"


@pytest.fixture(scope="module")
def sd15(comfy_host, tiny_checkpoint):
    """(model, clip) of the tiny checkpoint, loaded by CheckpointLoaderSimple."""
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.name)[:2]


@pytest.fixture(scope="module")
def region(comfy_host):
    from xmgie_core.hosts.comfy import region

    return region


def latent(batch: int = 1, seed: int = 0, size: int = 8) -> torch.Tensor:
    """A raw VAE latent (VAE space, as VAE Encode returns it)."""
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed)) * 5


def test_noise_difference_map(region, sd15):
    model, clip = sd15
    options = repr(model.model_options)
    calls = []
    m = region.comfy_noise_difference(model, clip, PROMPT, SOURCE, latent(), draws=3, seed=1, strength_range=(0.3, 0.7),
                                      progress=lambda done, total: calls.append((done, total)))
    assert m.shape == (1, 8, 8) and m.dtype == torch.float32 and m.device.type == "cpu"
    assert torch.isfinite(m).all() and (m >= 0).all() and (m > 0).any()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert repr(model.model_options) == options, "the input MODEL was changed"


def test_identical_descriptions_give_a_zero_map(region, sd15):
    model, clip = sd15
    m = region.comfy_noise_difference(model, clip, PROMPT, PROMPT, latent(), draws=2, seed=0)
    assert m.shape == (1, 8, 8) and m.abs().max() <= 1e-6


def test_noise_difference_equals_a_pass_written_out(region, sd15):
    """One draw at strength 0.5 by hand: z = process_latent_in(latent), x = z + sigma * noise, eps from
    BaseModel.apply_model under each prompt; the map is |eps_t - eps_s| averaged over channels."""
    model, clip = sd15
    raw = latent()
    m = region.comfy_noise_difference(model, clip, PROMPT, SOURCE, raw, draws=1, seed=3)
    base = model.model
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigma(torch.tensor(500.0)).reshape(1)
    noise = torch.randn((1, *raw.shape), generator=torch.Generator().manual_seed(3))[0]
    x = base.process_latent_in(raw) + sigma * noise
    eps = []
    for text in (PROMPT, SOURCE):
        cond = region.encode(clip, text)[0][0]
        with torch.no_grad():
            eps.append((x - base.apply_model(x, sigma, c_crossattn=cond)) / sigma)
    assert torch.allclose(m, (eps[0] - eps[1]).abs().mean(dim=1), atol=1e-4, rtol=1e-3)


def test_noise_difference_seed_and_batch(region, sd15):
    model, clip = sd15
    z = latent().repeat(2, 1, 1, 1)  # the same image twice
    m = region.comfy_noise_difference(model, clip, PROMPT, SOURCE, z, draws=2, seed=5)
    assert m.shape == (2, 8, 8) and torch.isfinite(m).all()
    assert not torch.allclose(m[0], m[1]), "each image of a batch must get its own noise"
    assert torch.equal(m, region.comfy_noise_difference(model, clip, PROMPT, SOURCE, z, draws=2, seed=5))
    assert not torch.allclose(m, region.comfy_noise_difference(model, clip, PROMPT, SOURCE, z, draws=2, seed=6))


def test_edit_attention_map(region, sd15, monkeypatch):
    model, clip = sd15
    options = repr(model.model_options)
    layers = []
    real = region.attend_and_record
    monkeypatch.setattr(region, "attend_and_record", lambda q, *a: layers.append(q.shape) or real(q, *a))
    calls = []
    m = region.comfy_edit_attention(model, clip, PROMPT, "red scarf", latent(), steps=3, seed=1, strength=0.6,
                                    progress=lambda done, total: calls.append((done, total)))
    assert m.shape == (1, 8, 8) and m.dtype == torch.float32 and m.device.type == "cpu"
    assert torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all() and (m > 0).any()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    attn2 = len(region.unet.attn2_keys(model.model.diffusion_model))
    assert attn2 == 4 and len(layers) == 3 * attn2 and all(s[0] == 1 for s in layers)
    assert repr(model.model_options) == options, "the input MODEL was changed"
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_edit_attention_over_every_token_is_one(region, sd15, monkeypatch):
    """Positions of a two-chunk prompt covering all its tokens: the probabilities sum to 1 in every layer."""
    model, clip = sd15
    long_prompt = "a photo of a man, " * 16 + "wearing a red scarf"
    positions, length = region.comfy_token_positions(clip, long_prompt, "red scarf")
    assert length == 154 and min(positions) >= 77
    monkeypatch.setattr(region, "comfy_token_positions", lambda *a: (list(range(length)), length))
    m = region.comfy_edit_attention(model, clip, long_prompt, "red scarf", latent(), steps=2, seed=0, strength=0.5)
    assert torch.allclose(m, torch.ones_like(m), atol=1e-5)


def test_edit_attention_seed_and_batch(region, sd15):
    model, clip = sd15
    z = latent().repeat(2, 1, 1, 1)
    m = region.comfy_edit_attention(model, clip, PROMPT, "red scarf", z, steps=2, seed=2, strength=0.7)
    assert m.shape == (2, 8, 8) and torch.isfinite(m).all()
    assert not torch.allclose(m[0], m[1]), "each image of a batch must get its own noise"
    assert torch.equal(m, region.comfy_edit_attention(model, clip, PROMPT, "red scarf", z, 2, 2, 0.7))
    assert not torch.allclose(m, region.comfy_edit_attention(model, clip, PROMPT, "red scarf", z, 2, 3, 0.7))


def test_recording_patch_leaves_sampling_unchanged(comfy_host, region, sd15):
    from xmgie_core.region.zeroshot import AttentionMaps

    model, clip = sd15
    patched = model.clone()
    maps = AttentionMaps((8, 8), 1)
    positions, length = region.comfy_token_positions(clip, PROMPT, "red scarf")
    recorder = region.CrossAttentionRecorder(positions, length, maps)
    for key in region.unet.attn2_keys(patched.model.diffusion_model):
        patched.set_model_attn2_replace(recorder, *key)
    positive = comfy_host.nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]

    def sample(m):
        return comfy_host.nodes.common_ksampler(m, 7, 3, 5.0, "euler", "normal", positive, negative,
                                                {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]

    stock = sample(model)
    recorded = sample(patched)
    assert maps.count == 3 * 4 and maps.total is not None
    # the recorder recomputes attention in its own order: float32 rounding on latents of magnitude ~200 after 3 steps
    # of the random tiny model, not a change of the result (which would be of the latents' own scale)
    assert (recorded - stock).abs().max() <= 1e-4 * stock.abs().max(), (recorded - stock).abs().max()


def test_interrupt_stops_the_passes(region, sd15):
    import comfy.model_management as mm

    model, clip = sd15
    calls = []

    def interrupt_after_first(done, total):
        calls.append(done)
        mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):
        region.comfy_noise_difference(model, clip, PROMPT, SOURCE, latent(), 4, 0, progress=interrupt_after_first)
    assert calls == [1] and not mm.processing_interrupted()


@pytest.mark.parametrize("mode, change, match", [
    ("attention", dict(edit_words="blue hat"), r"'blue hat'.*cannot be located in the prompt.*red.*scarf"),
    ("attention", dict(steps=0), r"steps must be a whole number of at least 1"),
    ("attention", dict(strength=0.0), r"strength must be above 0 and at most 1"),
    ("attention", dict(latent=torch.zeros(1, 16, 8, 8)), r"\[batch, 4, height, width\].*VAE Encode"),
    ("difference", dict(draws=0), r"draws must be a whole number of at least 1"),
    ("difference", dict(strength_range=(0.8, 0.2)), r"give the lower strength first"),
    ("difference", dict(latent=torch.full((1, 4, 8, 8), float("inf"))), r"NaN or infinite"),
])
def test_bad_input(region, sd15, mode, change, match):
    from xmgie_core.errors import XMGIEInputError

    model, clip = sd15
    if mode == "attention":
        args = {**dict(target_text=PROMPT, edit_words="red scarf", latent=latent(), steps=2, seed=0, strength=0.5),
                **change}
        call = region.comfy_edit_attention
    else:
        args = {**dict(target_text=PROMPT, source_text=SOURCE, latent=latent(), draws=2, seed=0), **change}
        call = region.comfy_noise_difference
    with pytest.raises(XMGIEInputError, match=match):
        call(model, clip, **args)
