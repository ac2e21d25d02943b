"""The whole xMGIE edit against a plain masked inpaint, the ratio the project's goal is stated in, per stage; and
batch throughput in this process against Ray local workers. Ratios are against baselines run in this process.

1. SD1.5 at its real sizes, random weights, a 512 x 512 photo: the headless edit (apps/edit.edit_photo: region
   prediction, crop, CAM + PFB sampling, decode, identity score, GB composite) against ComfyUI's plain masked
   inpaint (VAEEncode -> SetLatentNoiseMask -> KSampler -> VAEDecode) with the mask the edit predicted, at equal
   steps, cfg, denoise and scheduler (DDIM). One run each after a small warm-up (a run takes minutes on a CPU);
   the ratio at the default 20 steps and 10 region draws is projected from the measured per-step and per-draw
   costs (the region stage is a VAE encode plus one two-row U-Net pass per draw; sampling is per step).
2. The tiny random-weight models (xmgie_core.tiny), the same comparison at 512 x 512, and the edit of the same photo
   at 4000 x 3000 through the crop (median of --rounds after a warm-up): with a cheap U-Net the stages around it
   (region draws, VAE, face scoring, compositing at 12 MP) show their weight.
3. `python -m xmgie_core batch` over --items tiny items: in this process, and on a local Ray (started once, its
   start timed apart) with 1 and 2 CPU workers, each loading its own pipeline; the files are compared too.

Why the earlier version did not finish in 20 minutes on 2 cores: it timed each call 4 times (warm-up + 3 rounds) at
20 steps and 10 draws, then ran every call twice more in a child process for peak memory (models rebuilt there).
Timed at 4 steps and 2 draws on an idle machine, the 512 x 512 edit took 16 s (region 6.1, sampling 7.3, identity
2.4), the 4000 x 3000 edit 10 s and the baseline 8 s; at 20 steps and 10 draws that is about 75 + 35 + 40 s a round,
6 rounds = 15 min with the machine to itself, before the memory phase's own costs (glibc made to map and zero every
allocation over 64 KiB afresh, a thread sampling the resident size every 0.2 ms beside the model's two threads).
On 2 shared cores it could not finish. The tiny "baseline" was not cheap either: the tiny U-Net has self-attention
at the full 64 x 64 latent (4096 tokens). Memory is measured by the benchmarks of the parts (bench_pfb,
bench_region, bench_identity); this one times.

Run: python benchmarks/bench_edit.py [--quick] [--size 512] [--steps 3] [--draws 2] [--rounds 1] [--items 6]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_pfb import sd15_layout_unet  # noqa: E402
from xmgie_core.apps import cli  # noqa: E402
from xmgie_core.apps import edit as de  # noqa: E402
from xmgie_core.hosts.diffusers import models as sd15  # noqa: E402
from xmgie_core.identity.backends import Dlib  # noqa: E402
from xmgie_core.instruction.rules import rules_plan  # noqa: E402
from xmgie_core.pfb import latent_blend  # noqa: E402
from xmgie_core.tiny import clip_tokenizer  # noqa: E402

ASSETS = ROOT / "workflows" / "assets"
INSTRUCTION = "give the astronaut a red scarf"
EDIT_STAGES = ("region", "crop", "identity", "sampling", "decode", "composite")


def photo(width: int, height: int) -> torch.Tensor:
    img = Image.open(ASSETS / "xmgie_astronaut_source.png").convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


def sd15_random(tokenizer_dir: Path) -> sd15.SD15:
    """SD1.5 at its real sizes, random weights: the U-Net of its unet/config.json (bench_pfb's layout at width 320,
    cross-attention 768) and the VAE of its vae/config.json; the CLIP ViT-L/14 text encoder of text_encoder/config.json
    cut to 1 of its 12 layers (77 tokens through it cost milliseconds either way; its 0.45 GB are spared on a shared
    24 GB machine, where the full set got the run killed for memory)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = sd15_layout_unet(320, 768)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512).eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768)).eval()
    return sd15.SD15(unet, vae, text, clip_tokenizer(tokenizer_dir), sd15.ddim_scheduler(),
                     "random weights at SD1.5's sizes")


@torch.no_grad()
def masked_inpaint(models: sd15.SD15, image: torch.Tensor, mask: torch.Tensor, s: de.EditSettings,
                   watch: de.Stopwatch) -> torch.Tensor:
    """ComfyUI's plain masked inpaint on the diffusers host: VAEEncode, SetLatentNoiseMask (the mask resized to the
    latent bilinearly, as KSampler's prepare_mask), KSampler with DDIM at the edit's steps, cfg and denoise, where
    before every model call the latent outside the mask is the source noised with one fixed noise and the result
    is the source there (KSamplerX0Inpaint: x = x m + (z + sigma n)(1 - m); out = out m + z (1 - m)); VAEDecode."""
    plan = rules_plan(s.instruction)
    with watch.stage("encode"):
        z = de.encode_image(models, image)
    with watch.stage("sampling"):
        m = F.interpolate(mask[:, None].float(), size=z.shape[-2:], mode="bilinear")
        cond, uncond = de.encode_text(models, plan.target_description), de.encode_text(models, s.negative)
        scheduler = models.scheduler
        scheduler.set_timesteps(s.steps)
        timesteps = scheduler.timesteps[len(scheduler.timesteps) - max(1, round(s.steps * s.denoise)):]
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(s.seed))
        x = scheduler.add_noise(z, noise, timesteps[:1])
        for t in timesteps:
            x = latent_blend(x, scheduler.add_noise(z, noise, t[None]), m)
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = models.unet(x_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = scheduler.step(eps_u + s.cfg * (eps_c - eps_u), t, x).prev_sample
        x = latent_blend(x, z, m)
    with watch.stage("decode"):
        return de.decode_latent(models, x)


def edit_and_inpaint(models: sd15.SD15, image: torch.Tensor, s: de.EditSettings, backend) -> tuple[dict, dict, dict]:
    """One whole edit, then the inpaint with the mask it predicted -> (edit stage times, inpaint stage times,
    facts: crop size, region share, sampling steps)."""
    result = de.edit_photo(models, image, s, face_backend=backend)
    watch = de.Stopwatch()
    masked_inpaint(models, image, result.mask, s, watch)
    work = result.geometry.to_dict()["work_size"]
    facts = {"crop": "x".join(map(str, work)), "crop_share": work[0] * work[1] / (image.shape[1] * image.shape[2]),
             "region": f"{100 * float((result.mask > 0.5).float().mean()):.0f} %",
             "steps": max(1, round(s.steps * s.denoise))}
    return result.timings, watch.times, facts


def print_stages(edit: dict, inpaint: dict) -> tuple[float, float]:
    """The per-stage table; the inpaint's VAE encode is shown with its sampling, as the edit's sampling stage holds
    the crop's encode."""
    total_e, total_i = sum(edit.values()), sum(inpaint.values())
    inpaint = {**inpaint, "sampling": inpaint["encode"] + inpaint["sampling"]}
    print(f"  {'stage':24s} {'edit s':>9s} {'inpaint s':>10s} {'ratio':>7s}")
    for stage in EDIT_STAGES:
        e, i = edit.get(stage, 0.0), inpaint.get(stage)
        label = stage + (" (+ VAE encode)" if stage == "sampling" else "")
        print(f"  {label:24s} {e:9.2f} {(f'{i:.2f}' if i else '-'):>10s} {(f'{e / i:6.2f}x' if i else ''):>7s}")
    print(f"  {'whole':24s} {total_e:9.2f} {total_i:10.2f} {total_e / total_i:6.2f}x")
    return total_e, total_i


def full_size(size: int, steps: int, draws: int, backend) -> None:
    print(f"\n== 1. SD1.5 at its real sizes (random weights): whole edit vs plain masked inpaint, {size}x{size} ==")
    start = time.perf_counter()
    models = sd15_random(Path(tempfile.mkdtemp()))
    print(f"  models built in {time.perf_counter() - start:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    s = de.EditSettings(INSTRUCTION, steps=steps, region_draws=draws, working_size=size)  # the crop <= the photo
    with torch.no_grad():  # warm-up: every layer once, at a small size
        z, text = de.encode_image(models, photo(64, 64)), de.encode_text(models, "")
        de.decode_latent(models, models.unet(z, 999, encoder_hidden_states=text).sample)
    edit, inpaint, facts = edit_and_inpaint(models, photo(size, size), s, backend)
    print(f"  {facts['steps']} sampling steps ({steps} x denoise {s.denoise}), cfg {s.cfg}, DDIM, {draws} region "
          f"draws, dlib identity; predicted region {facts['region']} of the photo, crop {facts['crop']}")
    total_e, total_i = print_stages(edit, inpaint)
    # the defaults, from the measured parts: the inpaint's encode (a 512 x 512 photo) is also the region stage's
    # (the working size) and, scaled by its pixels, the crop's in the edit's sampling stage
    default = de.EditSettings(INSTRUCTION)
    n, n_default = facts["steps"], max(1, round(default.steps * default.denoise))
    per_step_i = inpaint["sampling"] / n
    per_step_e = (edit["sampling"] - inpaint["encode"] * facts["crop_share"]) / n
    per_draw = (edit["region"] - inpaint["encode"]) / draws
    e20 = total_e + (n_default - n) * per_step_e + (default.region_draws - draws) * per_draw
    i20 = total_i + (n_default - n) * per_step_i
    print(f"  per sampling step: edit {per_step_e:.2f} s vs inpaint {per_step_i:.2f} s = "
          f"{per_step_e / per_step_i:.2f}x; per region draw {per_draw:.2f} s")
    print(f"  projected at the defaults ({default.steps} steps x denoise {default.denoise} = {n_default} steps, "
          f"{default.region_draws} draws): edit {e20:.0f} s vs inpaint {i20:.0f} s = {e20 / i20:.2f}x")


def tiny(rounds: int, steps: int, draws: int, backend) -> None:
    print(f"\n== 2. Tiny random-weight models: whole edit vs plain masked inpaint, median of {rounds} ==")
    models = sd15.tiny_sd15(Path(tempfile.mkdtemp()))
    s = de.EditSettings(INSTRUCTION, steps=steps, region_draws=draws)
    runs: dict[str, list] = {"512x512": [], "4000x3000 (crop)": []}
    photos = {"512x512": photo(512, 512), "4000x3000 (crop)": photo(4000, 3000)}
    for r in range(rounds + 1):  # round 0 warms up
        for name in runs:
            start = time.perf_counter()
            if name == "512x512":
                edit, inpaint, facts = edit_and_inpaint(models, photos[name], s, backend)
            else:
                edit = de.edit_photo(models, photos[name], s, face_backend=backend).timings
                inpaint = None
            if r:
                runs[name].append((edit, inpaint, time.perf_counter() - start))
    median = lambda rows, key: {k: statistics.median(row[key][k] for row in rows) for k in rows[0][key]}  # noqa: E731
    print(f"  {facts['steps']} sampling steps ({steps} x denoise {s.denoise}), {draws} region draws, dlib identity")
    edit512, inpaint512 = median(runs["512x512"], 0), median(runs["512x512"], 1)
    print("  512x512:")
    total_e, total_i = print_stages(edit512, inpaint512)
    big = median(runs["4000x3000 (crop)"], 0)
    print(f"  4000x3000 through the crop: whole edit {sum(big.values()):.2f} s = {sum(big.values()) / total_i:.2f}x "
          "the 512x512 inpaint; stages: " + ", ".join(f"{k} {v:.2f}" for k, v in big.items() if k in EDIT_STAGES))


def batch_dataset(folder: Path, count: int) -> Path:
    source = Image.open(ASSETS / "xmgie_astronaut_source.png").convert("RGB").resize((128, 128), Image.LANCZOS)
    rows = ["id,source,instruction,seed"]
    for i in range(count):
        (source if i % 2 == 0 else source.transpose(Image.FLIP_LEFT_RIGHT)).save(folder / f"p{i}.png")
        rows.append(f"p{i},p{i}.png,{INSTRUCTION},{i}")
    (folder / "items.csv").write_text("\n".join(rows) + "\n")
    return folder / "items.csv"


def batch_throughput(count: int, steps: int, draws: int) -> None:
    cores = os.cpu_count() or 1
    print(f"\n== 3. Batch editing: {count} tiny items (128x128, predicted region), in process vs Ray local ==")
    folder = Path(tempfile.mkdtemp())
    data = batch_dataset(folder, count)
    args = ["batch", "--data", str(data), "--tiny", "--steps", str(steps), "--draws", str(draws), "--working-size",
            "128", "--identity", "none"]

    def run(name: str, *extra: str) -> tuple[float, dict]:
        out = folder / name
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            assert cli.main([*args, "--out", str(out), *extra]) == 0  # a failed run has no throughput
        seconds = time.perf_counter() - start
        return seconds, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def differences(written: dict, reference: dict) -> str:
        """How the files differ from the in-process run's: 'equal', else the largest pixel difference (0..255)."""
        if written == reference:
            return "files equal bit for bit"
        worst = max(int(np.abs(np.asarray(Image.open(io.BytesIO(written[n])), np.int16)
                               - np.asarray(Image.open(io.BytesIO(reference[n])), np.int16)).max())
                    for n in reference if n.endswith(".png"))
        return f"files differ by up to {worst}/255 (another thread count sums in another order)"

    base, reference = run("in_process", "--threads", str(cores))
    print(f"  {'in this process':26s} {base:7.1f} s  {60 * count / base:6.1f} items/min  1.00x "
          f"({cores} threads; model load included)")
    try:
        import ray
    except ImportError:
        print('  Ray is not installed (pip install "ray[data]"): no Ray figures')
        return
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    print(f"  (local Ray started in {time.perf_counter() - start:.1f} s, not counted below)")
    try:
        for workers in (1, 2):
            threads = max(1, cores // workers)
            seconds, written = run(f"ray{workers}", "--ray", "--workers", str(workers), "--threads", str(threads))
            print(f"  {f'Ray, {workers} worker(s) x {threads} thr':26s} {seconds:7.1f} s  {60 * count / seconds:6.1f} "
                  f"items/min  {base / seconds:.2f}x; {differences(written, reference)}")
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (256x256, 1 sampling step, fewer items)")
    p.add_argument("--size", type=int, default=512, help="photo side of part 1 (SD1.5's 512)")
    p.add_argument("--steps", type=int, default=3, help="part 1: steps (x denoise 0.8 = sampling steps)")
    p.add_argument("--draws", type=int, default=2, help="part 1: region draws")
    p.add_argument("--tiny-steps", type=int, default=10)
    p.add_argument("--tiny-draws", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="part 2: timed rounds after the warm-up")
    p.add_argument("--items", type=int, default=6, help="part 3: batch items")
    a = p.parse_args()
    if a.quick:
        a.size, a.steps, a.draws, a.tiny_steps, a.tiny_draws, a.items = 256, 1, 1, 4, 2, 3
    start = time.perf_counter()
    backend = Dlib()
    full_size(a.size, a.steps, a.draws, backend)
    tiny(a.rounds, a.tiny_steps, a.tiny_draws, backend)
    batch_throughput(a.items, a.tiny_steps, a.tiny_draws)
    print(f"\nbenchmark finished in {(time.perf_counter() - start) / 60:.1f} min; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
