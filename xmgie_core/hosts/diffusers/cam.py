"""Cross-attention masking on a diffusers UNet2DConditionModel: one attention processor class,
set on the cross-attention layers by a context manager and removed on exit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ...attention import stock_attention
from ...cam import TokenRestriction, masked_cross_attention
from ...masks import RegionPyramid
from .unet import check_plain_cross_attention, cross_attention_processors


class _LatentSize:
    """The spatial size of the U-Net input, recorded by a forward pre-hook (for the token grids)."""

    hw: tuple[int, int] = (0, 0)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.hw = tuple(sample.shape[-2:])


class CAMAttnProcessor:
    """Cross-attention with CAM on the selected batch rows (eqs 10-12 via xmgie_core.cam)."""

    def __init__(self, restriction: TokenRestriction, region: RegionPyramid, mode: str, latent: _LatentSize,
                 rows: slice):
        self.restriction, self.region, self.mode, self.latent, self.rows = restriction, region, mode, latent, rows

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        check_plain_cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, "CAMAttnProcessor")
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        out = stock_attention(q, k, v, heads)
        region = self.region.for_tokens(q.shape[1], self.latent.hw, q.device)
        rows = range(q.shape[0])[self.rows]
        if len(rows):
            idx = torch.tensor(list(rows), device=q.device)
            region = region[torch.arange(len(rows), device=q.device) % region.shape[0]]
            out[idx] = masked_cross_attention(q[idx], k[idx], v[idx], heads, region, self.restriction, self.mode)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextmanager
def cross_attention_masking(unet: torch.nn.Module, restriction: TokenRestriction, mask: torch.Tensor,
                            mode: str = "renormalized", threshold: float = 0.5,
                            rows: slice = slice(None)) -> Iterator[None]:
    """Within the block, every cross-attention (attn2) layer of `unet` applies CAM to batch `rows`
    (e.g. slice(B, None) for the conditional half of a [uncond, cond] CFG batch). The original
    processors come back on exit, also on error."""
    latent = _LatentSize()
    processor = CAMAttnProcessor(restriction, RegionPyramid(mask, threshold), mode, latent, rows)
    hook = unet.register_forward_pre_hook(latent, with_kwargs=True)
    try:
        with cross_attention_processors(unet, processor):
            yield
    finally:
        hook.remove()
