"""Zero-shot region modes without ComfyUI: DiffEdit's noise-difference map and the edit words' cross-attention map
(pure math, and on the tiny diffusers UNet), the schedules and seeded noise, CLIPSeg from a tiny local folder, and
the errors for bad input."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from fixtures.tiny_clipseg import save_tiny_clipseg
from xmgie_core.errors import XMGIEInputError
from xmgie_core.model_cache import MODELS
from xmgie_core.hosts.diffusers.region import (AttentionRecorder, diffusers_edit_attention,
                                               diffusers_noise_difference)
from xmgie_core.hosts.diffusers.unet import cross_attention_processors
from xmgie_core.region.clipseg import clipseg_probabilities, load_clipseg, unload_clipseg
from xmgie_core.region.zeroshot import (AttentionMaps, attend_and_record, denoising_timesteps,
                                        noise_difference_map, noise_difference_timesteps, seeded_noise)
from xmgie_core.hosts.diffusers.tokens import hf_token_positions

PROMPT = "a photo of a man wearing a red scarf in a snowy park"
SOURCE = "a photo of a man in a snowy park"


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler()


@pytest.fixture(scope="module")
def embeddings(clip_tokenizer, tiny_clip_text):
    def encode(text):
        ids = clip_tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return tiny_clip_text(ids).last_hidden_state
    return encode(PROMPT), encode(SOURCE)


def latents(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- DiffEdit math


def test_noise_difference_map_is_largest_exactly_where_the_predictions_differ():
    g = torch.Generator().manual_seed(1)
    eps_source = torch.randn(3, 2, 2, 4, 16, 16, generator=g)  # draws x timesteps x batch x channels
    eps_target = eps_source.clone()
    delta = 0.5 + torch.rand(3, 2, 2, 4, 4, 6, generator=g)
    eps_target[..., 4:8, 6:12] += delta * torch.sign(torch.randn(delta.shape, generator=g))
    m = noise_difference_map(eps_target, eps_source)
    assert m.shape == (2, 16, 16)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 6:12] = True
    assert torch.equal(m > 0, inside.expand(2, -1, -1))
    assert torch.allclose(m[:, 4:8, 6:12], delta.mean(dim=(0, 1, 3)))
    for b in range(2):
        row, col = divmod(int(m[b].argmax()), 16)
        assert inside[row, col]


def test_noise_difference_map_rejects_mismatched_predictions():
    with pytest.raises(ValueError, match="share a shape"):
        noise_difference_map(torch.zeros(2, 1, 4, 8, 8), torch.zeros(2, 1, 4, 8, 4))


# -- schedules and noise


def test_strength_schedules():
    assert noise_difference_timesteps((0.5, 0.5), 3, 1000) == [500, 500, 500]
    assert noise_difference_timesteps((0.2, 0.8), 4, 1000) == [200, 400, 599, 799]
    assert noise_difference_timesteps((0.2, 0.8), 1, 1000) == [500]
    assert denoising_timesteps(0.6, 3, 1000) == [599, 399, 200]
    assert denoising_timesteps(1.0, 1, 1000) == [999]


def test_seeded_noise_is_reproducible_and_differs_per_image():
    a = seeded_noise(7, (2, 4, 8, 8), 3)
    assert a.shape == (3, 2, 4, 8, 8)
    assert torch.equal(a, seeded_noise(7, (2, 4, 8, 8), 3))
    assert not torch.equal(a[:, 0], a[:, 1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, seeded_noise(8, (2, 4, 8, 8), 3))
    half = seeded_noise(7, (2, 4, 8, 8), 3, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, a.half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_noise_is_the_same_on_the_gpu():
    assert torch.equal(seeded_noise(7, (2, 4, 8, 8), 2, "cuda").cpu(), seeded_noise(7, (2, 4, 8, 8), 2))


# -- attention math


def manual_layer_map(q, k, heads, positions, grid, size):
    """softmax(Q K^T / sqrt(d)) written out, edit positions summed, heads averaged, bilinear to `size`."""
    b, n, c = q.shape
    d = c // heads
    qh = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    kh = k.reshape(b, k.shape[1], heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    layer = probs[..., positions].sum(-1).mean(1).reshape(b, 1, *grid)
    return F.interpolate(layer, size=size, mode="bilinear", align_corners=False)[:, 0]


def test_attend_and_record_is_stock_attention_and_records_the_manual_map():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 16, 8, generator=g), torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    positions = torch.tensor([2, 5])
    maps = AttentionMaps((8, 8), 2)
    out = attend_and_record(q, k, v, 2, positions, (4, 4), maps)
    stock = F.scaled_dot_product_attention(*(t.view(2, -1, 2, 4).transpose(1, 2) for t in (q, k, v)))
    assert torch.allclose(out, stock.transpose(1, 2).reshape(2, 16, 8), atol=1e-6)
    assert torch.allclose(maps.mean(), manual_layer_map(q, k, 2, positions, (4, 4), (8, 8)), atol=1e-6)


def test_attention_maps_average_layers_and_fold_chunks():
    maps = AttentionMaps((4, 4), 1)
    maps.add(torch.full((1, 2, 2), 0.2))
    maps.add(torch.stack([torch.full((4, 4), 0.4), torch.full((4, 4), 0.8)]))  # two chunks of the same image
    assert maps.count == 2 and torch.allclose(maps.mean(), torch.full((1, 4, 4), 0.4))
    with pytest.raises(XMGIEInputError, match="noise-difference or CLIPSeg"):
        AttentionMaps((4, 4), 1).mean()


# -- diffusers host: noise difference


def test_identical_descriptions_give_an_all_zero_map(tiny_unet, scheduler, embeddings):
    target, _ = embeddings
    m = diffusers_noise_difference(tiny_unet, scheduler, latents(), target, target, draws=2, seed=0)
    assert m.shape == (1, 16, 16) and torch.all(m == 0)


def test_noise_difference_map_shape_seed_and_batch(tiny_unet, scheduler, embeddings):
    target, source = embeddings
    z = latents().repeat(2, 1, 1, 1)  # the same image twice
    calls = []
    m = diffusers_noise_difference(tiny_unet, scheduler, z, target, source, draws=3, seed=4, strength_range=(0.3, 0.7),
                                   progress=lambda done, total: calls.append((done, total)))
    assert m.shape == (2, 16, 16) and torch.isfinite(m).all() and (m >= 0).all() and (m > 0).any()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert not torch.allclose(m[0], m[1]), "each image of a batch must get its own noise"
    again = diffusers_noise_difference(tiny_unet, scheduler, z, target, source, draws=3, seed=4,
                                       strength_range=(0.3, 0.7))
    assert torch.equal(m, again)
    other = diffusers_noise_difference(tiny_unet, scheduler, z, target, source, draws=3, seed=5,
                                       strength_range=(0.3, 0.7))
    assert not torch.allclose(m, other)


def test_noise_difference_equals_manual_diffedit(tiny_unet, scheduler, embeddings):
    """One draw at strength 0.5: |eps(x_t, target) - eps(x_t, source)| averaged over channels, x_t from add_noise."""
    target, source = embeddings
    z = latents()
    m = diffusers_noise_difference(tiny_unet, scheduler, z, target, source, draws=1, seed=3)
    t = 500
    noise = torch.randn((1, *z.shape), generator=torch.Generator().manual_seed(3))[0]
    x_t = scheduler.add_noise(z, noise, torch.tensor([t]))
    with torch.no_grad():
        eps_t = tiny_unet(x_t, t, encoder_hidden_states=target).sample
        eps_s = tiny_unet(x_t, t, encoder_hidden_states=source).sample
    assert torch.allclose(m, (eps_t - eps_s).abs().mean(dim=1), atol=1e-5)


# -- diffusers host: attention


def run_unet(unet, x, ctx):
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=ctx).sample


def test_recording_leaves_the_unet_output_unchanged(tiny_unet, clip_tokenizer, embeddings):
    target, _ = embeddings
    x = latents(2)
    positions = hf_token_positions(clip_tokenizer, PROMPT, "red scarf")
    before = {name: type(p) for name, p in tiny_unet.attn_processors.items()}
    maps = AttentionMaps((16, 16), 2)
    with cross_attention_processors(tiny_unet, AttentionRecorder(torch.tensor(positions), maps, (16, 16))):
        recorded = run_unet(tiny_unet, x, target.expand(2, -1, -1))
    assert {name: type(p) for name, p in tiny_unet.attn_processors.items()} == before
    assert torch.allclose(recorded, run_unet(tiny_unet, x, target.expand(2, -1, -1)), atol=1e-5)
    attn2 = sum(1 for name in before if ".attn2." in name)
    assert maps.count == attn2 and maps.mean().shape == (2, 16, 16)


def test_one_layer_map_equals_the_manual_softmax(tiny_unet, clip_tokenizer, embeddings):
    target, _ = embeddings
    x = latents(1, seed=5)
    positions = hf_token_positions(clip_tokenizer, PROMPT, "red scarf")
    name = next(n for n in tiny_unet.attn_processors if ".attn2." in n and n.startswith("down_blocks.1"))
    attn = tiny_unet.get_submodule(name.rsplit(".processor", 1)[0])
    seen = {}
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(h=args[0], ctx=kwargs["encoder_hidden_states"]), with_kwargs=True)
    original = dict(tiny_unet.attn_processors)
    maps = AttentionMaps((16, 16), 1)
    recorder = AttentionRecorder(torch.tensor(positions), maps, (16, 16))
    tiny_unet.set_attn_processor({n: recorder if n == name else p for n, p in original.items()})
    try:
        run_unet(tiny_unet, x, target)
    finally:
        tiny_unet.set_attn_processor(original)
        hook.remove()
    with torch.no_grad():
        q, k = attn.to_q(seen["h"]), attn.to_k(seen["ctx"])
    assert q.shape[1] == 64  # down_blocks.1 works at 8x8
    want = manual_layer_map(q, k, attn.heads, positions, (8, 8), (16, 16))
    assert maps.count == 1 and torch.allclose(maps.mean(), want, atol=1e-6)


def test_edit_attention_map(tiny_unet, scheduler, clip_tokenizer, embeddings):
    target, _ = embeddings
    z = latents().repeat(2, 1, 1, 1)
    positions = hf_token_positions(clip_tokenizer, PROMPT, "red scarf")
    calls = []
    m = diffusers_edit_attention(tiny_unet, scheduler, z, target, positions, steps=3, seed=1, strength=0.6,
                                 progress=lambda done, total: calls.append((done, total)))
    assert m.shape == (2, 16, 16) and torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert not torch.allclose(m[0], m[1]), "each image of a batch must get its own noise"
    assert torch.equal(m, diffusers_edit_attention(tiny_unet, scheduler, z, target, positions, 3, 1, 0.6))
    assert not torch.allclose(m, diffusers_edit_attention(tiny_unet, scheduler, z, target, positions, 3, 2, 0.6))
    everything = diffusers_edit_attention(tiny_unet, scheduler, z, target, list(range(77)), 2, 1, 0.6)
    assert torch.allclose(everything, torch.ones_like(everything), atol=1e-5), "probabilities over all tokens sum to 1"


def test_processors_come_back_after_an_error(tiny_unet, scheduler, clip_tokenizer, embeddings):
    target, _ = embeddings
    before = dict(tiny_unet.attn_processors)

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diffusers_edit_attention(tiny_unet, scheduler, latents(), target, [5, 6], 3, 0, 0.5, progress=interrupt)
    assert dict(tiny_unet.attn_processors) == before


# -- bad input


@pytest.mark.parametrize("change, match", [
    (dict(draws=0), r"draws must be a whole number of at least 1"),
    (dict(draws=2.5), r"draws must be a whole number"),
    (dict(strength_range=(0.0, 0.5)), r"lowest strength must be above 0 and at most 1"),
    (dict(strength_range=(0.5, 1.5)), r"highest strength must be above 0 and at most 1"),
    (dict(strength_range=(0.5, float("nan"))), r"highest strength must be above 0"),
    (dict(strength_range=(0.7, 0.3)), r"give the lower strength first"),
])
def test_noise_difference_bad_input(tiny_unet, scheduler, embeddings, change, match):
    target, source = embeddings
    args = {**dict(draws=2, seed=0, strength_range=(0.5, 0.5)), **change}
    with pytest.raises(XMGIEInputError, match=match):
        diffusers_noise_difference(tiny_unet, scheduler, latents(), target, source, **args)


@pytest.mark.parametrize("change, match", [
    (dict(steps=0), r"steps must be a whole number of at least 1"),
    (dict(strength=0.0), r"strength must be above 0 and at most 1.*0.5 is a good start"),
    (dict(strength=1.01), r"strength must be above 0 and at most 1"),
    (dict(positions=[]), r"hf_token_positions"),
    (dict(positions=[80]), r"within the prompt's 77 tokens"),
    (dict(latents=torch.zeros(1, 3, 16, 16)), r"encode the image with this model's VAE"),
    (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), r"NaN"),
])
def test_edit_attention_bad_input(tiny_unet, scheduler, embeddings, change, match):
    target, _ = embeddings
    args = {**dict(latents=latents(), positions=[5, 6], steps=2, seed=0, strength=0.5), **change}
    with pytest.raises(XMGIEInputError, match=match):
        diffusers_edit_attention(tiny_unet, scheduler, target_embeddings=target, **args)


def test_edit_words_not_in_the_prompt(clip_tokenizer):
    with pytest.raises(XMGIEInputError, match=r"'blue hat'.*cannot be located in the prompt.*Use words exactly as they appear"):
        hf_token_positions(clip_tokenizer, PROMPT, "blue hat")


def test_v_prediction_scheduler_is_refused(tiny_unet, embeddings):
    target, source = embeddings
    with pytest.raises(XMGIEInputError, match="epsilon-prediction"):
        diffusers_noise_difference(tiny_unet, DDIMScheduler(prediction_type="v_prediction"), latents(), target, source,
                                   1, 0)


# -- CLIPSeg


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    folder = save_tiny_clipseg(tmp_path_factory.mktemp("models") / "clipseg-tiny")
    yield folder
    unload_clipseg()


def image(batch: int = 2, h: int = 40, w: int = 56) -> torch.Tensor:
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_clipseg_loads_and_predicts(clipseg_dir):
    p = clipseg_probabilities(image(), ["red scarf"], clipseg_dir)
    assert p.shape == (2, 40, 56) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    assert not torch.allclose(p[0], p[1])
    assert load_clipseg(clipseg_dir) is load_clipseg(clipseg_dir), "the loaded model is cached"


def test_clipseg_several_phrases_are_the_max_of_single_phrases(clipseg_dir):
    img = image()
    both = clipseg_probabilities(img, ["red scarf", "hat", " "], clipseg_dir)
    single = [clipseg_probabilities(img, [p], clipseg_dir) for p in ("red scarf", "hat")]
    assert not torch.allclose(single[0], single[1])
    assert torch.allclose(both, torch.maximum(*single), atol=1e-5)


def test_clipseg_unload(clipseg_dir):
    load_clipseg(clipseg_dir)
    assert ("clipseg", clipseg_dir.resolve()) in MODELS.keys("clipseg")
    unload_clipseg(clipseg_dir)
    assert ("clipseg", clipseg_dir.resolve()) not in MODELS.keys("clipseg")


def test_clipseg_missing_folder(tmp_path):
    with pytest.raises(XMGIEInputError, match=r"not found.*CIDAS/clipseg-rd64-refined.*models/clipseg/"):
        clipseg_probabilities(image(1), ["hat"], tmp_path / "nothing")


def test_clipseg_bin_only_folder_is_refused(clipseg_dir, tmp_path):
    folder = tmp_path / "clipseg-bin"
    shutil.copytree(clipseg_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(XMGIEInputError, match=r"found only pytorch_model.bin.*download the safetensors version.*"
                                              r"convert"):
        clipseg_probabilities(image(1), ["hat"], folder)


def test_clipseg_folder_without_tokenizer_or_of_another_model(clipseg_dir, tmp_path):
    folder = tmp_path / "clipseg-partial"
    shutil.copytree(clipseg_dir, folder)
    for name in ("tokenizer.json", "vocab.json"):
        (folder / name).unlink()
    with pytest.raises(XMGIEInputError, match=r"incomplete: missing the tokenizer"):
        clipseg_probabilities(image(1), ["hat"], folder)
    (folder / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(XMGIEInputError, match=r"'clip' model, not CLIPSeg"):
        clipseg_probabilities(image(1), ["hat"], folder)


def test_clipseg_needs_a_phrase(clipseg_dir):
    with pytest.raises(XMGIEInputError, match="at least one phrase"):
        clipseg_probabilities(image(1), [" ", ""], clipseg_dir)
