"""Cross-attention masking on ComfyUI's U-Net, as plain callables with ComfyUI's patch signatures.

Route, chosen so CAM composes with other packs' attention patches:

- an `attn2_patch` (runs before every cross-attention, never replaces anything) decides
  whether this call is masked (U-Net level, sampling percent, which rows carry the node's own
  prompt encoding) and arms the patch;
- an `optimized_attention_override` (transformer_options) performs the masked attention when
  the armed cross-attention goes through ComfyUI's optimized attention with the
  transformer options, as the stock CrossAttention does; other rows, self-attention and any
  call that is not the armed one go to the original function untouched;
- an `attn2_output_patch` covers blocks where another pack's `attn2_replace` computed the
  attention itself without passing transformer_options (IP-Adapter's Attn2Replace calls
  optimized_attention(q, k, v, heads)): the override was never reached, so it adds
  to_out(O_cam - O_stock) for the masked rows, leaving the other pack's own term in place.

attn2_replace was not used: a replace slot holds one patch, so CAM would evict (or be
evicted by) IP-Adapter-style patches on the same blocks.

Token positions refer to the node's prompt, so only rows whose cross-attention context *is* that
prompt's encoding (cam_prompt.PromptEncoding) are masked: other positives (regional conds, a PFB source
branch, a prompt typed twice with a difference) are left alone. An `outer_sample` wrapper checks before the
first U-Net pass that the sampler's conditioning contains the encoding at all, and otherwise stops with an error
naming both texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...attention import stock_attention
from ...cam import MODES, TokenRestriction, masked_cross_attention, tiled_positions
from ...masks import RegionPyramid
from ...errors import XMGIEInputError
from . import unet
from .cam_prompt import PromptEncoding

LEVELS = ("input", "middle", "output")


@dataclass(frozen=True)
class CAMSpec:
    """Everything a CAM patch needs, independent of ComfyUI objects."""

    edit_positions: tuple[int, ...]
    background_positions: tuple[int, ...]
    prompt_tokens: int
    """Context length of the prompt the positions refer to (77 per chunk)."""
    region: RegionPyramid
    mode: str = "renormalized"
    strength: float = 1.0
    levels: frozenset[str] = frozenset(LEVELS)
    sigma_start: float = float("inf")
    """Masking is active while sigma_end <= sigma <= sigma_start."""
    sigma_end: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise XMGIEInputError(f"Unknown CAM mode {self.mode!r}; use one of {', '.join(MODES)}.")
        TokenRestriction(torch.tensor(self.edit_positions, dtype=torch.long),  # validates overlap and strength
                         torch.tensor(self.background_positions, dtype=torch.long), self.strength)

    def active(self, sigmas: torch.Tensor | None) -> bool:
        """Whether a pass at these sigmas is inside the sigma_end <= sigma <= sigma_start window."""
        return sigmas is None or self.sigma_end - 1e-5 <= float(sigmas.max()) <= self.sigma_start + 1e-5

    def region_rows(self, h: int, w: int, rows: torch.Tensor, per: int, device: torch.device) -> torch.Tensor:
        """The region on an h x w grid for batch rows `rows` of chunks of `per` latents: [len(rows), h*w], or [1, h*w]
        for one mask (it broadcasts, so the attention mask is built once, not per row)."""
        region = self.region.grid(h, w, device)
        if region.shape[0] not in (1, per):
            raise XMGIEInputError(
                f"The CAM mask has batch {region.shape[0]} but the latent batch is {per}; "
                "give one mask, or one per latent."
            )
        return region if region.shape[0] == 1 else region[(rows.to(region.device) % per) % region.shape[0]]

    def restriction(self, context_tokens: int, device: torch.device) -> TokenRestriction:
        edit = torch.tensor(self.edit_positions, dtype=torch.long, device=device)
        back = torch.tensor(self.background_positions, dtype=torch.long, device=device)
        return TokenRestriction(tiled_positions(edit, self.prompt_tokens, context_tokens),
                                tiled_positions(back, self.prompt_tokens, context_tokens), self.strength)


@dataclass
class _Armed:
    rows: torch.Tensor
    region: torch.Tensor
    restriction: TokenRestriction
    n: torch.Tensor
    context: torch.Tensor
    value: torch.Tensor
    block: tuple
    block_index: int


def chunk_rows(batch: int, chunks: tuple[bool, ...]) -> torch.Tensor:
    """Row indices of the chosen chunks: chunk j of len(chunks) equal chunks occupies rows j*B:(j+1)*B."""
    per = batch // max(len(chunks), 1)
    return torch.tensor([j * per + i for j, chosen in enumerate(chunks) if chosen for i in range(per)],
                        dtype=torch.long)


def by_rows(batch: int, rows: torch.Tensor, masked: Callable[[torch.Tensor], torch.Tensor],
            other: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """masked(rows) for the batch rows `rows`, other(rest) for the others, reassembled in batch order."""
    result = masked(rows)
    if rows.numel() == batch:
        return result
    keep = torch.ones(batch, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    rest = other(keep.nonzero()[:, 0])
    out = torch.empty(batch, *rest.shape[1:], dtype=rest.dtype, device=rest.device)
    out[keep.to(rest.device)] = rest
    out[rows.to(rest.device)] = result.to(rest.dtype)
    return out


class PromptPatch:
    """What every CAM patch shares: its spec, the node's own prompt encoding (the only conditioning it masks), the
    attention override that was installed before it (called for all unmasked work), and the outer_sample check
    that the sampler receives that encoding. ComfyUI deep-copies patch objects: heavy state is shared."""

    xmgie_source_neutral = True
    """It never changes a pass without its own prompt (e.g. PFB's source branch): not part of PFB's cache key."""

    def __init__(self, spec: CAMSpec, prompt: PromptEncoding, previous_override: Callable | None = None):
        self.spec = spec
        self.prompt = prompt
        self.previous_override = previous_override

    def __deepcopy__(self, memo: dict) -> "PromptPatch":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "PromptPatch":
        return self  # masks are moved per call; nothing to cast

    def _inner(self, func: Callable) -> Callable:
        if self.previous_override is None:
            return func
        return lambda *a, **kw: self.previous_override(func, *a, **kw)

    # -- outer_sample wrapper: out = w(executor, noise, latent_image, sampler, sigmas, ...)
    def check_sampler_conds(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Before any model pass: the guider's conds must contain the node's prompt encoding."""
        conds = getattr(getattr(executor, "class_obj", None), "conds", None)
        if isinstance(conds, dict):
            self.prompt.require_in(conds)
        return executor(*args, **kwargs)


class CrossAttentionMaskPatch(PromptPatch):
    """attn2_patch + optimized_attention_override + attn2_output_patch + outer_sample wrapper for one
    CAM spec, masking the rows whose context is `prompt`'s encoding.

    Install with `install(model_options, ...)` on a cloned ModelPatcher's options.
    """

    def __init__(self, spec: CAMSpec, prompt: PromptEncoding, diffusion_model: torch.nn.Module | None = None,
                 previous_override: Callable | None = None):
        super().__init__(spec, prompt, previous_override)
        self.diffusion_model = diffusion_model
        self._armed: _Armed | None = None

    # -- attn2_patch: n, context, value = p(n, context, value, extra_options)
    def arm(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor | None,
            extra_options: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self._armed = None
        spec = self.spec
        block = extra_options.get("block")
        sigmas = extra_options.get("sigmas")
        if block is None or block[0] not in spec.levels:
            return n, context, value
        if not spec.active(sigmas):
            return n, context, value
        n_chunks = max(len(extra_options.get("cond_or_uncond", [0])), 1)
        rows = chunk_rows(n.shape[0], self.prompt.chunks(context, n_chunks))
        if rows.numel() == 0:
            return n, context, value
        h, w = extra_options["activations_shape"][-2:]
        region = spec.region_rows(int(h), int(w), rows, n.shape[0] // n_chunks, n.device)
        self._armed = _Armed(rows.to(n.device), region, spec.restriction(context.shape[1], n.device), n, context,
                             value if value is not None else context, block, int(extra_options.get("block_index", 0)))
        return n, context, value

    # -- optimized_attention_override: out = override(func, q, k, v, heads, **kwargs)
    def __call__(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        inner = self._inner(func)
        armed = self._armed
        plain = args or kwargs.get("mask") is not None or kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape")
        if armed is None or plain or q.ndim != 3 or k.shape[1] != armed.context.shape[1] \
                or q.shape[:2] != armed.n.shape[:2]:
            return inner(q, k, v, heads, *args, **kwargs)
        self._armed = None
        return self._masked_rows(inner, q, k, v, heads, armed, kwargs)

    def _masked_rows(self, inner: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     armed: _Armed, kwargs: dict) -> torch.Tensor:
        return by_rows(q.shape[0], armed.rows,
                       lambda r: masked_cross_attention(q[r], k[r], v[r], heads, armed.region, armed.restriction,
                                                        self.spec.mode),
                       lambda r: inner(q[r], k[r], v[r], heads, **kwargs))

    # -- attn2_output_patch: n = p(n, extra_options)
    def correct_output(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        armed, self._armed = self._armed, None
        if armed is None:
            return n
        if self.diffusion_model is None:
            raise XMGIEInputError("CAM could not reach this block's attention: another patch replaced it and no "
                                  "U-Net was given for the output correction.")
        attn = unet.find_attn2(self.diffusion_model, armed.block, armed.block_index)
        rows = armed.rows
        heads = extra_options["n_heads"]
        q = attn.to_q(armed.n[rows])
        k, v = attn.to_k(armed.context[rows]), attn.to_v(armed.value[rows])
        delta = masked_cross_attention(q, k, v, heads, armed.region, armed.restriction, self.spec.mode) \
            - stock_attention(q, k, v, heads)
        n = n.clone()
        n[rows] = n[rows] + F.linear(delta, attn.to_out[0].weight).to(n.dtype)
        return n


OUTER_SAMPLE = "outer_sample"
"""comfy.patcher_extension.WrappersMP.OUTER_SAMPLE (wraps CFGGuider.outer_sample; executor.class_obj is the guider)."""


def install(model_options: dict, patch: CrossAttentionMaskPatch) -> None:
    """Register the callables in a (cloned) ModelPatcher's model_options, in place."""
    to = model_options.setdefault("transformer_options", {})
    patches = to.setdefault("patches", {})
    patches["attn2_patch"] = patches.get("attn2_patch", []) + [patch.arm]
    patches["attn2_output_patch"] = patches.get("attn2_output_patch", []) + [patch.correct_output]
    to["optimized_attention_override"] = patch
    wrappers = to.setdefault("wrappers", {}).setdefault(OUTER_SAMPLE, {})
    wrappers["xmgie_cam"] = wrappers.get("xmgie_cam", []) + [patch.check_sampler_conds]
