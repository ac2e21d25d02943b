"""Zero-shot edit regions from the host U-Net (no trained weights): the tensor math both hosts share.

- Noise difference, DiffEdit (Couairon et al. 2022, "DiffEdit: Diffusion-based semantic image editing with mask
  guidance", sec. 3.2 step 1): noise the image, predict the noise under the target and under the source
  description, and average |eps_target - eps_source| over noise draws and channels. The two predictions disagree
  where the descriptions do.
- Edit-word attention, prompt-to-prompt (Hertz et al. 2022) / DAAM (Tang et al. 2022): during a short denoising
  pass, the cross-attention probabilities softmax(Q K^T / sqrt(d)) of the edit words' tokens, mean over heads and
  summed over the tokens, upsampled (bilinear) to the latent grid, averaged over layers and steps.
- Flow matching (Flux / Kontext, Qwen-Image(-Edit): x = (1 - sigma) x0 + sigma n, the network predicts the velocity
  v = n - x0): the same map on the velocity difference (`flow_velocity`), and the attention map read from the joint
  attention's image-query -> edit-word-key probabilities (`joint_attention_map`).
- Schedules are given as strength, the fraction of the diffusion run (img2img's denoise). Strength s is the
  training timestep round(s * (T - 1)) of a T-step schedule; each host turns timesteps into its own sigmas.
- Noise comes from a seeded CPU torch.Generator and is moved afterwards, so a seed gives the same map on any device.
  Each image of a batch gets its own noise.
"""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F

from .. import limits
from ..attention import merge_heads, split_heads
from ..errors import XMGIEInputError
from ..validation import check_finite, rgb_image

DEFAULT_STRENGTH_RANGE = (0.5, 0.5)
"""DiffEdit's mask noise (sec. 3.2): strength 50%, i.e. noise to half the schedule."""


def working_size(height: int, width: int, longest: int = 512, multiple: int = 64) -> tuple[int, int]:
    """The U-Net modes read the photo at SD1.5's working size: longest side `longest`, aspect kept, sides multiples
    of `multiple` (never upscaled past the nearest multiple). The score map is coarse; it is resized back."""
    scale = min(1.0, longest / max(height, width))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def working_pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> its RGB at `working_size` (antialiased bilinear), for the VAE of the U-Net modes."""
    h, w = working_size(*image.shape[1:3])
    pixels = rgb_image(image)
    if (h, w) == tuple(image.shape[1:3]):
        return pixels
    return F.interpolate(pixels.movedim(-1, 1), size=(h, w), mode="bilinear", antialias=True,
                         align_corners=False).movedim(1, -1)


def check_count(value: int, name: str, what: str) -> int:
    """A whole number >= 1 (draws, steps), else an error saying what it counts."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise XMGIEInputError(f"{name} must be a whole number of at least 1 ({what}), got {value!r}.")
    return int(value)


def check_strength(strength: float, name: str = "strength") -> float:
    """A strength in (0, 1]: the fraction of the diffusion schedule the latent is noised to."""
    if not 0.0 < strength <= 1.0:  # also false for NaN
        raise XMGIEInputError(f"{name} must be above 0 and at most 1 (the fraction of the noise schedule the image "
                              f"is noised to; 0.5 is a good start), got {strength}.")
    return float(strength)


def check_strength_range(strength_range: tuple[float, float]) -> tuple[float, float]:
    """(low, high) strengths with 0 < low <= high <= 1."""
    low, high = (check_strength(s, n) for s, n in zip(strength_range, ("the lowest strength", "the highest strength")))
    if low > high:
        raise XMGIEInputError(f"The strength range starts at {low} but ends at {high}: give the lower strength "
                              "first (equal values use a single noise level, as DiffEdit does).")
    return low, high


STRENGTH_SPREAD = 0.1
"""The Region Predictor's noise-difference draws spread over strength +- this (DiffEdit averages draws at one
strength; a spread also averages over timesteps)."""


def spread_around(strength: float) -> tuple[float, float]:
    """The strength range of the noise-difference draws around the chosen `strength` (kept within 0.05..1)."""
    return max(limits.REGION_STRENGTH[0], strength - STRENGTH_SPREAD), min(1.0, strength + STRENGTH_SPREAD)


def strength_timestep(strength: float, train_timesteps: int) -> int:
    """The training timestep at `strength` of a schedule with `train_timesteps` steps (1 -> the noisiest)."""
    return round(strength * (train_timesteps - 1))


def noise_difference_timesteps(strength_range: tuple[float, float], draws: int, train_timesteps: int) -> list[int]:
    """One timestep per draw, the draws spread evenly over the strength range (one draw: its middle)."""
    low, high = check_strength_range(strength_range)
    levels = [(low + high) / 2] if draws == 1 else [low + (high - low) * i / (draws - 1) for i in range(draws)]
    return [strength_timestep(s, train_timesteps) for s in levels]


def denoising_timesteps(strength: float, steps: int, train_timesteps: int) -> list[int]:
    """`steps` timesteps evenly spaced from the one at `strength` down toward 0 (the pass ends at sigma 0)."""
    start = strength_timestep(check_strength(strength), train_timesteps)
    return [round(start * (steps - i) / steps) for i in range(steps)]


def seeded_noise(seed: int, shape: tuple[int, ...], count: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[count, *shape] standard normal noise drawn on the CPU from `seed`, then moved to device and dtype."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((count, *shape), generator=generator).to(device, dtype)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float,
               sigma_next: torch.Tensor | float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - denoised) / sigma (Karras et al. 2022)."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def flow_velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The velocity a flow-matching model predicted: v = (x - x0_hat) / sigma, from its denoised output
    x0_hat = x - sigma v (ComfyUI's CONST sampling).

    The flow-matching DiffEdit map is |v_target - v_source| (`noise_difference_map` on velocities). At one (x, sigma)
    the three readings differ only by a factor of sigma: dx0 = -sigma dv and dn = (1 - sigma) dv, so
    |dv| = |dn| + |dx0|. The velocity is the network's own output and keeps its scale at every sigma, whereas the
    noise difference vanishes as sigma -> 1 and the x0 difference as sigma -> 0; averaged over draws at several
    sigmas, the velocity weighs them evenly.
    """
    return (x - denoised) / sigma


def noise_difference_map(eps_target: torch.Tensor, eps_source: torch.Tensor) -> torch.Tensor:
    """DiffEdit's map: mean over the sample dims and channels of |eps_target - eps_source|.

    Both are stacked noise predictions [..., B, C, h, w] (e.g. draws x timesteps x batch); returns [B, h, w] >= 0.
    """
    if eps_target.shape != eps_source.shape or eps_target.ndim < 4:
        raise ValueError(f"noise predictions must share a shape [..., B, C, h, w], got {tuple(eps_target.shape)} "
                         f"and {tuple(eps_source.shape)}")
    diff = (eps_target.float() - eps_source.float()).abs()
    return diff.mean(dim=(*range(diff.ndim - 4), diff.ndim - 3))


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) in float32: [B, heads, Nq, Nk] from projected q [B, Nq, heads*d], k [B, Nk, heads*d]."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(dim=-1)


def token_attention(probs: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The edit words' attention on one layer's token grid: probabilities [B, heads, Nq, Nk] summed over the context
    `positions`, mean over heads, Nq reshaped row-major to grid (h, w) -> [B, h, w]."""
    return probs[..., positions].sum(dim=-1).mean(dim=1).reshape(probs.shape[0], *grid)


class AttentionMaps:
    """Running mean of per-layer edit-word maps, each resized (bilinear) to the latent's (h, w)."""

    def __init__(self, size: tuple[int, int], batch: int):
        self.size, self.batch = tuple(size), batch
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, layer_map: torch.Tensor) -> None:
        """A layer's [R, gh, gw] map; R is the batch or a multiple of it (chunks of the same images, averaged)."""
        resized = F.interpolate(layer_map[:, None].float(), size=self.size, mode="bilinear", align_corners=False)
        resized = resized.reshape(-1, self.batch, *self.size).mean(dim=0)
        self.total = resized if self.total is None else self.total + resized.to(self.total.device)
        self.count += 1

    def mean(self) -> torch.Tensor:
        """[B, h, w]: the mean over every recorded layer and step."""
        if self.total is None:
            raise XMGIEInputError("No text attention layer ran, so there is no attention map: this model has neither "
                                  "U-Net cross-attention (SD1.x, SD2, SDXL) nor a supported joint attention (Flux / "
                                  "FLUX.1 Kontext, Qwen-Image(-Edit)). Use the noise-difference or CLIPSeg mode "
                                  "with it.")
        return self.total / self.count


def attend_and_record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, positions: torch.Tensor,
                      grid: tuple[int, int], maps: AttentionMaps) -> torch.Tensor:
    """Cross-attention softmax(Q K^T / sqrt(d)) V on projected [B, N, heads*d] tensors (the stock output, computed in
    float32 and returned in q's dtype) that adds the edit words' map of this layer to `maps`."""
    probs = attention_probabilities(q, k, heads)
    maps.add(token_attention(probs, positions, grid))
    return merge_heads(probs @ split_heads(v.float(), heads)).to(q.dtype)


def joint_attention_map(q: torch.Tensor, k: torch.Tensor, image: slice, positions: torch.Tensor,
                        grid: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """The edit words' map of one DiT joint-attention call: q, k [B, heads, N, d] over the joint sequence
    [text | generated image | reference images]. For the generated image's queries (rows `image`),
    P = softmax(q k^T / sqrt(d) + mask) over the whole joint sequence, summed over the edit words' text columns
    `positions`, mean over heads (`token_attention`) -> [B, h, w]. `mask` is the attention's own (boolean: False is
    masked out; else added to the logits; [N, N], [B, N, N] or [B, 1|heads, N, N]). One head at a time, so memory
    stays at [B, h*w, N]."""
    if mask is not None:
        mask = mask.reshape(*(1,) * (4 - mask.ndim), *mask.shape)[..., image, :]
    heads, total = q.shape[1], None
    for head in range(heads):
        logits = q[:, head:head + 1, image].float() @ k[:, head:head + 1].float().transpose(-1, -2)
        logits = logits * q.shape[-1] ** -0.5
        if mask is not None:
            m = mask[:, head:head + 1] if mask.shape[1] > 1 else mask
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        layer = token_attention(logits.softmax(dim=-1), positions, grid)
        total = layer if total is None else total + layer
    return total / heads


def check_latent(latent: torch.Tensor, channels: int, frames: bool = False) -> torch.Tensor:
    """A VAE-encoded latent [B, channels, h, w] (float, finite), or with `frames` one frame [B, channels, 1, h, w]
    (Qwen-Image's Wan 2.1 latents); returned unchanged."""
    expected = [None, channels, 1, None, None] if frames else [None, channels, None, None]
    if not isinstance(latent, torch.Tensor) or latent.ndim != len(expected) \
            or any(e is not None and e != n for e, n in zip(expected, latent.shape)):
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        layout = f"[batch, {channels}, 1, height, width]" if frames else f"[batch, {channels}, height, width]"
        raise XMGIEInputError(f"The latent has shape {shape} but this model works on {layout} latents: encode the "
                              "image with this model's VAE (VAE Encode).")
    if not latent.is_floating_point() or min(latent.shape) == 0:
        raise XMGIEInputError(f"The latent must be a non-empty float tensor, got dtype {latent.dtype} and shape "
                              f"{tuple(latent.shape)}; connect the output of VAE Encode.")
    check_finite(latent, "The latent")
    return latent
