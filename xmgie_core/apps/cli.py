"""Headless command line: `python -m xmgie_core edit ...` runs the whole edit on a photo through the diffusers host
(instruction -> region -> crop -> CAM + PFB -> decode -> identity score -> GB composite) on SD1.5 or, with
`--editor kontext`, on FLUX.1 Kontext's diffusers pipeline; `python -m xmgie_core gb ...` runs GB compositing on
image files."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

import torch

from .. import gb
from ..device import resolve_device
from ..errors import XMGIEInputError
from ..instruction.rules import rules_plan
from . import batch, evaluate
from .edit import EDITOR_DEFAULTS, EDITORS, MASK_NEEDED, SETTING_HINTS, SETTING_RANGES, EditSettings, settings_from_args
from ..image_io import check_out_dir, load_image, load_mask, save_image, unused_stem
from ..validation import check_range


def run_gb(args: argparse.Namespace) -> list[Path]:
    out = check_out_dir(args.out)
    edited, alpha_mask = load_image(args.edited)
    mask = load_mask(args.mask) if args.mask else alpha_mask
    if mask is None:
        raise XMGIEInputError(f"{args.edited} has no transparency (no alpha channel, transparent palette entry or "
                              "colour key) to take the edit region from; pass it with --mask FILE.")
    source = load_image(args.source)[0] if args.source else None
    res = gb.apply_gb(edited, mask, args.mode, source, args.sigma_max, args.sigma_scale, args.edge_width)
    stem = unused_stem(out, "xmgie_gb", (".png", "_blend_mask.png"))
    return [save_image(res.image, out / f"{stem}.png"), save_image(res.mask, out / f"{stem}_blend_mask.png")]


TINY_TAG = "TINY-RANDOM-WEIGHTS"
NO_MODEL = ("No model: pass --checkpoint with an SD1.5 checkpoint, either a diffusers folder (model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single .safetensors file (e.g. "
            "ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors) plus --config with a local diffusers SD1.5 "
            "folder for its configs and tokenizer; or pass --tiny to check the plumbing on tiny random-weight models "
            "(the picture is then noise, not an edit).")


OUTPUTS = ("_edit.png", "_mask.png", "_overlay.png", "_report.json")
"""The files of one edit, after its stem (a second run into the same --out gets the next free stem)."""


EDIT = EditSettings("")
"""The edit's defaults (the bundled xmgie_edit workflow's), shown by --help."""


def check_editor_arguments(args: argparse.Namespace) -> None:
    """What a DiT editor needs (a diffusers folder and a mask) and the SD1.5-only options it cannot take."""
    if args.editor == "sd15":
        if args.checkpoint is None and not args.tiny:
            raise XMGIEInputError(NO_MODEL)
        if args.checkpoint is not None and args.tiny:
            raise XMGIEInputError("--tiny and --checkpoint exclude each other: --tiny uses tiny random-weight models.")
        return
    only_sd15 = [flag for flag, given in (("--tiny", args.tiny), ("--config", args.config is not None),
                                          ("--draws", args.draws is not None)) if given]
    if only_sd15:
        raise XMGIEInputError(f"{', '.join(only_sd15)} belong(s) to the SD1.5 edit, not --editor {args.editor}: "
                              f"leave {'them' if len(only_sd15) > 1 else 'it'} out.")
    if args.checkpoint is None:
        raise XMGIEInputError(f"--editor {args.editor} needs --checkpoint DIR: the local diffusers folder of the "
                              "model (e.g. FLUX.1-Kontext-dev as downloaded, with model_index.json).")
    if args.mask is None:
        raise XMGIEInputError(MASK_NEEDED.format(editor=args.editor))


def run_edit(args: argparse.Namespace) -> list[Path]:
    from ..hosts.diffusers import models as sd15
    from ..hosts.diffusers.dit_edit import DiTEditor
    from . import edit as de

    check_editor_arguments(args)
    settings = settings_from_args(args, args.instruction, args.editor)
    device = resolve_device(args.device)
    out = check_out_dir(args.out)
    photo = load_image(args.image)[0]
    mask = load_mask(args.mask) if args.mask else None
    plan = rules_plan(args.instruction)  # before any model loads: an unreadable instruction fails at once
    backend = de.face_backend_for(args.identity, args.insightface_root, args.insightface_pack)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        if args.editor != "sd15":
            log(f"loading {args.checkpoint} ...")
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            models = DiTEditor(sd15.load_dit_pipeline(args.checkpoint, args.editor, device, dtype), args.editor,
                               str(args.checkpoint))
        elif args.tiny:
            log("loading TINY RANDOM-WEIGHT models: this checks the plumbing, the picture will not be an edit")
            models = sd15.tiny_sd15(Path(tokenizer_dir), device)
        else:
            log(f"loading {args.checkpoint} ...")
            models = sd15.load_sd15(args.checkpoint, args.config, device)
        result = de.edit_photo(models, photo, settings, mask, backend, log, plan)
    stem = unused_stem(out, args.image.stem + "_xmgie" + (f"_{TINY_TAG}" if models.tiny else ""), OUTPUTS)
    written = [save_image(result.image, out / f"{stem}_edit.png"), save_image(result.mask, out / f"{stem}_mask.png"),
               save_image(result.overlay, out / f"{stem}_overlay.png"), out / f"{stem}_report.json"]
    written[-1].write_text(json.dumps(result.report(settings, models), indent=2) + "\n")
    log(f"identity: {result.identity}")
    return written


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the CLI's own form ("error: ...", exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m xmgie_core", description="xMGIE headless tools.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gb", help="Gaussian-blur compositing ([xMGIE] eqs 18-19) of an edited image.")
    g.add_argument("--edited", type=Path, required=True, help="edited image; its alpha is the mask (transparent = edit) unless --mask is given")
    g.add_argument("--mask", type=Path, help="greyscale mask file, white = edit")
    g.add_argument("--source", type=Path, help="original image (needed for --mode composite)")
    g.add_argument("--mode", choices=gb.MODES, default="composite")
    g.add_argument("--sigma-max", type=float, default=gb.SIGMA_MAX,
                   help="blur sigma at the mask border, pixels (%g..%g)" % gb.SIGMA_MAX_RANGE)
    g.add_argument("--sigma-scale", type=float, default=gb.SIGMA_SCALE,
                   help="how fast the blur fades with distance, pixels (%g..%g)" % gb.SIGMA_SCALE_RANGE)
    g.add_argument("--edge-width", type=float, default=gb.EDGE_WIDTH,
                   help="composite: width of the blend zone, pixels (%g..%g)" % gb.EDGE_WIDTH_RANGE)
    g.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    g.set_defaults(run=run_gb)
    e = sub.add_parser("edit", help="The whole instruction edit of a photo on an SD1.5 checkpoint or a DiT editor "
                                    "(diffusers).")
    e.add_argument("--image", type=Path, required=True, help="the photo to edit (any size: the region is cropped)")
    e.add_argument("--instruction", required=True, help="e.g. 'give the man a red scarf'")
    e.add_argument("--mask", type=Path, help="greyscale edit region, white = edit (default: predicted)")
    e.add_argument("--editor", choices=EDITORS, default="sd15",
                   help="the model that edits: sd15 (default), kontext (FLUX.1 Kontext) or qwen-edit "
                        "(Qwen-Image-Edit-2509); the DiT editors need --checkpoint DIR and --mask")
    e.add_argument("--checkpoint", type=Path, help="SD1.5: a diffusers folder or a single .safetensors file; "
                                                   "kontext / qwen-edit: the model's local diffusers folder")
    e.add_argument("--config", type=Path, help="with a single-file --checkpoint: a local diffusers SD1.5 folder")
    e.add_argument("--tiny", action="store_true", help="tiny random-weight models: checks the plumbing only")
    e.add_argument("--seed", type=setting("seed", int), default=EDIT.seed)
    e.add_argument("--steps", type=setting("steps", int), help=f"sampling steps ({by_editor('steps')})")
    e.add_argument("--cfg", type=setting("cfg", float),
                   help=f"guidance scale: SD1.5's and Qwen-Edit's CFG, Kontext's distilled guidance ({by_editor('cfg')})")
    e.add_argument("--denoise", type=setting("denoise", float),
                   help=f"fraction of the schedule run from the photo, above 0, at most 1 ({by_editor('denoise')})")
    e.add_argument("--draws", type=setting("region_draws", int),
                   help=f"noise draws of the region prediction, SD1.5 only (default {EDIT.region_draws})")
    e.add_argument("--context-factor", type=setting("context_factor", float), default=EDIT.context_factor,
                   help="crop = region box sides times this")
    e.add_argument("--working-size", type=setting("working_size", int),
                   help=f"longer side of the crop the model sees ({by_editor('working_size')})")
    e.add_argument("--face-protection", type=setting("face_protection", float), default=EDIT.face_protection,
                   help="0..1: keep faces the edit overlaps")
    e.add_argument("--identity", choices=("dlib", "auto", "insightface", "none"), default="dlib",
                   help="face backend for protection and the identity score (dlib: public-domain weights; auto: dlib "
                        "when installed, else none; insightface: a pack, see --insightface-pack)")
    e.add_argument("--insightface-root", type=Path, help="folder with models/<pack>/*.onnx")
    e.add_argument("--insightface-pack", default="antelopev2",
                   help="pack folder name (antelopev2 and buffalo_l: non-commercial licence; any pack of that layout "
                        "with an ArcFace-style recognition model works)")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is usable, else cpu)")
    e.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    e.set_defaults(run=run_edit)
    evaluate.add_arguments(sub.add_parser("eval", help="Score an editor over a dataset (MagicBrush, Emu Edit metrics)"))
    batch.add_arguments(sub.add_parser("batch", help=batch.HELP), e, NO_MODEL, TINY_TAG)
    return p


def by_editor(name: str) -> str:
    """The defaults of a setting per editor, for --help."""
    other = ", ".join(f"{e} {d[name]:g}" for e, d in EDITOR_DEFAULTS.items())
    return f"default: sd15 {getattr(EDIT, name):g}, {other}"


def setting(name: str, kind: type) -> Callable[[str], int | float]:
    """An argparse type: the text as `kind`, within the range the edit settings (and the node widget) allow."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        try:
            check_range(value, name, *SETTING_RANGES[name], hint=SETTING_HINTS.get(name, ""))
        except XMGIEInputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (already reported)
        return int(e.code or 0)
    try:
        written = args.run(args)
    except XMGIEInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
