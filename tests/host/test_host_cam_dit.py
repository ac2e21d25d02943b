"""CAM on ComfyUI's DiT editors (Flux / FLUX.1 Kontext, Qwen-Image(-Edit)) in a real ComfyUI: sampling with every
joint-attention call checked against the naive eqs 10-12, an all-ones mask equal to unpatched sampling, the MODEL
unchanged, an earlier attention override composed, the edit words' positions through the real T5-XXL and Qwen2.5-VL
tokenizers (with Qwen's chat template and TextEncodeQwenImageEditPlus's image placeholders), and user errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import tiny_dit as td
from test_cam_dit import joint_reference

PROMPT = "a man wearing a red scarf, standing in a snowy park"
STEPS, CFG = 3, 2.0


def tokenizer(family: str):
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy.text_encoders.qwen_image import QwenImageTokenizer

    return FluxTokenizer() if family == td.FLUX else QwenImageTokenizer()


def _embed(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """A deterministic stand-in for the text encoder's output: one row per token id."""
    return torch.sin(ids[:, None].double() * torch.arange(1, dim + 1) * 0.37).float()


class TinyTextClip:
    """The comfy.sd.CLIP surface the node uses, with the family's real ComfyUI tokenizer and a stand-in encoder (the
    real T5-XXL and Qwen2.5-VL 7B are too big to build): Flux's context is one row per T5 token, Qwen's drops the
    chat template's head as QwenImageTEModel does."""

    def __init__(self, family: str):
        self.family, self.tokenizer = family, tokenizer(family)

    def tokenize(self, text: str, **kwargs) -> dict:
        return self.tokenizer.tokenize_with_weights(text, **kwargs)

    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        dim = td.CONTEXT_DIM[self.family]
        if self.family == td.FLUX:
            ids = torch.tensor([t[0] for t in tokens["t5xxl"][0]])
            return [[_embed(ids, dim)[None], {"pooled_output": _embed(ids[:1], td.FLUX_TINY["vec_in_dim"]),
                                              "guidance": 2.5}]]
        ids = [t[0] for t in tokens["qwen25_7b"][0]]
        start = [i for i, t in enumerate(ids) if t == 151644][1] + 3  # "<|im_start|>user\n" and before: dropped
        return [[_embed(torch.tensor(ids[start:]), dim)[None], {}]]


@pytest.fixture(scope="module")
def node(comfy_host):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()


@pytest.fixture(scope="module")
def cam_dit(node):
    """The pack's hosts/comfy/cam_dit.py as ComfyUI loaded it."""
    package = sys.modules[type(node).__module__].__package__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.xmgie_core.hosts.comfy.cam_dit"]


@pytest.fixture(scope="module")
def models(comfy_host):
    return {family: td.tiny_dit_model(family) for family in (td.FLUX, td.QWEN)}


def half_mask() -> torch.Tensor:
    mask = torch.zeros(1, 64, 96)
    mask[:, :, :48] = 1
    return mask


def patch(node, model, family, mask=None, words="red scarf", background="snowy park", mode="renormalized",
          strength=1.0, **change):
    args = dict(model=model, clip=TinyTextClip(family), prompt=PROMPT, edit_words=words,
                mask=half_mask() if mask is None else mask, mode=mode, threshold=0.5, strength=strength,
                input_blocks=True, middle_block=True, output_blocks=True, start_percent=0.0, end_percent=1.0,
                background_words=background)
    return node.patch(**{**args, **change})


def with_reference(positive: list, z: torch.Tensor) -> list:
    """The editor's reference image (Kontext's ReferenceLatent / Qwen-Edit's), appended as those nodes do."""
    return [[c, {**extras, "reference_latents": [z]}] for c, extras in positive]


def sample(model, positive, negative, z) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return guider.sample(comfy.sample.prepare_noise(z, 0), z, comfy.samplers.sampler_object("euler"), sigmas,
                         seed=0, disable_pbar=True)


def conds(family: str, positive: list, z: torch.Tensor) -> tuple[list, list]:
    """The positive with the reference latent, and a negative of the same length (batched with it in one forward)."""
    negative = td.conditioning(family, tokens=positive[0][0].shape[1], seed=5, reference=z)
    return with_reference(positive, z), negative


def spy_on(model, cam_dit, family, checked: list):
    """A clone whose attention override runs CAM's and checks each result against the naive eqs 10-12 over the
    joint sequence (masked rows) or plain attention (other batch rows)."""
    spied = model.clone()
    to = spied.model_options["transformer_options"]
    cam = to["optimized_attention_override"]
    spec = cam.spec

    def spy(func, *args, **kwargs):
        out = cam(func, *args, **kwargs)
        q, k, v, heads = args[:4]
        if kwargs.get("skip_reshape"):
            q, k, v = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k, v))
        options = kwargs["transformer_options"]
        level = options.get(cam_dit.LEVEL)
        rows = options[cam_dit.ROWS].rows.tolist() if level is None or level in spec.levels else []
        geometry = options[cam_dit.dit_seam.GEOMETRY]
        grid = geometry.joint
        region = spec.region.grid(grid.h, grid.w)
        masked = joint_reference(q, k, v, heads, geometry.text, grid.count, region, spec.edit_positions,
                                 spec.background_positions, spec.strength, spec.mode)
        plain = joint_reference(q, k, v, heads, geometry.text, grid.count, region, [], [], 1.0, spec.mode)
        want = torch.stack([masked[i] if i in rows else plain[i] for i in range(q.shape[0])])
        assert torch.allclose(out.double(), want, atol=1e-4), (out.double() - want).abs().max()
        cond_row = options["cond_or_uncond"].index(0) * (q.shape[0] // len(options["cond_or_uncond"]))
        checked.append((q.shape[0], tuple(rows), cond_row, float((masked - plain)[rows].abs().max()) if rows else 0))
        return out

    to["optimized_attention_override"] = spy
    return spied


def _fingerprint(model) -> tuple:
    return ({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}, repr(model.model_options))


def _same(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
@pytest.mark.parametrize("family", [td.FLUX, td.QWEN])
def test_every_joint_attention_call_is_eqs_10_12(node, cam_dit, models, family, mode):
    model = models[family]
    before = _fingerprint(model)
    patched, positive = patch(node, model, family, mode=mode, strength=0.8 if mode == "paper" else 1.0)
    z = td.latent(family, 8, 12)
    positive, negative = conds(family, positive, z)
    checked: list = []
    edited = sample(spy_on(patched, cam_dit, family, checked), positive, negative, z)
    blocks = 4 if family == td.FLUX else 3
    assert len(checked) == STEPS * blocks  # cond and uncond batched: one forward per step
    assert all(batch == 2 and rows == (cond_row,) for batch, rows, cond_row, _ in checked)  # the positive's row only
    assert max(change for *_, change in checked) > 1e-3  # the words' columns were really masked
    unpatched = sample(model, positive, negative, z)
    assert (edited - unpatched).abs().max() > 1e-4
    assert _same(before, _fingerprint(model))  # the MODEL is never modified


@pytest.mark.parametrize("family", [td.FLUX, td.QWEN])
def test_level_switches_select_thirds_of_the_blocks(node, cam_dit, models, family):
    """output_blocks alone: only the last third of the blocks is masked (Flux's 2 + 2 blocks: single_block 1; Qwen's
    3 blocks: the third)."""
    patched, positive = patch(node, models[family], family, input_blocks=False, middle_block=False)
    z = td.latent(family, 8, 12)
    positive, negative = conds(family, positive, z)
    checked: list = []
    sample(spy_on(patched, cam_dit, family, checked), positive, negative, z)
    blocks = 4 if family == td.FLUX else 3
    masked = [i % blocks for i, (_, rows, _, _) in enumerate(checked) if rows]
    assert masked == [blocks - 1] * STEPS


@pytest.mark.parametrize("family", [td.FLUX, td.QWEN])
def test_all_ones_mask_is_unpatched_sampling(node, models, family):
    model = models[family]
    before = _fingerprint(model)
    patched, positive = patch(node, model, family, mask=torch.ones(1, 64, 96), background="")
    z = td.latent(family, 8, 12)
    positive, negative = conds(family, positive, z)
    edited = sample(patched, positive, negative, z)
    assert torch.allclose(edited, sample(model, positive, negative, z), atol=1e-5)
    assert _same(before, _fingerprint(model))


@pytest.mark.parametrize("family", [td.FLUX, td.QWEN])
def test_composes_with_an_earlier_override(node, cam_dit, models, family):
    calls = []

    def theirs(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    earlier = models[family].clone()
    earlier.model_options["transformer_options"]["optimized_attention_override"] = theirs
    before = repr(earlier.model_options)
    patched, positive = patch(node, earlier, family)
    z = td.latent(family, 8, 12)
    positive, negative = conds(family, positive, z)
    checked: list = []
    edited = sample(spy_on(patched, cam_dit, family, checked), positive, negative, z)
    alone = sample(patch(node, models[family], family)[0], positive, negative, z)
    assert torch.allclose(edited, alone, atol=1e-6) and len(checked) > 0
    assert len(calls) == 2 * len(checked)  # theirs ran the uncond row and the positive's text / reference rows
    assert repr(earlier.model_options) == before


def test_flux_positions_are_t5_tokens():
    from xmgie_core.hosts.comfy.tokens import dit_token_positions

    clip = TinyTextClip(td.FLUX)
    tokens = clip.tokenize(PROMPT)["t5xxl"][0]
    positions = dit_token_positions(clip, td.FLUX, PROMPT, "red scarf", len(tokens))
    t5 = clip.tokenizer.t5xxl
    assert [tokens[p][0] for p in positions] == t5.tokenizer("red scarf")["input_ids"][:-1]  # no </s>
    weighted = "a man wearing a (red scarf:1.3), standing in a snowy park"
    assert dit_token_positions(clip, td.FLUX, weighted, "red scarf", len(tokens)) == positions
    with pytest.raises(ValueError, match="conditioning has 77 tokens.*256 T5-XXL tokens"):
        dit_token_positions(clip, td.FLUX, PROMPT, "red scarf", 77)


def comfy_qwen_encoding(tokens: dict, vision_tokens: int, monkeypatch) -> list:
    """What ComfyUI's QwenImageTEModel.encode_token_weights keeps of a token list (its own template slicing), with a
    stand-in for the language model: each kept position holds its token id, an image placeholder `vision_tokens`
    copies of -1."""
    from comfy import sd1_clip
    from comfy.text_encoders.qwen_image import QwenImageTEModel

    def language_model(self, pairs):
        ids = [t for t, *_ in pairs["qwen25_7b"][0] for t in ([-1] * vision_tokens if isinstance(t, dict) else [t])]
        return torch.tensor(ids, dtype=torch.float32)[None, :, None], None, {"attention_mask": torch.ones(1, len(ids))}

    monkeypatch.setattr(sd1_clip.SD1ClipModel, "encode_token_weights", language_model)
    out, _, _ = QwenImageTEModel.encode_token_weights(object.__new__(QwenImageTEModel), tokens)
    return [int(t) for t in out[0, :, 0]]


def test_qwen_positions_through_the_chat_template_and_image_placeholders(monkeypatch):
    from xmgie_core.hosts.comfy.tokens import dit_token_positions

    clip = TinyTextClip(td.QWEN)
    qwen = clip.tokenizer.qwen25_7b.tokenizer
    want = qwen(" red scarf")["input_ids"]
    own = comfy_qwen_encoding(clip.tokenize(PROMPT), 0, monkeypatch)
    positions = dit_token_positions(clip, td.QWEN, PROMPT, "red scarf", len(own))
    assert [own[p] for p in positions] == want
    # TextEncodeQwenImageEditPlus: its template, two images (placeholders become many vision tokens)
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
    import inspect

    template = inspect.getsource(TextEncodeQwenImageEditPlus.execute).split('llama_template = "')[1].split('"\n')[0]
    template = template.encode().decode("unicode_escape")
    images = "".join(f"Picture {i}: <|vision_start|><|image_pad|><|vision_end|>" for i in (1, 2))
    plus = clip.tokenize(images + PROMPT, images=[torch.zeros(1, 8, 8, 3)] * 2, llama_template=template)
    encoded = comfy_qwen_encoding(plus, 37, monkeypatch)
    positions = dit_token_positions(clip, td.QWEN, PROMPT, "red scarf", len(encoded))
    assert [encoded[p] for p in positions] == want and -1 in encoded[:min(positions)]
    with pytest.raises(ValueError, match="'texture' cannot be located"):  # a word of the system prompt only
        dit_token_positions(clip, td.QWEN, PROMPT, "texture", len(own))
    with pytest.raises(ValueError, match=rf"conditioning has {len(own) - 1} tokens.*or more, with images"):
        dit_token_positions(clip, td.QWEN, PROMPT, "red scarf", len(own) - 1)


@pytest.mark.parametrize("family", [td.FLUX, td.QWEN])
def test_user_errors(node, models, family):
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    sd3_model = object.__new__(OpenAISignatureMMDITWrapper)  # ComfyUI's SD3 class (its attributes are not needed)
    sd3 = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=sd3_model))
    with pytest.raises(ValueError, match="diffusion model is a OpenAISignatureMMDITWrapper.*Load one of those"):
        patch(node, sd3, family)
    with pytest.raises(ValueError, match="'blue hat' cannot be located in the prompt"):
        patch(node, models[family], family, words="blue hat")
    text = "a red scarf " * 80 if family == td.FLUX else "a scarf"  # longer than T5's 256 / shorter than the prompt
    other = TinyTextClip(family).encode_from_tokens_scheduled(TinyTextClip(family).tokenize(text))
    with pytest.raises(ValueError, match="conditioning has .* tokens, but the prompt .* encodes to"):
        patch(node, models[family], family, positive=other)
    wrong = TinyTextClip(td.QWEN if family == td.FLUX else td.FLUX)
    with pytest.raises(ValueError, match="not the model's text encoder.*DualCLIPLoader"):
        patch(node, models[family], family, clip=wrong)


@pytest.mark.parametrize("family", [td.FLUX, td.QWEN])
def test_sampler_without_the_node_s_prompt_stops(node, models, family):
    patched, positive = patch(node, models[family], family)
    z = td.latent(family, 8, 12)
    other = td.conditioning(family, tokens=positive[0][0].shape[1], seed=9, reference=z)
    with pytest.raises(ValueError, match="never reaches the sampler"):
        sample(patched, other, conds(family, positive, z)[1], z)
