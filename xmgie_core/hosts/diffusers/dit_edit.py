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
Supported: FLUX.1 Kontext (FluxKontextPipeline). Only the `noised` source branch (the inversion needs the
pipeline's per-call inputs before the call; not done yet).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...cam import TokenRestriction
from ...errors import XMGIEInputError
from ...masks import RegionPyramid
from ...pfb import FeatureBlender, FeatureRecorder, PFBSettings, latent_blend
from ...pfb import run as pfb_run
from . import dit

KONTEXT, QWEN_EDIT = "kontext", "qwen-edit"
PIPELINES = {KONTEXT: "FluxKontextPipeline", QWEN_EDIT: "QwenImageEditPlusPipeline"}


@dataclass
class DiTEditor:
    """A loaded DiT editor pipeline and where it came from (the report's checkpoint)."""

    pipe: Any
    editor: str
    source: str
    tiny: bool = False

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype


@dataclass
class CAMSettings:
    """CAM on the edit prompt's joint attention: the restriction (positions in the encoded edit prompt), the region
    (MASK at the image's size) and the mode."""

    restriction: TokenRestriction
    mask: torch.Tensor
    mode: str = "renormalized"


def flow_sigma(scheduler, mu: float, t: float) -> float:
    """The scheduler's shifted sigma for the unshifted time t in [0, 1] (FlowMatchEulerDiscreteScheduler: the
    resolution-dependent shift with `mu`, else the static shift)."""
    if scheduler.config.use_dynamic_shifting:
        return float(scheduler.time_shift(mu, 1.0, torch.tensor(float(t), dtype=torch.float64)))
    s = scheduler.config.shift
    return s * t / (1 + (s - 1) * t)


def flow_noise_scaling(sigma: float, noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Flow matching's noised latent: (1 - sigma) z + sigma n."""
    return (1 - sigma) * z + sigma * noise


class _Kontext:
    """What is FluxKontextPipeline's own: image encoding, prompt encoding, the call's arguments."""

    tokens = 512
    """T5's padded length (max_sequence_length)."""

    def __init__(self, pipe):
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

        self.pipe, self.calculate_shift = pipe, calculate_shift

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE [1, H, W, 3] -> the latent the pipeline gives its reference tokens ((mode - shift) * scale)."""
        p = self.pipe
        x = p.image_processor.preprocess(pixels.movedim(-1, 1), pixels.shape[1], pixels.shape[2])
        return p._encode_vae_image(x.to(p.transformer.device, p.vae.dtype), generator=None)

    def encode_prompt(self, text: str) -> dict:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, device=self.pipe.transformer.device,
                                                    max_sequence_length=self.tokens)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def call_args(self, z: torch.Tensor, target: dict, negative: dict | None, guidance: float) -> dict:
        h, w = (s * self.pipe.vae_scale_factor for s in z.shape[-2:])
        args = dict(image=z, prompt_embeds=target["encoder_hidden_states"],
                    pooled_prompt_embeds=target["pooled_projections"], guidance_scale=guidance, height=h, width=w,
                    max_area=h * w, _auto_resize=False, max_sequence_length=self.tokens)
        if negative is not None:
            args.update(negative_prompt_embeds=negative["encoder_hidden_states"],
                        negative_pooled_prompt_embeds=negative["pooled_projections"])
        return args

    def tokenizer(self):
        return self.pipe.tokenizer_2


def _family(editor: DiTEditor):
    if editor.editor == KONTEXT:
        return _Kontext(editor.pipe)
    raise XMGIEInputError(f"--editor {editor.editor} is not available headless yet; use --editor kontext or sd15.")


class _Blocks:
    """hook(layer, h) for the block hooks: the current target (the blender of the edit call, or the source pass's
    recorder), or nothing."""

    target = None

    def __call__(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        return self.target(layer, h) if self.target is not None else h


@torch.no_grad()
def dit_edit(editor: DiTEditor, pixels: torch.Tensor, target: str, source: str, settings: PFBSettings,
             cam: CAMSettings | None = None, steps: int = 28, guidance: float = 2.5, denoise: float = 1.0,
             seed: int = 0, negative: str | None = None, true_cfg: float = 1.0) -> torch.Tensor:
    """Edit IMAGE `pixels` [1, H, W, 3] (H, W multiples of 16) with the DiT editor, PFB and CAM; returns the decoded
    IMAGE [1, H, W, 3] (0..1, float32, CPU). `guidance` is Kontext's distilled guidance; `true_cfg` > 1 with a
    `negative` prompt runs the pipeline's true CFG (both calls blended, only the edit prompt's masked)."""
    from diffusers.utils.torch_utils import randn_tensor

    if settings.source_mode != "noised":
        raise XMGIEInputError(f"The DiT editors' source branch is 'noised' only headless (got "
                              f"{settings.source_mode!r}): use source_mode 'noised'.")
    family, pipe = _family(editor), editor.pipe
    transformer = pipe.transformer
    blocks = dit.require_dit(transformer, "The pipeline's transformer")
    z = family.encode_image(pixels)
    grid = dit.token_grid(z)
    plan_mu = family.calculate_shift(grid.count, *(pipe.scheduler.config.get(k, d) for k, d in (
        ("base_image_seq_len", 256), ("max_image_seq_len", 4096), ("base_shift", 0.5), ("max_shift", 1.15))))
    plan = pfb_run.plan(settings, blocks.layout(), z, z.shape[1], lambda p: flow_sigma(pipe.scheduler, plan_mu, 1 - p))
    unshifted = np.linspace(1.0, 1 / steps, steps)[steps - max(1, round(steps * denoise)):]
    schedule = [flow_sigma(pipe.scheduler, plan_mu, t) for t in unshifted] + [0.0]
    cond, src = family.encode_prompt(target), family.encode_prompt(source)
    neg = family.encode_prompt(negative) if negative is not None and true_cfg > 1 else None
    noise = randn_tensor(tuple(z.shape), generator=torch.Generator().manual_seed(seed), device=z.device,
                         dtype=cond["encoder_hidden_states"].dtype)
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

    branch = None

    def before_call(module, args, kwargs):
        nonlocal branch
        if current.get("source"):
            return None
        sigma = float(kwargs["timestep"].flatten()[0])
        if branch is None:
            branch = pfb_run.open_source_branch(settings, plan, z, schedule, schedule[-2], run_pass,
                                                ("diffusers-dit", id(transformer), src, guidance),
                                                (transformer,), z.device, flow_noise_scaling)
        layers = plan.active_layers(sigma)
        current["kwargs"] = kwargs
        features = branch.features(sigma) if layers else {}
        hook.target = FeatureBlender(plan, features, layers) if layers else None
        if joint is not None:
            text = kwargs["encoder_hidden_states"]
            joint.text, joint.active = text.shape[1], _same(text, cond["encoder_hidden_states"])
        return None

    def after_step(pipeline, i: int, t, outputs: dict) -> dict:
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
        out = pipe(**family.call_args(z, cond, neg, guidance), latents=start, sigmas=list(unshifted),
                   true_cfg_scale=true_cfg, callback_on_step_end=after_step, output_type="pt").images
    return out.float().cpu().movedim(1, -1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
