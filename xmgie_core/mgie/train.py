"""MGIE training (apple/ml-mgie, ICLR'24, mgie_llava.py + mgie_train.py): L_all = L_ins + α·L_edit, α = 0.5.

One step, per batch of records (input image, instruction, expressive instruction, target image):
  prompt      MGIE's prompt with the image (the vicuna_v1_1 turn of llava.py: <im_patch> embeddings = the frozen CLIP
              features through the frozen projector), then the response = the expressive instruction's tokens,
              [IMG0]..[IMG7], EOS (ml-mgie: '<expressive> [IMG0] ... [IMG7]' + '</s>'), teacher forced
  L_ins       cross-entropy of the next token on the response positions only (mean over the batch's tokens)
  [IMG] states the last layer's hidden states at p..p+7, p = img_position(...) (the states that predict
              [IMG0]..[IMG7]); the edit head maps them (+ the [IMG] embeddings) to the U-Net conditioning;
              its negative = edit_head(zeros) (mgie_conditioning)
  L_edit      frozen AutoencoderKL: target latent = latent_dist.sample() * scaling_factor, input-image latent =
              latent_dist.mode() (unscaled, as ml-mgie and InstructPix2Pix); DDPM noise at uniform random timesteps
              (SD1.5's scaled-linear schedule, 1000 steps); U-Net(noisy target latent ++ input-image latent, t,
              conditioning) -> epsilon; L_edit = MSE(prediction, noise)
  dropout     per item, u ~ U[0,1): u < text: the text is dropped (negative conditioning); text <= u < text + both:
              text and image (input-image latent zeroed); text + both <= u < text + both + image: the image only.
              The defaults 0.05/0.05/0.05 are ml-mgie's (prob < 0.1 drops the text, 0.05 <= prob < 0.15 the image).
Trained: the edit head and the 8 [IMG] rows of embed_tokens and lm_head (held as separate parameters and written
back at the end, so every other row stays bit-identical); optional --lora-rank R adds LoRA adapters to the LLM's
q_proj/v_proj (merged into the weights at the end) and --train-unet trains the whole U-Net. Everything else (LLM,
CLIP vision, projector, VAE, and the U-Net by default) is frozen. ml-mgie trained the whole embed_tokens / lm_head
and the U-Net; the default here keeps the LLM's vocabulary as converted.

  python -m xmgie_core.mgie train --data edits.jsonl --mgie MGIE_FOLDER --unet UNET --vae VAE_FOLDER --out runs/m1
  torchrun --nproc_per_node 4 -m xmgie_core.mgie.train ...      (DDP; only rank 0 writes)

<out> receives log.jsonl (every term per step), checkpoint.safetensors (the trained tensors, AdamW state, step,
RNG state and data position; `--resume` continues bit-identically), mgie/ (an MGIE folder in the converter's
format with the trained edit head, [IMG] rows and merged LoRA) and, with --train-unet, unet.safetensors (ComfyUI's
key layout, like the converter's U-Net file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import XMGIEInputError
from ..image_io import check_out_dir, load_image
from ..training import (CHECKPOINT, Position, StepLog, checkpoint_to_resume, distributed, epoch_sampler, field_error,
                        load_checkpoint, mean_over_ranks, read_jsonl, remaining_batches, resolve, run_cli,
                        run_signature, save_checkpoint, setup_distributed, unusable_numbers)
from ..weight_files import check_model_folder, check_safetensors, loading
from .edit_head import NUM_IMG_TOKENS, EditMapper, mgie_conditioning
from .folder import load_mgie_folder, save_mgie_folder
from .llava import MGIE, img_position, mgie_prompt
from .meta import ADDED_TOKENS, CONVERT_HINT

LOGGER = logging.getLogger("xmgie")
PROG = "python -m xmgie_core.mgie train"
MGIE_DIR = "mgie"
UNET_FILE = "unet.safetensors"
CHECKPOINT_FORMAT = "xmgie-mgie-train-checkpoint-1"
IGNORE = -100
FIELDS = ("image", "instruction", "expressive", "target")
TERMS = ("loss", "l_ins", "l_edit", "l_ins_text", "l_ins_img", "text_dropped", "image_dropped", "timestep",
         "grad_norm")
"""Logged per step (means over the batch, and over the processes under DDP)."""
SHORT = {"l_ins": "L_ins", "l_edit": "L_edit"}
"""Progress-bar names of the running terms."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNET_CONFIG_KEY = "xmgie_unet_config"
"""Safetensors metadata key holding the diffusers config of a U-Net file written here."""
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, prediction_type="epsilon")
"""Stable Diffusion 1.5's DDPMScheduler (the noise schedule ml-mgie trains with)."""
SD15_IP2P_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=8, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
"""diffusers config of SD1.5 InstructPix2Pix's U-Net (SD1.5's with 8 input channels): what ml-mgie's unet.pt is."""
UNET_HINT = ("give the U-Net file `python -m xmgie_core.mgie convert` wrote (--out-unet), or a diffusers "
             "UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors)")


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MGIETrainSettings:
    steps: int = 20000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 500
    alpha: float = 0.5
    """L_all = L_ins + alpha * L_edit."""
    text_drop: float = 0.05
    image_drop: float = 0.05
    both_drop: float = 0.05
    train_unet: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    """LoRA scale = lora_alpha / lora_rank; None: lora_alpha = lora_rank (scale 1)."""
    resolution: int = 256
    """Side of the square (centre-cropped) images the VAE encodes (ml-mgie: 256)."""
    grad_clip: float = 1.0
    """Clip the trained parameters' gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in (("steps", self.steps), ("batch_size", self.batch_size),
                                                          ("save_every", self.save_every),
                                                          ("resolution", self.resolution)) if v < 1]
        bad += [f"--lr {self.lr}"] if not self.lr > 0 else []
        bad += [f"--{k.replace('_', '-')} {v}" for k, v in (("weight_decay", self.weight_decay),
                                                            ("alpha", self.alpha), ("grad_clip", self.grad_clip),
                                                            ("lora_rank", self.lora_rank)) if not v >= 0]
        drops = (self.text_drop, self.image_drop, self.both_drop)
        if not all(0 <= d <= 1 for d in drops) or not sum(drops) <= 1:
            bad.append(f"--text-drop {self.text_drop} --image-drop {self.image_drop} --both-drop {self.both_drop}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            bad.append(f"--lora-alpha {self.lora_alpha}")
        bad += unusable_numbers(self)
        if bad:
            raise XMGIEInputError(f"Invalid training settings: {', '.join(bad)}. Steps, batch size, save-every and "
                                  "resolution must be >= 1, the learning rate and --lora-alpha > 0, weight decay, "
                                  "alpha, grad-clip and lora-rank >= 0, the three dropout probabilities in 0..1 "
                                  "with a sum of at most 1, every number finite and the seed in 0..2^64-1.")

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / max(self.lora_rank, 1)

    def signature(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (steps and save_every may change)."""
        return run_signature(self, ("steps", "save_every"))


# ---------------------------------------------------------------------------------------------------------------------
# Records and the teacher-forced sequence
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MGIERecord:
    image: Path
    instruction: str
    expressive: str
    target: Path
    line: int


def parse_record(data: Any, source: Path, line: int) -> MGIERecord:
    """One validated record; relative paths resolve against the JSONL's folder; the files must exist."""
    if not isinstance(data, dict):
        raise XMGIEInputError(f"{source}, line {line}: a record must be a JSON object with the fields "
                              f"{', '.join(FIELDS)}, e.g. {{\"image\": \"in/1.png\", \"instruction\": \"make it "
                              "dusk\", \"expressive\": \"The sky turns orange.\", \"target\": \"out/1.png\"}.")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise XMGIEInputError(f"{source}, line {line}: unknown fields {unknown}; a record has exactly "
                              f"{', '.join(FIELDS)} (check the spelling).")
    texts = {}
    for name in ("instruction", "expressive"):
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise field_error(source, line, name, "missing or empty; give a non-empty string")
        found = [t for t in ADDED_TOKENS if t in value]
        if found:
            raise field_error(source, line, name, f"contains MGIE's reserved tokens {found}; remove them (the "
                               "trainer adds [IMG0]..[IMG7] after the expressive instruction itself)")
        texts[name] = value.strip()
    paths = {}
    for name in ("image", "target"):
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise field_error(source, line, name, "missing or not a path string; give the image file's path "
                               "(relative to the JSONL's folder, or absolute)")
        path = resolve(value, source.parent)
        if not path.is_file():
            raise field_error(source, line, name, f"file not found: {path}")
        paths[name] = path
    return MGIERecord(paths["image"], texts["instruction"], texts["expressive"], paths["target"], line)


def read_mgie_records(path: Path) -> list[MGIERecord]:
    """All records of a JSONL file (blank lines skipped)."""
    return read_jsonl(path, parse_record, "Give a JSONL file with one record per line: {\"image\": ..., "
                      "\"instruction\": ..., \"expressive\": ..., \"target\": ...}.")


@dataclass(frozen=True)
class Sequence:
    ids: list[int]
    """Prompt (with BOS and the <im_patch> run) + response (expressive tokens, [IMG0]..[IMG7], EOS)."""
    labels: list[int]
    """IGNORE on the prompt, the token itself on the response."""
    img_start: int
    """p: the hidden states p..p+7 predict [IMG0]..[IMG7]."""


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def training_sequence(mgie: MGIE, instruction: str, expressive: str) -> Sequence:
    """The teacher-forced sequence: MGIE's prompt (exactly MGIE.prompt_ids) + the expressive instruction's tokens as
    they follow the prompt's 'ASSISTANT:' (vicuna_v1_1 writes 'ASSISTANT: ' + response) + [IMG0]..[IMG7] + EOS."""
    tok, meta = mgie.tokenizer, mgie.meta
    if tok.eos_token_id is None:
        raise XMGIEInputError(f"The MGIE tokenizer has no EOS token; the response must end in one. Re-create the "
                              f"folder: {CONVERT_HINT}.")
    special = [t for t in tok.all_special_tokens if t and t in expressive]
    if special:
        raise XMGIEInputError(f"the expressive instruction contains the tokenizer's special tokens {special}; "
                              "remove them")
    prompt = _strip_eos(mgie.prompt_ids(instruction)[0].tolist(), tok.eos_token_id)
    text = mgie_prompt(instruction.strip(), meta.image_token_len)
    full = _strip_eos(tok(text + " " + expressive.strip()).input_ids, tok.eos_token_id)
    if full[:len(prompt)] == prompt and len(full) > len(prompt):
        response = full[len(prompt):]
    else:  # the tokenizer merged the prompt's end with the response: tokenize the response on its own
        LOGGER.warning("xMGIE: the MGIE tokenizer does not split 'ASSISTANT:' from the response; tokenizing the "
                     "expressive instruction on its own")
        response = tok(" " + expressive.strip(), add_special_tokens=False).input_ids
    if not response:
        raise XMGIEInputError("the expressive instruction tokenizes to nothing; write a sentence")
    response = list(response) + list(meta.img_token_ids) + [tok.eos_token_id]
    ids = prompt + response
    return Sequence(ids, [IGNORE] * len(prompt) + response, img_position(ids, len(ids), meta.img_token_ids[0]))


def centre_square(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [1,H,W,C] -> its centred square crop (ml-mgie crops to the short side before resizing)."""
    h, w = image.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[:, top:top + side, left:left + side]


def vae_pixels(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE [1,H,W,C] in 0..1 -> [3, resolution, resolution] in -1..1 (centre square, antialiased bicubic)."""
    square = centre_square(image)[..., :3].permute(0, 3, 1, 2).float()
    if square.shape[-1] != resolution:
        square = F.interpolate(square, size=(resolution, resolution), mode="bicubic", antialias=True,
                               align_corners=False)
    return (square.clamp(0, 1) * 2 - 1)[0]


class MGIEDataset(Dataset):
    """Records -> {ids, labels, img_start, pixels (CLIP), source and target (VAE, -1..1)}; the sequences are built
    (and checked) up front, the images read per item."""

    def __init__(self, records: list[MGIERecord], mgie: MGIE, resolution: int, source: Path | None = None):
        self.records, self.mgie, self.resolution = list(records), mgie, resolution
        self.sequences = []
        limit = getattr(mgie.llm.config, "max_position_embeddings", None)
        for r in self.records:
            where = f"{source}, line {r.line}" if source else f"record on line {r.line}"
            try:
                seq = training_sequence(mgie, r.instruction, r.expressive)
            except XMGIEInputError as e:
                raise XMGIEInputError(f"{where}, fields 'instruction'/'expressive': {e}") from None
            if limit and len(seq.ids) > limit:
                raise XMGIEInputError(f"{where}, field 'expressive': the prompt and response are {len(seq.ids)} "
                                      f"tokens, more than the LLM's {limit} positions; shorten the expressive "
                                      "instruction.")
            self.sequences.append(seq)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r, seq = self.records[index], self.sequences[index]
        image, target = (load_image(p)[0] for p in (r.image, r.target))
        square = centre_square(image)
        return {"ids": seq.ids, "labels": seq.labels, "img_start": seq.img_start,
                "pixels": self.mgie.preprocess(square)[0], "source": vae_pixels(image, self.resolution),
                "target": vae_pixels(target, self.resolution)}


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (pad_id), labels (IGNORE) and attention mask; stacked images."""
    length = max(len(i["ids"]) for i in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for b, item in enumerate(items):
        n = len(item["ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(item["ids"]), torch.tensor(item["labels"]), 1
    return {"ids": ids, "labels": labels, "attention_mask": mask,
            "img_start": torch.tensor([i["img_start"] for i in items], dtype=torch.long),
            **{k: torch.stack([i[k] for i in items]) for k in ("pixels", "source", "target")}}


# ---------------------------------------------------------------------------------------------------------------------
# The trained parameters
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------------------------------

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


@dataclass
class Models:
    """The loaded models and what identifies them (for the resume check)."""

    mgie: MGIE
    unet: nn.Module
    vae: nn.Module
    names: dict[str, str]


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


# ---------------------------------------------------------------------------------------------------------------------
# Loading the U-Net and VAE
# ---------------------------------------------------------------------------------------------------------------------

def _pickled_only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))


def _diffusers_folder(path: Path, sub: str, option: str, what: str, weights: str) -> Path:
    """A diffusers model folder: `path` itself or its `sub`/ (a pipeline folder), with config.json + safetensors."""
    if not path.exists():
        raise XMGIEInputError(f"{option} {path} does not exist; give {what}.")
    folder = path / sub if not (path / "config.json").is_file() and (path / sub / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise XMGIEInputError(f"{option} {path} has no config.json (nor {sub}/config.json), so it is not a diffusers "
                              f"model folder; give {what}.")
    if not any(folder.glob("*.safetensors")):
        pickled = _pickled_only(folder)
        found = f" (found only {', '.join(pickled)}: pickle files are never loaded, for safety; save the model with " \
                f"safe_serialization=True)" if pickled else ""
        raise XMGIEInputError(f"{option} {folder} has no {weights}{found}; give {what}.")
    return folder


def _unet_config(metadata: dict[str, str], config_file: Path | None) -> dict[str, Any]:
    if config_file is not None:
        try:
            config = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise XMGIEInputError(f"--unet-config {config_file} is not a readable JSON file ({e}); give the U-Net's "
                                  "diffusers config.json.") from None
        if not isinstance(config, dict):
            raise XMGIEInputError(f"--unet-config {config_file} must hold a JSON object (a diffusers config.json).")
        return config
    if UNET_CONFIG_KEY in metadata:
        return json.loads(metadata[UNET_CONFIG_KEY])
    return dict(SD15_IP2P_UNET)


def load_unet_file(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   config_file: Path | None = None) -> nn.Module:
    """One safetensors U-Net: the converter's (ComfyUI/LDM key names) or a diffusers-keyed state dict; its config
    from --unet-config, else from its metadata (files written here), else SD1.5 InstructPix2Pix's."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from .convert import diffusers_unet_to_ldm

    check_safetensors(path, "the U-Net of --unet")
    with loading(path, "the U-Net of --unet"), safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    config = _unet_config(metadata, config_file)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except Exception as e:  # diffusers rejects a config it cannot build with various error types
        raise XMGIEInputError(f"The U-Net config for {path} cannot be built ({e}); give --unet-config the U-Net's "
                              "diffusers config.json.") from None
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    mapping = {k: k for k in expected} if "conv_in.weight" in keys else diffusers_unet_to_ldm(expected)
    missing = sorted(k for k in expected if mapping[k] not in shapes)
    unused = sorted(set(shapes) - set(mapping.values()))
    wrong = sorted(k for k in expected if mapping[k] in shapes and shapes[mapping[k]] != expected[k])
    if missing or unused or wrong:
        source = "--unet-config" if config_file else ("its metadata" if UNET_CONFIG_KEY in metadata else
                                                      "SD1.5 InstructPix2Pix's (the default)")
        detail = "; ".join(([f"{len(missing)} tensors missing, e.g. {mapping[missing[0]]}"] if missing else [])
                           + ([f"{len(unused)} unused, e.g. {unused[0]}"] if unused else [])
                           + ([f"{len(wrong)} of another shape, e.g. {mapping[wrong[0]]}"] if wrong else []))
        raise XMGIEInputError(f"--unet {path} does not fit the U-Net config taken from {source} ({detail}). For an "
                              "U-Net that is not SD1.5's, pass its diffusers config.json with --unet-config, or "
                              f"{UNET_HINT}.")
    with loading(path, "the U-Net of --unet"), safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(mapping[k]).to(dtype) for k in expected}
    unet.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):
        raise XMGIEInputError(f"--unet {path}: the U-Net config builds tensors the file does not hold; {UNET_HINT}.")
    return unet.to(device=device, dtype=dtype).eval()


def load_unet(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              config_file: Path | None = None) -> nn.Module:
    """--unet: a safetensors file (load_unet_file) or a diffusers UNet2DConditionModel folder (or a pipeline folder
    with unet/)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise XMGIEInputError(f"--unet {path} is not a .safetensors file (pickles are never loaded, for safety); "
                                  f"{UNET_HINT}.")
        return load_unet_file(path, device, dtype, config_file)
    folder = _diffusers_folder(path, "unet", "--unet", UNET_HINT, "diffusion_pytorch_model.safetensors")
    check_model_folder(folder, "the U-Net of --unet")
    with loading(folder, "the U-Net of --unet"):
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                    torch_dtype=dtype)
    return unet.to(device).eval()


def load_vae(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """--vae: a diffusers AutoencoderKL folder (or a pipeline folder with vae/), float32 (SD's VAE overflows in
    float16)."""
    from diffusers import AutoencoderKL

    what = "a diffusers AutoencoderKL folder (e.g. stable-diffusion-v1-5/vae: config.json + " \
           "diffusion_pytorch_model.safetensors)"
    folder = _diffusers_folder(Path(path), "vae", "--vae", what, "diffusion_pytorch_model.safetensors")
    check_model_folder(folder, "the VAE of --vae")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name") not in (None, "AutoencoderKL"):
        raise XMGIEInputError(f"--vae {folder} holds a {config.get('_class_name')}, not an AutoencoderKL; give {what}.")
    with loading(folder, "the VAE of --vae"):
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                            torch_dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False)


def check_models(mgie: MGIE, unet: nn.Module, vae: nn.Module, resolution: int) -> None:
    """The MGIE edit head, the U-Net and the VAE must fit together; say which do not."""
    problems = []
    latent = vae.config.latent_channels
    if unet.config.in_channels != 2 * latent:
        problems.append(f"the U-Net takes {unet.config.in_channels} input channels, but InstructPix2Pix needs "
                        f"{2 * latent} (the VAE's {latent}-channel noisy latent ++ the input image's latent); give "
                        "MGIE's InstructPix2Pix U-Net, not a text-to-image one")
    if unet.config.out_channels != latent:
        problems.append(f"the U-Net predicts {unet.config.out_channels} channels but the VAE's latents have {latent}")
    if unet.config.cross_attention_dim != mgie.edit_head.config["out_dim"]:
        problems.append(f"the MGIE edit head writes {mgie.edit_head.config['out_dim']}-d conditioning but the U-Net's "
                        f"cross-attention takes {unet.config.cross_attention_dim}-d (MGIE pairs a 768-d head with "
                        "SD1.5's U-Net)")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        problems.append(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    if problems:
        raise XMGIEInputError(f"The models do not fit together: {'; '.join(problems)}.")


def _fingerprint(path: Path) -> str:
    """Names and sizes of a model file or folder's files (cheap; tells a resume that the models changed)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for p in files:
        h.update(f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size};".encode())
    return f"{path.name}:{h.hexdigest()[:16]}"


def load_models(mgie: Path, unet: Path, vae: Path, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, unet_config: Path | None = None,
                resolution: int = 256) -> Models:
    """The MGIE folder (in `dtype`), the U-Net (in `dtype`), the VAE (float32), checked to fit together."""
    loaded = load_mgie_folder(Path(mgie), device, dtype)
    u = load_unet(Path(unet), device, dtype, unet_config)
    v = load_vae(Path(vae), device)
    check_models(loaded, u, v, resolution)
    return Models(loaded, u, v, {"mgie": _fingerprint(mgie), "unet": _fingerprint(unet), "vae": _fingerprint(vae)})


def save_unet(unet: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """The U-Net as one safetensors file with ComfyUI's (LDM) key names, like the converter's --out-unet, plus its
    diffusers config in the metadata (so --unet can load it back)."""
    from safetensors.torch import save_file

    from .convert import UNET_FORMAT, diffusers_unet_to_ldm

    state = unet.state_dict()
    mapping = diffusers_unet_to_ldm(state)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    meta = {"xmgie_format": UNET_FORMAT, UNET_CONFIG_KEY: json.dumps(config, default=list),
            "xmgie_layout": "ComfyUI/LDM UNetModel keys (InstructPix2Pix, in_channels "
                            f"{unet.config.in_channels})", **(metadata or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file({mapping[k]: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def data_digest(records: list[MGIERecord]) -> str:
    """Identifies the training records (texts and file names), so a resume on other data is refused."""
    h = hashlib.sha1()
    for r in records:
        h.update(json.dumps([r.image.name, r.instruction, r.expressive, r.target.name]).encode())
    return f"{len(records)}:{h.hexdigest()}"


@dataclass(frozen=True)
class TrainResult:
    mgie_folder: Path | None
    unet_file: Path | None
    steps: int


def train(records: list[MGIERecord], models: Models, out: Path, settings: MGIETrainSettings,
          resume: bool | Path = False, device: torch.device | str = "cpu", data_source: Path | None = None
          ) -> TrainResult:
    """Train and write <out>/log.jsonl, checkpoint.safetensors, mgie/ (and unet.safetensors with --train-unet).

    Seeded; under torchrun (a process group initialised) the data is sharded with DistributedSampler, the trained
    module DDP-wrapped, and only rank 0 writes. `resume`: True for <out>/checkpoint.safetensors, or a checkpoint.
    The models are changed in place: at the end the LLM holds the trained [IMG] rows and merged LoRA."""

    device = torch.device(device)
    out = check_out_dir(Path(out))
    rank, world = distributed()
    start = checkpoint_to_resume(out, resume)
    mgie = models.mgie
    check_models(mgie, models.unet, models.vae, settings.resolution)
    dataset = MGIEDataset(records, mgie, settings.resolution, data_source)
    run = {"trainer": "xmgie-mgie-train", **settings.signature(), **models.names, "world_size": world,
           "data": data_digest(records)}
    sampler, per_epoch = epoch_sampler(dataset, settings.batch_size, settings.seed)

    torch.manual_seed(settings.seed)
    trainables = build_trainables(mgie, models.unet, settings)
    handles = attach_lora(mgie.llm, trainables)
    objective = MGIEObjective(mgie, models.unet, trainables, settings.alpha)
    params = [p for p in trainables.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    position = load_checkpoint(start, trainables, optimizer, run, CHECKPOINT_FORMAT, "MGIE") if start else Position()
    step_module = objective if world == 1 else nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = noise_scheduler()
    pad = mgie.tokenizer.eos_token_id  # never an <im_patch> or [IMG] id; padded positions are masked anyway
    writer = rank == 0
    log = StepLog(out, TERMS, SHORT, settings.steps, settings.save_every, position.step, "MGIE", writer, digits=4)
    while position.step < settings.steps:
        batches = remaining_batches(sampler, position, settings.batch_size, per_epoch, settings.steps)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=lambda items: collate(items, pad),
                            generator=torch.Generator().manual_seed(position.step))  # not the global RNG
        for batch in loader:
            began = time.perf_counter()
            generator = step_generator(settings.seed, position.step, rank, device)
            inputs = prepare(batch, models, scheduler, settings, generator, device)
            optimizer.zero_grad(set_to_none=True)
            terms = step_module(**inputs)
            terms["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip if settings.grad_clip > 0 else math.inf)
            optimizer.step()
            terms.update(text_dropped=inputs["drop_text"].float().mean(),
                         image_dropped=inputs["drop_image"].float().mean(),
                         timestep=inputs["timesteps"].float().mean(), grad_norm=norm)
            values = mean_over_ranks(torch.stack([terms[k].detach().float().to(device) for k in TERMS]),
                                     world).tolist()
            position = position.advanced(per_epoch)
            if log.record(position, values, time.perf_counter() - began, lr=settings.lr):
                save_checkpoint(out / CHECKPOINT, trainables, optimizer, position, run, CHECKPOINT_FORMAT)
    log.close()
    write_back(mgie, trainables, handles)
    if not writer:
        return TrainResult(None, None, position.step)
    mgie.edit_head.eval()
    folder = save_mgie_folder(out / MGIE_DIR, mgie.llm, mgie.tokenizer, mgie.vision, mgie.image_processor,
                              mgie.projector, mgie.edit_head, mgie.meta)
    unet_file = None
    if settings.train_unet:
        unet_file = save_unet(trainables.unet, out / UNET_FILE, {"xmgie_steps": str(position.step),
                                                                 "xmgie_data": run["data"]})
    return TrainResult(folder, unet_file, position.step)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    d = MGIETrainSettings()
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train MGIE (L_all = L_ins + alpha * L_edit, apple/ml-mgie): the edit "
                                            "head and the [IMG] token rows, optionally LoRA on the LLM and the "
                                            "whole U-Net.")
    p.add_argument("--data", type=Path, required=True,
                   help="JSONL records {image, instruction, expressive, target}; paths relative to its folder")
    p.add_argument("--mgie", type=Path, required=True, help="MGIE folder (`python -m xmgie_core.mgie convert`)")
    p.add_argument("--unet", type=Path, required=True,
                   help="InstructPix2Pix U-Net: the converter's --out-unet .safetensors file, or a diffusers folder")
    p.add_argument("--unet-config", type=Path,
                   help="diffusers config.json of a single-file --unet that is not SD1.5's (absent: the metadata's "
                        "config, else SD1.5 InstructPix2Pix's)")
    p.add_argument("--vae", type=Path, required=True,
                   help="diffusers AutoencoderKL folder (e.g. stable-diffusion-v1-5/vae, or the pipeline folder)")
    p.add_argument("--out", type=Path, required=True, help="run folder: log, checkpoint, mgie/, unet.safetensors")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in all (a resume may raise it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, noise, timesteps, dropout, LoRA init")
    p.add_argument("--alpha", type=float, default=d.alpha, help="L_all = L_ins + alpha * L_edit")
    p.add_argument("--text-drop", type=float, default=d.text_drop, help="probability of dropping the text only")
    p.add_argument("--image-drop", type=float, default=d.image_drop, help="probability of dropping the image only")
    p.add_argument("--both-drop", type=float, default=d.both_drop, help="probability of dropping text and image")
    p.add_argument("--train-unet", action="store_true", help="train the whole U-Net too (writes unet.safetensors)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank on the LLM's q_proj/v_proj (0: off)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale = alpha / rank (default: alpha = rank)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="side of the square images the VAE encodes")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=Path, metavar="CHECKPOINT",
                   help=f"continue the run in --out (or from CHECKPOINT); default checkpoint: <out>/{CHECKPOINT}")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (torchrun: this rank's GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the frozen LLM, vision tower and U-Net (trained tensors and the VAE stay float32)")
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> None:
        settings = MGIETrainSettings(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
            save_every=args.save_every, alpha=args.alpha, text_drop=args.text_drop, image_drop=args.image_drop,
            both_drop=args.both_drop, train_unet=args.train_unet, lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha, resolution=args.resolution, grad_clip=args.grad_clip)
        checkpoint_to_resume(check_out_dir(args.out), args.resume)
        records = read_mgie_records(args.data)
        device = setup_distributed(args.device)
        models = load_models(args.mgie, args.unet, args.vae, device, DTYPES[args.dtype], args.unet_config,
                             settings.resolution)
        result = train(records, models, args.out, settings, args.resume, device, args.data)
        if distributed()[0] == 0:
            print(f"wrote {result.mgie_folder} (MGIE folder: put it in ComfyUI/models/LLM/)")
            if result.unet_file:
                print(f"wrote {result.unet_file} (U-Net: put it in ComfyUI/models/diffusion_models/)")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
