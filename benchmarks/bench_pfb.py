"""PFB speed and memory as ratios against plain masked sampling run in this process.

Baseline: the same diffusers edit loop (xmgie_core.hosts.diffusers.pfb.pfb_edit) with feature blending switched
off and the latent outside the mask kept on the noised source for every step, i.e. inpainting with a noise mask:
same U-Net, steps, cfg and scheduler. Candidates: PFB with the `noised` and `inverted` source branch, without a
cache (a fresh private cache each run: the inversion's passes still serve that run) and on a cache hit (the
second run over the same source). The U-Net has SD1.5's block layout (4 levels, 2 resnets per block,
cross-attention on the top three) at reduced width (default latent 32x32).
Targets: noised <= 1.55x time (floor 1.5x), inverted <= 2.05x uncached (floor 2x), either <= 1.10x on a cache
hit, <= 1.3x peak memory.

Run: python benchmarks/bench_pfb.py [--width 64] [--latent 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402
from xmgie_core.hosts.diffusers.pfb import pfb_edit  # noqa: E402
from xmgie_core.pfb import PFBSettings, SourceCache  # noqa: E402


def sd15_layout_unet(width: int, cross: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width), norm_num_groups=min(32, width // 2),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross, attention_head_dim=8,
    ).eval()


def calls(width: int, latent: int, steps: int) -> dict:
    from diffusers import DDIMScheduler

    cross = 4 * width
    unet = sd15_layout_unet(width, cross)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, latent, latent, generator=g)
    cond, uncond, source = (torch.randn(1, 77, cross, generator=g) for _ in range(3))
    mask = torch.zeros(1, latent, latent)
    mask[:, latent // 4: 3 * latent // 4, latent // 4: latent // 2] = 1
    caches = {mode: SourceCache(4096) for mode in ("noised", "inverted")}

    def run(mode: str, cache: SourceCache | None, layers: str = "auto", latent_end: float = 0.5):
        settings = PFBSettings(mask, layers=layers, latent_end=latent_end, source_mode=mode, cache=cache)
        return lambda: pfb_edit(unet, DDIMScheduler(clip_sample=False), z, cond, uncond, source, settings,
                                steps=steps, strength=0.8, generator=torch.Generator().manual_seed(2))

    for mode, cache in caches.items():
        run(mode, cache)()  # fill the caches: the *_hit calls below are all hits
    return {
        "plain": run("noised", None, layers="middle@0", latent_end=1.0),
        "noised": run("noised", None),
        "noised_hit": run("noised", caches["noised"]),
        "inverted": run("inverted", None),
        "inverted_hit": run("inverted", caches["inverted"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64, help="channels of the first level (SD1.5: 320)")
    p.add_argument("--latent", type=int, default=32, help="latent size (32 = a 256x256 image; 64 = 512x512, slow on a CPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    a, _ = p.parse_known_args()
    fns = calls(a.width, a.latent, a.steps)
    if in_memory_phase():
        memory_phase({name: peak_mb(fn, repeats=1) for name, fn in fns.items()})
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5 block layout at width {a.width}, "
          f"latent {a.latent}x{a.latent}, {a.steps} steps x strength 0.8, cfg 7.5, DDIM")
    times = time_calls(fns, rounds=a.rounds)
    memory = memory_phase()
    steps = max(1, round(a.steps * 0.8))
    base_t, base_m = times["plain"], memory["plain"]
    print(f"{'plain masked sampling':28s} {base_t / steps * 1e3:8.1f} ms/step {base_m:8.1f} MB")
    for name in ("noised", "noised_hit", "inverted", "inverted_hit"):
        print(f"{name:28s} {times[name] / steps * 1e3:8.1f} ms/step {memory[name]:8.1f} MB -> time x"
              f"{times[name] / base_t:.2f}, memory x{memory[name] / max(base_m, 1e-9):.2f}")


if __name__ == "__main__":
    main()
