"""The seam for ComfyUI's DiT editors: Flux / FLUX.1 Kontext (comfy/ldm/flux/model.py) and Qwen-Image /
Qwen-Image-Edit (comfy/ldm/qwen_image/model.py). It answers, for their blocks and tokens, what `unet.py` answers for
the U-Net: which blocks are fusion points (PFB's layers `double_k`, `single_k`), where the generated image's tokens
sit in each block's sequences (xmgie_core.token_grid), and how a technique hooks in without touching the MODEL
(docs/comfyui-internals.md §8):

- a DIFFUSION_MODEL wrapper (`GeometryWrapper`) reads each forward's latent and text shapes and puts the token
  geometry into a copy of that forward's transformer_options (key GEOMETRY), where block patches and the attention
  override find it;
- block replace patches `patches_replace["dit"][("double_block", i)]` / `[("single_block", i)]` (`TokenPatch`) run
  the block (or the patch that held the slot before, so other packs' patches compose) and hand the generated
  image's tokens, laid out [B, D, h, w], to hook(layer, h). Text and reference-image tokens are never passed on.

Both families are flow-matching models (CONST sampling: x = (1 - sigma) x0 + sigma noise), whose noise_scaling is
affine in the noise like the U-Net's, so `unet.noise_for` and the Karras ODE d = (x - D) / sigma hold unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import XMGIEInputError
from ...pfb import BlockLayout
from ...token_grid import TokenGrid

Hook = Callable[[str, torch.Tensor], torch.Tensor]
FLUX, QWEN_IMAGE = "flux", "qwen_image"
GEOMETRY = "xmgie_dit_geometry"
"""transformer_options key of the current forward's Geometry."""
DIFFUSION_MODEL = "diffusion_model"
"""comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL."""
_OPTIONS_INDEX = {FLUX: 7, QWEN_IMAGE: 6}
"""Position of transformer_options in the DIFFUSION_MODEL wrapper's arguments: Flux.forward passes (x, timestep,
context, y, guidance, ref_latents, control, transformer_options), QwenImageTransformer2DModel.forward (x, timestep,
context, attention_mask, guidance, ref_latents, transformer_options)."""


@dataclass(frozen=True)
class DiT:
    """A DiT editor's block structure: `double` joint blocks (Flux double_blocks, Qwen transformer_blocks), `single`
    Flux single-stream blocks, patch size p."""

    family: str
    double: int
    single: int
    patch: int

    def layout(self) -> BlockLayout:
        return BlockLayout.from_dit(self.double, self.single, self.patch)

    def block_key(self, layer: str) -> tuple[str, int]:
        """The patches_replace["dit"] key of a layer: double_k -> ("double_block", k), single_k -> ("single_block", k)."""
        kind, k = layer.rsplit("_", 1)
        return f"{kind}_block", int(k)

    def describe(self) -> str:
        name = "Flux / FLUX.1 Kontext" if self.family == FLUX else "Qwen-Image / Qwen-Image-Edit"
        single = f" and {self.single} single-stream blocks" if self.single else ""
        return f"{name} ({self.double} double-stream{single})"


def find(diffusion_model: torch.nn.Module) -> DiT | None:
    """The DiT structure of a diffusion model, or None when it is not a DiT this pack supports."""
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks"):
        return DiT(FLUX, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks),
                   int(diffusion_model.patch_size))
    if hasattr(diffusion_model, "transformer_blocks") and hasattr(diffusion_model, "txt_norm"):
        return DiT(QWEN_IMAGE, len(diffusion_model.transformer_blocks), 0, int(diffusion_model.patch_size))
    return None


def is_unet(diffusion_model: torch.nn.Module) -> bool:
    return all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def require_dit(diffusion_model: torch.nn.Module, technique: str, instead: str) -> DiT:
    """The model's DiT structure; a U-Net or another architecture gets a sentence saying what to use instead."""
    found = find(diffusion_model)
    if found is None:
        kind = "an SD U-Net" if is_unet(diffusion_model) else f"a {type(diffusion_model).__name__}"
        raise XMGIEInputError(f"{technique}, but this model's diffusion model is {kind}, not Flux / FLUX.1 Kontext "
                              f"or Qwen-Image(-Edit): {instead}.")
    return found


def check_supported(diffusion_model: torch.nn.Module, technique: str) -> None:
    """A U-Net or a supported DiT passes; any other architecture (SD3, HunyuanDiT, video models ...) is named."""
    if not is_unet(diffusion_model) and find(diffusion_model) is None:
        raise XMGIEInputError(f"{technique} supports SD1.x / SD2 / SDXL U-Nets, Flux / FLUX.1 Kontext and "
                              f"Qwen-Image(-Edit); this model's diffusion model is a "
                              f"{type(diffusion_model).__name__}. Load one of those checkpoints.")


# ------------------------------------------------------------------------------------------ geometry

@dataclass(frozen=True)
class Geometry:
    """One forward's token layout: `text` text tokens, the generated image on `grid` (double-stream image stream,
    starting at 0), reference-image tokens after it."""

    text: int
    grid: TokenGrid

    @property
    def joint(self) -> TokenGrid:
        """The generated tokens in the joint sequence [text | generated | references]."""
        return self.grid.shifted(self.text)


class GeometryWrapper:
    """DIFFUSION_MODEL wrapper: puts the forward's Geometry into a copy of its transformer_options."""

    def __init__(self, dit: DiT):
        self.dit = dit

    def __deepcopy__(self, memo: dict) -> "GeometryWrapper":
        return self

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        return call_with_options(self.dit, executor, args, kwargs, lambda options, a: {GEOMETRY: Geometry(
            int(a[2].shape[1]), TokenGrid.from_latent(*a[0].shape[-2:], self.dit.patch))})


def call_with_options(dit: DiT, executor: Any, args: tuple, kwargs: dict,
                      extra: Callable[[dict, list], dict]) -> Any:
    """Continue a DIFFUSION_MODEL wrapper call (args = x, timestep, context, ...) with a copy of the forward's
    transformer_options updated by extra(options, args); the caller's dict is untouched."""
    i = _OPTIONS_INDEX[dit.family]
    args = list(args)
    positional = len(args) > i
    options = dict(args[i] if positional else kwargs.get("transformer_options") or {})
    options.update(extra(options, args))
    if positional:
        args[i] = options
    else:
        kwargs = {**kwargs, "transformer_options": options}
    return executor(*args, **kwargs)


def geometry(transformer_options: dict) -> Geometry:
    found = transformer_options.get(GEOMETRY)
    if found is None:
        raise XMGIEInputError("xMGIE's DiT patch ran without its geometry wrapper: the model's transformer options "
                              "were rebuilt by another node between xMGIE's node and the sampler. Put the xMGIE "
                              "node last before the sampler.")
    return found


def with_geometry(model_options: dict, dit: DiT) -> dict:
    """A copy of model_options whose diffusion-model wrappers include the geometry wrapper (once)."""
    options = dict(model_options)
    to = options["transformer_options"] = dict(options.get("transformer_options", {}))
    wrappers = to["wrappers"] = dict(to.get("wrappers", {}))
    wrappers[DIFFUSION_MODEL] = {**wrappers.get(DIFFUSION_MODEL, {}), "xmgie_dit": [GeometryWrapper(dit)]}
    return options


# ------------------------------------------------------------------------------------------ block patches

class TokenPatch:
    """patches_replace["dit"] patch for one block: run the block (or the patch that held this slot before), then
    hook(layer, generated tokens as [B, D, h, w]) and write its result back into the generated slice only."""

    def __init__(self, layer: str, hook: Hook, previous: Callable | None = None):
        self.layer, self.hook, self.previous = layer, hook, previous
        self.joint = layer.startswith("single_")

    def __deepcopy__(self, memo: dict) -> "TokenPatch":
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        geo = geometry(args["transformer_options"])
        grid = geo.joint if self.joint else geo.grid
        out = dict(out)
        out["img"] = grid.put(out["img"], self.hook(self.layer, grid.to_grid(out["img"])))
        return out


def with_layer_hook(model_options: dict, dit: DiT, hook: Hook, layers: list[str]) -> dict:
    """A copy of model_options with hook(layer, h) after each of `layers`' blocks, composed with any replace patch
    already on those blocks (the original options are untouched)."""
    options = with_geometry(model_options, dit)
    to = options["transformer_options"]
    replace = to["patches_replace"] = dict(to.get("patches_replace", {}))
    blocks = replace["dit"] = dict(replace.get("dit", {}))
    for layer in layers:
        key = dit.block_key(layer)
        blocks[key] = TokenPatch(layer, hook, blocks.get(key))
    return options
