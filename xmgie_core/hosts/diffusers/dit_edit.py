"""PFB (eqs 5, 23) and CAM (eqs 10-12) on diffusers' DiT editor pipelines, run through the pipeline's own __call__
(its text encoding, reference-image tokens, scheduler, CFG and decoding unchanged). The least invasive way in:

- the edit starts from latents we pass (`latents=`, `sigmas=`): the pipeline's own seeded noise (randn_tensor with
  the caller's seed, so a full mask gives exactly the pipeline's output), or, with denoise < 1, the source noised to
  the first sigma of the schedule's tail (flow matching: x = (1 - sigma) z + sigma n);
- a forward pre-hook on the transformer sees each of the pipeline's transformer calls: it reads sigma (the
  pipelines pass timestep / 1000 = sigma), gets the source branch's features for that sigma (xmgie_core.pfb:
  cache, or one source pass = the same call with the generated tokens replaced by x_src(sigma) =
  (1 - sigma) z + sigma n_fixed and the text by the source description's, stopped after the deepest blended block),
  and arms the blender for the call; CAM masks only the call whose text is the edit prompt's;
- forward hooks on the blended blocks (dit.block_hooks) blend the generated tokens only (eq 5);
- `callback_on_step_end` keeps the latent outside the mask on the source trajectory (eq 23) while the latent blend
  lasts (to the end: outside = the source latent exactly).
Hooks and processors are removed after the call, also on error: the pipeline's model is left as it was.
Supported: FLUX.1 Kontext (FluxKontextPipeline) and Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline). Only the
`noised` source branch (the inversion needs the pipeline's per-call inputs before the call; not done yet).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import copy

import numpy as np
import torch

from ...cam import TokenRestriction
from ...errors import XMGIEInputError
from ...masks import RegionPyramid
from ...pfb import FeatureBlender, FeatureRecorder, PFBSettings, latent_blend
from ...pfb import run as pfb_run
from ...tokens import locate_phrases, parse_words
from . import dit
from .tokens import hf_token_positions

KONTEXT, QWEN_EDIT = "kontext", "qwen-edit"
PIPELINES = {KONTEXT: "FluxKontextPipeline", QWEN_EDIT: "QwenImageEditPlusPipeline"}


@dataclass
class DiTEditor:
    """A loaded DiT editor pipeline and where it came from (the report's checkpoint)."""

    pipe: Any
    editor: str
    source: str
    tiny: bool = False


@dataclass
class CAMSettings:
    """CAM on the edit prompt's joint attention: the restriction (positions in the encoded edit prompt), the region
    (MASK at the image's size) and the mode."""

    restriction: TokenRestriction
    mask: torch.Tensor
    mode: str = "renormalized"


def flow_sigma(scheduler, mu: float, t: float) -> float:
    """The scheduler's shifted sigma for the unshifted time t in [0, 1] (FlowMatchEulerDiscreteScheduler: the
    resolution-dependent shift with `mu`, else the static shift; a terminal stretch is left out): PFB's schedule
    fractions -> sigma."""
    if scheduler.config.use_dynamic_shifting:
        return float(scheduler.time_shift(mu, 1.0, torch.tensor(float(t), dtype=torch.float64)))
    s = scheduler.config.shift
    return s * t / (1 + (s - 1) * t)


def pipeline_sigmas(scheduler, unshifted: list[float], mu: float) -> list[float]:
    """The sigmas the pipeline's scheduler will step through for `unshifted` (set on a copy), ending with 0."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(sigmas=unshifted, mu=mu)
    return [float(s) for s in probe.sigmas]


def flow_noise_scaling(sigma: float, noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Flow matching's noised latent: (1 - sigma) z + sigma n."""
    return (1 - sigma) * z + sigma * noise


def to_pil(pixels: torch.Tensor):
    """IMAGE [1, H, W, 3] -> an 8-bit PIL image (what the Qwen pipeline's processors take)."""
    from PIL import Image

    return Image.fromarray((pixels[0, ..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


class _Kontext:
    """What is FluxKontextPipeline's own: image and prompt encoding, the prompt's token positions, the call."""

    tokens = 512
    """T5's padded length (max_sequence_length)."""

    def __init__(self, pipe, pixels: torch.Tensor):
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

        self.pipe, self.pixels, self.calculate_shift = pipe, pixels, calculate_shift

    def encode_image(self) -> torch.Tensor:
        """The latent [1, 16, h, w] the pipeline makes its reference tokens of ((mode - shift) * scale)."""
        p, x = self.pipe, self.pixels
        x = p.image_processor.preprocess(x.movedim(-1, 1), x.shape[1], x.shape[2])
        return p._encode_vae_image(x.to(p.transformer.device, p.vae.dtype), generator=None)

    def noise_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        return tuple(z.shape)

    def encode_prompt(self, text: str) -> dict:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, device=self.pipe.transformer.device,
                                                    max_sequence_length=self.tokens)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def positions(self, prompt: str, words: str, what: str) -> list[int]:
        return hf_token_positions(self.pipe.tokenizer_2, prompt, words, self.tokens, what)

    def call_args(self, z: torch.Tensor, target: dict, cfg: float) -> dict:
        """Kontext's cfg is its distilled guidance (no true CFG, one transformer call per step)."""
        h, w = (s * self.pipe.vae_scale_factor for s in z.shape[-2:])
        return dict(image=z, prompt_embeds=target["encoder_hidden_states"],
                    pooled_prompt_embeds=target["pooled_projections"], guidance_scale=cfg, height=h, width=w,
                    max_area=h * w, _auto_resize=False, max_sequence_length=self.tokens)


class _QwenEdit:
    """What is QwenImageEditPlusPipeline's own: it takes the photo as a PIL image (its Qwen2.5-VL reads it at
    ~384^2, its VAE at ~1 MP for the reference tokens), the prompt in its chat template with the image placeholder,
    and true CFG against a negative prompt."""

    negative = " "
    """The negative prompt of Qwen-Image-Edit's model card."""

    def __init__(self, pipe, pixels: torch.Tensor):
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        self.pipe, self.pixels, self.module = pipe, pixels, module
        self.calculate_shift = module.calculate_shift
        self.image = to_pil(pixels)
        w, h = module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, self.image.width / self.image.height)
        self.condition = [pipe.image_processor.resize(self.image, h, w)]

    def encode_image(self) -> torch.Tensor:
        """The source latent [1, 16, 1, h, w] at the edit's own size (normalised as the pipeline's)."""
        p, x = self.pipe, self.pixels
        x = p.image_processor.preprocess(x.movedim(-1, 1), x.shape[1], x.shape[2])[:, :, None]
        return p._encode_vae_image(x.to(p.transformer.device, p.vae.dtype), generator=None)

    def noise_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        """The pipeline draws [B, 1, C, h, w] (the same values in memory order as z's [B, C, 1, h, w])."""
        return (z.shape[0], 1, z.shape[1], *z.shape[-2:])

    def encode_prompt(self, text: str) -> dict:
        embeds, mask = self.pipe.encode_prompt(prompt=text, image=self.condition, device=self.pipe.transformer.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def positions(self, prompt: str, words: str, what: str) -> list[int]:
        """Positions in the encoded prompt as the pipeline builds it: chat template, 'Picture 1:' with the image
        placeholder expanded to the condition image's tokens, the first prompt_template_encode_start_idx tokens
        dropped."""
        p = self.pipe
        text = p.prompt_template_encode.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + prompt)
        ids = p.processor(text=[text], images=self.condition, padding=True)["input_ids"][0]
        ids = list(ids)[p.prompt_template_encode_start_idx:]
        tokenizer = p.tokenizer
        phrases = {w: [t for t in tokenizer(w)["input_ids"] if t not in tokenizer.all_special_ids]
                   for w in parse_words(words)}
        if not phrases:
            raise XMGIEInputError(f"No {what} given: write the words to localize, e.g. 'red scarf'.")
        inverse = {v: k for k, v in tokenizer.get_vocab().items()}
        return locate_phrases([ids], phrases, set(tokenizer.all_special_ids), lambda t: inverse.get(t, ""), what)

    def call_args(self, z: torch.Tensor, target: dict, cfg: float) -> dict:
        """Qwen-Edit's cfg is its true CFG scale, against `negative`."""
        h, w = (s * self.pipe.vae_scale_factor for s in z.shape[-2:])
        neg = self.encode_prompt(self.negative)
        return dict(image=self.image, prompt_embeds=target["encoder_hidden_states"], prompt_embeds_mask=_mask(target),
                    true_cfg_scale=cfg, negative_prompt_embeds=neg["encoder_hidden_states"],
                    negative_prompt_embeds_mask=_mask(neg), height=h, width=w)


def _mask(prompt: dict) -> torch.Tensor:
    """The prompt's padding mask as the pipeline wants it back (encode_prompt returns None for an unpadded one)."""
    mask = prompt["encoder_hidden_states_mask"]
    embeds = prompt["encoder_hidden_states"]
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask


def family(editor: DiTEditor, pixels: torch.Tensor):
    """The editor's own pieces for one photo IMAGE [1, H, W, 3]."""
    return (_Kontext if editor.editor == KONTEXT else _QwenEdit)(editor.pipe, pixels)


def restriction(editor: DiTEditor, pixels: torch.Tensor, prompt: str, edit_words: list[str],
                background_words: list[str] = ()) -> TokenRestriction:
    """CAM's token positions in the editor's encoding of `prompt` (T5's for Kontext; Qwen2.5-VL's chat template
    with the image placeholder for Qwen-Edit)."""
    f = family(editor, pixels)
    edit = f.positions(prompt, ", ".join(edit_words), "edit words")
    back = f.positions(prompt, ", ".join(background_words), "background words") if background_words else []
    return TokenRestriction(torch.tensor(edit), torch.tensor(back, dtype=torch.long))


class _Blocks:
    """hook(layer, h) for the block hooks: the current target (the blender of the edit call, or the source pass's
    recorder), or nothing."""

    target = None

    def __call__(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        return self.target(layer, h) if self.target is not None else h


@torch.no_grad()
def dit_edit(editor: DiTEditor, pixels: torch.Tensor, target: str, source: str, settings: PFBSettings,
             cam: CAMSettings | None = None, steps: int = 28, cfg: float = 2.5, denoise: float = 1.0,
             seed: int = 0) -> torch.Tensor:
    """Edit IMAGE `pixels` [1, H, W, 3] (H, W multiples of 16) with the DiT editor, PFB and CAM; returns the decoded
    IMAGE [1, H, W, 3] (0..1, float32, CPU). `cfg` is Kontext's distilled guidance, Qwen-Edit's true CFG scale
    (both of its calls per step are blended, only the edit prompt's is masked)."""
    from diffusers.utils.torch_utils import randn_tensor

    if settings.source_mode != "noised":
        raise XMGIEInputError(f"The DiT editors' source branch is 'noised' only headless (got "
                              f"{settings.source_mode!r}): use source_mode 'noised'.")
    own, pipe = family(editor, pixels), editor.pipe
    transformer = pipe.transformer
    blocks = dit.require_dit(transformer, "The pipeline's transformer")
    z = own.encode_image()
    grid = dit.token_grid(z)
    mu = own.calculate_shift(grid.count, *(pipe.scheduler.config.get(k, d) for k, d in (
        ("base_image_seq_len", 256), ("max_image_seq_len", 4096), ("base_shift", 0.5), ("max_shift", 1.15))))
    plan = pfb_run.plan(settings, blocks.layout(), z, z.shape[1], lambda p: flow_sigma(pipe.scheduler, mu, 1 - p))
    unshifted = [float(t) for t in np.linspace(1.0, 1 / steps, steps)[steps - max(1, round(steps * denoise)):]]
    schedule = pipeline_sigmas(pipe.scheduler, unshifted, mu)
    cond, src = own.encode_prompt(target), own.encode_prompt(source)
    noise = randn_tensor(own.noise_shape(z), generator=torch.Generator().manual_seed(seed), device=z.device,
                         dtype=cond["encoder_hidden_states"].dtype).reshape(z.shape)
    start = dit.pack(flow_noise_scaling(schedule[0], noise, z.to(noise.dtype)) if schedule[0] < 1 else noise)
    m = plan.latent_mask(*z.shape[-2:], z.device, z.ndim)
    hook, current = _Blocks(), {}
    joint = None if cam is None else dit.JointCAM(cam.restriction, RegionPyramid(cam.mask), grid, cam.mode)

    def run_pass(x: torch.Tensor, sigma: float, recorder: FeatureRecorder) -> torch.Tensor:
        """One source pass: the edit call's inputs with the generated tokens at x and the source description."""
        kwargs = dict(current["kwargs"])
        image = kwargs["hidden_states"]
        kwargs["hidden_states"] = torch.cat([dit.pack(x).to(image.dtype), image[:, grid.count:]], dim=1)
        kwargs.update(src)
        current["source"], hook.target = True, recorder
        if joint is not None:
            joint.active = False
        try:
            velocity = transformer(**kwargs)[0][:, :grid.count]
        finally:
            current["source"] = False
        return x - sigma * dit.unpack(velocity, x)

    branch = pfb_run.open_source_branch(settings, plan, z, schedule, schedule[-2], run_pass,
                                        ("diffusers-dit", id(transformer), src, cfg), (transformer,), z.device,
                                        flow_noise_scaling)

    def before_call(module, args, kwargs):
        """Each of the pipeline's transformer calls: arm the blender with this sigma's source features (and CAM
        on the edit prompt's call); the source pass's own (re-entrant) call passes through."""
        if current.get("source"):
            return None
        sigma = float(kwargs["timestep"].flatten()[0])
        layers = plan.active_layers(sigma)
        current["kwargs"] = kwargs
        features = branch.features(sigma) if layers else {}
        hook.target = FeatureBlender(plan, features, layers) if layers else None
        if joint is not None:
            text = kwargs["encoder_hidden_states"]
            joint.text, joint.active = text.shape[1], _same(text, cond["encoder_hidden_states"])
        return None

    def after_step(pipeline, i: int, t, outputs: dict) -> dict:
        """Eq 23 after step i, towards the source trajectory at the next sigma (the source latent at the end)."""
        if not plan.latent_active(schedule[i]):
            return {}
        x = dit.unpack(outputs["latents"], z)
        x_src = branch.trajectory(schedule[i + 1]) if schedule[i + 1] > 0 else z
        return {"latents": dit.pack(latent_blend(x, x_src.to(x.dtype), m))}

    with ExitStack() as stack:
        stack.enter_context(dit.block_hooks(blocks, list(plan.layers), grid, hook))
        if joint is not None:
            stack.enter_context(dit.joint_attention_processors(transformer, joint))
        handle = transformer.register_forward_pre_hook(before_call, with_kwargs=True)
        stack.callback(handle.remove)
        out = pipe(**own.call_args(z, cond, cfg), latents=start, sigmas=unshifted, num_inference_steps=len(unshifted),
                   callback_on_step_end=after_step, output_type="pt").images
    return out.float().cpu().movedim(1, -1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
