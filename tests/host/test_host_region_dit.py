"""Region for DiT editors in a real ComfyUI on tiny random Flux (Kontext layout) and Qwen-Image models: the
flow-matching noise difference (a known box, seeds, batches, the reference latent on both branches, equal
conditionings), the joint-attention map (the calls it reads, the image's aspect, sampling unchanged, composing with
an earlier override), the MODEL untouched, interrupts, the Region Predictor node on a DiT, and user errors."""

from __future__ import annotations

import types

import pytest
import torch

import tiny_dit as td

FAMILIES = (td.FLUX, td.QWEN)
H, W = 8, 12  # latent cells: a 4 x 6 token grid, a non-square aspect
QWEN_TEMPLATE = 34
"""Tokens of Qwen-Image's chat template before the prompt ('<|im_start|>system ... <|im_end|>\n<|im_start|>user\n'),
which QwenImageTEModel.encode_token_weights drops (comfy/text_encoders/qwen_image.py)."""
BLOCKS = {td.FLUX: td.FLUX_TINY["depth"] + td.FLUX_TINY["depth_single_blocks"], td.QWEN: td.QWEN_TINY["num_layers"]}


@pytest.fixture(scope="module")
def modules(comfy_host):
    from xmgie_core.hosts.comfy import region, region_dit

    return types.SimpleNamespace(region=region, region_dit=region_dit)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(comfy_host, family):
    return td.tiny_dit_model(family)


def batch(family: str, seeds=(2, 3)) -> torch.Tensor:
    return torch.cat([td.latent(family, H, W, seed=s) for s in seeds])


def conds(family: str, z: torch.Tensor):
    """(target with z as its reference image, source without one)."""
    return td.conditioning(family, reference=z), td.conditioning(family, seed=5)


# -- noise difference (flow matching: velocity difference)


def test_noise_difference_seed_batch_and_model_untouched(modules, family, model):
    z = batch(family)
    target, source = conds(family, z)
    options = repr(model.model_options)
    calls = []
    m = modules.region.noise_difference(model, target, source, z, 3, 7, (0.3, 0.7),
                                        progress=lambda done, total: calls.append((done, total)))
    assert m.shape == (2, H, W) and m.dtype == torch.float32 and m.device.type == "cpu"
    assert torch.isfinite(m).all() and (m >= 0).all() and (m > 0).all()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(m, modules.region.noise_difference(model, target, source, z, 3, 7, (0.3, 0.7)))
    assert not torch.allclose(m, modules.region.noise_difference(model, target, source, z, 3, 8, (0.3, 0.7)))
    same = z[:1].repeat(2, *[1] * (z.ndim - 1))
    twice = modules.region.noise_difference(model, td.conditioning(family, reference=same), source, same, 2, 7)
    assert twice.shape == (2, H, W) and not torch.allclose(twice[0], twice[1]), "each image gets its own noise"
    assert repr(model.model_options) == options, "the input MODEL was changed"


def test_a_model_whose_target_prediction_differs_in_a_box_gives_that_box(modules, family, model):
    """The same conditioning on both branches, and a model function wrapper that moves the target row's denoised
    output by delta inside a box: the velocity differs there by delta / sigma (v = (x - x0) / sigma) and nowhere
    else, so the map is delta / sigma averaged over the draws' sigmas inside the box and exactly 0 outside."""
    z = batch(family)
    cond = td.conditioning(family, reference=z)
    delta, box = 0.25, (slice(2, 5), slice(3, 10))

    def shift_target(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        shift = torch.zeros_like(out[:1])
        shift[..., box[0], box[1]] = delta
        rows = [r + shift if which == 0 else r  # 0: the first cond given to calc_cond_batch, the target
                for r, which in zip(out.chunk(len(args["cond_or_uncond"])), args["cond_or_uncond"])]
        return torch.cat(rows)

    patched = model.clone()
    patched.set_model_unet_function_wrapper(shift_target)
    m = modules.region.noise_difference(patched, cond, cond, z, 3, 0, (0.3, 0.7))
    ms = model.get_model_object("model_sampling")
    from xmgie_core.region.zeroshot import noise_difference_timesteps

    sigmas = modules.region.timestep_sigmas(ms, noise_difference_timesteps((0.3, 0.7), 3, len(ms.sigmas)))
    assert 0 < min(sigmas) < max(sigmas) < 1
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[box] = True
    assert torch.allclose(m[:, inside], torch.full_like(m[:, inside], sum(delta / s for s in sigmas) / 3), rtol=1e-4)
    assert torch.equal(m[:, ~inside], torch.zeros_like(m[:, ~inside]))


def test_strength_is_the_flow_sigma_at_that_fraction_of_the_schedule(modules, family, model):
    """Strength s reads the model's own shifted sigma table (its sigma() takes a time, not a timestep index)."""
    ms = model.get_model_object("model_sampling")
    for strength in (0.25, 0.5, 0.9):
        t = round(strength * (len(ms.sigmas) - 1))
        assert abs(modules.region.timestep_sigmas(ms, [t])[0] - ms.percent_to_sigma(1 - strength)) < 2e-3


def test_the_reference_latent_reaches_both_branches(modules, family, model):
    z = batch(family)
    target, source = conds(family, z)
    source_with_ref = td.conditioning(family, seed=5, reference=z)
    no_ref = td.conditioning(family)
    m = modules.region.noise_difference(model, target, source, z, 2, 1)
    assert torch.equal(m, modules.region.noise_difference(model, target, source_with_ref, z, 2, 1))
    assert not torch.allclose(m, modules.region.noise_difference(model, no_ref, source, z, 2, 1)), \
        "the reference image must reach the model"


def test_equal_conditionings_give_an_all_zero_map(modules, family, model):
    z = batch(family)
    target, _ = conds(family, z)
    m = modules.region.noise_difference(model, target, target, z, 2, 0)
    assert m.shape == (2, H, W) and torch.equal(m, torch.zeros_like(m))


# -- joint attention


def test_attention_map_reads_every_joint_attention(modules, family, model, monkeypatch):
    z = batch(family)
    target, _ = conds(family, z)
    text = target[0][0].shape[1]
    seen = []
    real = modules.region_dit.joint_attention_map

    def spy(q, k, image, positions, grid, mask=None):
        seen.append((q.shape[0], k.shape[2], image, positions.tolist(), grid))
        return real(q, k, image, positions, grid, mask)

    monkeypatch.setattr(modules.region_dit, "joint_attention_map", spy)
    options = repr(model.model_options)
    calls = []
    m = modules.region_dit.dit_edit_attention(model, target, [2, 5], z, 3, 1, 0.6,
                                              progress=lambda done, total: calls.append((done, total)))
    assert m.shape == (2, H, W) and m.dtype == torch.float32 and m.device.type == "cpu"
    assert torch.isfinite(m).all() and (m > 0).all() and (m < 1).all()
    assert calls == [(1, 3), (2, 3), (3, 3)]
    tokens = (H // 2) * (W // 2)
    assert seen == [(2, text + 2 * tokens, slice(text, text + tokens), [2, 5], (H // 2, W // 2))] * 3 * BLOCKS[family]
    assert repr(model.model_options) == options, "the input MODEL was changed"
    assert "optimized_attention_override" not in model.model_options["transformer_options"]
    again = modules.region_dit.dit_edit_attention(model, target, [2, 5], z, 3, 1, 0.6)
    assert torch.equal(m, again)
    assert not torch.allclose(m, modules.region_dit.dit_edit_attention(model, target, [2, 5], z, 3, 2, 0.6))


def sample(comfy_host, model, positive, negative, z, steps=3):
    import comfy.sample
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(2.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    return guider.sample(comfy.sample.prepare_noise(z, 0), z, comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                         disable_pbar=True)


def test_recording_leaves_sampling_unchanged_and_composes(comfy_host, modules, family, model):
    from xmgie_core.region.zeroshot import AttentionMaps

    z = batch(family)
    positive, negative = td.conditioning(family, reference=z), td.conditioning(family, seed=9, reference=z)
    stock = sample(comfy_host, model, positive, negative, z)
    maps = AttentionMaps((H, W), 2)
    recorded = sample(comfy_host, modules.region_dit.recording_clone(model, [1, 3], maps), positive, negative, z)
    assert torch.equal(recorded, stock)
    assert maps.count == 3 * BLOCKS[family] and maps.mean().shape == (2, H, W)

    earlier = []

    def previous(func, *args, **kwargs):  # another pack's override: doubles the attention output
        earlier.append(1)
        return func(*args, **kwargs) * 2

    other = model.clone()
    other.model_options["transformer_options"]["optimized_attention_override"] = previous
    alone = sample(comfy_host, other, positive, negative, z)
    maps = AttentionMaps((H, W), 2)
    both = sample(comfy_host, modules.region_dit.recording_clone(other, [1, 3], maps), positive, negative, z)
    assert torch.equal(both, alone) and not torch.allclose(alone, stock)
    assert len(earlier) == 2 * 3 * BLOCKS[family] and maps.count == 3 * BLOCKS[family]


# -- interrupts, errors


@pytest.mark.parametrize("mode", ["difference", "attention"])
def test_interrupt_stops_the_passes(modules, family, model, mode):
    import comfy.model_management as mm

    z = batch(family)
    target, source = conds(family, z)
    calls = []

    def interrupt_after_first(done, total):
        calls.append(done)
        mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):
        if mode == "difference":
            modules.region.noise_difference(model, target, source, z, 4, 0, progress=interrupt_after_first)
        else:
            modules.region_dit.dit_edit_attention(model, target, [1], z, 4, 0, 0.5, progress=interrupt_after_first)
    assert calls == [1] and not mm.processing_interrupted()


def test_bad_input(comfy_host, modules, family, model, tiny_checkpoint):
    from xmgie_core.errors import XMGIEInputError

    z = batch(family)
    target, source = conds(family, z)
    with pytest.raises(XMGIEInputError, match=r"sit at text tokens \[3, 40\].*has 12 text tokens"):
        modules.region_dit.dit_edit_attention(model, target, [3, 40], z, 1, 0, 0.5)
    with pytest.raises(XMGIEInputError, match=r"No edit-word token positions"):
        modules.region_dit.dit_edit_attention(model, target, [], z, 1, 0, 0.5)
    wrong = z.flatten(1, 2) if family == td.QWEN else z[:, :, None]
    with pytest.raises(XMGIEInputError, match=r"latent has shape .*VAE Encode"):
        modules.region.noise_difference(model, target, source, wrong, 1, 0)
    sd15 = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.name)[0]
    with pytest.raises(XMGIEInputError, match=r"SD U-Net, not Flux.*use region.comfy_edit_attention"):
        modules.region_dit.dit_edit_attention(sd15, target, [1], torch.zeros(1, 4, 8, 8), 1, 0, 0.5)


# -- the Region Predictor node on a DiT


class FakeDiTClip:
    """comfy.sd.CLIP's surface the node uses: the family's real tokenizer (ComfyUI's FluxTokenizer: T5 padded to
    256; QwenImageTokenizer: Qwen2.5-VL with its chat template), and the tiny DiT's CONDITIONING with as many text
    tokens as the real encoder keeps (Qwen: after the template), seeded by the text (the real T5-XXL / Qwen2.5-VL
    encoders are too large to build)."""

    def __init__(self, family):
        import comfy.text_encoders.flux
        import comfy.text_encoders.qwen_image

        self.family, self.key = family, region_dit_key(family)
        self.tokenizer = (comfy.text_encoders.flux.FluxTokenizer() if family == td.FLUX
                          else comfy.text_encoders.qwen_image.QwenImageTokenizer())

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    def encode_from_tokens_scheduled(self, tokens):
        ids = [t[0] for t in tokens[self.key][0]]
        kept = ids[QWEN_TEMPLATE:] if self.family == td.QWEN else ids
        return td.conditioning(self.family, tokens=len(kept), seed=sum(ids) % 10007)


def region_dit_key(family):
    from xmgie_core.hosts.comfy.tokens import TEXT_ENCODER

    return TEXT_ENCODER[family][0]


class FakeVAE:
    """A VAE's encode: Flux [B, 16, h/8, w/8]; Qwen-Image's video VAE (latent_dim 3) one clip [1, 16, 1, h/8, w/8]
    per call, so it must be called per image."""

    def __init__(self, family):
        self.latent_dim = 3 if family == td.QWEN else 2
        self.calls = []

    def encode(self, pixels):
        self.calls.append(pixels.shape[0])
        z = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16] * 4
        return z[:, :, None] if self.latent_dim == 3 else z


def test_region_node_on_a_dit(comfy_host, family, model):
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIERegionPredictor"]()
    image = torch.rand(2, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    args = dict(image=image, instruction="", target_description="a man wearing a red scarf",
                source_description="a man", edit_words="red scarf", threshold=0.5, grow=0, smoothing=0.0, seed=1,
                draws=2, steps=2, strength=0.5, model=model, clip=FakeDiTClip(family))
    vae = FakeVAE(family)
    out = node.predict(mode="noise-difference", vae=vae, **args)
    mask, soft, preview = out["result"]
    assert mask.shape == soft.shape == (2, 48, 80) and preview.shape == (2, 48, 80, 3)
    assert vae.calls == ([1, 1] if family == td.QWEN else [2])
    assert soft.amax(dim=(1, 2)).eq(1).all() and soft.amin(dim=(1, 2)).eq(0).all()

    same = node.predict(mode="noise-difference", vae=vae, **{**args, "source_description": args["target_description"]})
    assert not same["result"][0].any()
    assert "noise difference is zero everywhere for image(s) [0, 1]" in same["ui"]["xmgie_warning"][0]

    mask, soft, _ = node.predict(mode="attention", vae=vae, **args)["result"]
    assert mask.shape == (2, 48, 80) and soft.amax(dim=(1, 2)).eq(1).all()


def test_edit_word_positions_in_the_dit_text_context(comfy_host, family):
    """Flux's context is the T5 tokens as they are; Qwen-Image's starts after the 34 template tokens."""
    from xmgie_core.errors import XMGIEInputError
    from xmgie_core.hosts.comfy.tokens import dit_token_positions

    clip = FakeDiTClip(family)
    prompt = "a colorful background behind a man wearing a red scarf"
    chunk = clip.tokenize(prompt)[clip.key][0]
    offset = QWEN_TEMPLATE if family == td.QWEN else 0
    vocab = getattr(clip.tokenizer, clip.key).inv_vocab
    encoded = len(chunk) - offset

    def spelled(words):
        positions = dit_token_positions(clip, family, prompt, words, encoded)
        assert min(positions) >= 0
        return [vocab[chunk[p + offset][0]].lstrip("\u2581\u0120") for p in positions]

    assert spelled("red scarf") == ["red", "scarf"]
    assert spelled("background") == ["background"], "the word of the prompt, not the template's 'background'"
    with pytest.raises(XMGIEInputError, match="cannot be located"):
        dit_token_positions(clip, family, prompt, "blue hat", encoded)
