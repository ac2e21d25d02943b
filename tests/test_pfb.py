"""PFB core (xmgie_core.pfb): eq 5 and eq 23 on known tensors, layer layouts and the layer grammar, the
per-level masks and schedule gates, the DDIM inversion, the source branch and its cache."""

from __future__ import annotations

import math

import pytest
import torch

from xmgie_core.masks import RegionPyramid
from xmgie_core.errors import XMGIEInputError
from xmgie_core.pfb import (BlendPlan, FeaturesComplete, SourceBranch, SourceCache, SourceRecord, BlockLayout,
                            blend_features, fingerprint, invert, latent_blend, layer_alpha, parse_layers)
from xmgie_core.pfb.branch import FeatureRecorder

SD15 = BlockLayout.from_blocks([1, 1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1], [1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1])
SDXL = BlockLayout.from_blocks([1, 1, 1, 2, 1, 1, 2, 1, 1], [1, 1, 2, 1, 1, 2, 1, 1, 1])


def test_eq5_and_alpha_on_known_values():
    f_edit, f_src = torch.full((1, 2, 1, 3), 2.0), torch.zeros(1, 2, 1, 3)
    region = torch.tensor([1.0, 0.0, 0.5]).view(1, 1, 1, 3)
    alpha = layer_alpha(region, 0.2)
    assert torch.allclose(alpha.flatten(), torch.tensor([1.0, 0.2, 0.6]))
    out = blend_features(f_edit, f_src, alpha)
    assert torch.allclose(out[0, :, 0], torch.tensor([[2.0, 0.4, 1.2]] * 2))
    assert torch.equal(blend_features(f_edit, f_src, torch.ones(1)), f_edit)  # alpha 1: the edit, bit for bit
    assert torch.equal(blend_features(f_edit, f_src, torch.zeros(1)), f_src)


def test_eq23_latent_blend():
    z_model, z_src = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), -1.0)
    m = torch.tensor([[1.0, 0.0], [0.25, 0.0]]).view(1, 1, 2, 2)
    out = latent_blend(z_model, z_src, m)
    assert torch.allclose(out[0, 0], torch.tensor([[3.0, -1.0], [0.0, -1.0]]))
    assert torch.equal(out[..., 0, 1], z_src[..., 0, 1])


def test_layouts_and_default_layers():
    """The two coarsest grids: PFB-Diff's SD1.5 layers (+ input_11, on the middle block's grid), SDXL's."""
    assert SD15.default_layers() == [*(f"input_{k}" for k in range(7, 12)), "middle",
                                     *(f"output_{k}" for k in range(5))]
    assert SD15.factors["input_9"] == (4, 8) and SD15.factors["output_5"] == (4, 2) and "output_11" not in SD15.factors
    assert SDXL.default_layers() == [*(f"input_{k}" for k in range(4, 9)), "middle",
                                     *(f"output_{k}" for k in range(5))]
    flat = BlockLayout.from_blocks([1, 1, 1], [1, 1, 1])  # the tiny test checkpoint: one level
    assert flat.default_layers() == flat.names == ["input_0", "input_1", "input_2", "middle", "output_0", "output_1"]


def test_layer_grammar():
    got = parse_layers("input_7-8, middle:0.5, output_0-2@0.6, output_1:0.25@0.3", SD15, 0.1, 0.9)
    assert [(b.name, b.weight, b.end) for b in got] == [
        ("input_7", 0.1, 0.9), ("input_8", 0.1, 0.9), ("middle", 0.5, 0.9), ("output_0", 0.1, 0.6),
        ("output_1", 0.25, 0.3), ("output_2", 0.1, 0.6)]
    assert [b.name for b in parse_layers("auto", SD15, 0, 1)] == SD15.default_layers()
    assert [b.end for b in parse_layers("auto@0.5", SDXL, 0, 1)] == [0.5] * 11


@pytest.mark.parametrize("spec, message", [
    ("output_11", "This model has no layer output_11. Its layers are: input_0, .*output_10"),
    ("input_9-7", "runs backwards"),
    ("middle:heavy", "weight in layer entry 'middle:heavy' is not a number"),
    ("middle@1.5", "end in layer entry 'middle@1.5' must be between 0 and 1"),
    ("decoder", "Cannot read the layer entry 'decoder'"),
    (" , ", "No PFB layer selected"),
])
def test_layer_grammar_errors(spec, message):
    with pytest.raises(XMGIEInputError, match=message):
        parse_layers(spec, SD15, 0.0, 1.0)


def _plan(mask, soft=False, weight=0.0, layers="middle, output_0@0.5", latent_end=0.5):
    percent_to_sigma = lambda p: 10.0 * (1 - p)  # noqa: E731
    return BlendPlan.build(parse_layers(layers, SD15, weight, 1.0), RegionPyramid(mask, name="The PFB mask", allow_empty=True), soft,
                           latent_end, percent_to_sigma)


def test_schedule_boundaries_are_honoured():
    plan = _plan(torch.ones(1, 8, 8))
    assert plan.layer_sigma_end == {"middle": 0.0, "output_0": 5.0} and plan.latent_sigma_end == 5.0
    assert plan.active_layers(5.0) == ["middle", "output_0"] and plan.latent_active(5.0)
    assert plan.active_layers(4.99) == ["middle"] and not plan.latent_active(4.99)
    assert plan.active_layers(0.0) == ["middle"] and not plan.latent_to_end
    assert _plan(torch.ones(1, 8, 8), latent_end=1.0).latent_to_end


def test_per_level_masks_binary_and_soft():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :6] = 1  # 6/16 of the width: a 2x2 grid's left cells are 75% covered
    hard, soft = _plan(mask, weight=0.2), _plan(mask, soft=True, weight=0.2)
    assert torch.allclose(hard.alpha("middle", 2, 2, "cpu").flatten(), torch.tensor([1.0, 0.2, 1.0, 0.2]))
    assert torch.allclose(soft.alpha("middle", 2, 2, "cpu").flatten(), torch.tensor([0.8, 0.2, 0.8, 0.2]))
    assert torch.allclose(soft.alpha("middle", 16, 16, "cpu")[0, 0], layer_alpha(mask[0], 0.2))
    with pytest.raises(XMGIEInputError, match="The PFB mask is 16x16 .* aspect ratios differ"):
        hard.alpha("middle", 2, 8, "cpu")


def test_blend_rows_inside_edit_outside_source():
    """Cond and uncond chunks of a batch-2 latent: inside the mask the edit, outside the source (w = 0)."""
    mask = torch.zeros(2, 4, 4)
    mask[0, :, :2] = 1
    mask[1, :2, :] = 1
    plan = _plan(mask)
    h, src = torch.randn(4, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = plan.blend("middle", h, src)
    inside = torch.cat([mask, mask]).bool()[:, None].expand_as(h)
    assert torch.equal(out[inside], h[inside])
    assert torch.equal(out[~inside], torch.cat([src, src])[~inside])
    with pytest.raises(XMGIEInputError, match="not a multiple of the source branch's batch 3"):
        plan.blend("middle", h, torch.randn(3, 3, 4, 4))
    with pytest.raises(XMGIEInputError, match="mask has batch 2 but the latent batch is 4"):
        plan.blend("middle", torch.randn(8, 3, 4, 4), torch.randn(4, 3, 4, 4))


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact denoiser of unit-Gaussian data: D(x, sigma) = x / (1 + sigma^2); its ODE solution is
    x(sigma) = x(0) sqrt(1 + sigma^2)."""
    return x / (1 + sigma**2)


@pytest.mark.parametrize("steps", [10, 100])
def test_inversion_follows_the_probability_flow_ode(steps):
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    sigmas = [0.0, *torch.linspace(0.05, 3.0, steps).tolist()]
    derivative = lambda x, s: (x - gaussian_denoiser(x, max(s, 0.05))) / max(s, 0.05)  # noqa: E731
    tr = invert(derivative, z, sigmas)
    assert torch.equal(tr.at(0.0), z) and torch.equal(tr.at(sigmas[5]), tr.latents[5])
    exact = z * math.sqrt(1 + 3.0**2)
    error = float((tr.latents[-1] - exact).abs().max() / exact.abs().max())
    assert error < (0.12 if steps == 10 else 0.015)  # first order: ten times the steps, about a tenth the error
    mid = 0.5 * (sigmas[5] + sigmas[6])
    assert torch.allclose(tr.at(mid), tr.latents[5] + (mid - sigmas[5]) * tr.derivatives[5])
    x = tr.latents[-1]  # and back down with the same steps: close to the source
    for a, b in zip(sigmas[::-1][:-1], sigmas[::-1][1:]):
        x = x + (b - a) * derivative(x, a)
    assert float((x - z).abs().max() / z.abs().max()) < (0.3 if steps == 10 else 0.03)
    with pytest.raises(ValueError, match="ascend"):
        invert(derivative, z, [0.0, 1.0, 0.5])


def _branch(cache=None, record=None):
    calls = []

    def run_pass(x, sigma, recorder):
        calls.append(sigma)
        for layer in ("input_7", "middle", "output_0", "output_1"):
            recorder(layer, x * sigma + len(layer))
        return x / (1 + sigma**2)

    cache = cache or SourceCache(1)
    record = record or cache.record("k")
    return SourceBranch(lambda s: torch.full((1, 1, 2, 2), s), run_pass, ["middle", "output_0"], record, cache), calls


def test_source_branch_stops_after_the_deepest_layer_and_reuses_its_record():
    branch, calls = _branch()
    feats = branch.features(2.0)
    assert set(feats) == {"middle", "output_0"} and torch.equal(feats["middle"], torch.full((1, 1, 2, 2), 10.0))
    assert branch.passes == 1 and calls == [2.0]
    again = branch.features(2.0 * (1 + 1e-6))  # the same step through a float round trip
    assert again is feats and branch.passes == 1
    recorder = FeatureRecorder(["middle"], "cpu", stop_early=True)
    with pytest.raises(FeaturesComplete):
        recorder("middle", torch.zeros(1))


def test_inversion_passes_serve_the_edit_steps():
    branch, calls = _branch(SourceCache(64))
    trajectory = branch.invert(torch.ones(1, 1, 2, 2), [3.0, 2.0, 1.0, 0.0], sigma_min=0.5)
    assert trajectory.sigmas == [0.0, 1.0, 2.0, 3.0] and calls == [0.5, 1.0, 2.0]
    branch.trajectory = trajectory.at
    for sigma in (2.0, 1.0):
        branch.features(sigma)
    assert branch.passes == 3  # the edit's steps at 2 and 1 were recorded by the inversion
    branch.features(3.0)
    assert branch.passes == 4  # the top step is the one extra pass


def test_cache_is_lru_and_bounded_in_bytes():
    mb = 2**20
    cache = SourceCache(max_mb=2)
    big = {"middle": torch.zeros(mb // 4 - 64)}  # just under 1 MB
    a = cache.record("a")
    assert cache.room(a, mb - 256)
    a.put(1.0, big)
    b = cache.record("b")
    assert cache.room(b, mb - 256)
    b.put(1.0, dict(big))
    assert cache.record("a") is a  # a hit: a is now the most recent
    c = cache.record("c")
    assert cache.room(c, mb - 256) and len(cache) == 2 and "b" not in cache._records  # b went (least recent)
    c.put(1.0, dict(big))
    assert not cache.room(c, 2 * mb)  # a record alone over budget stops growing
    assert (cache.hits, cache.misses) == (1, 3)
    cache.resize(1)
    assert len(cache) == 1 and cache.nbytes <= mb
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_fingerprint_sees_values_dtype_and_identity():
    t = torch.arange(6.0).view(2, 3)
    assert fingerprint(t, {"b": 1, "a": [t]}) == fingerprint(t.clone(), {"a": [t.clone()], "b": 1})
    changed = t.clone()
    changed[1, 2] += 1e-6
    assert fingerprint(t) != fingerprint(changed)
    assert fingerprint(t) != fingerprint(t.double()) and fingerprint(t) != fingerprint(t.view(3, 2))
    assert fingerprint(t.bfloat16()) == fingerprint(t.bfloat16())
    a, b = object(), object()
    assert fingerprint(a) != fingerprint(b) and fingerprint(a) == fingerprint(a)


def test_source_record_accounts_bytes():
    record = SourceRecord()
    record.put(1.0, {"middle": torch.zeros(10)})
    assert record.nbytes == 40 and record.get(1.0 + 1e-7) is not None and record.get(1.1) is None
