"""The region predictor's data builder ([Regions] §4): training records (xmgie_core.region.data) made from captioned
images.

A record is one JSON line: {"image": path, "t_o": source description, "t_ins": instruction, "t_e": target
description, "render": path}. `render` is X_gen, a frozen generator's render of t_e for that image, made once here
so training never runs the generator. Relative paths resolve against the JSONL file's folder.

  python -m xmgie_core.apps.region_data build --captions captions.csv --out records.jsonl [--overwrite] \
      [--backend rules|local --model-folder F] [--generator SD15 --steps 30 --strength 0.7 --seed 0]

The data set (records.jsonl and records_renders/) is written beside --out and swapped in when complete: a failure
or Ctrl-C leaves an existing one as it was, and an existing one is replaced only with --overwrite.

The builder takes t_o from the caption and writes t_ins / t_e with the Instruction node's backends: `rules` turns a
colour word before an object ('a red car on a street') into 'make the red car blue' and substitutes the rules
plan's attribute into t_o; `local` keeps that instruction and asks the local VLM (local_plan) for t_e.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..device import resolve_device
from ..errors import XMGIEInputError
from ..hosts.diffusers.models import load_sd15_pipeline
from ..image_io import FORMATS_HINT, load_image, save_image, to_rgb8
from ..instruction.local import GenerationSettings, local_plan, unload
from ..instruction.rules import COLOURS, rules_plan
from ..region.data import BUILD_HINT, TEXT_FIELDS
from ..region.encoders import square_resize
from ..staging import overlap, staged
from ..training import field_error, resolve, unusable_numbers

NEW_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""Colours the rules backend recolours objects to."""
NOT_OBJECTS = {"and", "or", "with", "on", "in", "of", "at", "to", "by", "near", "under", "over", "behind", "next",
               "is", "are", "a", "an", "the", "color", "colour", "colored", "coloured", "light", "dark"}


def read_captions(path: Path) -> list[tuple[Path, str, int]]:
    """(image path, caption, line) from a JSONL of {"image", "caption"} or a CSV with columns image,caption."""
    path = Path(path)
    if not path.is_file():
        raise XMGIEInputError(f"Captions file not found: {path}. Give a .jsonl of {{\"image\": ..., \"caption\": ...}} "
                              "lines or a .csv with columns image,caption.")
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise XMGIEInputError(f"{path} must have a header row with the columns image,caption (found "
                                      f"{reader.fieldnames}).")
            rows = [(row, reader.line_num) for row in reader]
        else:
            rows = []
            for number, text in enumerate(f, 1):
                if text.strip():
                    try:
                        rows.append((json.loads(text), number))
                    except json.JSONDecodeError as e:
                        raise XMGIEInputError(f"{path}, line {number}: not valid JSON ({e.msg}); write one "
                                              "{\"image\": ..., \"caption\": ...} object per line.") from None
    out = []
    for row, number in rows:
        if not isinstance(row, dict):
            raise XMGIEInputError(f"{path}, line {number}: expected an object with image and caption.")
        for name in ("image", "caption"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise field_error(path, number, name, "missing or empty")
        image = resolve(row["image"], path.parent)
        if not image.is_file():
            raise field_error(path, number, "image", f"file not found: {image}")
        check_image_file(image, path, number)
        out.append((image, " ".join(row["caption"].split()), number))
    if not out:
        raise XMGIEInputError(f"{path} holds no captions.")
    return out


def coloured_object(caption: str) -> tuple[str, str, str] | None:
    """The first 'colour object' of a caption as (span, colour, object): 'a red car on ...' -> ('red car', 'red',
    'car'); None if there is none."""
    for m in re.finditer(r"\b([A-Za-z]+)(?=(\s+)([A-Za-z]+)\b)", caption):
        colour, thing = m.group(1).lower(), m.group(3)
        if colour in COLOURS and thing.lower() not in COLOURS | NOT_OBJECTS:
            return m.group(1) + m.group(2) + thing, colour, thing
    return None


def rules_edit(caption: str, seed: int = 0) -> tuple[str, str] | None:
    """(t_ins, t_e) for a caption, or None when it names no coloured object (or every colour). The new colour is a
    stable hash of (caption, seed) over NEW_COLOURS minus those in the caption; t_e substitutes the rules plan's
    attribute."""
    found = coloured_object(caption)
    if found is None:
        return None
    span, colour, thing = found
    present = set(re.findall(r"[a-z]+", caption.lower()))
    choices = [c for c in NEW_COLOURS if c not in present]
    if not choices:
        return None
    digest = int(hashlib.sha1(f"{seed}|{caption}".encode()).hexdigest(), 16)
    instruction = f"make the {colour} {thing.lower()} {choices[digest % len(choices)]}"
    attribute = rules_plan(instruction).edit_words[0].split()[0]  # the new colour as the Instruction node reads it
    start = caption.index(span)
    return instruction, caption[:start] + f"{attribute} {thing}" + caption[start + len(span):]


def render(pipe: Any, image: torch.Tensor, prompt: str, size: int, steps: int, strength: float, guidance: float,
           seed: int) -> torch.Tensor:
    """X_gen: img2img of IMAGE [1, H, W, 3] (squashed to size x size) towards `prompt` -> [1, size, size, 3]."""
    from PIL import Image

    pixels = square_resize(image.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt=prompt, image=Image.fromarray(to_rgb8(pixels)[0]), strength=strength,
               num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np").images
    return torch.from_numpy(out[:1]).float()


@dataclass(frozen=True)
class BuildSettings:
    backend: str = "rules"
    model_folder: Path | None = None
    generator: Path | None = None
    generator_config: Path | None = None
    steps: int = 30
    strength: float = 0.7
    guidance_scale: float = 7.5
    size: int = 512
    seed: int = 0
    device: str = "cpu"


def check_build_settings(s: BuildSettings) -> None:
    resolve_device(s.device)
    if s.backend not in ("rules", "local"):
        raise XMGIEInputError(f"--backend {s.backend!r}: choose rules or local.")
    if s.backend == "local" and s.model_folder is None:
        raise XMGIEInputError("--backend local needs --model-folder: a transformers VLM folder (e.g. "
                              "ComfyUI/models/LLM/Qwen2.5-VL-3B-Instruct).")
    unusable = unusable_numbers(s) + ([f"--guidance-scale {s.guidance_scale}"] if s.guidance_scale < 0 else [])
    if unusable:
        raise XMGIEInputError(f"Invalid settings: {', '.join(unusable)}. Every number must be finite, the guidance "
                              "scale >= 0 and the seed in 0..2^64-1.")
    if s.generator is not None and (s.steps < 1 or not 0 < s.strength <= 1 or s.size % 8 or s.size < 8):
        raise XMGIEInputError(f"Generator settings --steps {s.steps} --strength {s.strength} --size {s.size}: steps "
                              "must be >= 1, strength in (0, 1], size a positive multiple of 8.")


def edits(captions: list[tuple[Path, str, int]], s: BuildSettings) -> Iterator[tuple[Path, str, str, str, str]]:
    """(image, t_o, t_ins, t_e, how) per usable caption; how = the backend that wrote t_e."""
    try:
        for image, caption, _ in captions:
            made = rules_edit(caption, s.seed)
            if made is None:
                continue
            t_ins, t_e = made
            how = "rules"
            if s.backend == "local":
                plan = local_plan(load_image(image)[0], t_ins, Path(s.model_folder), GenerationSettings(seed=s.seed),
                                  keep_loaded=True, device=s.device)
                if not plan.backend.startswith("rules"):
                    t_e, how = plan.target_description, "local"
            yield image, caption, t_ins, t_e, how
    finally:
        if s.backend == "local":
            unload(Path(s.model_folder))


def check_image_file(path: Path, source: Path, line: int) -> None:
    """A captions entry must name a file PIL can read as an image (its header and structure; not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise field_error(source, line, "image", f"{path} is not a readable image ({e}); {FORMATS_HINT}") from None


def looks_like_records(path: Path) -> bool:
    """Whether a file is a records JSONL this builder wrote: every non-blank line an object with t_o, t_ins, t_e."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return bool(rows) and all(isinstance(r, dict) and {"image", *TEXT_FIELDS} <= set(r) for r in rows)


def check_outputs(out: Path, renders: Path, captions_path: Path, images: list[Path], overwrite: bool) -> None:
    """Before any work: --out must be a file path; an existing data set (records + renders) is replaced only with
    `overwrite`, and only if it is one; no input (the captions, an image) may be among the outputs."""
    if out.is_dir():
        raise XMGIEInputError(f"--out {out} is a folder; give the records file to write, e.g. --out "
                              f"{out / 'records.jsonl'}.")
    for path in (captions_path, *images):
        if overlap(path, out) or overlap(path, renders):
            raise XMGIEInputError(f"--out {out} would replace the input {path} (the data set is {out} and the "
                                  f"renders folder {renders}); choose an --out away from the captions and images.")
    if not (out.exists() or renders.exists()):
        return
    if not overwrite:
        raise XMGIEInputError(f"--out {out} already holds a data set ({out.name} and/or {renders.name}/); choose "
                              "another --out, or pass --overwrite to replace it (the old one stays until the new one "
                              "is complete).")
    if out.exists() and not looks_like_records(out):
        raise XMGIEInputError(f"--out {out} exists and is not a region data set (not records written by this "
                              "builder), so it is not replaced even with --overwrite; choose another --out.")
    if renders.exists() and (not renders.is_dir() or any(p.suffix != ".png" or not p.is_file()
                                                         for p in renders.iterdir())):
        raise XMGIEInputError(f"{renders} (where the renders of --out {out} go) holds other things than renders, so "
                              "it is not replaced even with --overwrite; move them away or choose another --out.")


def build_records(captions_path: Path, out: Path, s: BuildSettings, overwrite: bool = False) -> dict[str, int]:
    """Write the records JSONL (and renders under <out stem>_renders/); returns counts for the summary.

    Everything is checked before any work; the data set is written beside --out and swapped in when complete
    (xmgie_core.staging), so a failure or Ctrl-C leaves an existing data set as it was."""
    from tqdm import tqdm

    check_build_settings(s)
    captions = read_captions(captions_path)
    out = Path(out).expanduser().absolute()
    renders = out.parent / f"{out.stem}_renders"
    check_outputs(out, renders, Path(captions_path), [image for image, _, _ in captions], overwrite)
    counts = {"captions": len(captions), "records": 0, "local": 0, "rules": 0}
    with staged([out, renders]) as (staged_out, staged_renders):
        pipe = None
        if s.generator is not None:
            dtype = torch.float16 if str(s.device).startswith("cuda") else torch.float32
            pipe = load_sd15_pipeline(s.generator, s.generator_config, s.device, dtype, "--generator",
                                      "--generator-config")
        with staged_out.open("w", encoding="utf-8") as f:
            for index, (image, t_o, t_ins, t_e, how) in enumerate(tqdm(edits(captions, s), total=len(captions),
                                                                       desc="records")):
                record = {"image": os.path.relpath(image, out.parent), "t_o": t_o, "t_ins": t_ins, "t_e": t_e}
                if pipe is not None:
                    x_gen = render(pipe, load_image(image)[0], t_e, s.size, s.steps, s.strength, s.guidance_scale,
                                   s.seed + index)
                    name = f"{index:06d}_{image.stem}.png"
                    save_image(x_gen, staged_renders / name)
                    record["render"] = os.path.relpath(renders / name, out.parent)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["records"] += 1
                counts[how] += 1
        if not counts["records"]:
            raise XMGIEInputError(f"None of the {len(captions)} captions in {captions_path} names a coloured object "
                                  "('a red car ...'), which the instruction templates need; add such captions.")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xmgie_core.apps.region_data",
                                description="Region predictor training data ([Regions] §4).")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="records (t_o, t_ins, t_e, X_gen) from captioned images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--captions", type=Path, required=True, help=".jsonl of {image, caption} or .csv image,caption")
    b.add_argument("--out", type=Path, required=True, help="records .jsonl to write (renders go beside it)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing data set at --out (swapped in only once the new one is complete)")
    b.add_argument("--backend", choices=("rules", "local"), default="rules", help="who writes t_e")
    b.add_argument("--model-folder", type=Path, help="local VLM folder for --backend local")
    b.add_argument("--generator", type=Path, help="SD1.5: diffusers folder or single .safetensors checkpoint")
    b.add_argument("--generator-config", type=Path, help="diffusers SD1.5 config folder, for a single-file --generator")
    b.add_argument("--steps", type=int, default=30, help="img2img denoising steps")
    b.add_argument("--strength", type=float, default=0.7, help="img2img strength (0, 1]")
    b.add_argument("--guidance-scale", type=float, default=7.5, help="img2img classifier-free guidance")
    b.add_argument("--size", type=int, default=512, help="render size in pixels (square, multiple of 8)")
    b.add_argument("--seed", type=int, default=0, help="seeds the new colours and the renders (seed + record index)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the VLM and generator")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = BuildSettings(args.backend, args.model_folder, args.generator, args.generator_config, args.steps,
                             args.strength, args.guidance_scale, args.size, args.seed, args.device)
    try:
        counts = build_records(args.captions, args.out, settings, args.overwrite)
    except XMGIEInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = counts["captions"] - counts["records"]
    print(f"wrote {args.out}: {counts['records']} records ({counts['local']} t_e by the local model, "
          f"{counts['rules']} by rules), {skipped} captions skipped (no coloured object)"
          + ("" if args.generator else f"; no renders: {BUILD_HINT} before training"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
