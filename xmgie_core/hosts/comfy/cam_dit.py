"""Cross-attention masking in the joint attention of ComfyUI's DiT editors (Flux / FLUX.1 Kontext, Qwen-Image(-Edit)),
[xMGIE] eqs 10-12 on the image-query -> text-key columns (xmgie_core.cam.masked_joint_attention).

Both families call their joint attention through `wrap_attn` (comfy/ldm/modules/attention.py), i.e. through
`transformer_options["optimized_attention_override"]` when one is set: Flux as optimized_attention(q, k, v, heads,
skip_reshape=True, mask=..., transformer_options=...) with q [B, heads, N, d], Qwen as optimized_attention_masked(q,
k, v, heads, mask, transformer_options=...) with q [B, N, heads*d]. The patch, installed on a clone's options:

- a DIFFUSION_MODEL wrapper (with dit.GeometryWrapper beside it) decides once per forward which batch rows carry
  the node's own prompt encoding (cond and uncond are batched in one forward, one chunk per cond_or_uncond entry)
  and whether the sigma is in the node's window, and puts that into the forward's options;
- the override masks the generated-image query rows of those batch rows; text and reference-image rows, other batch
  rows and every other call go to the override installed before it (another pack's) or ComfyUI's function;
- when some of the three level switches are off, block replace patches tag each block's options with its level
  (`block_levels`: the blocks in depth order, in thirds), composing with the patch that held the slot before;
- an outer_sample wrapper checks that the sampler receives the node's prompt encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...cam import masked_joint_attention
from ...errors import XMGIEInputError
from . import dit as dit_seam
from .cam import LEVELS, OUTER_SAMPLE, CAMSpec, PromptPatch, by_rows, chunk_rows
from .cam_prompt import PromptEncoding

ROWS = "xmgie_cam_rows"
"""transformer_options key of the forward's _Rows."""
LEVEL = "xmgie_cam_level"
"""transformer_options key of the running block's level (only while some levels are off)."""


def block_levels(dit: dit_seam.DiT) -> dict[tuple[str, int], str]:
    """Each joint-attention block's level, what the U-Net switches mean for a DiT: its blocks in depth order
    (double-stream, then Flux's single-stream), first third 'input', second 'middle', last 'output'."""
    keys = [("double_block", i) for i in range(dit.double)] + [("single_block", i) for i in range(dit.single)]
    return {key: LEVELS[min(3 * i // len(keys), 2)] for i, key in enumerate(keys)}


class LevelPatch:
    """patches_replace["dit"] patch: the block (or the patch that held the slot before) runs with its level in a
    copy of its transformer_options."""

    def __init__(self, level: str, previous: Callable | None = None):
        self.level, self.previous = level, previous

    def __deepcopy__(self, memo: dict) -> "LevelPatch":
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        args = {**args, "transformer_options": {**(args.get("transformer_options") or {}), LEVEL: self.level}}
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)


@dataclass(frozen=True)
class _Rows:
    """The batch rows of one forward that CAM masks, and the latents per cond chunk."""

    rows: torch.Tensor
    per: int


class JointCrossAttentionMask(PromptPatch):
    """DIFFUSION_MODEL wrapper + optimized_attention_override + outer_sample wrapper for one CAM spec on a DiT; the
    spec's positions are positions in the conditioning (dit tokens), its prompt_tokens that conditioning's length."""

    def __init__(self, spec: CAMSpec, prompt: PromptEncoding, dit: dit_seam.DiT,
                 previous_override: Callable | None = None):
        super().__init__(spec, prompt, previous_override)
        self.dit = dit

    # -- DIFFUSION_MODEL wrapper: out = w(executor, x, timestep, context, ..., transformer_options, ...)
    def find_rows(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Put the rows whose context is the node's prompt encoding (none outside the sigma window) into a copy of
        the forward's transformer_options."""
        def rows(options: dict, args: list) -> dict:
            context = args[2]
            chunks = max(len(options.get("cond_or_uncond", [0])), 1)
            found = self.prompt.chunks(context, chunks) if self.spec.active(options.get("sigmas")) else (False,)
            return {ROWS: _Rows(chunk_rows(context.shape[0], found).to(context.device), context.shape[0] // chunks)}

        return dit_seam.call_with_options(self.dit, executor, args, kwargs, rows)

    # -- optimized_attention_override: out = override(func, q, k, v, heads, [mask], **kwargs)
    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        inner = self._inner(func)
        options = kwargs.get("transformer_options") or {}
        found: _Rows | None = options.get(ROWS)
        level = options.get(LEVEL)
        if found is None or found.rows.numel() == 0 or (level is not None and level not in self.spec.levels):
            return inner(*args, **kwargs)
        q, k, v, heads, *rest = args
        if kwargs.get("mask", rest[0] if rest else None) is not None:
            raise XMGIEInputError("CAM cannot mask a joint attention that already has an attention mask (a "
                                  "conditioning with an attention_mask, e.g. regional prompting): remove one of them.")
        heads_first = bool(kwargs.get("skip_reshape"))
        geometry = dit_seam.geometry(options)
        grid = geometry.joint
        grid.check(q.shape[2 if heads_first else 1], "The joint attention")
        restriction = self.spec.restriction(geometry.text, q.device)
        region = self.spec.region_rows(grid.h, grid.w, found.rows, found.per, q.device)
        merged = {**kwargs, "skip_output_reshape": False}

        def masked(rows: torch.Tensor) -> torch.Tensor:
            kr, vr = k[rows], v[rows]
            return masked_joint_attention(q[rows], kr, vr, heads, slice(grid.start, grid.stop), region,
                                          restriction, self.spec.mode, heads_first,
                                          lambda part: inner(part, kr, vr, heads, *rest, **merged))

        out = by_rows(q.shape[0], found.rows, masked, lambda rows: inner(q[rows], k[rows], v[rows], heads, *rest,
                                                                           **merged))
        if kwargs.get("skip_output_reshape"):
            return out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
        return out


def install(model_options: dict, patch: JointCrossAttentionMask) -> dict:
    """A copy of a (cloned) ModelPatcher's model_options with the patch and dit's geometry wrapper installed; the
    original options are untouched."""
    options = dit_seam.with_geometry(model_options, patch.dit)
    to = options["transformer_options"]
    wrappers = to["wrappers"]
    wrappers[dit_seam.DIFFUSION_MODEL] = {**wrappers[dit_seam.DIFFUSION_MODEL], "xmgie_cam_dit": [patch.find_rows]}
    outer = dict(wrappers.get(OUTER_SAMPLE, {}))
    outer["xmgie_cam"] = outer.get("xmgie_cam", []) + [patch.check_sampler_conds]
    wrappers[OUTER_SAMPLE] = outer
    to["optimized_attention_override"] = patch
    if set(patch.spec.levels) != set(LEVELS):
        replace = to["patches_replace"] = dict(to.get("patches_replace", {}))
        blocks = replace["dit"] = dict(replace.get("dit", {}))
        for key, level in block_levels(patch.dit).items():
            blocks[key] = LevelPatch(level, blocks.get(key))
    return options
