"""MGIE training's objective L_all = L_ins + α·L_edit (train.py's docstring): the terms, the module computing them for
a batch, and the frozen part of a step (latents, noise, timesteps, dropout) drawn from a per-step generator."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE
from .edit_head import NUM_IMG_TOKENS, mgie_conditioning
from .llava import MGIE
from .train_models import Models
from .train_settings import MGIETrainSettings
from .trainables import Trainables

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, prediction_type="epsilon")
"""Stable Diffusion 1.5's DDPMScheduler (the noise schedule ml-mgie trains with)."""


def sequence_embeddings(embed: nn.Embedding, ids: torch.Tensor, features: torch.Tensor, patch_id: int,
                        img_ids: torch.Tensor, img_embed: torch.Tensor) -> torch.Tensor:
    """inputs_embeds [B, L, D]: the token embeddings, the <im_patch> runs replaced by the projected image features
    [B, N, D] (in order), the [IMG] tokens' by the trained rows img_embed [8, D]."""
    with torch.no_grad():
        embeds = embed(ids)
    patches = ids == patch_id
    embeds = embeds.masked_scatter(patches[..., None], features.to(embeds.dtype))
    hits = ids[..., None] == img_ids
    rows = img_embed.to(embeds.dtype)[hits.int().argmax(-1)]
    return torch.where(hits.any(-1)[..., None], rows, embeds)


def instruction_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, img_ids: torch.Tensor,
                     img_head: torch.Tensor, eos_id: int) -> dict[str, torch.Tensor]:
    """L_ins: next-token cross-entropy where labels != IGNORE (the response), mean over those tokens; the logits
    of the [IMG] tokens come from the trained rows img_head. Also its means over the text tokens and over the
    [IMG]+EOS tokens."""
    targets = labels[:, 1:]
    valid = targets != IGNORE
    states = hidden[:, :-1][valid]
    targets = targets[valid]
    logits = lm_head(states).float()
    logits = logits.index_copy(1, img_ids, states.float() @ img_head.float().T)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    img = torch.isin(targets, img_ids) | (targets == eos_id)
    nan = per_token.new_tensor(float("nan"))
    return {"l_ins": per_token.mean(),
            "l_ins_text": per_token[~img].mean().detach() if (~img).any() else nan,
            "l_ins_img": per_token[img].mean().detach() if img.any() else nan}


def img_states(hidden: torch.Tensor, img_start: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D] -> the states at img_start[b] .. img_start[b] + 7, [B, 8, D]."""
    index = img_start[:, None] + torch.arange(NUM_IMG_TOKENS, device=hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], index]


def dropout_masks(u: torch.Tensor, text: float, image: float, both: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image) from u ~ U[0,1): [0, text) text only, [text, text + both) both, [text + both,
    text + both + image) image only. 0.05 each = ml-mgie's prob < 0.1 and 0.05 <= prob < 0.15."""
    return u < text + both, (u >= text) & (u < text + both + image)


def edit_loss(unet: nn.Module, conditioning: torch.Tensor, noisy: torch.Tensor, source_latent: torch.Tensor,
              timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_edit = MSE(U-Net(noisy ++ source latent, t, conditioning), noise) (mean over every element)."""
    dtype = next(unet.parameters()).dtype
    pred = unet(torch.cat([noisy, source_latent], dim=1).to(dtype), timesteps,
                encoder_hidden_states=conditioning.to(dtype)).sample
    return F.mse_loss(pred.float(), noise.float())


class MGIEObjective(nn.Module):
    """One forward = every term of L_all for a prepared batch. Only `trainables` is registered (what DDP syncs);
    the frozen LLM and (unless trained) U-Net are held outside the module tree."""

    def __init__(self, mgie: MGIE, unet: nn.Module, trainables: Trainables, alpha: float):
        super().__init__()
        self.trainables = trainables
        self.__dict__["frozen"] = (mgie, unet)
        self.alpha = alpha
        self.register_buffer("img_ids", torch.tensor(mgie.meta.img_token_ids, device=mgie.device), persistent=False)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, img_start: torch.Tensor,
                features: torch.Tensor, noisy: torch.Tensor, source_latent: torch.Tensor, timesteps: torch.Tensor,
                noise: torch.Tensor, drop_text: torch.Tensor, drop_image: torch.Tensor) -> dict[str, torch.Tensor]:
        mgie, unet = self.frozen
        t = self.trainables
        llm = mgie.llm
        embeds = sequence_embeddings(llm.get_input_embeddings(), ids, features, mgie.meta.im_patch_id, self.img_ids,
                                     t.img_embed)
        hidden = llm.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        terms = instruction_loss(hidden, labels, llm.get_output_embeddings(), self.img_ids, t.head_rows(),
                                 mgie.tokenizer.eos_token_id)
        positive, negative = mgie_conditioning(t.edit_head, img_states(hidden, img_start), t.img_embed)
        conditioning = torch.where(drop_text[:, None, None], negative, positive)
        source_latent = source_latent * (~drop_image).to(source_latent.dtype)[:, None, None, None]
        terms["l_edit"] = edit_loss(t.unet if t.unet is not None else unet, conditioning, noisy, source_latent,
                                    timesteps, noise)
        terms["loss"] = terms["l_ins"] + self.alpha * terms["l_edit"]
        return terms


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one step's random draws (latent sample, noise, timesteps, dropout): a function of
    (seed, step, rank) alone, so a resumed run draws what the uninterrupted one did."""
    digest = hashlib.sha256(f"xmgie-mgie-train:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


@torch.no_grad()
def prepare(batch: dict[str, torch.Tensor], models: Models, scheduler: Any, settings: MGIETrainSettings,
            generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The frozen parts of a step: image features, latents, noise, timesteps, dropout masks."""
    mgie, vae = models.mgie, models.vae
    b = batch["ids"].shape[0]
    vae_dtype = next(vae.parameters()).dtype
    target = vae.encode(batch["target"].to(device, vae_dtype)).latent_dist.sample(generator=generator)
    target = target.float() * vae.config.scaling_factor
    source = vae.encode(batch["source"].to(device, vae_dtype)).latent_dist.mode().float()
    noise = torch.randn(target.shape, generator=generator, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
    u = torch.rand(b, generator=generator, device=device)
    drop_text, drop_image = dropout_masks(u, settings.text_drop, settings.image_drop, settings.both_drop)
    return {"ids": batch["ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "labels": batch["labels"].to(device), "img_start": batch["img_start"].to(device),
            "features": mgie.image_features(batch["pixels"].to(device)),
            "noisy": scheduler.add_noise(target, noise, timesteps), "source_latent": source, "timesteps": timesteps,
            "noise": noise, "drop_text": drop_text, "drop_image": drop_image}


def noise_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULER)
