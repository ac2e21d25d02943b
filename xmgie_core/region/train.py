"""Training of the region predictor ([Regions] §3.3 and §4): eqs 1-3 trained with eqs 4-11 (see losses.py).

One step, per batch of records (X, X_gen, t_o, t_ins, t_e):
  without grad   E_v(X) and F_img (CLIP vision on X), T_o and T_e (CLIP text), F_ins (FLAN-T5 on t_ins)
  trained        P_region, F_Editedimg = predictor(F_img, F_ins);  L_semAlign with f_sem (eqs 4-6)
  generator step X_res = (1 - M~) X + M~ X_gen  (X_gen cached by the data builder, so no generator runs here)
  with grad      E_v(X_res) and its patches: one CLIP vision forward + backward to X_res -> P_region;
                 L_CLIP (eqs 7-10), L = α L_semAlign + β L_CLIP (eq 11)
CLIP, T5 and the generator stay frozen; AdamW trains the predictor and f_sem.

  python -m xmgie_core.region.train --data records.jsonl --clip CLIP_FOLDER --t5 FLAN_T5_FOLDER --out runs/r1
  torchrun --nproc_per_node 4 -m xmgie_core.region.train ...      (DDP; only rank 0 writes)

<out> receives log.jsonl (every loss term per step), checkpoint.safetensors (predictor, f_sem, AdamW state, step,
RNG state and data position; `--resume` continues bit-identically) and region_predictor.safetensors (the inference
file, predictor.save_predictor).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import XMGIEInputError
from ..image_io import check_out_dir
from ..training import (CHECKPOINT, Position, RunSettings, StepLog, add_run_arguments, checkpoint_to_resume,
                        distributed, epoch_sampler, load_checkpoint, mean_over_ranks, remaining_batches, run_cli,
                        run_signature, save_checkpoint, setup_distributed)
from .data import RegionDataset, collate, read_records
from .encoders import ImageEncoder, InstructionEncoder, TextEncoder, load_clip_encoders, load_t5_instruction_encoder
from .losses import (LossWeights, SemanticProjection, clip_directional_loss, clip_global_loss, clip_loss,
                     clip_structure_loss, composite, sem_edited_loss, sem_original_loss, soft_region, total_loss)
from .predictor import RegionConfig, RegionOutput, RegionPredictor, save_predictor

PREDICTOR = "region_predictor.safetensors"
CHECKPOINT_FORMAT = "xmgie-region-train-checkpoint-1"
TERMS = ("loss", "sem_align", "sem_edited", "sem_original", "clip", "clip_g", "clip_d", "clip_s", "region_mean")
SHORT = {"loss": "L", "sem_align": "sem", "clip_g": "g", "clip_d": "d", "clip_s": "s", "region_mean": "P"}
"""Progress-bar names of the running terms."""


@dataclass(frozen=True)
class TrainSettings(RunSettings):
    """One region predictor training run's choices (the command line's options); invalid values refused together."""

    weight_decay: float = 0.01
    weights: LossWeights = LossWeights()
    heads: int = 8
    threshold: float = 0.5
    workers: int = 0

    def __post_init__(self) -> None:
        bad = self.problems(counts=("heads",), non_negative=("workers",))
        bad += [f"--threshold {self.threshold}"] if not 0 < self.threshold < 1 else []
        if bad:
            raise XMGIEInputError(f"Invalid training settings: {', '.join(bad)}. Steps, batch size, save-every and "
                                  "heads must be >= 1, the learning rate > 0, weight decay and workers >= 0, the "
                                  "threshold in (0, 1), every number finite and the seed in 0..2^64-1.")

    def signature(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (steps, save_every, workers may change)."""
        return run_signature(self, ("steps", "save_every", "workers"))


@dataclass(frozen=True)
class Encoders:
    """The frozen encoders (protocols of encoders.py) and the names written into the predictor's config."""

    image: ImageEncoder
    text: TextEncoder
    instruction: InstructionEncoder
    image_name: str = "openai/clip-vit-large-patch14"
    instruction_name: str = "google/flan-t5-base"


class RegionTrainable(nn.Module):
    """The trained pair, predictor (eqs 1-3) and f_sem, with eqs 4-5 in one forward (so DDP wraps one module)."""

    def __init__(self, config: RegionConfig, joint_dim: int):
        super().__init__()
        self.predictor = RegionPredictor(config)
        self.f_sem = SemanticProjection(config.dim, joint_dim)

    def forward(self, f_img: torch.Tensor, f_ins: torch.Tensor, ins_mask: torch.Tensor, t_o: torch.Tensor,
                t_e: torch.Tensor) -> tuple[RegionOutput, torch.Tensor, torch.Tensor]:
        out = self.predictor(f_img, f_ins, ins_mask)
        return (out, sem_edited_loss(self.f_sem, out.probability, out.edited, f_img, t_e),
                sem_original_loss(self.f_sem, f_img, t_o))


def step_terms(model: nn.Module, encoders: Encoders, batch: dict[str, Any], w: LossWeights,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Every term of eqs 4-11 for one batch (batch means); `loss` is eq 11, differentiable w.r.t. the model."""
    image, render = batch["image"].to(device), batch["render"].to(device)
    with torch.no_grad():
        e_src, f_img = (t.float() for t in encoders.image(image))
        t_o, t_e = encoders.text(batch["t_o"] + batch["t_e"]).float().chunk(2)
        f_ins, ins_mask = encoders.instruction(batch["t_ins"])
    out, sem_edited, sem_original = model(f_img, f_ins.float(), ins_mask, t_o, t_e)
    x_res = composite(image, render, soft_region(out.probability, image.shape[-2:]))
    e_res, f_res = (t.float() for t in encoders.image(x_res))
    g, d = clip_global_loss(e_res, t_e), clip_directional_loss(e_res, e_src, t_e, t_o)
    s = clip_structure_loss(f_res, f_img)
    sem_align, clip = sem_edited + sem_original, clip_loss(g, d, s, w)
    terms = {"loss": total_loss(sem_align, clip, w), "sem_align": sem_align, "sem_edited": sem_edited,
             "sem_original": sem_original, "clip": clip, "clip_g": g, "clip_d": d, "clip_s": s,
             "region_mean": out.probability.detach().mean(dim=1)}
    return {k: v.mean() for k, v in terms.items()}


def region_config(dataset: RegionDataset, encoders: Encoders, s: TrainSettings, device: torch.device
                  ) -> tuple[RegionConfig, int]:
    """The predictor's config and CLIP's joint dim, read off the encoders' outputs on the first record."""
    item = collate([dataset[0]])
    with torch.no_grad():
        e_src, f_img = encoders.image(item["image"].to(device))
        text = encoders.text(item["t_o"])
        f_ins, _ = encoders.instruction(item["t_ins"])
    n, dim = f_img.shape[1:]
    grid = int(round(n ** 0.5))
    size = encoders.image.size
    if f_ins.shape[-1] != dim:
        raise XMGIEInputError(f"The image encoder's patch features are {dim}-d but the instruction encoder's are "
                              f"{f_ins.shape[-1]}-d; the predictor needs both the same (CLIP ViT-L/14 and "
                              "FLAN-T5-base are both 768-d).")
    if e_src.shape[-1] != text.shape[-1]:
        raise XMGIEInputError(f"CLIP's image embedding is {e_src.shape[-1]}-d but its text embedding is "
                              f"{text.shape[-1]}-d; give the vision and text towers of the same CLIP.")
    if grid * grid != n or size % grid:
        raise XMGIEInputError(f"The image encoder returned {n} patches for a {size}x{size} view, not a square grid "
                              "that divides the view; use a ViT CLIP vision tower.")
    config = RegionConfig(dim=dim, heads=s.heads, mlp_hidden=dim, threshold=s.threshold,
                          image_encoder=encoders.image_name, instruction_encoder=encoders.instruction_name,
                          image_size=size, patch_size=size // grid)
    return config, int(text.shape[-1])


def data_digest(dataset: RegionDataset) -> str:
    """Identifies the training records (texts and file names), so a resume on other data is refused."""
    h = hashlib.sha1()
    for r in dataset.records:
        h.update(json.dumps([r.image.name, r.render.name if r.render else None, r.t_o, r.t_ins, r.t_e]).encode())
    return f"{len(dataset.records)}:{h.hexdigest()}"


def train(dataset: RegionDataset, encoders: Encoders, out: Path, settings: TrainSettings,
          resume: bool | Path = False, device: torch.device | str = "cpu") -> Path:
    """Train and write <out>/region_predictor.safetensors (returned), log.jsonl and checkpoint.safetensors.

    Seeded; under torchrun (a process group initialised) it shards the data with DistributedSampler, DDP-wraps the
    trained modules and only rank 0 writes. `resume`: True for <out>/checkpoint.safetensors, or a checkpoint path."""

    device = torch.device(device)
    out = check_out_dir(Path(out))
    rank, world = distributed()
    start = checkpoint_to_resume(out, resume)
    config, joint_dim = region_config(dataset, encoders, settings, device)
    run = {**settings.signature(), "config": config.to_json(), "joint_dim": joint_dim, "world_size": world,
           "data": data_digest(dataset)}

    sampler, per_epoch = epoch_sampler(dataset, settings.batch_size, settings.seed)

    torch.manual_seed(settings.seed)
    model = RegionTrainable(config, joint_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    position = load_checkpoint(start, model, optimizer, run, CHECKPOINT_FORMAT, "region") if start else Position()
    trained = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = rank == 0
    log = StepLog(out, TERMS, SHORT, settings.steps, settings.save_every, position.step, "region predictor", writer)
    model.train()
    while position.step < settings.steps:
        batches = remaining_batches(sampler, position, settings.batch_size, per_epoch, settings.steps)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=settings.workers,
                            generator=torch.Generator().manual_seed(position.step))
        for batch in loader:
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            terms = step_terms(trained, encoders, batch, settings.weights, device)
            terms["loss"].backward()
            optimizer.step()
            values = mean_over_ranks(torch.stack([terms[k].detach() for k in TERMS]), world).tolist()
            position = position.advanced(per_epoch)
            if log.record(position, values, time.perf_counter() - began):
                save_checkpoint(out / CHECKPOINT, model, optimizer, position, run, CHECKPOINT_FORMAT)
    log.close()
    path = out / PREDICTOR
    if writer:
        meta = {"steps": str(position.step), "loss_weights": json.dumps(asdict(settings.weights)),
                "data": run["data"]}
        save_predictor(model.predictor, path, meta)
    return path


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    w = LossWeights()
    p = argparse.ArgumentParser(prog="python -m xmgie_core.region.train",
                                description="Train the xMGIE region predictor ([Regions] eqs 1-11).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="records .jsonl with renders (apps.region_data build)")
    p.add_argument("--clip", type=Path, required=True, help="transformers CLIP folder (e.g. clip-vit-large-patch14)")
    p.add_argument("--t5", type=Path, required=True, help="transformers FLAN-T5 folder (e.g. flan-t5-base)")
    p.add_argument("--out", type=Path, required=True, help="run folder: log, checkpoint, region_predictor.safetensors")
    add_run_arguments(p, d, seed_help="initialisation and data order")
    p.add_argument("--alpha", type=float, default=w.alpha, help="weight of L_semAlign (eq 11)")
    p.add_argument("--beta", type=float, default=w.beta, help="weight of L_CLIP (eq 11)")
    p.add_argument("--lambda-g", type=float, default=w.lambda_g, help="weight of L_CLIPg (eq 10)")
    p.add_argument("--lambda-d", type=float, default=w.lambda_d, help="weight of L_CLIPd (eq 10)")
    p.add_argument("--lambda-s", type=float, default=w.lambda_s, help="weight of L_CLIPs (eq 10)")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads of the predictor")
    p.add_argument("--threshold", type=float, default=d.threshold, help="M_region = [P_region >= threshold]")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=Path, metavar="CHECKPOINT",
                   help=f"continue the run in --out (or from CHECKPOINT); default checkpoint: <out>/{CHECKPOINT}")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader worker processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (torchrun: this rank's GPU)")
    p.add_argument("--encoder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the frozen CLIP and T5 (the predictor trains in float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        weights = LossWeights(args.alpha, args.beta, args.lambda_g, args.lambda_d, args.lambda_s)
        settings = TrainSettings(args.steps, args.batch_size, args.lr, args.weight_decay, args.seed, args.save_every,
                                 weights, args.heads, args.threshold, args.workers)
        checkpoint_to_resume(check_out_dir(args.out), args.resume)
        records = read_records(args.data)
        device = setup_distributed(args.device)
        dtype = getattr(torch, args.encoder_dtype)
        image, text = load_clip_encoders(args.clip, device, dtype)
        instruction = load_t5_instruction_encoder(args.t5, device, dtype)
        encoders = Encoders(image, text, instruction, args.clip.name, args.t5.name)
        path = train(RegionDataset(records, image.size), encoders, args.out, settings, args.resume, device)
        if distributed()[0] == 0:
            print(f"wrote {path}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
