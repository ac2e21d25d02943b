"""Square tiles of a [B,C,H,W] tensor: pick the tiles where work is needed, gather them with a
replicate-extended halo, and write results back. Lets band-limited operations (a blur near a
mask border) cost in proportion to the band, not the image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TileSet:
    """Tiles (bi, ty, tx) of size `tile` over images of size h x w."""

    bi: torch.Tensor
    ty: torch.Tensor
    tx: torch.Tensor
    tile: int
    h: int
    w: int

    @classmethod
    def covering(cls, active: torch.Tensor, tile: int) -> "TileSet":
        """The tiles containing at least one True pixel of `active` [B,H,W]."""
        b, h, w = active.shape
        need = F.max_pool2d(active[:, None].float(), tile, ceil_mode=True)[:, 0] > 0
        bi, ty, tx = need.nonzero(as_tuple=True)
        return cls(bi, ty, tx, tile, h, w)

    def __len__(self) -> int:
        return int(self.bi.numel())

    def split(self, size: int) -> list["TileSet"]:
        """The tiles in groups of at most `size` (to bound the memory of gathered patches)."""
        return [TileSet(self.bi[i:i + size], self.ty[i:i + size], self.tx[i:i + size], self.tile, self.h, self.w)
                for i in range(0, len(self), size)]

    def _span(self, start: torch.Tensor, halo: int) -> torch.Tensor:
        return start[:, None] * self.tile - halo + torch.arange(self.tile + 2 * halo, device=start.device)

    def gather(self, t: torch.Tensor, halo: int = 0) -> torch.Tensor:
        """[B,C,H,W] (any strides) -> [n,C,tile+2*halo,tile+2*halo]; outside the image, edge pixels repeat."""
        dev = t.device
        rows = self._span(self.ty.to(dev), halo).clamp(0, self.h - 1)
        cols = self._span(self.tx.to(dev), halo).clamp(0, self.w - 1)
        out = t[self.bi.to(dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def scatter(self, dst: torch.Tensor, values: torch.Tensor) -> None:
        """Write values [n,C,tile,tile] into dst [B,C,H,W] in place (pixels beyond the image are dropped)."""
        dev = dst.device
        rows = self._span(self.ty.to(dev), 0)
        cols = self._span(self.tx.to(dev), 0)
        valid = (rows < self.h)[:, :, None] & (cols < self.w)[:, None, :]
        n = len(self)
        bi = self.bi.to(dev)[:, None, None].expand(n, self.tile, self.tile)[valid]
        r = rows[:, :, None].expand(n, self.tile, self.tile)[valid]
        c = cols[:, None, :].expand(n, self.tile, self.tile)[valid]
        dst.permute(0, 2, 3, 1)[bi, r, c] = values.permute(0, 2, 3, 1)[valid].to(dst.dtype)
