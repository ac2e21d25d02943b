"""What MGIE training trains: the edit head, the [IMG] rows of embed_tokens / lm_head (held apart so every other row
stays bit-identical), hand-written LoRA adapters on the LLM's q_proj / v_proj (forward hooks, merged at the end)
and, with --train-unet, the U-Net."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import XMGIEInputError
from .edit_head import EditMapper
from .llava import MGIE
from .train_settings import MGIETrainSettings


class LoRA(nn.Module):
    """A low-rank update of one nn.Linear: y = W x + scale * up(down(x)); up starts at zero (no change)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the Linear's weight, [out, in]."""
        return (self.up @ self.down) * self.scale


LORA_TARGETS = ("q_proj", "v_proj")


def lora_targets(llm: nn.Module) -> dict[str, nn.Linear]:
    """The LLM's attention q_proj / v_proj Linear modules by name."""
    found = {n: m for n, m in llm.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(m, nn.Linear)}
    if not found:
        raise XMGIEInputError(f"--lora-rank: the MGIE LLM has no {'/'.join(LORA_TARGETS)} Linear layers to adapt; "
                              "train without --lora-rank.")
    return found


class Trainables(nn.Module):
    """Everything that trains (and everything a checkpoint holds): the edit head, the [IMG] rows of embed_tokens
    (img_embed) and of lm_head (img_head; absent when the two are tied), the LoRA adapters and, with --train-unet,
    the U-Net. float32."""

    def __init__(self, edit_head: EditMapper, img_embed: torch.Tensor, img_head: torch.Tensor | None,
                 lora: dict[str, LoRA], unet: nn.Module | None = None):
        super().__init__()
        self.edit_head = edit_head
        self.img_embed = nn.Parameter(img_embed.detach().float().clone())
        self.img_head = None if img_head is None else nn.Parameter(img_head.detach().float().clone())
        self.lora = nn.ModuleDict({name.replace(".", "-"): module for name, module in lora.items()})
        self.unet = unet

    def head_rows(self) -> torch.Tensor:
        return self.img_embed if self.img_head is None else self.img_head


def build_trainables(mgie: MGIE, unet: nn.Module, settings: MGIETrainSettings) -> Trainables:
    """Freeze every model, then collect what trains (LoRA initialised from torch's current RNG)."""
    for module in (mgie.llm, mgie.vision, mgie.projector, unet):
        module.requires_grad_(False)
    ids = torch.tensor(mgie.meta.img_token_ids, device=mgie.device)
    embed, head = mgie.llm.get_input_embeddings().weight, mgie.llm.get_output_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()
    lora = {}
    if settings.lora_rank:
        lora = {name: LoRA(m.in_features, m.out_features, settings.lora_rank, settings.lora_scale).to(mgie.device)
                for name, m in lora_targets(mgie.llm).items()}
    edit_head = mgie.edit_head.float().requires_grad_(True).train()
    trained_unet = None
    if settings.train_unet:
        trained_unet = unet.float().requires_grad_(True).train()
    return Trainables(edit_head, embed[ids], None if tied else head[ids], lora, trained_unet)


def attach_lora(llm: nn.Module, trainables: Trainables) -> list[Any]:
    """Forward hooks adding each adapter's output to its Linear's; returns the hook handles."""
    targets = lora_targets(llm) if len(trainables.lora) else {}
    handles = []
    for name, module in targets.items():
        adapter = trainables.lora[name.replace(".", "-")]
        handles.append(module.register_forward_hook(
            lambda _m, args, out, adapter=adapter: out + adapter(args[0]).to(out.dtype)))
    return handles


@torch.no_grad()
def write_back(mgie: MGIE, trainables: Trainables, handles: list[Any]) -> None:
    """Put the trained [IMG] rows into embed_tokens / lm_head and merge the LoRA updates into q_proj / v_proj (the
    hooks are removed): the LLM alone then computes what training computed."""
    for handle in handles:
        handle.remove()
    ids = torch.tensor(mgie.meta.img_token_ids, device=mgie.device)
    embed, head = mgie.llm.get_input_embeddings().weight, mgie.llm.get_output_embeddings().weight
    embed[ids] = trainables.img_embed.to(embed.dtype)
    head[ids] = trainables.head_rows().to(head.dtype)
    if len(trainables.lora):
        for name, module in lora_targets(mgie.llm).items():
            delta = trainables.lora[name.replace(".", "-")].delta()
            module.weight.copy_((module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype))
