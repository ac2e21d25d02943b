"""The headless whole edit (`python -m xmgie_core edit`) end to end on the tiny random-weight models, split by
stage (instruction, region, crop, sampling, decode, identity, composite), on the bundled 512 x 512 sample and on
the same photo at 4000 x 3000 (crop-and-stitch), against a baseline in this process: plain CFG sampling of a
512 x 512 latent with the same U-Net, steps and scheduler (no region, CAM, PFB, crop or compositing).

The tiny models make the U-Net cheap, so the stages around it (region draws, VAE, face scoring, compositing at
12 MP) show their real weight; with SD1.5 the sampling stage grows about 40x and dominates.

Run: python benchmarks/bench_edit.py [--steps 20] [--draws 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402
from xmgie_core.apps import edit as de  # noqa: E402
from xmgie_core.hosts.diffusers import models as sd15  # noqa: E402
from xmgie_core.identity.backends import Dlib  # noqa: E402

ASSETS = ROOT / "workflows" / "assets"
INSTRUCTION = "give the astronaut a red scarf"


def photo(width: int, height: int) -> torch.Tensor:
    img = Image.open(ASSETS / "xmgie_astronaut_source.png").convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


@torch.no_grad()
def plain_sampling(models: sd15.SD15, steps: int, cfg: float) -> torch.Tensor:
    """The baseline: DDIM with CFG from noise on a 64 x 64 latent (a 512 x 512 image)."""
    scheduler = models.scheduler
    scheduler.set_timesteps(steps)
    cond, uncond = de.encode_text(models, "a photo of the astronaut with a red scarf"), de.encode_text(models, "")
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        eps_u, eps_c = models.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        x = scheduler.step(eps_u + cfg * (eps_c - eps_u), t, x).prev_sample
    return x


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_known_args()[0]  # the memory phase adds its own flag
    torch.manual_seed(0)
    models = sd15.tiny_sd15(Path(tempfile.mkdtemp()))
    backend = Dlib()
    settings = de.EditSettings(INSTRUCTION, steps=args.steps, region_draws=args.draws)
    photos = {"512x512": photo(512, 512), "4000x3000 (crop)": photo(4000, 3000)}
    stages: dict[str, dict[str, float]] = {}

    def edit(name: str):
        def run() -> None:
            stages[name] = de.edit_photo(models, photos[name], settings, face_backend=backend).timings
        return run

    calls = {"baseline (plain sampling 512)": lambda: plain_sampling(models, args.steps, settings.cfg),
             **{name: edit(name) for name in photos}}
    if in_memory_phase():
        memory_phase({name: peak_mb(fn, repeats=1) for name, fn in calls.items()})
        return
    times = time_calls(calls, rounds=args.rounds)
    memory = memory_phase()
    base_t, base_m = times["baseline (plain sampling 512)"], memory["baseline (plain sampling 512)"]
    print(f"tiny models, {args.steps} DDIM steps, {args.draws} region draws, dlib identity; median of {args.rounds}")
    for name in calls:
        print(f"{name:32s} {times[name]:7.2f} s  {times[name] / base_t:5.2f}x   peak +{memory[name]:7.1f} MB "
              f"({memory[name] / max(base_m, 1e-3):5.1f}x)")
    for name, timing in stages.items():
        total = sum(timing.values())
        slowest = max(timing, key=timing.get)
        print(f"\n{name}: stages (last round), slowest = {slowest}")
        for stage in de.STAGES:
            if stage in timing:
                print(f"  {stage:12s} {timing[stage]:7.3f} s  {100 * timing[stage] / total:5.1f} %")


if __name__ == "__main__":
    main()
