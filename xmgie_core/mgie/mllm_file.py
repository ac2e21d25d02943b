"""ml-mgie's mllm.pt: the LLM's embed_tokens / lm_head (the base vocabulary + MGIE's 11 rows), the edit head
(edit_head.*) and emb (the [IMG0]..[IMG7] rows), checked key by key; the edit head's sizes read from its shapes."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import XMGIEInputError
from .convert_inputs import RETRY, short_list
from .edit_head import EDIT_HEAD_DEFAULTS, NUM_IMG_TOKENS, EditMapper
from .meta import ADDED_TOKENS

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
EDIT_HEAD_PREFIX = "edit_head."
MLLM_EMB = "emb"


def _edit_head_args(mllm: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """EditMapper's sizes read from the tensor shapes (heads cannot be read from shapes: ml-mgie's 4)."""
    def shape(name: str) -> tuple[int, ...]:
        key = EDIT_HEAD_PREFIX + name
        if key not in mllm:
            raise XMGIEInputError(f"{path} has no {key}, so it is not an MGIE mllm.pt (it must hold "
                                  f"{EMBED}, {LM_HEAD} and the edit head edit_head.*); {RETRY}.")
        return tuple(mllm[key].shape)

    llm2hid, query, hid2feat = shape("llm2hid.weight"), shape("query"), shape("hid2feat.weight")
    linear1 = shape("mapper.encoder.layers.0.linear1.weight")
    layers = len({int(m.group(1)) for k in mllm for m in [re.match(r"edit_head\.mapper\.encoder\.layers\.(\d+)\.", k)]
                  if m})
    if len(llm2hid) != 2 or len(query) != 3 or len(hid2feat) != 2 or len(linear1) != 2:
        raise XMGIEInputError(f"{path}: the edit head's tensors have unexpected ranks, so it is not an MGIE mllm.pt; "
                              f"{RETRY}.")
    return dict(llm_dim=llm2hid[1], hidden=llm2hid[0], out_dim=hid2feat[0], queries=query[1],
                heads=EDIT_HEAD_DEFAULTS["heads"], layers=layers, feedforward=linear1[0])


def check_mllm(mllm: dict[str, torch.Tensor], path: Path, base_rows: int, hidden: int) -> dict[str, int]:
    """mllm.pt's keys and shapes must be exactly ml-mgie's; returns the edit head's sizes."""
    not_mgie = f"so it is not an MGIE mllm.pt (ml-mgie's mgie_7b/mllm.pt); {RETRY}"
    other = sorted(k for k in mllm if k not in (EMBED, LM_HEAD, MLLM_EMB) and not k.startswith(EDIT_HEAD_PREFIX))
    if other:
        raise XMGIEInputError(f"{path} holds tensors MGIE's mllm.pt does not have: {short_list(other)}; {not_mgie}.")
    rows = base_rows + len(ADDED_TOKENS)
    for key in (EMBED, LM_HEAD):
        if key not in mllm:
            raise XMGIEInputError(f"{path} has no {key}; {not_mgie}.")
        if tuple(mllm[key].shape) != (rows, hidden):
            raise XMGIEInputError(f"{path}: {key} has shape {tuple(mllm[key].shape)}, but on this LLaMA (vocabulary "
                                  f"{base_rows}, hidden size {hidden}) MGIE's is ({rows}, {hidden}): the base "
                                  f"vocabulary plus the {len(ADDED_TOKENS)} added tokens. Either this is not an MGIE "
                                  f"mllm.pt or --llama is not the LLaMA MGIE was built on; {RETRY}.")
    args = _edit_head_args(mllm, path)
    with torch.device("meta"):
        expected = {EDIT_HEAD_PREFIX + k: tuple(v.shape) for k, v in EditMapper(**args).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in mllm.items() if k.startswith(EDIT_HEAD_PREFIX)}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = {k: (found[k], s) for k, s in expected.items() if k in found and found[k] != s}
    if missing or extra or wrong:
        detail = "; ".join(([f"missing {short_list(missing)}"] if missing else [])
                           + ([f"unexpected {short_list(extra)}"] if extra else [])
                           + ([f"wrong shapes (found, expected) {wrong}"] if wrong else []))
        raise XMGIEInputError(f"{path}: the edit head is not ml-mgie's EditMapper ({detail}); {not_mgie}.")
    if args["llm_dim"] != hidden:
        raise XMGIEInputError(f"{path}: the edit head reads LLM hidden states of size {args['llm_dim']}, but the "
                              f"LLaMA's hidden size is {hidden}; --llama/--delta and --mllm are from different models. "
                              f"MGIE 7B needs LLaMA-7B; {RETRY}.")
    if MLLM_EMB in mllm:
        emb = mllm[MLLM_EMB]
        img_rows = mllm[EMBED][-NUM_IMG_TOKENS:]
        if emb.shape[-2:] != img_rows.shape or emb.numel() != img_rows.numel():
            raise XMGIEInputError(f"{path}: emb has shape {tuple(emb.shape)}, expected the {NUM_IMG_TOKENS} [IMG] "
                                  f"embedding rows {tuple(img_rows.shape)}; {not_mgie}.")
        if not torch.equal(emb.reshape(img_rows.shape).to(img_rows.dtype), img_rows):
            raise XMGIEInputError(f"{path}: emb differs from the [IMG0]..[IMG7] rows of its own {EMBED}. ml-mgie "
                                  f"trains the edit head with exactly those rows and the MGIE folder stores them once "
                                  f"(in the embedding); a file where they differ is not ml-mgie's released mllm.pt: "
                                  f"{RETRY}.")
    return args
