"""Leak metrics (xMGIE's own): how much an edit changed the photo outside its edit region, and the drift heat map of
the contact sheet, both computed by xmgie_core.drift.drift_map (the node XMGIE Edit Metrics calls it too).

With S the source, E the edit (at the source's size: resized with PIL bicubic first when it differs, as l1_src and
MagicBrush's eval_distance resize) and O the pixels outside the sample's edit region (Item.edit_region: the dataset's
mask, else the editor's; binarised at 0.5, no margin):

  leak_l1   = mean over O and channels |E - S|                    MagicBrush's L1 restricted to O (0..1)
  leak_psnr = 10 log10(1 / mean over O and channels (E - S)^2)   dB, peak 1; +inf when O is unchanged (left out of
                                                                  the mean, as PSNR of identical images is)
  leak_max  = max over O of (max over channels |E - S|)           the worst pixel (1/255 = one 8-bit level)

A region covering the whole photo leaves nothing outside: the three are None (undefined) for that sample.
The "drift map" panel is drift_map's heat map (full scale drift.FULL_SCALE); a sample without a region shows the
change over the whole photo.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .. import drift
from ..errors import XMGIEInputError
from .pixels import resized_like


class Item(Protocol):
    """What the leak metrics read of registry.Item (not imported: the registry imports this module)."""

    source: torch.Tensor
    edit: torch.Tensor

    @property
    def edit_region(self) -> torch.Tensor | None: ...

    def memo(self, key: str, compute: Callable[[], Any]) -> Any: ...


def item_drift(item: Item) -> drift.Drift:
    """drift_map of the item's edit against its source outside its edit region (once per item)."""
    return item.memo("drift", lambda: drift.drift_map(item.source, resized_like(item.edit, item.source),
                                                      item.edit_region))


def leak_l1(item: Item, _: Any = None) -> float | None:
    """leak_l1 of the module docstring."""
    return item_drift(item).stats[0].mean_abs


def leak_psnr(item: Item, _: Any = None) -> float | None:
    """leak_psnr of the module docstring."""
    return item_drift(item).stats[0].psnr


def leak_max(item: Item, _: Any = None) -> float | None:
    """leak_max of the module docstring."""
    return item_drift(item).stats[0].max_abs


def drift_panel(item: Item) -> torch.Tensor | None:
    """The contact sheet's drift map; None (a blank tile) where the region does not fit the photo, which the leak
    metrics have already noted on that sample's row."""
    try:
        return item_drift(item).heat_map
    except XMGIEInputError:
        return None
