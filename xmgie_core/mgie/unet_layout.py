"""The U-Net's two key layouts: diffusers' UNet2DConditionModel (ml-mgie's unet.pt; what training runs) and ComfyUI's
LDM UNetModel (input_blocks.* / middle_block.* / output_blocks.*, which ComfyUI detects as SD15_instructpix2pix).
Shared by the converter (its --out-unet) and the trainer (reading that file back, writing unet.safetensors)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import XMGIEInputError
from .convert_inputs import RETRY, short_list

UNET_FORMAT = "xmgie-mgie-unet-1"
"""xmgie_format (safetensors metadata) of a U-Net file with ComfyUI's key names, written by the converter and the
trainer."""

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_ATTENTION_PART = re.compile(r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|"
                             r"norm[123]|ff\.net\.(0\.proj|2)))\.(weight|bias)")
_PARAM = re.compile(r"(weight|bias)")


def diffusers_unet_to_ldm(keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: LDM key} for every key of an SD-style UNet2DConditionModel state dict.

    The block layout is read from the keys (any number of down/up blocks and resnets per block, with or without
    cross-attention), the way diffusers' own LDM conversion numbers ComfyUI's input_blocks / middle_block /
    output_blocks. A key this mapping does not know (an SDXL add_embedding, a class embedding, ...) is an error
    listing them: nothing is dropped silently.
    """
    keys = list(keys)
    out: dict[str, str] = {}
    unknown: list[str] = []

    def parts(prefix: str) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
        for k in keys:
            m = pat.fullmatch(k)
            if m:
                found.setdefault(int(m.group(1)), []).append(m.group(2))
        return found

    def resnet(src: str, rest: str, dst: str) -> None:
        name, _, param = rest.partition(".")
        if name in _RESNET_PARTS and _PARAM.fullmatch(param):
            out[src + rest] = f"{dst}.{_RESNET_PARTS[name]}.{param}"
        else:
            unknown.append(src + rest)

    def attention(src: str, rest: str, dst: str) -> None:
        if _ATTENTION_PART.fullmatch(rest):
            out[src + rest] = f"{dst}.{rest}"
        else:
            unknown.append(src + rest)

    def sampler(src: str, rest: str, dst: str) -> None:
        if rest in ("conv.weight", "conv.bias"):
            out[src + rest] = f"{dst}.{rest.split('.', 1)[1]}"
        else:
            unknown.append(src + rest)

    def block(prefix: str) -> dict[str, dict[int, list[str]]]:
        sub: dict[str, dict[int, list[str]]] = {"resnets": {}, "attentions": {}, "downsamplers": {}, "upsamplers": {}}
        for rest in block_keys[prefix]:
            kind, _, tail = rest.partition(".")
            index, _, tail = tail.partition(".")
            if kind in sub and index.isdigit() and tail:
                sub[kind].setdefault(int(index), []).append(tail)
            else:
                unknown.append(f"{prefix}{rest}")
        return sub

    block_keys: dict[str, list[str]] = {}
    for group in ("down_blocks", "up_blocks"):
        for i, rests in parts(f"{group}.").items():
            block_keys[f"{group}.{i}."] = rests
    block_keys["mid_block."] = [k[len("mid_block."):] for k in keys if k.startswith("mid_block.")]

    n = 1
    for i in sorted(parts("down_blocks.")):
        prefix = f"down_blocks.{i}."
        sub = block(prefix)
        for j in sorted(sub["resnets"]):
            for rest in sub["resnets"][j]:
                resnet(f"{prefix}resnets.{j}.", rest, f"input_blocks.{n}.0")
            for rest in sub["attentions"].pop(j, []):
                attention(f"{prefix}attentions.{j}.", rest, f"input_blocks.{n}.1")
            n += 1
        for j, rests in sub["attentions"].items():  # an attention without its resnet
            unknown.extend(f"{prefix}attentions.{j}.{r}" for r in rests)
        for j, rests in sub["downsamplers"].items():
            for rest in rests:
                if j == 0:
                    sampler(f"{prefix}downsamplers.0.", rest, f"input_blocks.{n}.0.op")
                else:
                    unknown.append(f"{prefix}downsamplers.{j}.{rest}")
            n += 1
        unknown.extend(f"{prefix}upsamplers.{j}.{r}" for j, rs in sub["upsamplers"].items() for r in rs)

    mid = block("mid_block.")
    for j, rests in mid["resnets"].items():
        for rest in rests:
            resnet(f"mid_block.resnets.{j}.", rest, f"middle_block.{2 * j}")
    for j, rests in mid["attentions"].items():
        for rest in rests:
            attention(f"mid_block.attentions.{j}.", rest, f"middle_block.{2 * j + 1}")
    unknown.extend(f"mid_block.{kind}.{j}.{r}" for kind in ("downsamplers", "upsamplers")
                   for j, rs in mid[kind].items() for r in rs)

    m = 0
    for i in sorted(parts("up_blocks.")):
        prefix = f"up_blocks.{i}."
        sub = block(prefix)
        last = max(sub["resnets"], default=-1)
        for j in sorted(sub["resnets"]):
            for rest in sub["resnets"][j]:
                resnet(f"{prefix}resnets.{j}.", rest, f"output_blocks.{m}.0")
            has_attention = j in sub["attentions"]
            for rest in sub["attentions"].pop(j, []):
                attention(f"{prefix}attentions.{j}.", rest, f"output_blocks.{m}.1")
            if j == last:
                for rest in sub["upsamplers"].pop(0, []):
                    sampler(f"{prefix}upsamplers.0.", rest, f"output_blocks.{m}.{2 if has_attention else 1}.conv")
            m += 1
        unknown.extend(f"{prefix}attentions.{j}.{r}" for j, rs in sub["attentions"].items() for r in rs)
        unknown.extend(f"{prefix}upsamplers.{j}.{r}" for j, rs in sub["upsamplers"].items() for r in rs)
        unknown.extend(f"{prefix}downsamplers.{j}.{r}" for j, rs in sub["downsamplers"].items() for r in rs)

    for k in keys:
        if k.startswith(("down_blocks.", "up_blocks.", "mid_block.")):
            continue
        module, _, param = k.rpartition(".")
        if module in _TOP_LEVEL and _PARAM.fullmatch(param):
            out[k] = f"{_TOP_LEVEL[module]}.{param}"
        else:
            unknown.append(k)
    unknown = sorted(set(unknown) | ({k for k in keys if k.startswith(("down_blocks.", "up_blocks."))} - set(out)))
    if unknown:
        raise XMGIEInputError(f"The U-Net has tensors outside the Stable Diffusion 1.5 U-Net layout: "
                              f"{short_list(unknown)}. It is not ml-mgie's unet.pt (an SD1.5 InstructPix2Pix "
                              f"UNet2DConditionModel state dict); {RETRY}.")
    if len(set(out.values())) != len(out):
        raise XMGIEInputError(f"The U-Net's block numbering is not contiguous, so its tensors do not map one to one "
                              f"onto ComfyUI's U-Net; it is not ml-mgie's unet.pt: {RETRY}.")
    return out
