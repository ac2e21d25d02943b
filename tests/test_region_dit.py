"""Region for DiT editors without ComfyUI: the flow-matching noise difference (velocities from denoised outputs, the
map on a known box, the relation to the noise and x0 differences), the joint-attention edit-word map against a naive
softmax over the joint sequence, and the one-frame latents of Qwen-Image."""

from __future__ import annotations

import math

import pytest
import torch

from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy.unet import noise_for
from xmgie_core.region.zeroshot import (check_latent, flow_velocity, joint_attention_map, noise_difference_map,
                                        seeded_noise)

BOX = (slice(3, 7), slice(2, 9))


class ConstSampling:
    """ComfyUI's CONST noise_scaling (comfy/model_sampling.py): x = sigma n + (1 - sigma) x0."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


def fake_flow_model(x: torch.Tensor, sigma: float, target: bool, velocity: torch.Tensor) -> torch.Tensor:
    """A flow model's denoised output x - sigma v, whose velocity under the target conditioning is `velocity` plus
    2 inside BOX (source: `velocity`)."""
    v = velocity.clone()
    if target:
        v[..., BOX[0], BOX[1]] += 2.0
    return x - sigma * v


def test_flow_noise_difference_of_a_model_differing_in_a_box_is_that_box():
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 16, 10, 12, generator=g)
    sigmas = [0.3, 0.5, 0.8]
    noise = seeded_noise(4, tuple(latent.shape), len(sigmas))
    ms = ConstSampling()
    targets, sources = [], []
    for d, sigma in enumerate(sigmas):
        x = ms.noise_scaling(sigma, noise[d], latent)
        velocity = torch.randn(latent.shape, generator=g)
        targets.append(flow_velocity(x, fake_flow_model(x, sigma, True, velocity), sigma))
        sources.append(flow_velocity(x, fake_flow_model(x, sigma, False, velocity), sigma))
    m = noise_difference_map(torch.stack(targets), torch.stack(sources))
    box = torch.zeros(10, 12, dtype=torch.bool)
    box[BOX] = True
    assert m.shape == (2, 10, 12)
    assert torch.allclose(m[:, box], torch.full_like(m[:, box], 2.0), atol=1e-5)
    assert m[:, ~box].abs().max() < 1e-5, "outside the box the velocities agree"
    assert torch.equal(m > 1.0, box.expand(2, -1, -1))


def test_velocity_difference_is_the_sum_of_the_noise_and_x0_differences():
    """dx0 = -sigma dv and dn = (1 - sigma) dv at the same (x, sigma), so |dv| = |dn| + |dx0| (flow_velocity's
    docstring): the velocity keeps its scale where the noise difference (sigma -> 1) or the x0 one (sigma -> 0)
    vanishes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, 4, generator=g)
    d_target, d_source = torch.randn(2, 1, 16, 4, 4, generator=g)
    ms = ConstSampling()
    for sigma in (0.05, 0.5, 0.95):
        s = torch.tensor(sigma)
        dv = flow_velocity(x, d_target, s) - flow_velocity(x, d_source, s)
        dn = noise_for(ms, s, x, d_target) - noise_for(ms, s, x, d_source)
        dx0 = d_target - d_source
        assert torch.allclose(dn, (1 - sigma) * dv, atol=1e-4)
        assert torch.allclose(dx0, -sigma * dv, atol=1e-5)
        assert torch.allclose(dv.abs(), dn.abs() + dx0.abs(), atol=1e-4)


def naive_joint_map(q, k, text, grid, positions, mask=None):
    """softmax over the whole joint sequence written out per query, the edit columns summed, heads averaged."""
    b, heads, n, d = q.shape
    h, w = grid
    out = torch.zeros(b, h * w)
    for i in range(b):
        for head in range(heads):
            for r in range(h * w):
                logits = torch.tensor([float(q[i, head, text + r] @ k[i, head, j]) / math.sqrt(d) for j in range(n)])
                if mask is not None:
                    logits = logits.masked_fill(~mask[text + r], float("-inf"))
                p = logits.softmax(0)
                out[i, r] += p[positions].sum() / heads
    return out.reshape(b, h, w)


@pytest.fixture
def joint():
    """q, k over [text 5 | generated 3x4 | reference 6] with 2 heads of 8."""
    g = torch.Generator().manual_seed(3)
    n = 5 + 12 + 6
    return torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)


def test_joint_attention_map_equals_a_naive_softmax_over_the_joint_sequence(joint):
    q, k = joint
    positions = torch.tensor([1, 3])
    m = joint_attention_map(q, k, slice(5, 17), positions, (3, 4))
    assert m.shape == (2, 3, 4)
    assert torch.allclose(m, naive_joint_map(q, k, 5, (3, 4), positions), atol=1e-5)
    every = joint_attention_map(q, k, slice(5, 17), torch.arange(q.shape[2]), (3, 4))
    assert torch.allclose(every, torch.ones_like(every), atol=1e-5), "the softmax runs over the whole joint sequence"


def test_joint_attention_map_applies_the_attention_mask(joint):
    q, k = joint
    mask = torch.ones(23, 23, dtype=torch.bool)
    mask[:, 17:] = False  # the reference tokens masked out
    positions = torch.tensor([0, 4])
    m = joint_attention_map(q, k, slice(5, 17), positions, (3, 4), mask)
    assert torch.allclose(m, naive_joint_map(q, k, 5, (3, 4), positions, mask), atol=1e-5)
    assert not torch.allclose(m, joint_attention_map(q, k, slice(5, 17), positions, (3, 4)))
    additive = torch.zeros(23, 23).masked_fill(~mask, float("-inf"))
    assert torch.allclose(m, joint_attention_map(q, k, slice(5, 17), positions, (3, 4), additive[None]), atol=1e-6)


def test_one_frame_latents_for_qwen_image():
    z = torch.randn(2, 16, 1, 6, 8)
    assert check_latent(z, 16, frames=True) is z
    for bad in (torch.randn(2, 16, 6, 8), torch.randn(2, 16, 3, 6, 8), torch.randn(2, 4, 1, 6, 8)):
        with pytest.raises(XMGIEInputError, match=r"\[batch, 16, 1, height, width\].*VAE Encode"):
            check_latent(bad, 16, frames=True)
    with pytest.raises(XMGIEInputError, match=r"\[batch, 16, height, width\]"):
        check_latent(z, 16)
