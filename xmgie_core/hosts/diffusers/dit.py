"""The diffusers host's seam for DiT editors (beside unet.py): FluxTransformer2DModel (FLUX.1 Kontext) and
QwenImageTransformer2DModel (Qwen-Image-Edit), as diffusers 0.42 builds them. It answers what unet.py answers for
the U-Net: PFB's fusion points (`double_k` = transformer_blocks[k], `single_k` = Flux's single_transformer_blocks[k],
xmgie_core.pfb.blend's BlockLayout.from_dit), where the generated image's tokens sit, and how a technique hooks in
and comes out again, the model unchanged.

Token layout (diffusers 0.42):
- the pipelines pack the latent [B, C, h, w] (Qwen: [B, C, 1, h, w]) 2 x 2 into tokens [B, h/2 * w/2, 4C]
  (`pack`, the pipelines' `_pack_latents`); the transformer's image stream is [generated | reference image(s)],
  the text a separate stream;
- every block, double or single, returns (text stream, image stream): Flux's single blocks concatenate [text | image]
  inside and split it again on the way out, so the generated tokens are at TokenGrid(h/2, w/2, start=0) of each
  block's image output (`block_hooks` blends only that slice; text and reference tokens are never touched);
- joint attention runs on [text (T) | generated | reference]: the generated queries are TokenGrid.shifted(T).
  CAM (eqs 10-12, xmgie_core.cam) restricts those queries' text-key columns only (`FluxCAMProcessor`,
  `QwenCAMProcessor`, set by `joint_attention_processors`); text and reference queries attend as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ...cam import TokenRestriction, masked_joint_attention
from ...errors import XMGIEInputError
from ...masks import RegionPyramid
from ...pfb import BlockLayout
from ...token_grid import TokenGrid

Hook = Callable[[str, torch.Tensor], torch.Tensor]
FLUX, QWEN_IMAGE = "flux", "qwen_image"
PATCH = 2
"""Latent cells per token side: both pipelines pack 2 x 2 cells into one token."""


@dataclass(frozen=True)
class DiTBlocks:
    """A diffusers DiT's blocks: `double` joint blocks (transformer_blocks), `single` Flux single-stream blocks."""

    family: str
    double: tuple[torch.nn.Module, ...]
    single: tuple[torch.nn.Module, ...] = ()

    def layout(self) -> BlockLayout:
        return BlockLayout.from_dit(len(self.double), len(self.single), PATCH)

    def block(self, layer: str) -> torch.nn.Module:
        kind, k = layer.rsplit("_", 1)
        return (self.double if kind == "double" else self.single)[int(k)]


def find(transformer: torch.nn.Module) -> DiTBlocks | None:
    """The blocks of a FluxTransformer2DModel / QwenImageTransformer2DModel, else None."""
    if hasattr(transformer, "single_transformer_blocks") and hasattr(transformer, "transformer_blocks"):
        return DiTBlocks(FLUX, tuple(transformer.transformer_blocks), tuple(transformer.single_transformer_blocks))
    if hasattr(transformer, "transformer_blocks") and hasattr(transformer, "txt_norm"):
        return DiTBlocks(QWEN_IMAGE, tuple(transformer.transformer_blocks))
    return None


def require_dit(transformer: torch.nn.Module, what: str) -> DiTBlocks:
    found = find(transformer)
    if found is None:
        raise XMGIEInputError(f"{what} holds a {type(transformer).__name__}, not a FluxTransformer2DModel or "
                              "QwenImageTransformer2DModel: load FLUX.1 Kontext or Qwen-Image-Edit(-2509).")
    return found


def pack(latent: torch.Tensor) -> torch.Tensor:
    """Latent [B, C, h, w] or [B, C, 1, h, w] -> tokens [B, h/2 * w/2, 4C], channel-major within each 2 x 2 cell
    (the pipelines' _pack_latents)."""
    z = latent[:, :, 0] if latent.ndim == 5 else latent
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`, shaped as the latent `like`."""
    b, c, h, w = like.shape[0], like.shape[1], *like.shape[-2:]
    z = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return z[:, :, None] if like.ndim == 5 else z


def token_grid(latent: torch.Tensor) -> TokenGrid:
    """The generated tokens of a latent in the image stream (start 0)."""
    return TokenGrid(latent.shape[-2] // PATCH, latent.shape[-1] // PATCH)


@contextmanager
def block_hooks(blocks: DiTBlocks, layers: list[str], grid: TokenGrid, hook: Hook) -> Iterator[None]:
    """Within the block, hook(layer, generated tokens as [B, D, h, w]) runs after each of `layers`' blocks and its
    result replaces those tokens of the block's image-stream output; text and reference tokens pass untouched.
    The hooks are removed on exit, also on error."""
    handles = []
    for layer in layers:
        def after(module, args, output, layer=layer):
            text, image = output
            return text, grid.put(image, hook(layer, grid.to_grid(image)))
        handles.append(blocks.block(layer).register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ CAM

@dataclass
class JointCAM:
    """What the CAM processors need per forward: the restriction, the region on the generated tokens' grid, the
    current text length (set by the caller per forward), and whether this forward is masked (the edit prompt's)."""

    restriction: TokenRestriction
    region: RegionPyramid
    grid: TokenGrid
    mode: str = "renormalized"
    text: int = 0
    active: bool = False
    calls: int = field(default=0)
    """Masked attention calls so far (tests check that CAM ran)."""


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, cam: JointCAM | None
                    ) -> torch.Tensor:
    """Joint attention on q/k/v [B, N, heads, d] (sequence [text | generated | reference]) -> [B, N, heads*d]:
    plain softmax attention, except that with an active `cam` the generated queries get eqs 10-12 on the text
    keys (xmgie_core.cam.masked_joint_attention: edit words only inside the region, background words only outside;
    the text positions are the restriction's, as the text leads the joint sequence)."""
    heads = q.shape[2]
    if cam is None or not cam.active:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) \
            .transpose(1, 2).flatten(2, 3)
    gen = cam.grid.shifted(text)
    gen.check(q.shape[1], "The joint attention sequence")
    cam.calls += 1
    return masked_joint_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), heads, slice(gen.start, gen.stop),
                                  cam.region.grid(cam.grid.h, cam.grid.w, q.device), cam.restriction, cam.mode)


def _refuse_masks(who: str, *masks) -> None:
    if any(m is not None for m in masks):
        raise XMGIEInputError(f"{who} supports joint attention without an attention mask (one prompt per batch, "
                              "unpadded): edit one image with one prompt at a time.")


class FluxCAMProcessor:
    """FluxAttnProcessor (diffusers 0.42) with `joint_attention` in place of its attention call: the same
    projections, q/k norms and rotary embedding, the text first; for single blocks (no encoder stream) the text
    length comes from the JointCAM state."""

    def __init__(self, cam: JointCAM):
        self.cam = cam

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        _refuse_masks("CAM on Flux", attention_mask)
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev.unflatten(-1, (-1, attn.head_dim)), v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        text = encoder_hidden_states.shape[1] if joint else self.cam.text
        out = joint_attention(q, k, v, text, self.cam).to(q.dtype)
        if not joint:
            return out
        text_out, image_out = out[:, :text], out[:, text:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class QwenCAMProcessor:
    """QwenDoubleStreamAttnProcessor2_0 (diffusers 0.42) with `joint_attention` in place of its attention call."""

    def __init__(self, cam: JointCAM):
        self.cam = cam

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        _refuse_masks("CAM on Qwen-Image", attention_mask, encoder_hidden_states_mask)
        head_dim = attn.inner_dim // attn.heads
        split = lambda t: t.unflatten(-1, (-1, head_dim))  # noqa: E731
        iq, ik, iv = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        tq, tk = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        iq, ik = attn.norm_q(iq) if attn.norm_q is not None else iq, attn.norm_k(ik) if attn.norm_k is not None else ik
        tq = attn.norm_added_q(tq) if attn.norm_added_q is not None else tq
        tk = attn.norm_added_k(tk) if attn.norm_added_k is not None else tk
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            iq, ik = apply_rotary_emb_qwen(iq, image_freqs, use_real=False), apply_rotary_emb_qwen(ik, image_freqs, use_real=False)
            tq, tk = apply_rotary_emb_qwen(tq, text_freqs, use_real=False), apply_rotary_emb_qwen(tk, text_freqs, use_real=False)
        text = encoder_hidden_states.shape[1]
        out = joint_attention(torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1), text,
                              self.cam).to(iq.dtype)
        image_out = attn.to_out[0](out[:, text:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(out[:, :text].contiguous())


@contextmanager
def joint_attention_processors(transformer: torch.nn.Module, cam: JointCAM) -> Iterator[None]:
    """Within the block every attention layer of the transformer runs the family's CAM processor on `cam`; the
    original processors come back on exit, also on error."""
    blocks = require_dit(transformer, "The transformer")
    processor = FluxCAMProcessor(cam) if blocks.family == FLUX else QwenCAMProcessor(cam)
    original = dict(transformer.attn_processors)
    transformer.set_attn_processor({name: processor for name in original})
    try:
        yield
    finally:
        transformer.set_attn_processor(original)
