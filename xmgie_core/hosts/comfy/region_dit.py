"""The attention mode of the zero-shot region on ComfyUI's DiT editors (Flux / FLUX.1 Kontext, Qwen-Image(-Edit)):
the edit words' map read from the joint attention (math: zeroshot.joint_attention_map). The noise-difference mode
needs nothing DiT-specific beyond region.noise_difference (flow matching: the velocity difference).

Both families run every joint attention through comfy.ldm.modules.attention.wrap_attn, which hands the call to
transformer_options["optimized_attention_override"](func, *args, **kwargs) (docs/comfyui-internals.md §8): Flux as
optimized_attention(q, k, v, heads, skip_reshape=True, mask=..., transformer_options=...) with q [B, heads, N, d]
(double and single blocks), Qwen as optimized_attention_masked(q, k, v, heads, mask, transformer_options=...) with
q [B, N, heads*d]. The recorder returns the stock output and reads the token layout [text | generated image |
reference images] from dit.geometry(transformer_options), put there by dit.GeometryWrapper. The caller's MODEL is
never patched: a clone gets the wrapper and the override.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ...attention import split_heads
from ...errors import XMGIEInputError
from ...region.zeroshot import AttentionMaps, joint_attention_map
from . import dit
from .region import Progress, denoising_attention

Override = Callable[..., torch.Tensor]


class JointAttentionRecorder:
    """optimized_attention_override: out = the stock attention (func, or the override installed before, which this
    one composes with), and the edit words' map of the call added to `maps`."""

    def __init__(self, positions: Sequence[int], maps: AttentionMaps, previous: Override | None = None):
        self.positions = torch.tensor(list(positions), dtype=torch.long)
        self.maps, self.previous = maps, previous

    def __deepcopy__(self, memo: dict) -> "JointAttentionRecorder":
        return self  # clones share the recording

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        q, k, heads = args[0], args[1], args[3]
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        if not kwargs.get("skip_reshape", False):
            q, k = split_heads(q, heads), split_heads(k, heads)
        geo = dit.geometry(kwargs["transformer_options"])
        if int(self.positions.max()) >= geo.text:
            raise XMGIEInputError(f"The edit words sit at text tokens {self.positions.tolist()}, but the "
                                  f"conditioning has {geo.text} text tokens: find the positions in the prompt the "
                                  "conditioning was encoded from.")
        geo.joint.check(k.shape[2], "The joint attention")
        with torch.no_grad():
            self.maps.add(joint_attention_map(q, k, slice(geo.joint.start, geo.joint.stop),
                                              self.positions.to(q.device), (geo.grid.h, geo.grid.w), mask))
        return out


def recording_clone(model: Any, positions: Sequence[int], maps: AttentionMaps) -> Any:
    """A clone of the DiT `model` with the geometry wrapper and a JointAttentionRecorder (over any override the
    model already had)."""
    found = dit.require_dit(model.model.diffusion_model, "The joint-attention map reads a DiT's joint attention",
                            "use region.comfy_edit_attention for SD U-Nets")
    if not positions or min(positions) < 0:
        raise XMGIEInputError(f"No edit-word token positions given ({list(positions)!r}): locate the edit words in "
                              "the target prompt's tokens first.")
    patched = model.clone()
    patched.model_options = dit.with_geometry(patched.model_options, found)
    options = patched.model_options["transformer_options"]
    options["optimized_attention_override"] = JointAttentionRecorder(positions, maps,
                                                                     options.get("optimized_attention_override"))
    return patched


def dit_edit_attention(model: Any, target: list, positions: Sequence[int], latent: torch.Tensor, steps: int,
                       seed: int, strength: float, progress: Progress | None = None) -> torch.Tensor:
    """The edit words' joint-attention map [B, h, w] >= 0 of a DiT editor (float32, ComfyUI's intermediate device).

    `target` is the CONDITIONING of the target prompt (a reference image in its reference_latents is passed on as the
    editor does), `positions` the edit words' indices among its text tokens, `latent` the raw VAE latent [B, C, h, w]
    (Qwen-Image: [B, C, 1, h, w]). region.denoising_attention runs `steps` Euler steps from the sigma at `strength`
    while every joint attention (Flux: double and single blocks) adds the generated image's attention to those text
    tokens, softmax over the whole joint sequence, averaged over heads, blocks and steps.
    """
    maps = AttentionMaps(tuple(latent.shape[-2:]), latent.shape[0])
    return denoising_attention(recording_clone(model, positions, maps), target, latent, steps, seed, strength, maps,
                               progress)
