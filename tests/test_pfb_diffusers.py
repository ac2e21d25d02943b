"""PFB end to end on the tiny diffusers U-Net (xmgie_core.hosts.diffusers.pfb): fusion points, the invariants of
eq 5 / eq 23 through a whole edit, the inverted source branch's reconstruction, and the source cache."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.diffusers.pfb import pfb_edit
from xmgie_core.hosts.diffusers.unet import fusion_hooks, fusion_points
from xmgie_core.pfb import PFBSettings, SourceCache

CROSS = 32


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(1, 8, CROSS, generator=g) for _ in range(3)]  # cond, uncond, source description


@pytest.fixture(scope="module")
def source():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))


def box_mask():
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:10] = 1
    return mask


def edit(unet, source, settings, scheduler=None, steps=6, seed=1, **kw):
    cond, uncond, src = prompts()
    branches = []
    out = pfb_edit(unet, scheduler or DDIMScheduler(clip_sample=False), source, kw.pop("cond", cond), uncond, src,
                   settings, steps=steps, generator=torch.Generator().manual_seed(seed), on_branch=branches.append,
                   **kw)
    return out, branches[0]


def test_fusion_points_follow_the_ldm_block_order(tiny_unet):
    layout, points = fusion_points(tiny_unet)
    assert layout.factors == {"input_0": (1, 1), "input_1": (1, 1), "input_2": (1, 2), "input_3": (2, 2),
                              "middle": (2, 2), "output_0": (2, 2), "output_1": (2, 1), "output_2": (1, 1)}
    assert points["input_1"].module is tiny_unet.down_blocks[0].downsamplers[0] and points["input_1"].before
    assert points["input_3"].module is tiny_unet.mid_block and points["middle"].module is tiny_unet.mid_block
    assert points["output_1"].module is tiny_unet.up_blocks[0].upsamplers[0] and not points["output_1"].before
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor(500), prompts()[0]
    with torch.no_grad():
        stock = tiny_unet(x, t, encoder_hidden_states=ctx).sample
        seen = []
        with fusion_hooks(points, layout.names, lambda layer, h: seen.append((layer, h.shape[-1])) or h):
            same = tiny_unet(x, t, encoder_hidden_states=ctx).sample
        with fusion_hooks(points, ["input_1"], lambda layer, h: h + 1):
            moved = tiny_unet(x, t, encoder_hidden_states=ctx).sample
        after = tiny_unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(same, stock) and torch.equal(after, stock)  # transparent hooks, removed on exit
    assert [s for _, s in seen] == [16, 16, 8, 8, 8, 8, 16, 16]  # each layer's grid, in forward order
    assert [name for name, _ in seen] == layout.names
    assert not torch.allclose(moved, stock)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("mode", ["noised", "inverted"])
def test_empty_mask_with_latent_blend_to_the_end_returns_the_source_exactly(tiny_unet, source, scheduler, mode):
    kwargs = {"clip_sample": False} if scheduler is DDIMScheduler else {}
    out, _ = edit(tiny_unet, source, PFBSettings(torch.zeros(1, 16, 16), source_mode=mode, latent_end=1.0),
                  scheduler(**kwargs), strength=0.6)
    assert torch.equal(out, source)


def plain_sampling(unet, source, steps=6, seed=1, guidance=7.5):
    """The reference: classifier-free guided DDIM from the noised source, no PFB."""
    cond, uncond, _ = prompts()
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    x = scheduler.add_noise(source, torch.randn(source.shape, generator=torch.Generator().manual_seed(seed)),
                            scheduler.timesteps[:1])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def test_full_mask_is_plain_sampling(tiny_unet, source):
    """Inside the mask alpha = 1 and eq 23 keeps the model's latent: PFB equals plain sampling, same seed."""
    out, branch = edit(tiny_unet, source, PFBSettings(torch.ones(1, 16, 16), outside_weight=0.3, latent_end=1.0))
    assert branch.passes == 6  # the source branch did run
    assert (out - plain_sampling(tiny_unet, source)).abs().max() <= 1e-5


def test_a_blended_level_changes_the_edit_and_an_unblended_one_does_not(tiny_unet, source):
    settings = lambda layers: PFBSettings(box_mask(), layers=layers, latent_end=0.0)  # noqa: E731
    blended, _ = edit(tiny_unet, source, settings("middle"))
    weight_one, _ = edit(tiny_unet, source, settings("middle:1"))  # alpha = 1 everywhere: no blending
    never, _ = edit(tiny_unet, source, settings("middle@0"))  # its schedule ends before the first step
    assert torch.equal(weight_one, never)
    assert torch.equal(never, plain_sampling(tiny_unet, source))
    assert not torch.allclose(blended, never, atol=1e-4)


@pytest.fixture(scope="module")
def smooth_unet(tiny_unet):
    """The tiny U-Net without its (random, high-frequency) timestep embedding: its probability-flow ODE is
    smooth, so DDIM inversion error shrinks with the step count as it does for a trained model."""
    unet = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        unet.time_embedding.linear_2.weight.zero_()
        unet.time_embedding.linear_2.bias.zero_()
    return unet


def reconstruction_error(unet, source, mode, steps):
    _, _, src = prompts()
    out, _ = edit(unet, source, PFBSettings(torch.ones(1, 16, 16), source_mode=mode), steps=steps, strength=0.5,
                  guidance=1.0, cond=src)
    return float((out - source).abs().max() / source.abs().max())


def test_inverted_source_without_an_edit_reconstructs_the_source(smooth_unet, source):
    """Target = source description, no guidance: sampling back from the inversion retraces the source
    (PFB-Diff's source branch); the noised branch cannot."""
    errors = {steps: reconstruction_error(smooth_unet, source, "inverted", steps) for steps in (10, 50)}
    noised = reconstruction_error(smooth_unet, source, "noised", 50)
    print(f"inverted reconstruction error (max |diff| / max |source|): {errors}; noised at 50 steps: {noised:.3f}")
    assert errors[50] < 0.1 and errors[50] < errors[10] and errors[50] < noised / 10


@pytest.mark.parametrize("mode", ["noised", "inverted"])
def test_cache_hit_is_identical_and_skips_the_source_pass(tiny_unet, source, mode):
    cache = SourceCache(64)
    settings = PFBSettings(box_mask(), source_mode=mode, cache=cache)
    first, branch = edit(tiny_unet, source, settings)
    assert branch.passes == (6 if mode == "noised" else 7)  # inverted: 6 inversion passes + the top step
    second, branch = edit(tiny_unet, source, settings)
    assert branch.passes == 0 and torch.equal(first, second)
    _, branch = edit(tiny_unet, source, PFBSettings(torch.ones(1, 16, 16), source_mode=mode, cache=cache), seed=9)
    assert branch.passes == 0  # a new mask and seed: still the same source branch
    _, branch = edit(tiny_unet, source + 0.01, settings)
    assert branch.passes > 0  # another source image: a miss


def test_diffusers_loop_refuses_what_it_cannot_do(tiny_unet, source):
    with pytest.raises(XMGIEInputError, match="epsilon-prediction"):
        edit(tiny_unet, source, PFBSettings(box_mask()), DDIMScheduler(prediction_type="v_prediction"))
    with pytest.raises(XMGIEInputError, match="Unknown source_mode 'reversed'"):
        edit(tiny_unet, source, PFBSettings(box_mask(), source_mode="reversed"))
    with pytest.raises(XMGIEInputError, match="This model has no layer output_5"):
        edit(tiny_unet, source, PFBSettings(box_mask(), layers="output_5"))
