"""The seam for diffusers' UNet2DConditionModel family (SD1.x, SD2, SDXL): PFB's fusion points in its modules, named
as ComfyUI numbers the LDM blocks (LDM block k = the k-th resnet/attention unit in forward order), and its
cross-attention processors — swapped for a technique's, checked to be plain attention, and restored. A DiT family
gets a module of its own beside this one.

Fusion points:
- `input_k`: a forward pre-hook on the module after encoder unit k (h after it was kept as a skip, which stays
  unblended), the mid block after the last;
- `middle`: a forward hook on mid_block's output;
- `output_k`: a forward hook on decoder unit k's last module (its upsampler if it has one), i.e. h before the
  next unit concatenates its skip.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ...errors import XMGIEInputError
from ...pfb import BlockLayout

Hook = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class FusionPoint:
    module: torch.nn.Module
    before: bool
    """True: blend the module's input (pre-hook); False: its output."""


def fusion_points(unet: torch.nn.Module) -> tuple[BlockLayout, dict[str, FusionPoint]]:
    """The blendable layers of a UNet2DConditionModel in ComfyUI's names, and where each is blended."""
    enc_units: list[list[torch.nn.Module]] = [[unet.conv_in]]
    enc_scale = [1]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            enc_units.append([resnet] + ([attns[j]] if attns is not None else []))
            enc_scale.append(1)
        if block.downsamplers is not None:
            enc_units.append([block.downsamplers[0]])
            enc_scale.append(2)
    dec_units: list[list[torch.nn.Module]] = []
    dec_scale: list[int] = []
    for block in unet.up_blocks:
        attns = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            unit = [resnet] + ([attns[j]] if attns is not None else [])
            last = j == len(block.resnets) - 1 and block.upsamplers is not None
            dec_units.append(unit + ([block.upsamplers[0]] if last else []))
            dec_scale.append(2 if last else 1)
    layout = BlockLayout.from_blocks(enc_scale, dec_scale)
    points = {f"input_{k}": FusionPoint(enc_units[k + 1][0] if k + 1 < len(enc_units) else unet.mid_block, True)
              for k in range(len(enc_units))}
    points["middle"] = FusionPoint(unet.mid_block, False)
    points.update({f"output_{k}": FusionPoint(unit[-1], False) for k, unit in enumerate(dec_units[:-1])})
    return layout, points


def _replace_first(value, new: torch.Tensor):
    return (new, *value[1:]) if isinstance(value, tuple) else new


@contextmanager
def fusion_hooks(points: dict[str, FusionPoint], layers: list[str], hook: Hook) -> Iterator[None]:
    """Within the block, `hook(layer, h)` runs at each of `layers` (and may replace h). Removed on exit."""
    handles = []
    for layer in layers:
        point = points[layer]
        if point.before:
            def pre(module, args, kwargs, layer=layer):
                if args:
                    return (hook(layer, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hook(layer, kwargs["hidden_states"])}
            handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output, layer=layer):
                h = output[0] if isinstance(output, tuple) else output
                return _replace_first(output, hook(layer, h))
            handles.append(point.module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_plain_cross_attention(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                                attention_mask: torch.Tensor | None, who: str) -> None:
    """A processor that recomputes attention from to_q/to_k/to_v handles plain U-Net cross-attention only."""
    if encoder_hidden_states is None or attention_mask is not None or attn.norm_cross is not None \
            or attn.residual_connection or getattr(attn, "spatial_norm", None) is not None \
            or getattr(attn, "group_norm", None) is not None or getattr(attn, "norm_q", None) is not None \
            or hidden_states.ndim != 3:
        raise XMGIEInputError(f"{who} supports plain U-Net cross-attention only (no attention mask, cross/group/"
                              "spatial/query norm, residual or 4-D input).")


@contextmanager
def cross_attention_processors(unet: torch.nn.Module, processor: Any) -> Iterator[None]:
    """Within the block every cross-attention (attn2) layer of `unet` runs `processor`; the original processors
    come back on exit, also on error."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: processor if ".attn2." in name else p for name, p in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)
