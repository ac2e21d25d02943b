"""CAM in a real ComfyUI: token positions from its tokenizer, KSampler runs of the tiny SD1.5
checkpoint, the input MODEL left untouched, and composition with an IP-Adapter-style replace."""

from __future__ import annotations

import pytest
import torch

import comfy_harness as harness

PROMPT = "a photo of a man wearing a (red scarf:1.2), standing in a snowy park"


@pytest.fixture(scope="module")
def sd15(comfy_host: harness.ComfyHost, tiny_checkpoint):
    """(model, clip, vae) of the tiny checkpoint, loaded by CheckpointLoaderSimple."""
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.name)[:3]


@pytest.fixture(scope="module")
def cam_node(comfy_host: harness.ComfyHost):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()


def token_ids(clip, prompt: str, positions: list[int]) -> list[int]:
    chunks = clip.tokenize(prompt)["l"]
    return [chunks[p // 77][p % 77][0] for p in positions]


def word_ids(clip, words: str) -> list[int]:
    return clip.tokenizer.clip_l.tokenizer(words)["input_ids"][1:-1]


@pytest.mark.parametrize("prompt, words, count", [
    (PROMPT, "red scarf", 1),
    ("red scarf,red scarf!! (red scarf), another RED SCARF", "red scarf", 4),
    ("photo, " * 40 + "a man in a red scarf", "red scarf", 1),
    ("a man, (snowy park:0.8) and (red:1.3) scarf", "snowy park, scarf", 1),
])
def test_token_positions_with_comfy_tokenizer(sd15, prompt, words, count):
    from xmgie_core.hosts.comfy.tokens import comfy_token_positions
    from xmgie_core.tokens import parse_words

    clip = sd15[1]
    positions, length = comfy_token_positions(clip, prompt, words)
    assert length == 77 * len(clip.tokenize(prompt)["l"])
    want = [t for phrase in parse_words(words) for t in word_ids(clip, phrase)]
    got = token_ids(clip, prompt, positions)
    assert set(got) == set(want) and len(positions) == count * len(want)
    if len(prompt) > 200:
        assert min(positions) >= 77  # the words sit in the second chunk


def test_missing_words_list_the_prompt_tokens(sd15, cam_node):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match=r"blue hat.*snowy"):
        cam_node.patch(model, clip, PROMPT, "blue hat", torch.ones(1, 64, 64), "renormalized", 0.5, 1.0,
                       True, True, True, 0.0, 1.0)


def sample(comfy_host, model, clip, seed: int = 7, size: int = 128) -> torch.Tensor:
    nodes = comfy_host.nodes
    pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    return nodes.common_ksampler(model, seed, 3, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max difference relative to b's scale (the random tiny model's latents reach the hundreds)."""
    return float((a - b).abs().max() / b.abs().max())


def left_half(size: int = 128) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, :, : size // 2] = 1
    return mask


def patch(cam_node, model, clip, mask, mode="renormalized", background=""):
    return cam_node.patch(model, clip, PROMPT, "red scarf", mask, mode, 0.5, 1.0, True, True, True, 0.0, 1.0,
                          background)[0]


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
def test_cam_changes_the_sample_and_leaves_the_input_model_alone(comfy_host, sd15, cam_node, mode):
    model, clip, _ = sd15
    before = sample(comfy_host, model, clip)
    options_before = repr(model.model_options)
    patched = patch(cam_node, model, clip, left_half(), mode, background="snowy park")
    assert patched is not model
    masked = sample(comfy_host, patched, clip)
    assert rel(masked, before) > 1e-4
    assert torch.equal(sample(comfy_host, model, clip), before)
    assert repr(model.model_options) == options_before
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
def test_full_mask_equals_the_unpatched_model(comfy_host, sd15, cam_node, mode):
    model, clip, _ = sd15
    full = patch(cam_node, model, clip, torch.ones(1, 128, 128), mode)
    assert rel(sample(comfy_host, full, clip), sample(comfy_host, model, clip)) <= 1e-5


class IPAdapterStyleReplace:
    """Like ComfyUI_IPAdapter_plus's Attn2Replace: optimized_attention(q, k, v, heads) without
    transformer_options, plus its own term."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"]) + self.scale * torch.tanh(q)


def with_ip_style(model, scale: float = 0.5):
    m = model.clone()
    unet = m.model.diffusion_model
    keys = [("input", i) for i, b in enumerate(unet.input_blocks) if any(hasattr(x, "transformer_blocks") for x in b.modules())]
    keys += [("middle", 0)] + [("output", i) for i, b in enumerate(unet.output_blocks)
                               if any(hasattr(x, "transformer_blocks") for x in b.modules())]
    for key in keys:
        m.set_model_attn2_replace(IPAdapterStyleReplace(scale), *key)
    return m


def test_composes_with_ip_adapter_style_replace_in_either_order(comfy_host, sd15, cam_node):
    model, clip, _ = sd15
    mask = left_half()
    cam_only = sample(comfy_host, patch(cam_node, model, clip, mask), clip)
    ip_only = sample(comfy_host, with_ip_style(model), clip)
    cam_then_ip = sample(comfy_host, with_ip_style(patch(cam_node, model, clip, mask)), clip)
    ip_then_cam = sample(comfy_host, patch(cam_node, with_ip_style(model), clip, mask), clip)
    assert rel(cam_then_ip, ip_then_cam) <= 1e-5  # masking and the added term commute
    assert rel(cam_then_ip, ip_only) > 1e-4  # CAM's effect is there
    assert rel(cam_then_ip, cam_only) > 1e-4  # the replace's effect is there
    full = sample(comfy_host, with_ip_style(patch(cam_node, model, clip, torch.ones(1, 128, 128))), clip)
    assert rel(full, ip_only) <= 1e-5  # a full mask through the correction path is exact


def cam_prompt(ckpt_name: str, seed: int) -> dict:
    """The plain SD1.5 graph with a CAM node whose model and positive feed the KSampler."""
    prompt = harness.plain_sd15_prompt(ckpt_name, seed=seed, size=128, filename_prefix="xmgie_cam")
    prompt["8"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    prompt["9"] = {"class_type": "XMGIECrossAttentionMask", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "edit_words": "red scarf", "mask": ["8", 0],
        "mode": "renormalized", "threshold": 0.5, "strength": 1.0, "input_blocks": True, "middle_block": True,
        "output_blocks": True, "start_percent": 0.0, "end_percent": 1.0, "background_words": "snowy park"}}
    prompt["5"]["inputs"]["model"] = ["9", 0]
    prompt["5"]["inputs"]["positive"] = ["9", 1]
    return prompt


def test_cam_workflow_runs(runner, tiny_checkpoint):
    run = runner.run(cam_prompt(tiny_checkpoint.name, seed=11))
    assert len(run.images("7")) == 1


@pytest.mark.parametrize("other, named", [
    ("a photo of a snowman standing in a park", "'a photo of a snowman standing in a park'"),
    (", ".join(["a snowman standing in a park"] * 14), "154 tokens"),  # two chunks vs the node's one
])
def test_a_sampler_that_never_sees_the_nodes_prompt_stops(runner, tiny_checkpoint, other, named):
    """The issue's case: the KSampler's positive comes from another CLIP Text Encode. Sampling stops before the
    first step with an error that names the node's prompt and what the sampler got."""
    prompt = cam_prompt(tiny_checkpoint.name, seed=12)
    prompt["2"]["inputs"]["text"] = other
    prompt["5"]["inputs"]["positive"] = ["2", 0]
    with pytest.raises(harness.PromptFailed) as err:
        runner.run(prompt)
    message = str(err.value)
    assert f"prompt {PROMPT!r} never reaches the sampler" in message, message
    assert named in message and "'positive' output" in message, message
