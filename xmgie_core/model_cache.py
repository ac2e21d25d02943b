"""The one cache of the pack's loaded models (local VLM, MGIE, CLIPSeg, the learned region predictor): keyed by what
was loaded (kind, real path, device, dtype ...), kept for the next run while a node's keep_loaded asks for it,
unloaded one kind, one key or all at once, with their memory handed back."""

from __future__ import annotations

import gc
from typing import Any, Callable, Hashable

import torch

Key = tuple[Hashable, ...]
"""(kind, ...): the first element names what kind of model it is."""


class ModelCache:
    def __init__(self) -> None:
        self._models: dict[Key, Any] = {}

    def get(self, key: Key, load: Callable[[], Any]) -> Any:
        """The model under `key`, loaded by `load()` on first use and kept until unloaded."""
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]

    def keys(self, kind: Hashable | None = None) -> list[Key]:
        return [k for k in self._models if kind is None or k[0] == kind]

    def unload(self, match: Callable[[Key], bool] | None = None) -> None:
        """Drop the models whose key `match` accepts (every model without one) and free their memory."""
        for key in [k for k in self._models if match is None or match(k)]:
            del self._models[key]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


MODELS = ModelCache()
"""The process's loaded models, shared by every node and command."""
