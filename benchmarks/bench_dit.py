"""PFB and CAM on ComfyUI's DiT editors: speed and memory as ratios against the stock editor sampling run in this process.

Models: ComfyUI 0.3.64's own Flux (FLUX.1 Kontext) and Qwen-Image(-Edit) classes at the real hidden size (3072, 24
heads of 128) with few blocks (Flux: one double- and one single-stream block; Qwen-Image: two blocks), random
weights. The editors' token counts: a 1024x1024 image is a 128x128 latent, 4096 generated tokens, plus the reference
image's 4096 tokens (Kontext's ReferenceLatent, Qwen-Image-Edit's image) and ~512 text tokens (`--size 1024`).
Each editor samples as its users run it: Kontext guidance-distilled at cfg 1 (one model row per step, FluxGuidance
2.5), Qwen-Image-Edit with true CFG (cfg 4, two rows).

Baseline `stock`: comfy.samplers.CFGGuider, euler, `simple` schedule. Candidates at equal steps, same seed:
  latent          PFB with outside weight 1 (no feature blending, no source pass): the latent blend (eq 23) alone
                  every step. Target <= 1.05x.
  noised          PFB feature blending (auto = the first half of the blocks) with the `noised` source branch, no
                  cache: one source pass per step, stopped after the deepest blended block. Target <= 1.6x.
  noised_hit      the same on a cache hit (the second edit of the same source). Target <= 1.6x.
  inverted(_hit)  with --inverted: the `inverted` source branch (a full source pass per step for the inversion).
  cam             CAM-DiT (the joint-attention mask as the Cross-Attention Mask node installs it, two edit words)
                  against stock. Target <= 1.10x.

Requires COMFYUI_PATH (a ComfyUI 0.3.64 checkout); without it the script says so and exits.
Run: COMFYUI_PATH=... python benchmarks/bench_dit.py [--size 1024] [--steps 8] [--text 512] [--family flux]
(on a CPU, e.g. --size 256 --steps 4 --text 64 for a run of a few minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "host")]

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402

FLUX, QWEN = "flux", "qwen_image"
BLOCKS = {FLUX: {"depth": 1, "depth_single_blocks": 1}, QWEN: {"num_layers": 2}}
CFG = {FLUX: 1.0, QWEN: 4.0}
EDITOR = {FLUX: "FLUX.1 Kontext (cfg 1, guidance 2.5)", QWEN: "Qwen-Image-Edit (cfg 4)"}


def editor_model(family: str) -> Any:
    """A ModelPatcher around ComfyUI's Flux / Qwen-Image at width 3072 with BLOCKS[family], float32 on the CPU
    (the host harness runs ComfyUI in CPU mode), seeded weights (tests/host/tiny_dit.py's detectable
    configuration)."""
    import comfy.model_patcher
    import tiny_dit
    from comfy_harness import randomized

    config = tiny_dit._config(family, {**tiny_dit.DETECTABLE[family], **BLOCKS[family]})
    model = config.get_model({}, device="cpu")
    model.diffusion_model.load_state_dict(randomized(model.diffusion_model.state_dict(),
                                                     torch.Generator().manual_seed(0)))
    return comfy.model_patcher.ModelPatcher(model.to(torch.float32), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def editor_inputs(model: Any, family: str, size: int, text: int) -> tuple[torch.Tensor, list, list, torch.Tensor]:
    """Source latent z (the reference image too), positive and negative CONDITIONING with `text` tokens, the
    edit mask (a centred box over a quarter of the image)."""
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, size // 8, size // 8, generator=g)
    z = z if family == FLUX else z[:, :, None]

    def cond(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        extras: dict = {"reference_latents": [z]}
        if family == FLUX:
            extras.update(pooled_output=torch.randn(1, dm.params.vec_in_dim, generator=gen), guidance=2.5)
        return [[torch.randn(1, text, dm.txt_in.in_features, generator=gen), extras]]

    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return z, cond(2), cond(3), mask


def sampling(guider: Any, model: Any, z: torch.Tensor, steps: int) -> Callable[[], torch.Tensor]:
    import comfy.sample
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    noise = comfy.sample.prepare_noise(z, 0)
    return lambda: guider.sample(noise, z, comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                                 disable_pbar=True)


def cam_candidate(model: Any, positive: list, negative: list, mask: torch.Tensor, z: torch.Tensor, family: str,
                  steps: int) -> Callable[[], torch.Tensor]:
    """CAM-DiT against stock (target <= 1.10x): the MODEL cloned with the joint-attention mask as the Cross-Attention
    Mask node installs it (hosts/comfy/cam_dit.py), the first two text tokens as edit words, the positive as the
    node's prompt encoding."""
    import comfy.samplers

    from xmgie_core.hosts.comfy import cam_dit, dit
    from xmgie_core.hosts.comfy.cam import CAMSpec
    from xmgie_core.hosts.comfy.cam_prompt import PromptEncoding
    from xmgie_core.masks import RegionPyramid

    cam_model = model.clone()
    spec = CAMSpec((0, 1), (), int(positive[0][0].shape[1]), RegionPyramid(mask))
    patch = cam_dit.JointCrossAttentionMask(spec, PromptEncoding("bench", (positive[0][0],)),
                                            dit.find(model.model.diffusion_model))
    cam_model.model_options = cam_dit.install(cam_model.model_options, patch)
    guider = comfy.samplers.CFGGuider(cam_model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG[family])
    return sampling(guider, cam_model, z, steps)


def calls(family: str, size: int, steps: int, text: int, inverted: bool) -> dict[str, Callable[[], torch.Tensor]]:
    import comfy.samplers
    from xmgie_core.hosts.comfy.pfb import pfb_guider_class
    from xmgie_core.pfb import PFBSettings, SourceCache

    model = editor_model(family)
    z, positive, negative, mask = editor_inputs(model, family, size, text)

    def guided(guider: Any) -> Callable[[], torch.Tensor]:
        guider.set_conds(positive, negative)
        guider.set_cfg(CFG[family])
        return sampling(guider, model, z, steps)

    def pfb(**settings: Any) -> Callable[[], torch.Tensor]:
        return guided(pfb_guider_class()(model, PFBSettings(mask, **settings)))

    fns = {"stock": guided(comfy.samplers.CFGGuider(model)),
           "latent": pfb(outside_weight=1.0, latent_end=1.0),
           "noised": pfb(source_mode="noised"),
           "noised_hit": pfb(source_mode="noised", cache=SourceCache(65536))}
    if inverted:
        fns.update(inverted=pfb(source_mode="inverted"),
                   inverted_hit=pfb(source_mode="inverted", cache=SourceCache(65536)))
    fns["cam"] = cam_candidate(model, positive, negative, mask, z, family, steps)
    for name in ("noised_hit", "inverted_hit"):
        if name in fns:
            fns[name]()  # fill the cache: every timed call is a hit
    return fns


TARGETS = {"latent": 1.05, "noised": 1.6, "noised_hit": 1.6, "cam": 1.10}


def import_comfyui() -> bool:
    import comfy_harness

    root = comfy_harness.comfyui_path()
    if root is None:
        print(f"bench_dit: skipped: {comfy_harness.SKIP_REASON} (set COMFYUI_PATH to a ComfyUI 0.3.64 checkout).")
        return False
    comfy_harness.import_comfyui(root)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size / 8, tokens = "
                                                          "(size / 16)^2 generated + as many reference)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--text", type=int, default=512, help="text tokens")
    p.add_argument("--family", choices=[FLUX, QWEN], action="append", help="default: both")
    p.add_argument("--inverted", action="store_true", help="also the inverted source branch")
    p.add_argument("--rounds", type=int, default=3)
    a, _ = p.parse_known_args()
    if not import_comfyui():
        return
    families = a.family or [FLUX, QWEN]
    if in_memory_phase():
        memory_phase({f: {name: peak_mb(fn, repeats=1) for name, fn in
                          calls(f, a.size, a.steps, a.text, a.inverted).items()} for f in families})
        return
    tokens = (a.size // 16) ** 2
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; width 3072, float32, "
          f"{a.size}x{a.size} image: {tokens} generated + {tokens} reference + {a.text} text tokens; "
          f"{a.steps} steps, euler/simple")
    times = {}
    for f in families:  # one model in memory at a time; times printed before the (memory-hungry) memory phase
        times[f] = time_calls(calls(f, a.size, a.steps, a.text, a.inverted), rounds=a.rounds)
        report(f, a.steps, times[f])
    try:
        memory = memory_phase()
    except subprocess.CalledProcessError as failed:
        print(f"memory: not measured, the memory phase's process failed ({failed}); run one --family at a time")
        return
    for f in families:
        report(f, a.steps, times[f], memory[f])


def report(family: str, steps: int, t: dict[str, float], m: dict[str, float] | None = None) -> None:
    """Seconds per step and time ratios against stock (with `m`: peak MB and memory ratios)."""
    def mem(name: str) -> str:
        return "" if m is None else f" {m[name]:9.1f} MB peak"

    print(f"{EDITOR[family]}, blocks {BLOCKS[family]}" + (": peak memory" if m is not None else ": time"))
    print(f"  {'stock':12s} {t['stock'] / steps:8.2f} s/step{mem('stock')}")
    for name in t:
        if name == "stock":
            continue
        target = f" (target <= {TARGETS[name]:.2f}x)" if name in TARGETS else ""
        ratio = "" if m is None else f", memory x{m[name] / max(m['stock'], 1e-9):.2f}"
        print(f"  {name:12s} {t[name] / steps:8.2f} s/step{mem(name)} -> time x{t[name] / t['stock']:.2f}{ratio}"
              f"{target}")


if __name__ == "__main__":
    main()
