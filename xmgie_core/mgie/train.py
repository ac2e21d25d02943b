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

The pieces: train_settings.py (the settings), data.py (records, sequences, batches), trainables.py (what trains,
LoRA included), objective.py (the terms and a step's frozen inputs), train_models.py (loading the models, writing
the U-Net); this module holds the training loop and the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..image_io import check_out_dir
from ..training import (CHECKPOINT, Position, StepLog, add_run_arguments, checkpoint_to_resume, distributed,
                        epoch_sampler, load_checkpoint, mean_over_ranks, remaining_batches, run_cli, save_checkpoint,
                        setup_distributed)
from .data import MGIEDataset, MGIERecord, collate, data_digest, read_mgie_records
from .folder import save_mgie_folder
from .objective import MGIEObjective, noise_scheduler, prepare, step_generator
from .train_models import Models, check_models, load_models, save_unet
from .train_settings import MGIETrainSettings
from .trainables import attach_lora, build_trainables, write_back

PROG = "python -m xmgie_core.mgie train"
MGIE_DIR = "mgie"
UNET_FILE = "unet.safetensors"
CHECKPOINT_FORMAT = "xmgie-mgie-train-checkpoint-1"
TERMS = ("loss", "l_ins", "l_edit", "l_ins_text", "l_ins_img", "text_dropped", "image_dropped", "timestep",
         "grad_norm")
"""Logged per step (means over the batch, and over the processes under DDP)."""
SHORT = {"l_ins": "L_ins", "l_edit": "L_edit"}
"""Progress-bar names of the running terms."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    add_run_arguments(p, d, seed_help="data order, noise, timesteps, dropout, LoRA init")
    p.add_argument("--alpha", type=float, default=d.alpha, help="L_all = L_ins + alpha * L_edit")
    p.add_argument("--text-drop", type=float, default=d.text_drop, help="probability of dropping the text only")
    p.add_argument("--image-drop", type=float, default=d.image_drop, help="probability of dropping the image only")
    p.add_argument("--both-drop", type=float, default=d.both_drop, help="probability of dropping text and image")
    p.add_argument("--train-unet", action="store_true", help="train the whole U-Net too (writes unet.safetensors)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank on the LLM's q_proj/v_proj (0: off)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale = alpha / rank (default: alpha = rank)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="side of the square images the VAE encodes")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
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
