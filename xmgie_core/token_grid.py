"""Where a DiT's generated-image tokens sit in its sequences, and their latent cells.

A DiT (Flux / Kontext, Qwen-Image / -Edit) patchifies the latent [B, C, H, W] into p x p cells (p = 2), one token
per cell in row-major order, h = ceil(H / p), w = ceil(W / p) (the latent is padded to a multiple of p). The
model's sequences are

  double-stream image stream:  [generated (h*w) | reference images ...]
  joint attention / single-stream:  [text (T) | generated (h*w) | reference images ...]

so the generated tokens are the slice [start, start + h*w) with start = 0 or T. Text and reference tokens are
never blended or masked by xMGIE: only this slice is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import XMGIEInputError


@dataclass(frozen=True)
class TokenGrid:
    """The generated image's h x w tokens at sequence positions [start, start + h*w)."""

    h: int
    w: int
    start: int = 0

    @classmethod
    def from_latent(cls, height: int, width: int, patch: int, start: int = 0) -> "TokenGrid":
        """The grid of a latent of height x width patchified p x p (ComfyUI: (H + p // 2) // p, i.e. ceil for p=2)."""
        return cls((height + patch // 2) // patch, (width + patch // 2) // patch, start)

    @property
    def count(self) -> int:
        return self.h * self.w

    @property
    def stop(self) -> int:
        return self.start + self.count

    def shifted(self, offset: int) -> "TokenGrid":
        """The same tokens in a sequence with `offset` more tokens in front (e.g. the text in joint attention)."""
        return TokenGrid(self.h, self.w, self.start + offset)

    def check(self, sequence_length: int, where: str) -> None:
        if sequence_length < self.stop:
            raise XMGIEInputError(f"{where} has {sequence_length} tokens, fewer than the {self.count} image tokens "
                                  f"of a {self.h}x{self.w} grid after {self.start}: the latent and the model's "
                                  "input do not match.")

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, D] -> the generated image's features [B, D, h, w]."""
        self.check(tokens.shape[1], "The sequence")
        b, _, d = tokens.shape
        return tokens[:, self.start:self.stop].transpose(1, 2).reshape(b, d, self.h, self.w)

    def put(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """A copy of tokens [B, L, D] with the generated slice replaced by grid [B, D, h, w] (others untouched)."""
        b, d = grid.shape[:2]
        return torch.cat([tokens[:, :self.start], grid.reshape(b, d, self.count).transpose(1, 2).to(tokens.dtype),
                          tokens[:, self.stop:]], dim=1)
