"""Region predictor speed and memory, in this process.

Learned mode at full size (random weights): CLIP ViT-L/14 vision (24 layers, width 1024, projection 768), the
FLAN-T5-base encoder (12 layers, d_model 768) and the predictor (d 768) on a 224² and a 448² image, at scales (1,)
and (1, 2); the baseline is one CLIP ViT-L/14 forward, the unavoidable encoder cost. A training step (eqs 4-11) at
batch 8 against a plain CLIP forward + backward of the same batch. Zero-shot modes on the test suite's tiny U-Net
and a tiny CLIPSeg, against one U-Net (or CLIPSeg) forward. CPU; times are medians of interleaved rounds, memory is
the peak resident growth read in a child process (benchmarks/_measure.py).

Run: python benchmarks/bench_region.py [--skip-train] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402
from fixtures import tiny_models  # noqa: E402
from fixtures.tiny_clipseg import save_tiny_clipseg  # noqa: E402
from xmgie_core.hosts.diffusers.region import diffusers_edit_attention, diffusers_noise_difference  # noqa: E402
from xmgie_core.region.clipseg import clipseg_probabilities  # noqa: E402
from xmgie_core.region.encoders import CLIPImageEncoder, T5InstructionEncoder  # noqa: E402
from xmgie_core.region.learned import predict_learned  # noqa: E402
from xmgie_core.region.predictor import RegionConfig, RegionPredictor  # noqa: E402

INSTRUCTION = "give the man a red scarf"


class Tokens:
    """Fixed-length token ids for the T5 encoder (the tokenizer's cost is negligible next to the encoder)."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.arange(3, 3 + 12).repeat(len(texts), 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def full_size_models():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768)).eval().requires_grad_(False)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                                 feed_forward_proj="gated-gelu")).eval().requires_grad_(False)
    return CLIPImageEncoder(clip), T5InstructionEncoder(t5, Tokens()), RegionPredictor(RegionConfig()).eval()


def learned(rounds: int) -> dict:
    image_enc, ins_enc, net = full_size_models()
    calls, results = {}, {}
    one_view = torch.rand(1, 3, 224, 224)
    calls["CLIP-L/14 forward (baseline)"] = lambda: torch.inference_mode()(image_enc)(one_view)
    for size in (224, 448):
        image = torch.rand(1, size, size, 3)
        for scales in ((1,), (1, 2)):
            calls[f"learned {size}² scales {scales}"] = (
                lambda im=image, sc=scales: predict_learned(net, image_enc, ins_enc, im, INSTRUCTION, sc))
    if in_memory_phase():
        return {name: peak_mb(fn, repeats=1) for name, fn in calls.items()}
    times = time_calls(calls, rounds)
    base = times["CLIP-L/14 forward (baseline)"]
    for name, t in times.items():
        results[name] = (t, t / base)
    return results


def train_step(rounds: int) -> dict:
    from xmgie_core.region.losses import LossWeights
    from xmgie_core.region.train import Encoders, RegionTrainable, step_terms

    image_enc, ins_enc, net = full_size_models()

    class CLIPText:
        """CLIP text embeddings T_o / T_e: random unit vectors (the text tower runs once per record, no grad)."""

        def __call__(self, texts):
            return torch.nn.functional.normalize(torch.randn(len(texts), 768), dim=-1)

    encoders = Encoders(image=image_enc, text=CLIPText(), instruction=ins_enc)
    model = RegionTrainable(net.config, 768)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {"image": torch.rand(8, 3, 224, 224), "render": torch.rand(8, 3, 224, 224),
             "t_o": ["a man"] * 8, "t_e": ["a man wearing a red scarf"] * 8, "t_ins": [INSTRUCTION] * 8}
    weights = LossWeights()

    def step():
        optimizer.zero_grad()
        terms = step_terms(model, encoders, batch, weights, torch.device("cpu"))
        terms["loss"].backward()
        optimizer.step()

    pixels = batch["image"].clone().requires_grad_(True)

    def clip_forward_backward():
        image_enc(pixels)[0].sum().backward()

    calls = {"CLIP-L/14 fwd+bwd, batch 8 (baseline)": clip_forward_backward, "training step, batch 8": step}
    if in_memory_phase():
        return {name: peak_mb(fn, repeats=1) for name, fn in calls.items()}
    times = time_calls(calls, rounds)
    base = times["CLIP-L/14 fwd+bwd, batch 8 (baseline)"]
    return {name: (t, t / base) for name, t in times.items()}


def zero_shot(rounds: int) -> dict:
    from diffusers import DDIMScheduler

    unet, scheduler = tiny_models.tiny_unet(), DDIMScheduler()
    latents = torch.randn(1, 4, 64, 64)
    target, source = torch.randn(1, 77, tiny_models.CROSS_DIM), torch.randn(1, 77, tiny_models.CROSS_DIM)
    folder = save_tiny_clipseg(Path(tempfile.mkdtemp()) / "clipseg")
    image = torch.rand(1, 512, 512, 3)
    with torch.inference_mode():
        calls = {
            "U-Net forward (baseline)": lambda: unet(latents, 500, encoder_hidden_states=target).sample,
            "noise-difference, 10 draws": lambda: diffusers_noise_difference(unet, scheduler, latents, target, source,
                                                                             10, 0, (0.4, 0.6)),
            "attention, 10 steps": lambda: diffusers_edit_attention(unet, scheduler, latents, target, [5, 6], 10, 0,
                                                                    0.5),
            "clipseg (tiny), 2 phrases, 512²": lambda: clipseg_probabilities(image, ["red scarf", "hat"], folder),
        }
        if in_memory_phase():
            return {name: peak_mb(fn, repeats=1) for name, fn in calls.items()}
        times = time_calls(calls, rounds)
    base = times["U-Net forward (baseline)"]
    return {name: (t, t / base) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args([a for a in sys.argv[1:] if a != "--memory-phase"])
    torch.manual_seed(0)
    parts = {"learned": learned, "zero-shot": zero_shot}
    if not args.skip_train:
        parts["train"] = train_step
    if in_memory_phase():
        memory_phase({part: fn(1) for part, fn in parts.items()})
        return
    memory = memory_phase()
    for part, fn in parts.items():
        print(f"--- {part}")
        for name, (seconds, ratio) in fn(args.rounds).items():
            print(f"{name:44s} {seconds * 1e3:9.1f} ms  {ratio:6.2f}x   peak +{memory[part][name]:8.1f} MB")


if __name__ == "__main__":
    main()
