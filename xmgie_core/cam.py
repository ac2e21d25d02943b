"""Cross-Attention Masking (CAM), xMGIE [xMGIE] §3.4, eqs 10-12 (PFB-Diff).

Chosen text tokens may act only inside the edit region; optional background tokens only
outside it. With S = Q K^T / sqrt(d), A = softmax(S) and a per-(query, token) weight
M[q, t] in [0, 1] (1 for unrestricted tokens):

  "paper"        A^M = A * M,  O = A^M V                      (eqs 10-12, no renormalisation)
  "renormalized" O = softmax(S + log M) V                     (rows still sum to 1; PFB-Diff's code)

For an edit token M[q, t] = 1 - s (1 - R[q]); for a background token M[q, t] = 1 - s R[q],
with R the binary region at the layer's resolution and s the strength.

Neither mode builds the [B, heads, Nq, Nk] probability matrix: each is one fused
scaled_dot_product_attention call with a [B, 1, Nq, Nk + R] mask over the context plus one
value-less copy of each of the R restricted tokens' keys. The copies carry weight 0 in
"renormalized" (softmax(S + log M) V exactly) and weight 1 - M[q, t] in "paper", where they keep
the removed share of each restricted token in the softmax denominator:

  sum_t' M e^S V / (sum_t' M e^S + sum_t (1 - M) e^S) = sum_t' A M V = A^M V.

In a DiT's joint attention (masked_joint_attention) the same mask covers only the generated image's query rows;
the restricted tokens are text keys, and text and reference-image queries attend as without CAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import merge_heads, split_heads
from .errors import XMGIEInputError
from .masks import binarize

MODES = ("renormalized", "paper")


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

    def keep_rows(self, nk: int, paper: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights for a query inside / outside the region: M over the nk context tokens (1 for
        unrestricted tokens, 1 - s (1 - R) for edit tokens, 1 - s R for background tokens), then
        those of the restricted tokens' value-less copies (1 - M with `paper`, else 0)."""
        inside = torch.ones(nk, device=device)
        outside = torch.ones(nk, device=device)
        outside[self.edit.to(device)] = 1 - self.strength
        inside[self.background.to(device)] = 1 - self.strength
        positions = torch.cat([self.edit, self.background]).to(device)
        rows = [torch.cat([row, 1 - row[positions] if paper else torch.zeros(positions.numel(), device=device)])
                for row in (inside, outside)]
        return rows[0], rows[1]


def all_binary(rows: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Every weight is 0 or 1 (strength 1): the mask is boolean, a key is kept or dropped."""
    return all(bool(((row == 0) | (row == 1)).all()) for row in rows)


def attention_mask(rows: tuple[torch.Tensor, torch.Tensor], region: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask [B, 1, Nq, Nk] from per-token weights for inside/outside queries and a region [B, Nq]:
    boolean when every weight is 0 or 1, else log M (additive). Only the result is full size."""
    inside, outside = rows
    if all_binary(rows):
        inside, outside = inside > 0, outside > 0
    else:
        inside, outside = torch.log(inside).to(dtype), torch.log(outside).to(dtype)
    return torch.where(binarize(region)[:, None, :, None], inside, outside)


def masked_heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region: torch.Tensor,
                           restriction: TokenRestriction, mode: str = "renormalized",
                           split_rows: bool = False) -> torch.Tensor:
    """Eqs 10-12 on heads-first q [B, H, Nq, d], k/v [B, H, Nk, d], region [B or 1, Nq] in {0, 1}: one
    scaled_dot_product_attention over the keys plus the restricted tokens' value-less copies, with a
    [B or 1, 1, Nq, Nk + R] mask (module docstring). Returns [B, H, Nq, d]; every row is masked.

    `split_rows`: with 0/1 weights and one region, the queries inside and outside the region attend, without a
    mask, to the keys their weight row keeps (kept_keys_attention): the same result, and mask-free fused kernels
    apply, which pays off for long key sequences (a DiT's joint attention)."""
    if mode not in MODES:
        raise XMGIEInputError(f"Unknown CAM mode {mode!r}; use one of {', '.join(MODES)}.")
    nk = k.shape[2]
    positions = torch.cat([restriction.edit, restriction.background]).to(q.device)
    if positions.numel() and int(positions.max()) >= nk:
        raise XMGIEInputError(f"CAM token position {int(positions.max())} is outside the context ({nk} tokens).")
    k = torch.cat([k, k[:, :, positions]], dim=2)
    v = torch.cat([v, torch.zeros_like(v[:, :, positions])], dim=2)
    rows = restriction.keep_rows(nk, mode == "paper", q.device)
    if split_rows and region.shape[0] == 1 and all_binary(rows):
        return kept_keys_attention(q, k, v, rows, binarize(region[0].to(q.device)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(rows, region.to(q.device), q.dtype))


def kept_keys_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                        inside: torch.Tensor) -> torch.Tensor:
    """Attention under a boolean mask whose query rows are one of two key rows (`rows`: kept keys for queries
    inside / outside the region, `inside` [Nq] bool), as two unmasked calls over the kept keys."""
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for chosen, row in ((inside, rows[0]), (~inside, rows[1])):
        if bool(chosen.any()):
            keep = row.nonzero()[:, 0]
            out[:, :, chosen] = F.scaled_dot_product_attention(q[:, :, chosen], k[:, :, keep], v[:, :, keep])
    return out


def masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, region: torch.Tensor,
                           restriction: TokenRestriction, mode: str = "renormalized") -> torch.Tensor:
    """CAM attention (eqs 10-12) on q [B, Nq, heads*d], k/v [B, Nk, heads*d], region [B or 1, Nq] in {0, 1}.

    Returns [B, Nq, heads*d] in q's dtype. Every row is masked; callers pass only the rows to mask.
    """
    return merge_heads(masked_heads_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                              region, restriction, mode))


Stock = Callable[[torch.Tensor], torch.Tensor]
"""stock(query rows, in the caller's layout) -> their unmasked attention over all keys, [B, n, heads*d]."""


def masked_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, image: slice,
                           region: torch.Tensor, restriction: TokenRestriction, mode: str = "renormalized",
                           heads_first: bool = False, stock: Stock | None = None) -> torch.Tensor:
    """CAM in a DiT's joint attention (eqs 10-12 on the image-query -> text-key columns).

    Queries and keys are the joint sequence [text | generated image | reference images]; `image` is the generated
    image's slice, `region` [B or 1, image tokens] in {0, 1}, and the restriction's positions are text positions
    (before image.start). Only the generated rows are masked (masked_heads_attention, one fused call); the text and
    reference rows are `stock(rows)` (default: plain scaled_dot_product_attention). q/k/v are [B, N, heads*d], or
    [B, heads, N, d] with `heads_first` (Flux's skip_reshape); returns [B, N, heads*d].
    """
    positions = torch.cat([restriction.edit, restriction.background])
    if positions.numel() and int(positions.max()) >= image.start:
        raise XMGIEInputError(f"CAM token position {int(positions.max())} is not a text token: the joint sequence "
                              f"has {image.start} text tokens before the image.")
    as_heads = (lambda t: t) if heads_first else (lambda t: split_heads(t, heads))
    kh, vh = as_heads(k), as_heads(v)
    seq = 2 if heads_first else 1

    def plain(rows: torch.Tensor) -> torch.Tensor:
        return merge_heads(F.scaled_dot_product_attention(as_heads(rows), kh, vh))

    rows = q.narrow(seq, image.start, image.stop - image.start)
    masked = merge_heads(masked_heads_attention(as_heads(rows), kh, vh, region, restriction, mode, split_rows=True))
    rest = torch.cat([q.narrow(seq, 0, image.start), q.narrow(seq, image.stop, q.shape[seq] - image.stop)], dim=seq)
    others = (stock or plain)(rest)
    return torch.cat([others[:, :image.start], masked.to(others.dtype), others[:, image.start:]], dim=1)


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
