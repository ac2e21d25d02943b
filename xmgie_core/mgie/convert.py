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

The pieces: convert_inputs.py (reading the inputs, checksums, the ledger), mllm_file.py (mllm.pt's checks),
llm_assembly.py (the LLM and the vision tower, planned then built), unet_layout.py (diffusers -> ComfyUI U-Net
keys); this module checks the outputs, runs the steps in order and holds the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import XMGIEInputError
from ..staging import overlap, staged
from .convert_inputs import (RETRY, Inputs, Ledger, TensorSource, check_file, has_tokenizer, load_pickled_tensors,
                             model_weight_files, progress_bar, read_config, sha256_files, tokenizer_files)
from .edit_head import EditMapper
from .folder import save_mgie_folder
from .llm_assembly import PROJECTOR_PREFIX, Plan, build_llm, build_vision, mgie_tokenizer, plan_llm, plan_vision
from .meta import META_FILE, MGIEMeta
from .mllm_file import EDIT_HEAD_PREFIX
from .unet_layout import UNET_FORMAT, diffusers_unet_to_ldm

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
IP2P_IN_CHANNELS = 8


def unet_source(path: Path) -> TensorSource:
    """ml-mgie's unet.pt (or the same state dict as safetensors), checked to be an 8-input-channel U-Net."""
    source = TensorSource("the MGIE U-Net (--unet)", [check_file(path, "--unet", "ml-mgie's mgie_7b/unet.pt")])
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
    with progress_bar(progress, total=len(mapping), desc="U-Net -> ComfyUI keys") as bar:
        for src, dst in mapping.items():
            value = source.get(src)
            tensors[dst] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
            bar.update(1)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata=metadata)
    return out_file


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


def _gather_inputs(llama: Path, delta: Path, mllm: Path, unet: Path, clip: Path, plan: Plan) -> Inputs:
    """Find every input file (configs, weights, tokenizer, image processor) and open the tensors lazily."""
    configs = {name: read_config(folder, f"--{name}") for name, folder in
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
    plan.tokenizer_dir = delta if has_tokenizer(delta) else llama
    if not has_tokenizer(plan.tokenizer_dir):
        raise XMGIEInputError(f"Neither --delta {delta} nor --llama {llama} holds a tokenizer (tokenizer.model or "
                              f"tokenizer.json); download LLaMA-7B's tokenizer files into {llama}.")
    role = "delta" if plan.tokenizer_dir == delta else "llama"
    files.update({f"{role}/{p.name}": p for p in tokenizer_files(plan.tokenizer_dir)})
    files["mllm/" + mllm.name] = check_file(mllm, "--mllm", "ml-mgie's mgie_7b/mllm.pt")
    files["unet/" + unet.name] = unet
    mllm_tensors = load_pickled_tensors(mllm, "the MGIE LLM checkpoint (--mllm)")
    return Inputs(llama, delta, clip, files, configs["llama"], configs["delta"], configs["clip"],
                   TensorSource("--llama", weights["llama"]), TensorSource("--delta", weights["delta"]),
                   TensorSource("--clip", weights["clip"]), mllm_tensors, unet_source(unet))


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
    plan, ledger = Plan(), Ledger()
    inputs = _gather_inputs(llama, delta, mllm, unet, clip, plan)
    for label, source in (("--llama", inputs.base), ("--delta", inputs.delta_tensors), ("--unet", inputs.unet)):
        ledger.add(label, source.keys())
    ledger.add("--mllm", inputs.mllm)
    ledger.add("--clip", [k for k in inputs.clip_tensors.keys() if k.startswith("vision_model.")])
    hidden = plan_llm(inputs, plan, ledger, mllm)
    p_shape = plan_vision(inputs, plan, ledger, hidden)
    ledger.use("--unet", *diffusers_unet_to_ldm(inputs.unet.keys()))
    ledger.check()
    base, deltas, mllm_tensors, clip_tensors = inputs.base, inputs.delta_tensors, inputs.mllm, inputs.clip_tensors
    files, unet_tensors = inputs.files, inputs.unet
    projector_keys = [PROJECTOR_PREFIX + "weight", PROJECTOR_PREFIX + "bias"]
    unused_clip = len([k for k in clip_tensors.keys() if not k.startswith("vision_model.")])
    tokenizer = mgie_tokenizer(plan)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(clip, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise XMGIEInputError(f"--clip {clip}: preprocessor_config.json could not be read ({e}); {RETRY}.") from None

    # 2. Checksums of every input file.
    sources = sha256_files(files, progress)

    # 3. The MGIE folder.
    say("building the MGIE LLM ...")
    llm = build_llm(plan, base, deltas, mllm_tensors, torch_dtype, progress)
    vision = build_vision(plan, clip_tensors, torch_dtype)
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
