"""`python -m xmgie_core.mgie convert`: turn ml-mgie's released files into what ComfyUI loads.

Inputs (the user downloads them; nothing is fetched here):

    --llama DIR   LLaMA-7B as a transformers folder (the base LLaVA's delta was made against)
    --delta DIR   LLaVA-Lightning-7B-delta-v1-1 (LlavaLlamaForCausalLM: model.*, lm_head.weight,
                  model.mm_projector.weight/bias; embed_tokens/lm_head have 3 more rows than the base)
    --mllm FILE   ml-mgie's mgie_7b/mllm.pt: model.embed_tokens.weight, lm_head.weight (base vocab + 11 rows),
                  edit_head.* (EditMapper) and, in the released file, emb (the [IMG0]..[IMG7] embedding rows)
    --unet FILE   ml-mgie's mgie_7b/unet.pt: the InstructPix2Pix SD1.5 U-Net as a diffusers state dict (8 input
                  channels)
    --clip DIR    openai/clip-vit-large-patch14 as a transformers folder (LLaVA v1's vision tower)

Outputs:

    --out-llm DIR        an MGIE folder (xmgie_core.mgie.folder) for ComfyUI/models/LLM/<name>/
    --out-unet FILE      one safetensors file for ComfyUI/models/diffusion_models/ that ComfyUI's UNETLoader loads
                         as SD15_instructpix2pix

How the LLM is assembled (LLaVA's apply_delta, then ml-mgie's demo):
  * every base tensor is added to the delta's tensor of the same name (in float32, then cast to --dtype);
    embed_tokens / lm_head are larger in the delta (the base goes into the top-left block), but both are then
    replaced as a whole by mllm.pt's (ml-mgie's `model.load_state_dict(mllm, strict=False)`), so only their shapes
    are checked;
  * model.mm_projector.* (absent from the base) is taken from the delta as is and becomes the projector;
  * rotary_emb.inv_freq buffers that older transformers saved are derived from the config, not weights: they are
    accepted and recomputed;
  * mllm.pt's emb must equal its own [IMG0]..[IMG7] embedding rows (ml-mgie trains the edit head with exactly those
    rows); the MGIE folder stores them once, in embed_tokens.
Every tensor of every input is accounted for before any heavy work: a tensor no rule uses is an error that lists
it. The one deliberate exception is the text half of the CLIP checkpoint (text_model.*, text_projection,
visual_projection, logit_scale): LLaVA v1 uses only CLIPVisionModel.

The U-Net is written with ComfyUI's own (LDM, `input_blocks.*`) key names, not diffusers': ComfyUI recognises
a diffusers-format U-Net only when its config equals one of a fixed list of known models, and that list has no
8-channel SD1.5 (InstructPix2Pix) U-Net, so a diffusers-keyed file fails with "Could not detect model type". With
LDM keys, ComfyUI's detection reads in_channels = 8 from input_blocks.0.0.weight and picks SD15_instructpix2pix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import XMGIEInputError
from ..staging import overlap, staged
from ..weight_files import check_pickle, check_safetensors, corrupt, loading
from .edit_head import EDIT_HEAD_DEFAULTS, NUM_IMG_TOKENS, EditMapper
from .folder import save_mgie_folder
from .meta import ADDED_TOKENS, META_FILE, MGIEMeta, token_ids

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_FORMAT = "xmgie-mgie-unet-1"
IP2P_IN_CHANNELS = 8
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROJECTOR_PREFIX = "model.mm_projector."
EDIT_HEAD_PREFIX = "edit_head."
MLLM_EMB = "emb"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
LLAVA_CONFIG_KEYS = ("use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "sep_image_conv_front",
                     "image_aspect_ratio", "image_grid_pinpoints", "model_type", "architectures", "_name_or_path",
                     "transformers_version", "torch_dtype", "dtype")
"""Keys of the LLaVA delta's config.json that are not LlamaConfig fields (plus every mm_* key)."""
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DOWNLOADS = ("LLaMA-7B (transformers folder), LLaVA-Lightning-7B-delta-v1-1, ml-mgie's mgie_7b/mllm.pt and "
             "mgie_7b/unet.pt, and openai/clip-vit-large-patch14")
RETRY = ("point the option at the original downloaded file or folder (download it again if it is cut short: compare "
         "its size and sha256 with the source's) and run the converter again")


def _derived(key: str) -> bool:
    """Buffers old transformers versions saved although they follow from the config (recomputed on load)."""
    return key.endswith(".rotary_emb.inv_freq") or key.endswith("position_ids")


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------------------------------
# Reading tensors (safetensors, or pickles with weights_only=True) without loading them all at once
# --------------------------------------------------------------------------------------------------

def load_pickled_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A pickled {name: tensor} file read with torch.load(weights_only=True) (memory-mapped when possible).

    weights_only refuses any pickle that would build objects other than tensors and plain containers, so no code
    from the file ever runs; such a file is an XMGIEInputError.
    """
    check_pickle(path, what, RETRY)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise XMGIEInputError(
                f"{path} ({what}) is a pickle that would run code or build objects other than tensors, so it was "
                f"refused (torch.load with weights_only=True: {first}). xMGIE never executes code from model files; "
                f"{RETRY} (the released files hold plain tensors only).") from None
        raise XMGIEInputError(f"{path} ({what}) is not a PyTorch tensor file ({first}); {RETRY}.") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise corrupt(path, what, f"it could not be read as a PyTorch tensor file ({type(e).__name__}: {e})",
                      RETRY) from None
    if not isinstance(obj, dict) or not obj:
        raise XMGIEInputError(f"{path} ({what}) holds a {type(obj).__name__}, not a dict of named tensors; {RETRY}.")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise XMGIEInputError(f"{path} ({what}) holds entries that are not tensors: {_short(bad)}; {RETRY}.")
    return obj


class TensorSource:
    """The named tensors of one input (one file, or a transformers folder's shards), read lazily."""

    def __init__(self, label: str, files: list[Path]):
        from safetensors import safe_open

        self.label, self.files = label, list(files)
        self._where: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                check_safetensors(path, label, RETRY)
                with loading(path, label, RETRY):
                    handle = safe_open(str(path), framework="pt")
                    names = list(handle.keys())
                    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in names}
                getter: Any = handle.get_tensor
            else:
                tensors = load_pickled_tensors(path, label)
                names, shapes, getter = list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}, tensors.get
            twice = sorted(set(names) & set(self._where))
            if twice:
                raise XMGIEInputError(f"{label}: the tensors {_short(twice)} appear in more than one file of "
                                      f"{path.parent}; the folder mixes two downloads. {RETRY[0].upper() + RETRY[1:]}.")
            self._where.update({k: getter for k in names})
            self._shapes.update(shapes)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._where[key](key)


def model_weight_files(folder: Path, option: str) -> tuple[list[Path], Path | None]:
    """(weight files, index file or None) of a transformers folder: safetensors (sharded or not) if present,
    else pickled .bin (sharded or not)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise XMGIEInputError(f"{index} ({option}) is unreadable ({e}); {RETRY}.") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise XMGIEInputError(f"{option} {folder}: the weight shards {_short(missing)} listed in {index_name} "
                                      f"are missing; the download is incomplete: download them into {folder}.")
            return [folder / s for s in shards], index
        if (folder / single).is_file():
            return [folder / single], None
    found = sorted(p.name for p in folder.iterdir())
    raise XMGIEInputError(f"{option} {folder} has no model weights (model.safetensors[.index.json] or "
                          f"pytorch_model.bin[.index.json]); it holds {_short(found) or 'nothing'}. Point {option} at "
                          f"the transformers folder that holds config.json and the weight files.")


def _read_config(folder: Path, option: str) -> dict:
    if not folder.is_dir():
        raise XMGIEInputError(f"{option} {folder} is not a folder; point {option} at the downloaded transformers "
                              f"folder (the one holding config.json and the weights).")
    path = folder / "config.json"
    if not path.is_file():
        raise XMGIEInputError(f"{option} {folder} has no config.json, so it is not a transformers model folder; "
                              f"point {option} at the folder that holds config.json and the weight files.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise XMGIEInputError(f"{path} ({option}) is not valid JSON ({e}); {RETRY}.") from None
    if not isinstance(config, dict):
        raise XMGIEInputError(f"{path} ({option}) must hold a JSON object; {RETRY}.")
    return config


def _check_file(path: Path, option: str, what: str) -> Path:
    if not path.is_file():
        raise XMGIEInputError(f"{option} {path} does not exist or is not a file; point {option} at {what}.")
    return path


# --------------------------------------------------------------------------------------------------
# Checksums and progress
# --------------------------------------------------------------------------------------------------

def _bar(progress: bool, **kwargs: Any):
    from tqdm import tqdm

    return tqdm(disable=not progress, file=sys.stderr, **kwargs)


def sha256_files(files: dict[str, Path], progress: bool = True) -> dict[str, str]:
    """{name: sha256 hex} of every file, with one progress bar over all bytes."""
    out = {}
    with _bar(progress, total=sum(p.stat().st_size for p in files.values()), unit="B", unit_scale=True,
              unit_divisor=1024, desc="sha256 of the inputs") as bar:
        for name, path in files.items():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
                    bar.update(len(chunk))
            out[name] = digest.hexdigest()
    return out


# --------------------------------------------------------------------------------------------------
# diffusers UNet2DConditionModel keys -> ComfyUI / LDM UNetModel keys
# --------------------------------------------------------------------------------------------------

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_ATTENTION_PART = re.compile(r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|"
                             r"norm[123]|ff\.net\.(0\.proj|2)))\.(weight|bias)")
_PARAM = re.compile(r"(weight|bias)")


def diffusers_unet_to_ldm(keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: LDM key} for every key of an SD-style UNet2DConditionModel state dict.

    The block layout is read from the keys (any number of down/up blocks and resnets per block, with or without
    cross-attention), the way diffusers' own LDM conversion numbers ComfyUI's input_blocks / middle_block /
    output_blocks. A key this mapping does not know (an SDXL add_embedding, a class embedding, ...) is an error
    listing them: nothing is dropped silently.
    """
    keys = list(keys)
    out: dict[str, str] = {}
    unknown: list[str] = []

    def parts(prefix: str) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
        for k in keys:
            m = pat.fullmatch(k)
            if m:
                found.setdefault(int(m.group(1)), []).append(m.group(2))
        return found

    def resnet(src: str, rest: str, dst: str) -> None:
        name, _, param = rest.partition(".")
        if name in _RESNET_PARTS and _PARAM.fullmatch(param):
            out[src + rest] = f"{dst}.{_RESNET_PARTS[name]}.{param}"
        else:
            unknown.append(src + rest)

    def attention(src: str, rest: str, dst: str) -> None:
        if _ATTENTION_PART.fullmatch(rest):
            out[src + rest] = f"{dst}.{rest}"
        else:
            unknown.append(src + rest)

    def sampler(src: str, rest: str, dst: str) -> None:
        if rest in ("conv.weight", "conv.bias"):
            out[src + rest] = f"{dst}.{rest.split('.', 1)[1]}"
        else:
            unknown.append(src + rest)

    def block(prefix: str) -> dict[str, dict[int, list[str]]]:
        sub: dict[str, dict[int, list[str]]] = {"resnets": {}, "attentions": {}, "downsamplers": {}, "upsamplers": {}}
        for rest in block_keys[prefix]:
            kind, _, tail = rest.partition(".")
            index, _, tail = tail.partition(".")
            if kind in sub and index.isdigit() and tail:
                sub[kind].setdefault(int(index), []).append(tail)
            else:
                unknown.append(f"{prefix}{rest}")
        return sub

    block_keys: dict[str, list[str]] = {}
    for group in ("down_blocks", "up_blocks"):
        for i, rests in parts(f"{group}.").items():
            block_keys[f"{group}.{i}."] = rests
    block_keys["mid_block."] = [k[len("mid_block."):] for k in keys if k.startswith("mid_block.")]

    n = 1
    for i in sorted(parts("down_blocks.")):
        prefix = f"down_blocks.{i}."
        sub = block(prefix)
        for j in sorted(sub["resnets"]):
            for rest in sub["resnets"][j]:
                resnet(f"{prefix}resnets.{j}.", rest, f"input_blocks.{n}.0")
            for rest in sub["attentions"].pop(j, []):
                attention(f"{prefix}attentions.{j}.", rest, f"input_blocks.{n}.1")
            n += 1
        for j, rests in sub["attentions"].items():  # an attention without its resnet
            unknown.extend(f"{prefix}attentions.{j}.{r}" for r in rests)
        for j, rests in sub["downsamplers"].items():
            for rest in rests:
                if j == 0:
                    sampler(f"{prefix}downsamplers.0.", rest, f"input_blocks.{n}.0.op")
                else:
                    unknown.append(f"{prefix}downsamplers.{j}.{rest}")
            n += 1
        unknown.extend(f"{prefix}upsamplers.{j}.{r}" for j, rs in sub["upsamplers"].items() for r in rs)

    mid = block("mid_block.")
    for j, rests in mid["resnets"].items():
        for rest in rests:
            resnet(f"mid_block.resnets.{j}.", rest, f"middle_block.{2 * j}")
    for j, rests in mid["attentions"].items():
        for rest in rests:
            attention(f"mid_block.attentions.{j}.", rest, f"middle_block.{2 * j + 1}")
    unknown.extend(f"mid_block.{kind}.{j}.{r}" for kind in ("downsamplers", "upsamplers")
                   for j, rs in mid[kind].items() for r in rs)

    m = 0
    for i in sorted(parts("up_blocks.")):
        prefix = f"up_blocks.{i}."
        sub = block(prefix)
        last = max(sub["resnets"], default=-1)
        for j in sorted(sub["resnets"]):
            for rest in sub["resnets"][j]:
                resnet(f"{prefix}resnets.{j}.", rest, f"output_blocks.{m}.0")
            has_attention = j in sub["attentions"]
            for rest in sub["attentions"].pop(j, []):
                attention(f"{prefix}attentions.{j}.", rest, f"output_blocks.{m}.1")
            if j == last:
                for rest in sub["upsamplers"].pop(0, []):
                    sampler(f"{prefix}upsamplers.0.", rest, f"output_blocks.{m}.{2 if has_attention else 1}.conv")
            m += 1
        unknown.extend(f"{prefix}attentions.{j}.{r}" for j, rs in sub["attentions"].items() for r in rs)
        unknown.extend(f"{prefix}upsamplers.{j}.{r}" for j, rs in sub["upsamplers"].items() for r in rs)
        unknown.extend(f"{prefix}downsamplers.{j}.{r}" for j, rs in sub["downsamplers"].items() for r in rs)

    for k in keys:
        if k.startswith(("down_blocks.", "up_blocks.", "mid_block.")):
            continue
        module, _, param = k.rpartition(".")
        if module in _TOP_LEVEL and _PARAM.fullmatch(param):
            out[k] = f"{_TOP_LEVEL[module]}.{param}"
        else:
            unknown.append(k)
    unknown = sorted(set(unknown) | ({k for k in keys if k.startswith(("down_blocks.", "up_blocks."))} - set(out)))
    if unknown:
        raise XMGIEInputError(f"The U-Net has tensors outside the Stable Diffusion 1.5 U-Net layout: "
                              f"{_short(unknown)}. It is not ml-mgie's unet.pt (an SD1.5 InstructPix2Pix "
                              f"UNet2DConditionModel state dict); {RETRY}.")
    if len(set(out.values())) != len(out):
        raise XMGIEInputError(f"The U-Net's block numbering is not contiguous, so its tensors do not map one to one "
                              f"onto ComfyUI's U-Net; it is not ml-mgie's unet.pt: {RETRY}.")
    return out


def unet_source(path: Path) -> TensorSource:
    """ml-mgie's unet.pt (or the same state dict as safetensors), checked to be an 8-input-channel U-Net."""
    source = TensorSource("the MGIE U-Net (--unet)", [_check_file(path, "--unet", "ml-mgie's mgie_7b/unet.pt")])
    if "conv_in.weight" not in source:
        hint = (" It looks like a file that is already in ComfyUI's layout: put it in ComfyUI/models/diffusion_models/ "
                "as it is." if "input_blocks.0.0.weight" in source else "")
        raise XMGIEInputError(f"{path} has no conv_in.weight, so it is not a diffusers UNet2DConditionModel state "
                              f"dict like ml-mgie's mgie_7b/unet.pt.{hint} Otherwise {RETRY}.")
    shape = source.shape("conv_in.weight")
    if len(shape) != 4 or shape[1] != IP2P_IN_CHANNELS:
        raise XMGIEInputError(f"{path}: conv_in.weight has shape {shape}, but MGIE's InstructPix2Pix U-Net takes "
                              f"{IP2P_IN_CHANNELS} input channels (latent + source-image latent). This is not "
                              f"ml-mgie's mgie_7b/unet.pt; {RETRY}.")
    return source


def write_unet(source: TensorSource, out_file: Path, dtype: torch.dtype, metadata: dict[str, str],
               progress: bool = True) -> Path:
    """The U-Net with ComfyUI (LDM) key names as one safetensors file (parent folders created)."""
    from safetensors.torch import save_file

    mapping = diffusers_unet_to_ldm(source.keys())
    tensors = {}
    with _bar(progress, total=len(mapping), desc="U-Net -> ComfyUI keys") as bar:
        for src, dst in mapping.items():
            value = source.get(src)
            tensors[dst] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
            bar.update(1)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=metadata)
    return out_file


# --------------------------------------------------------------------------------------------------
# The MGIE LLM: LLaMA + LLaVA delta + mllm.pt, CLIP vision tower
# --------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
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


class _Ledger:
    """Which tensors of each input were used; anything left over is an error listing it."""

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[set[str], set[str]]] = {}

    def add(self, label: str, keys: Iterable[str]) -> None:
        self.inputs[label] = (set(keys), set())

    def use(self, label: str, *keys: str) -> None:
        self.inputs[label][1].update(keys)

    def check(self) -> None:
        left = {label: sorted(all_ - used) for label, (all_, used) in self.inputs.items() if all_ - used}
        if left:
            detail = "; ".join(f"{label}: {_short(keys)}" for label, keys in left.items())
            raise XMGIEInputError(f"These input tensors would be left unused: {detail}. The inputs are not the ones "
                                  f"MGIE was released with ({DOWNLOADS}); check that each option points at the "
                                  f"right download.")


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


def _check_mllm(mllm: dict[str, torch.Tensor], path: Path, base_rows: int, hidden: int) -> dict[str, int]:
    """mllm.pt's keys and shapes must be exactly ml-mgie's; returns the edit head's sizes."""
    not_mgie = f"so it is not an MGIE mllm.pt (ml-mgie's mgie_7b/mllm.pt); {RETRY}"
    other = sorted(k for k in mllm if k not in (EMBED, LM_HEAD, MLLM_EMB) and not k.startswith(EDIT_HEAD_PREFIX))
    if other:
        raise XMGIEInputError(f"{path} holds tensors MGIE's mllm.pt does not have: {_short(other)}; {not_mgie}.")
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
        detail = "; ".join(([f"missing {_short(missing)}"] if missing else []) + ([f"unexpected {_short(extra)}"]
                           if extra else []) + ([f"wrong shapes (found, expected) {wrong}"] if wrong else []))
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


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, ImportError, KeyError) as e:
        raise XMGIEInputError(f"The tokenizer in {folder} could not be loaded ({type(e).__name__}: {e}). It must be "
                              f"LLaMA's tokenizer (tokenizer.model or tokenizer.json with tokenizer_config.json) as "
                              f"downloaded; {RETRY}.") from None


def _mgie_tokenizer(plan: _Plan) -> Any:
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


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()


def _build_llm(plan: _Plan, base: TensorSource, delta: TensorSource, mllm: dict[str, torch.Tensor],
               dtype: torch.dtype, progress: bool) -> Any:
    """LlamaForCausalLM holding base + delta, with mllm.pt's embed_tokens / lm_head (no random init on the way)."""
    from transformers import LlamaForCausalLM

    tensors: dict[str, torch.Tensor] = {}
    with _bar(progress, total=len(plan.merged) + len(plan.from_delta) + 2, desc="LLaMA + LLaVA delta") as bar:
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


def _build_vision(plan: _Plan, clip: TensorSource, dtype: torch.dtype) -> Any:
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(plan.vision_config)
    state = {k: clip.get(plan.vision_keys[k]) for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvertResult:
    llm_folder: Path
    unet_file: Path
    sources: dict[str, str]
    """'<input>/<file>' -> sha256 of every input file read."""
    unused_clip_keys: int
    """Tensors of the CLIP checkpoint's text half (deliberately unused)."""


def _check_outputs(out_llm: Path, out_unet: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Before any work: the outputs are new (or, with `overwrite`, earlier outputs of the converter) and lie apart
    from every input and from each other (resolved paths: links and `..` followed)."""
    if out_unet.suffix != ".safetensors":
        raise XMGIEInputError(f"--out-unet {out_unet} must end in .safetensors (ComfyUI's UNETLoader lists "
                              f"models/diffusion_models/*.safetensors); e.g. --out-unet "
                              f"ComfyUI/models/diffusion_models/mgie_7b_unet.safetensors.")
    for option, out in (("--out-llm", out_llm), ("--out-unet", out_unet)):
        for name, path in inputs.items():
            if overlap(out, path):
                raise XMGIEInputError(f"{option} {out} is, holds or lies inside the input --{name} {path}; the "
                                      f"converter never writes into its inputs: choose an output outside them (e.g. "
                                      f"under ComfyUI/models/).")
    if out_unet.is_dir():
        raise XMGIEInputError(f"--out-unet {out_unet} is a folder; give a file name ending in .safetensors.")
    if out_unet.exists() and not overwrite:
        raise XMGIEInputError(f"--out-unet {out_unet} already exists; delete it, choose another name, or pass "
                              f"--overwrite.")
    if out_llm.exists() and not out_llm.is_dir():
        raise XMGIEInputError(f"--out-llm {out_llm} is a file; give a folder (e.g. ComfyUI/models/LLM/mgie_7b).")
    if out_llm.is_dir() and any(out_llm.iterdir()):
        if not overwrite:
            raise XMGIEInputError(f"--out-llm {out_llm} already exists and is not empty; delete it, choose another "
                                  f"folder, or pass --overwrite to replace the MGIE folder in it.")
        if not (out_llm / META_FILE).is_file():
            raise XMGIEInputError(f"--out-llm {out_llm} is not empty and is not an MGIE folder (it has no "
                                  f"{META_FILE}), so it is not replaced even with --overwrite; choose another folder.")
    if overlap(out_llm, out_unet):
        raise XMGIEInputError(f"--out-unet {out_unet} lies inside --out-llm {out_llm}; keep them apart (ComfyUI "
                              f"reads models/LLM/<folder> and models/diffusion_models/<file>.safetensors).")


@dataclass
class _Inputs:
    """What the five inputs hold (tensors are read lazily)."""

    llama: Path
    delta: Path
    clip: Path
    files: dict[str, Path]
    """'<input>/<file>' -> path of every file the conversion reads (all are hashed)."""
    base_config: dict
    delta_config: dict
    clip_config: dict
    base: TensorSource
    delta_tensors: TensorSource
    clip_tensors: TensorSource
    mllm: dict[str, torch.Tensor]
    unet: TensorSource


def _gather_inputs(llama: Path, delta: Path, mllm: Path, unet: Path, clip: Path, plan: _Plan) -> _Inputs:
    """Find every input file (configs, weights, tokenizer, image processor) and open the tensors lazily."""
    configs = {name: _read_config(folder, f"--{name}") for name, folder in
               (("llama", llama), ("delta", delta), ("clip", clip))}
    files = {f"{name}/config.json": folder / "config.json" for name, folder in
             (("llama", llama), ("delta", delta), ("clip", clip))}
    weights: dict[str, list[Path]] = {}
    for role, folder in (("llama", llama), ("delta", delta), ("clip", clip)):
        weights[role], index = model_weight_files(folder, f"--{role}")
        if index is not None:
            files[f"{role}/{index.name}"] = index
        files.update({f"{role}/{p.name}": p for p in weights[role]})
    preprocessor = clip / "preprocessor_config.json"
    if not preprocessor.is_file():
        raise XMGIEInputError(f"--clip {clip} has no preprocessor_config.json (the CLIP image processor); use the "
                              f"complete openai/clip-vit-large-patch14 folder.")
    files["clip/preprocessor_config.json"] = preprocessor
    plan.tokenizer_dir = delta if _has_tokenizer(delta) else llama
    if not _has_tokenizer(plan.tokenizer_dir):
        raise XMGIEInputError(f"Neither --delta {delta} nor --llama {llama} holds a tokenizer (tokenizer.model or "
                              f"tokenizer.json); download LLaMA-7B's tokenizer files into {llama}.")
    role = "delta" if plan.tokenizer_dir == delta else "llama"
    files.update({f"{role}/{p.name}": p for p in _tokenizer_files(plan.tokenizer_dir)})
    files["mllm/" + mllm.name] = _check_file(mllm, "--mllm", "ml-mgie's mgie_7b/mllm.pt")
    files["unet/" + unet.name] = unet
    mllm_tensors = load_pickled_tensors(mllm, "the MGIE LLM checkpoint (--mllm)")
    return _Inputs(llama, delta, clip, files, configs["llama"], configs["delta"], configs["clip"],
                   TensorSource("--llama", weights["llama"]), TensorSource("--delta", weights["delta"]),
                   TensorSource("--clip", weights["clip"]), mllm_tensors, unet_source(unet))


def _plan_llm(inputs: _Inputs, plan: _Plan, ledger: _Ledger, mllm_path: Path) -> int:
    """Decide where each LLM tensor comes from (base + delta, delta only, mllm.pt); returns the hidden size."""
    base, deltas = inputs.base, inputs.delta_tensors
    if EMBED not in base or EMBED not in deltas:
        where = "--llama" if EMBED not in base else "--delta"
        raise XMGIEInputError(f"{where} has no {EMBED}, so it is not a LLaMA / LLaVA checkpoint; point {where} at "
                              f"the {'LLaMA-7B' if where == '--llama' else 'LLaVA-Lightning-7B-delta-v1-1'} folder.")
    plan.base_rows, hidden = base.shape(EMBED)
    plan.edit_head_args = _check_mllm(inputs.mllm, mllm_path, plan.base_rows, hidden)
    ledger.use("--mllm", *inputs.mllm)
    plan.llm_config = _llm_config(inputs.delta_config, inputs.base_config, plan.base_rows + len(ADDED_TOKENS))
    expected = _expected_llm_shapes(plan.llm_config)

    mismatched = {}
    for key in deltas.keys():
        if _derived(key):
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
    ledger.use("--llama", *(k for k in base.keys() if _derived(k)))
    missing = sorted(set(expected) - set(plan.merged) - set(plan.from_delta) - {EMBED, LM_HEAD})
    if missing:
        raise XMGIEInputError(f"The LLaVA delta lacks LLaMA tensors: {_short(missing)}; the download of --delta "
                              f"{inputs.delta} is incomplete or is not LLaVA-Lightning-7B-delta-v1-1.")
    return hidden


def _plan_vision(inputs: _Inputs, plan: _Plan, ledger: _Ledger, hidden: int) -> tuple[int, int]:
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
                              + "; ".join(([f"missing {_short(absent)}"] if absent else [])
                                          + ([f"wrong shapes {dict(list(wrong.items())[:5])}"] if wrong else []))
                              + f"); {RETRY}.")
    ledger.use("--clip", *plan.vision_keys.values(),
               *(k for k in clip_tensors.keys() if k.startswith("vision_model.") and _derived(k)))
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


def convert(llama: Path, delta: Path, mllm: Path, unet: Path, clip: Path, out_llm: Path, out_unet: Path,
            dtype: str = "fp16", overwrite: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = None) -> ConvertResult:
    """Check every output and input, hash the inputs, then write the MGIE folder and the ComfyUI U-Net file (module
    docstring). Both are written beside their places and swapped in together at the end: a failure or Ctrl-C leaves
    no partial output and earlier outputs as they were; nothing is ever written into an input."""
    say = log or (lambda message: print(message, file=sys.stderr))
    if dtype not in DTYPES:
        raise XMGIEInputError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}; fp16 is the default.")
    llama, delta, mllm, unet, clip = (Path(p).expanduser() for p in (llama, delta, mllm, unet, clip))
    out_llm, out_unet = Path(out_llm).expanduser(), Path(out_unet).expanduser()
    _check_outputs(out_llm, out_unet, dict(llama=llama, delta=delta, mllm=mllm, unet=unet, clip=clip), overwrite)
    with staged([out_llm, out_unet]) as (stage_llm, stage_unet):  # written beside, swapped in when both are done
        sources, unused_clip = _convert(llama, delta, mllm, unet, clip, stage_llm, stage_unet, dtype, progress, say)
    return ConvertResult(out_llm, out_unet, sources, unused_clip)


def _convert(llama: Path, delta: Path, mllm: Path, unet: Path, clip: Path, out_llm: Path, out_unet: Path,
             dtype: str, progress: bool, say: Callable[[str], None]) -> tuple[dict[str, str], int]:
    """convert()'s work, writing into the staging paths; returns the inputs' checksums and the unused CLIP count."""
    from transformers import CLIPImageProcessor

    torch_dtype = DTYPES[dtype]

    # 1. Read configs, tensor names and shapes; decide where every output tensor comes from (cheap, fails fast).
    say("checking the inputs ...")
    plan, ledger = _Plan(), _Ledger()
    inputs = _gather_inputs(llama, delta, mllm, unet, clip, plan)
    for label, source in (("--llama", inputs.base), ("--delta", inputs.delta_tensors), ("--unet", inputs.unet)):
        ledger.add(label, source.keys())
    ledger.add("--mllm", inputs.mllm)
    ledger.add("--clip", [k for k in inputs.clip_tensors.keys() if k.startswith("vision_model.")])
    hidden = _plan_llm(inputs, plan, ledger, mllm)
    p_shape = _plan_vision(inputs, plan, ledger, hidden)
    ledger.use("--unet", *diffusers_unet_to_ldm(inputs.unet.keys()))
    ledger.check()
    base, deltas, mllm_tensors, clip_tensors = inputs.base, inputs.delta_tensors, inputs.mllm, inputs.clip_tensors
    files, unet_tensors = inputs.files, inputs.unet
    projector_keys = [PROJECTOR_PREFIX + "weight", PROJECTOR_PREFIX + "bias"]
    unused_clip = len([k for k in clip_tensors.keys() if not k.startswith("vision_model.")])
    tokenizer = _mgie_tokenizer(plan)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(clip, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise XMGIEInputError(f"--clip {clip}: preprocessor_config.json could not be read ({e}); {RETRY}.") from None

    # 2. Checksums of every input file.
    sources = sha256_files(files, progress)

    # 3. The MGIE folder.
    say("building the MGIE LLM ...")
    llm = _build_llm(plan, base, deltas, mllm_tensors, torch_dtype, progress)
    vision = _build_vision(plan, clip_tensors, torch_dtype)
    projector = nn.Linear(p_shape[1], p_shape[0])
    projector.load_state_dict({"weight": deltas.get(projector_keys[0]).float(),
                               "bias": deltas.get(projector_keys[1]).float()})
    edit_head = EditMapper(**plan.edit_head_args)
    edit_head.load_state_dict({k[len(EDIT_HEAD_PREFIX):]: v.float() for k, v in mllm_tensors.items()
                               if k.startswith(EDIT_HEAD_PREFIX)})
    image_size, patch = plan.vision_config.image_size, plan.vision_config.patch_size
    meta = MGIEMeta.from_tokenizer(tokenizer, image_token_len=(image_size // patch) ** 2,
                                   vision_select_layer=plan.vision_select_layer, edit_head=dict(plan.edit_head_args),
                                   sources=dict(sources))
    say("writing the MGIE folder ...")
    save_mgie_folder(out_llm, llm, tokenizer, vision, image_processor, projector.to(torch_dtype).eval(),
                     edit_head.to(torch_dtype).eval(), meta)
    del llm, vision

    # 4. The U-Net.
    metadata = {"xmgie_format": UNET_FORMAT, "xmgie_sources": json.dumps(sources, sort_keys=True),
                "xmgie_unet_source": "unet/" + unet.name, "xmgie_dtype": dtype,
                "xmgie_layout": "ComfyUI/LDM UNetModel keys (SD1.5 InstructPix2Pix, in_channels 8)"}
    say("writing the U-Net ...")
    write_unet(unet_tensors, out_unet, torch_dtype, metadata, progress)
    return sources, unused_clip


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def build_parser(prog: str = "python -m xmgie_core.mgie convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Turn ml-mgie's released files into an MGIE folder for ComfyUI/models/LLM/ and one U-Net "
                    "safetensors file for ComfyUI/models/diffusion_models/ (loaded by the stock UNETLoader as an "
                    "InstructPix2Pix SD1.5 model). Nothing is downloaded; pickles are read with weights_only=True.")
    p.add_argument("--llama", type=Path, required=True, help="LLaMA-7B transformers folder (the delta's base)")
    p.add_argument("--delta", type=Path, required=True, help="LLaVA-Lightning-7B-delta-v1-1 folder")
    p.add_argument("--mllm", type=Path, required=True, help="ml-mgie's mgie_7b/mllm.pt")
    p.add_argument("--unet", type=Path, required=True, help="ml-mgie's mgie_7b/unet.pt")
    p.add_argument("--clip", type=Path, required=True, help="openai/clip-vit-large-patch14 folder")
    p.add_argument("--out-llm", type=Path, required=True, help="output MGIE folder, e.g. ComfyUI/models/LLM/mgie_7b")
    p.add_argument("--out-unet", type=Path, required=True,
                   help="output U-Net, e.g. ComfyUI/models/diffusion_models/mgie_7b_unet.safetensors")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="write over existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m xmgie_core.mgie convert") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        result = convert(args.llama, args.delta, args.mllm, args.unet, args.clip, args.out_llm, args.out_unet,
                         dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    except XMGIEInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.llm_folder} (MGIE folder: put it in ComfyUI/models/LLM/)")
    print(f"wrote {result.unet_file} (U-Net: put it in ComfyUI/models/diffusion_models/, load it with Load Diffusion "
          f"Model)")
    print(f"checksums of {len(result.sources)} input files are in {result.llm_folder / 'mgie.json'} and in the "
          f"U-Net's metadata")
    return 0


if __name__ == "__main__":
    sys.exit(main())
