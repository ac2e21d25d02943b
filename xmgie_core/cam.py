"""Cross-Attention Masking (CAM), xMGIE seed 000 section 3.4, eqs 10-12 (PFB-Diff).

Chosen text tokens may act only inside the edit region; optional background tokens only
outside it. With S = Q K^T / sqrt(d), A = softmax(S) and a per-(query, token) weight
M[q, t] in [0, 1] (1 for unrestricted tokens):

  "paper"        A^M = A * M,  O = A^M V                      (eqs 10-12, no renormalisation)
  "renormalized" O = softmax(S + log M) V                     (rows still sum to 1; PFB-Diff's code)

For an edit token M[q, t] = 1 - s (1 - R[q]); for a background token M[q, t] = 1 - s R[q],
with R the binary region at the layer's resolution and s the strength.

Neither mode builds the [B, heads, Nq, Nk] probability matrix: "renormalized" is one fused
scaled_dot_product_attention call with an additive [B, 1, Nq, Nk] mask; "paper" is one fused
call that also returns the log-sum-exp, then subtracts the few restricted tokens' terms,
O = O_stock - sum_t (1 - M[q, t]) exp(S[q, t] - lse[q]) V_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import XMGIEInputError

MODES = ("renormalized", "paper")
LSE_CHUNK = 1024


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] -> [B, heads, N, d] (a view)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def stock_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V on [B, N, heads*d] tensors (the baseline the kernel is measured against)."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(S) V, logsumexp(S) over keys) for [B, heads, N, d] inputs, S = Q K^T / sqrt(d).

    On the CPU one fused flash-attention call returns both. Elsewhere the output comes from
    scaled_dot_product_attention and the log-sum-exp from query chunks of LSE_CHUNK rows, so
    at most [B, heads, LSE_CHUNK, Nk] scores exist at once.
    """
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        return out, lse
    out = F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    lse = torch.cat([torch.logsumexp((c @ k.transpose(-1, -2)).float() * scale, dim=-1)
                     for c in q.split(LSE_CHUNK, dim=2)], dim=2)
    return out, lse


@dataclass(frozen=True)
class TokenRestriction:
    """Which context positions are restricted, and how strongly (s in eq M = 1 - s(1 - R))."""

    edit: torch.Tensor
    """Positions allowed only inside the region (LongTensor)."""
    background: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """Positions allowed only outside the region (LongTensor)."""
    strength: float = 1.0

    def __post_init__(self) -> None:
        edit, back = self.edit.long().flatten().unique(), self.background.long().flatten().unique()
        if not 0.0 <= self.strength <= 1.0:
            raise XMGIEInputError(f"CAM strength must be in [0, 1], got {self.strength}.")
        both = set(edit.tolist()) & set(back.tolist())
        if both:
            raise XMGIEInputError(f"Tokens at positions {sorted(both)} are both edit words and background words; "
                                  "a word can only be one of them.")
        object.__setattr__(self, "edit", edit)
        object.__setattr__(self, "background", back.to(edit.device))

    def weights(self, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(restricted positions [R], M [B, Nq, R]) for a region [B, Nq] in {0, 1}."""
        r = region.float()
        s = self.strength
        m_edit = (1 - s * (1 - r))[..., None].expand(*r.shape, self.edit.numel())
        m_back = (1 - s * r)[..., None].expand(*r.shape, self.background.numel())
        return torch.cat([self.edit, self.background]), torch.cat([m_edit, m_back], dim=-1)


def masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, region: torch.Tensor,
                           restriction: TokenRestriction, mode: str = "renormalized") -> torch.Tensor:
    """CAM attention (eqs 10-12) on q [B, Nq, heads*d], k/v [B, Nk, heads*d], region [B or 1, Nq].

    Returns [B, Nq, heads*d] in q's dtype. Every row is masked; callers pass only the rows to mask.
    """
    if mode not in MODES:
        raise XMGIEInputError(f"Unknown CAM mode {mode!r}; use one of {', '.join(MODES)}.")
    b, nq, _ = q.shape
    nk = k.shape[1]
    positions, m = restriction.weights(region.to(q.device).expand(b, nq))
    if positions.numel() and int(positions.max()) >= nk:
        raise XMGIEInputError(f"CAM token position {int(positions.max())} is outside the context ({nk} tokens).")
    positions = positions.to(q.device)
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if mode == "renormalized":
        bias = torch.zeros(b, 1, nq, nk, device=q.device, dtype=q.dtype)
        bias[:, 0, :, positions] = torch.log(m).to(q.dtype)
        return merge_heads(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias))
    out, lse = attention_with_lse(qh, kh, vh)
    if positions.numel() == 0:
        return merge_heads(out)
    scale = qh.shape[-1] ** -0.5
    scores = (qh @ kh[:, :, positions].transpose(-1, -2)).float() * scale  # [B, h, Nq, R]
    removed = torch.exp(scores - lse.float()[..., None]) * (1 - m[:, None])
    out = out - (removed.to(vh.dtype) @ vh[:, :, positions])
    return merge_heads(out)


def tiled_positions(positions: torch.Tensor, prompt_tokens: int, context_tokens: int) -> torch.Tensor:
    """Positions of a prompt of `prompt_tokens` inside a context tiled to `context_tokens`
    (ComfyUI repeats shorter conds up to a common length): p + j * prompt_tokens."""
    if context_tokens % prompt_tokens:
        raise XMGIEInputError(
            f"The conditioning has {context_tokens} tokens, not a multiple of the CAM prompt's {prompt_tokens}: "
            "encode the positive prompt from the same text you gave the Cross-Attention Mask node."
        )
    reps = torch.arange(context_tokens // prompt_tokens, device=positions.device) * prompt_tokens
    return (positions[None, :] + reps[:, None]).flatten()


class RegionPyramid:
    """A binary region at each attention layer's token grid, cached per resolution.

    The mask [B, H, W] (1 = region) is area-averaged onto the h x w grid of a layer (row-major
    tokens) and thresholded: a cell is inside when at least `threshold` of it is covered, so
    coarse layers do not leak across the border. A region that would vanish at a coarse grid
    keeps its best-covered cell(s), so small regions are never lost.
    """

    def __init__(self, mask: torch.Tensor, threshold: float = 0.5):
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise XMGIEInputError(f"The CAM mask must be [batch, height, width] or [height, width], got {tuple(mask.shape)}.")
        if not 0.0 < threshold <= 1.0:
            raise XMGIEInputError(f"threshold must be in (0, 1], got {threshold}.")
        if not bool((mask >= 0.5).any()):
            raise XMGIEInputError(
                "The CAM mask is empty (no value >= 0.5): the edit words would act nowhere. "
                "Paint the region to edit, or bypass the Cross-Attention Mask node."
            )
        self.mask = mask.float()
        self.threshold = threshold
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Region [B, h*w] in {0, 1} (float32) at an h x w token grid."""
        key = (h, w, str(device))
        if key not in self._cache:
            cover = F.adaptive_avg_pool2d(self.mask[:, None], (h, w))[:, 0]
            inside = cover >= self.threshold - 1e-6
            best = cover.flatten(1).amax(dim=1)
            lost = ~inside.flatten(1).any(dim=1) & (best > 0)
            inside = inside | (lost[:, None, None] & (cover >= best[:, None, None] - 1e-6))
            self._cache[key] = inside.flatten(1).float().to(device)
        return self._cache[key]

    def for_tokens(self, n_tokens: int, latent_hw: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Region for a layer with `n_tokens` queries when the U-Net input is latent_hw (h, w)."""
        return self.grid(*infer_grid(n_tokens, latent_hw), device)


def infer_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of a U-Net layer: the latent downsampled by a power of two (ceil)."""
    h, w = latent_hw
    for level in range(8):
        f = 2**level
        gh, gw = math.ceil(h / f), math.ceil(w / f)
        if gh * gw == n_tokens:
            return gh, gw
    raise XMGIEInputError(f"Cannot place {n_tokens} attention tokens on a grid for a {h}x{w} latent.")
