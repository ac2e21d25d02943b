"""Headless command line: `python -m xmgie_core gb ...` runs GB compositing on image files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import gb
from .errors import XMGIEInputError
from .image_io import check_out_dir, load_image, load_mask, save_image


def run_gb(args: argparse.Namespace) -> list[Path]:
    out = check_out_dir(args.out)
    edited, alpha_mask = load_image(args.edited)
    mask = load_mask(args.mask) if args.mask else alpha_mask
    if mask is None:
        raise XMGIEInputError(f"{args.edited} has no transparency (no alpha channel, transparent palette entry or "
                              "colour key) to take the edit region from; pass it with --mask FILE.")
    source = load_image(args.source)[0] if args.source else None
    res = gb.apply_gb(edited, mask, args.mode, source, args.sigma_max, args.sigma_scale, args.edge_width)
    return [save_image(res.image, out / "xmgie_gb.png"), save_image(res.mask, out / "xmgie_gb_blend_mask.png")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xmgie_core", description="xMGIE headless tools.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gb", help="Gaussian-blur compositing (seed 000 eqs 18-19) of an edited image.")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = args.run(args)
    except XMGIEInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
