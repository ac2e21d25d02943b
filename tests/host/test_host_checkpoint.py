"""The tiny random-weight checkpoint: detected as SD1.5 with a working CLIP and VAE, and sampled end to end."""

from __future__ import annotations

import numpy as np

import comfy_harness as harness


def test_tiny_checkpoint_is_detected_as_sd15(tiny_checkpoint):
    """load_checkpoint_guess_config: model class SD15, CLIP encodes to [1,77,768], TAESD decodes 8x8 -> 64x64."""
    import comfy.sd
    import torch

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    config = model.model.model_config
    assert type(config).__name__ == "SD15"
    for key, value in {"model_channels": 320, "context_dim": 768, "in_channels": 4, "channel_mult": [1]}.items():
        assert config.unet_config[key] == value, f"unet_config[{key!r}] = {config.unet_config[key]!r}"
    assert clip is not None and vae is not None, "checkpoint gave no CLIP or no VAE"
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a red scarf"), return_pooled=True)
        assert tuple(cond.shape) == (1, 77, 768) and tuple(pooled.shape) == (1, 768)
        assert torch.isfinite(cond).all()
        assert type(vae.first_stage_model).__name__ == "TAESD"
        image = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert tuple(image.shape) == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and float(image.std()) > 0, "VAE decode is constant or not finite"


def test_plain_sd15_graph_runs(runner, tiny_checkpoint):
    """Checkpoint -> encode x2 -> empty latent 64x64 -> KSampler 2 steps -> VAEDecode -> SaveImage."""
    run = runner.run(harness.plain_sd15_prompt(tiny_checkpoint.name, seed=4242,
                                               filename_prefix=f"xmgie_plain_{runner.name}"))
    (image,) = run.images("7")
    pixels = runner.read_image(image)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
