"""Which rows of a cross-attention carry the CAM node's own prompt: its encoding recognised by value in a batched
context (tiled as ComfyUI tiles shorter conds), checked to reach the sampler at all, and, when it does not, the
text that was connected instead named from the running workflow (docs/comfyui-internals.md §4.1, §7.3)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import XMGIEInputError


MAX_NAMED_TEXTS = 32
"""At most this many workflow texts are encoded to name a mismatched prompt (only on that error)."""


def same_encoding(reference: torch.Tensor, context: torch.Tensor) -> bool:
    """context [Nk, C] is `reference` [L, C] repeated Nk / L times (ComfyUI tiles shorter conds up to a
    common length), up to the rounding of a cast to context's dtype."""
    if context.shape[-1] != reference.shape[-1] or context.shape[0] % reference.shape[0]:
        return False
    ref = reference.to(context.device, torch.float32).repeat(context.shape[0] // reference.shape[0], 1)
    tolerance = max(torch.finfo(context.dtype).eps, 1e-3) * float(ref.abs().max())
    return bool((context.float() - ref).abs().max() <= tolerance)


@dataclass(eq=False)
class PromptEncoding:
    """The conditioning a CAM node encoded from its prompt: what the patch masks, and how it names the
    text of a conditioning that is not it.

    `tensors` are the cond tensors [1, L, C] (one per scheduled entry); `other_texts()` gives the other
    prompt texts of the running workflow and `encode(text) -> [1, L, C]` encodes one, used only to name a
    mismatch (lazily: a cached node outlives the workflow it first ran in).
    """

    text: str
    tensors: tuple[torch.Tensor, ...]
    other_texts: Callable[[], tuple[str, ...]] = tuple
    encode: Callable[[str], torch.Tensor] | None = None
    _seen: tuple[Any, tuple[bool, ...]] | None = field(default=None, repr=False)

    def matches(self, context: torch.Tensor) -> bool:
        """A context [Nk, C] (one row of a batch) or cond [1, Nk, C] is this encoding."""
        context = context[0] if context.ndim == 3 else context
        return any(same_encoding(t[0], context) for t in self.tensors)

    def chunks(self, context: torch.Tensor, n_chunks: int) -> tuple[bool, ...]:
        """Which of the `n_chunks` equal row chunks of a batched context [B, Nk, C] carry this encoding
        (remembered for the context object, which every layer of one U-Net pass shares)."""
        if self._seen is not None and self._seen[0]() is context:
            return self._seen[1]
        per = context.shape[0] // max(n_chunks, 1)
        found = tuple(self.matches(context[j * per]) for j in range(n_chunks))
        self._seen = (weakref.ref(context), found)
        return found

    def require_in(self, conds: dict[str, list]) -> None:
        """Raise unless some cond entry of a sampler's conds ({"positive": [{"cross_attn": ...}], ...})
        is this encoding."""
        entries = {key: [c["cross_attn"] for c in (group or []) if isinstance(c, dict) and "cross_attn" in c]
                   for key, group in conds.items()}
        if any(self.matches(t) for group in entries.values() for t in group):
            return
        seen = entries.get("positive") or next((g for g in entries.values() if g), [])
        raise XMGIEInputError(self._mismatch(seen[0] if seen else None))

    def _mismatch(self, seen: torch.Tensor | None) -> str:
        if seen is None:
            what = "the sampler has no text conditioning"
        else:
            name = self.name_of(seen)
            what = (f"its positive conditioning ({seen.shape[-2]} tokens) was encoded from {name!r}" if name else
                    f"its positive conditioning ({seen.shape[-2]} tokens) was not encoded from that text")
            what += f", the node's prompt has {self.tensors[0].shape[-2]} tokens"
        return (f"The Cross-Attention Mask node's prompt {self.text!r} never reaches the sampler: {what}. The edit "
                "words' token positions refer to the node's prompt, so masking them in another prompt would "
                "restrict the wrong words. Connect the Cross-Attention Mask node's 'positive' output (that prompt, "
                "encoded) to the sampler's positive input.")

    def name_of(self, cond: torch.Tensor) -> str | None:
        """Which of `other_texts` encodes to `cond`, or None."""
        if self.encode is None:
            return None
        for text in self.other_texts()[:MAX_NAMED_TEXTS]:
            try:
                encoded = self.encode(text)
            except Exception:  # naming is best effort: the error about the mismatch is raised either way
                continue
            if same_encoding(encoded[0], cond[0] if cond.ndim == 3 else cond):
                return text
        return None


def running_workflows() -> list[dict]:
    """The API-format graphs ComfyUI's server is executing now; [] outside a server."""
    try:
        from server import PromptServer

        running, _ = PromptServer.instance.prompt_queue.get_current_queue_volatile()
    except Exception:  # not inside a ComfyUI server (serverless, tests): nothing is running there
        return []
    return [item[2] for item in running if len(item) > 2 and isinstance(item[2], dict)]


def workflow_texts(*graphs: dict | None, exclude: str = "") -> tuple[str, ...]:
    """The prompt texts typed into text-encode nodes of API-format workflows (ComfyUI's hidden PROMPT)."""
    texts: list[str] = []
    for node in (n for graph in graphs for n in (graph or {}).values()):
        if not isinstance(node, dict) or "TextEncode" not in str(node.get("class_type", "")):
            continue
        for value in node.get("inputs", {}).values():
            if isinstance(value, str) and value.strip() and value != exclude and value not in texts:
                texts.append(value)
    return tuple(texts)
