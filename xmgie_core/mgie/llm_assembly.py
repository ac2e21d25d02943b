"""The MGIE LLM (LLaMA + LLaVA delta + mllm.pt) and the CLIP vision tower, as convert.py's docstring describes: first
planned from the inputs' names and shapes alone (where each output tensor comes from, every input tensor accounted
for in the ledger), then built from that plan after the inputs are hashed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import XMGIEInputError
from .convert_inputs import RETRY, Inputs, Ledger, TensorSource, is_derived, progress_bar, short_list
from .meta import ADDED_TOKENS, token_ids
from .mllm_file import EMBED, LM_HEAD, check_mllm

PROJECTOR_PREFIX = "model.mm_projector."
LLAVA_CONFIG_KEYS = ("use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "sep_image_conv_front",
                     "image_aspect_ratio", "image_grid_pinpoints", "model_type", "architectures", "_name_or_path",
                     "transformers_version", "torch_dtype", "dtype")
"""Keys of the LLaVA delta's config.json that are not LlamaConfig fields (plus every mm_* key)."""
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class Plan:
    """Where each tensor of the output comes from; filled while checking, executed after hashing."""

    llm_config: Any = None
    merged: list[str] = field(default_factory=list)
    """LLM tensors = base + delta."""
    from_delta: list[str] = field(default_factory=list)
    """LLM tensors the base lacks, taken from the delta as is."""
    base_rows: int = 0
    edit_head_args: dict[str, int] = field(default_factory=dict)
    vision_config: Any = None
    vision_keys: dict[str, str] = field(default_factory=dict)
    """CLIPVisionModel state-dict key -> CLIP checkpoint key."""
    vision_select_layer: int = -2
    tokenizer_dir: Path | None = None


def _llm_config(delta_config: dict, base_config: dict, vocab: int) -> Any:
    from transformers import LlamaConfig

    different = {k: (base_config.get(k), delta_config.get(k)) for k in ARCH_FIELDS
                 if base_config.get(k) != delta_config.get(k)}
    if different:
        detail = ", ".join(f"{k} {b} in --llama but {d} in --delta" for k, (b, d) in different.items())
        raise XMGIEInputError(f"The LLaVA delta does not match the LLaMA base: {detail}. The delta "
                              f"LLaVA-Lightning-7B-delta-v1-1 applies to LLaMA-7B; point --llama at LLaMA-7B.")
    values = {k: v for k, v in delta_config.items() if not k.startswith("mm_") and k not in LLAVA_CONFIG_KEYS}
    values["vocab_size"] = vocab
    values["use_cache"] = True  # LLaVA's training config turns the KV cache off; ml-mgie's demo loads with it on
    config = LlamaConfig(**values)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _expected_llm_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plan_llm(inputs: Inputs, plan: Plan, ledger: Ledger, mllm_path: Path) -> int:
    """Decide where each LLM tensor comes from (base + delta, delta only, mllm.pt); returns the hidden size."""
    base, deltas = inputs.base, inputs.delta_tensors
    if EMBED not in base or EMBED not in deltas:
        where = "--llama" if EMBED not in base else "--delta"
        raise XMGIEInputError(f"{where} has no {EMBED}, so it is not a LLaMA / LLaVA checkpoint; point {where} at "
                              f"the {'LLaMA-7B' if where == '--llama' else 'LLaVA-Lightning-7B-delta-v1-1'} folder.")
    plan.base_rows, hidden = base.shape(EMBED)
    plan.edit_head_args = check_mllm(inputs.mllm, mllm_path, plan.base_rows, hidden)
    ledger.use("--mllm", *inputs.mllm)
    plan.llm_config = _llm_config(inputs.delta_config, inputs.base_config, plan.base_rows + len(ADDED_TOKENS))
    expected = _expected_llm_shapes(plan.llm_config)

    mismatched = {}
    for key in deltas.keys():
        if is_derived(key):
            ledger.use("--delta", key)
            continue
        if key.startswith(PROJECTOR_PREFIX):
            continue  # planned with the vision tower
        if key in (EMBED, LM_HEAD):  # merged by apply_delta, then replaced as a whole by mllm.pt's
            d_shape = deltas.shape(key)
            b_shape = base.shape(key) if key in base else None
            if b_shape is None or len(d_shape) != 2 or d_shape[1] != b_shape[1] or not (
                    b_shape[0] <= d_shape[0] <= b_shape[0] + len(ADDED_TOKENS)):
                mismatched[key] = (b_shape, d_shape)
            ledger.use("--delta", key)
            if b_shape is not None:
                ledger.use("--llama", key)
            continue
        if key not in expected:
            continue  # left over: the ledger lists it
        if key in base:
            if base.shape(key) != deltas.shape(key) or deltas.shape(key) != expected[key]:
                mismatched[key] = (base.shape(key), deltas.shape(key))
                continue
            plan.merged.append(key)
            ledger.use("--llama", key)
        elif deltas.shape(key) == expected[key]:
            plan.from_delta.append(key)
        else:
            mismatched[key] = (None, deltas.shape(key))
            continue
        ledger.use("--delta", key)
    if mismatched:
        detail = ", ".join(f"{k}: {b} in --llama vs {d} in --delta" for k, (b, d) in sorted(mismatched.items())[:8])
        raise XMGIEInputError(f"The LLaVA delta does not match the LLaMA base ({len(mismatched)} tensors of different "
                              f"shapes: {detail}). LLaVA-Lightning-7B-delta-v1-1 must be applied to LLaMA-7B; check "
                              f"that --llama is LLaMA-7B and --delta is that delta.")
    ledger.use("--llama", *(k for k in base.keys() if is_derived(k)))
    missing = sorted(set(expected) - set(plan.merged) - set(plan.from_delta) - {EMBED, LM_HEAD})
    if missing:
        raise XMGIEInputError(f"The LLaVA delta lacks LLaMA tensors: {short_list(missing)}; the download of --delta "
                              f"{inputs.delta} is incomplete or is not LLaVA-Lightning-7B-delta-v1-1.")
    return hidden


def _clip_vision_config(config: dict, folder: Path) -> Any:
    from transformers import CLIPVisionConfig

    kind = config.get("model_type")
    if kind == "clip" and isinstance(config.get("vision_config"), dict):
        values = config["vision_config"]
    elif kind == "clip_vision_model":
        values = config
    else:
        raise XMGIEInputError(f"--clip {folder} is a {kind!r} model, not CLIP; point --clip at "
                              f"openai/clip-vit-large-patch14 (the vision tower LLaVA v1 was trained with).")
    values = {k: v for k, v in values.items() if k not in ("model_type", "architectures", "transformers_version",
                                                           "_name_or_path", "torch_dtype", "dtype")}
    return CLIPVisionConfig(**values)


def _clip_checkpoint_key(model_key: str) -> str:
    """CLIP checkpoints name the vision tower's tensors vision_model.*; some transformers versions' CLIPVisionModel
    state dict drops that prefix."""
    return model_key if model_key.startswith("vision_model.") else "vision_model." + model_key


def plan_vision(inputs: Inputs, plan: Plan, ledger: Ledger, hidden: int) -> tuple[int, int]:
    """The CLIP vision tower and LLaVA's projector must fit each other; returns the projector's (out, in)."""
    from transformers import CLIPVisionModel

    clip, clip_tensors, deltas = inputs.clip, inputs.clip_tensors, inputs.delta_tensors
    plan.vision_config = _clip_vision_config(inputs.clip_config, clip)
    with torch.device("meta"):
        vision_shapes = {k: tuple(v.shape) for k, v in CLIPVisionModel(plan.vision_config).state_dict().items()}
    plan.vision_keys = {k: _clip_checkpoint_key(k) for k in vision_shapes}
    absent = sorted(c for c in plan.vision_keys.values() if c not in clip_tensors)
    wrong = {c: (clip_tensors.shape(c), vision_shapes[k]) for k, c in plan.vision_keys.items()
             if c in clip_tensors and clip_tensors.shape(c) != vision_shapes[k]}
    if absent or wrong:
        raise XMGIEInputError(f"--clip {clip}: the checkpoint does not fit its config.json ("
                              + "; ".join(([f"missing {short_list(absent)}"] if absent else [])
                                          + ([f"wrong shapes {dict(list(wrong.items())[:5])}"] if wrong else []))
                              + f"); {RETRY}.")
    ledger.use("--clip", *plan.vision_keys.values(),
               *(k for k in clip_tensors.keys() if k.startswith("vision_model.") and is_derived(k)))
    projector_keys = [PROJECTOR_PREFIX + "weight", PROJECTOR_PREFIX + "bias"]
    if not all(k in deltas for k in projector_keys):
        raise XMGIEInputError(f"--delta {inputs.delta} has no {PROJECTOR_PREFIX}weight/bias (LLaVA's image "
                              f"projector), so it is not the LLaVA-Lightning-7B-delta-v1-1 checkpoint; point --delta "
                              f"at that folder.")
    p_shape = deltas.shape(projector_keys[0])
    if p_shape != (hidden, plan.vision_config.hidden_size) or deltas.shape(projector_keys[1]) != (hidden,):
        raise XMGIEInputError(f"LLaVA's projector maps {p_shape[1] if len(p_shape) == 2 else '?'}-d CLIP features, "
                              f"but --clip {clip} has hidden size {plan.vision_config.hidden_size}; point --clip at "
                              f"openai/clip-vit-large-patch14 (the vision tower LLaVA v1 was trained with).")
    ledger.use("--delta", *projector_keys)
    plan.vision_select_layer = int(inputs.delta_config.get("mm_vision_select_layer", -2))
    return p_shape


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, ImportError, KeyError) as e:
        raise XMGIEInputError(f"The tokenizer in {folder} could not be loaded ({type(e).__name__}: {e}). It must be "
                              f"LLaMA's tokenizer (tokenizer.model or tokenizer.json with tokenizer_config.json) as "
                              f"downloaded; {RETRY}.") from None


def mgie_tokenizer(plan: Plan) -> Any:
    """The LLaMA/LLaVA tokenizer plus MGIE's 11 tokens, which must get ids base_rows .. base_rows + 10."""
    tokenizer = _load_tokenizer(plan.tokenizer_dir)
    tokenizer.add_tokens(list(ADDED_TOKENS), special_tokens=True)
    ids = token_ids(tokenizer)
    expected = {t: plan.base_rows + i for i, t in enumerate(ADDED_TOKENS)}
    wrong = {t: ids[t] for t in ADDED_TOKENS if ids[t] != expected[t]}
    if wrong or len(tokenizer) != plan.base_rows + len(ADDED_TOKENS):
        detail = ", ".join(f"{t} got id {i} (MGIE's is {expected[t]})" for t, i in wrong.items()) or (
            f"it has {len(tokenizer)} tokens, MGIE's embedding has {plan.base_rows + len(ADDED_TOKENS)} rows")
        raise XMGIEInputError(f"The tokenizer in {plan.tokenizer_dir} does not line up with MGIE's vocabulary: "
                              f"{detail}. It must be LLaMA's {plan.base_rows}-token tokenizer (as in --llama or "
                              f"--delta, optionally with <im_patch> <im_start> <im_end> already added); {RETRY}.")
    return tokenizer


def build_llm(plan: Plan, base: TensorSource, delta: TensorSource, mllm: dict[str, torch.Tensor],
               dtype: torch.dtype, progress: bool) -> Any:
    """LlamaForCausalLM holding base + delta, with mllm.pt's embed_tokens / lm_head (no random init on the way)."""
    from transformers import LlamaForCausalLM

    tensors: dict[str, torch.Tensor] = {}
    with progress_bar(progress, total=len(plan.merged) + len(plan.from_delta) + 2, desc="LLaMA + LLaVA delta") as bar:
        for key in plan.merged:
            tensors[key] = (base.get(key).float() + delta.get(key).float()).to(dtype)
            bar.update(1)
        for key in plan.from_delta:
            tensors[key] = delta.get(key).to(dtype)
            bar.update(1)
        for key in (EMBED, LM_HEAD):
            tensors[key] = mllm[key].to(dtype).clone()
            bar.update(1)
    config = plan.llm_config
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    # Buffers that are not weights (the rotary tables) were built on the meta device: rebuild them from the config.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], type(module)(config=model.config))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: LLaMA tensors not materialised: {leftover[:5]}")
    return model.eval()


def build_vision(plan: Plan, clip: TensorSource, dtype: torch.dtype) -> Any:
    """CLIPVisionModel holding the planned --clip tensors, in `dtype`."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(plan.vision_config)
    state = {k: clip.get(plan.vision_keys[k]) for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()
