"""`python -m xmgie_core eval`: run an editor over a dataset and score every edit (xmgie_core.evaluation), or
`--compare RUN_A RUN_B` two earlier runs side by side. A run writes a new folder under --out (never over an earlier
run: eval, eval_2, ...), staged and swapped in whole at the end, so a failure leaves nothing half written."""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import XMGIEInputError
from ..evaluation import datasets as ds
from ..evaluation.datasets import Sample
from ..evaluation.editors import ABLATIONS, Edited, PrecomputedEdits
from ..evaluation.models import MODEL_OPTIONS, Models
from ..evaluation.report import compare, write_run
from ..evaluation.runner import evaluate
from ..image_io import check_out_dir, unused_stem
from ..metrics.registry import METRICS
from ..staging import staged
from .edit import EditSettings, edit_photo, face_backend_for

EDIT = EditSettings("")
NO_EDITOR = ("Nothing to evaluate: pass --edits DIR (edits made elsewhere, named by sample id), or --checkpoint with "
             "an SD1.5 model (a diffusers folder, or a .safetensors file plus --config) for the xMGIE edit, or --tiny "
             "to check the plumbing on tiny random-weight models.")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The eval command's options; sets `run`."""
    p.add_argument("--dataset", type=Path, help="a MagicBrush folder (edit_sessions.json + images/), a Hugging Face "
                   "snapshot of osunlp/MagicBrush or facebook/emu_edit_test_set (data/*.parquet), or a .csv/.jsonl")
    p.add_argument("--format", choices=ds.FORMATS, default="auto", help="the dataset layout (default: detected)")
    p.add_argument("--split", help="parquet split (MagicBrush: train/dev, default dev; Emu Edit: validation/test, "
                   "default test)")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--edits", type=Path, help="score precomputed edits from this folder (<sample id>.png) instead "
                   "of editing")
    p.add_argument("--checkpoint", type=Path, help="edit with xMGIE on this SD1.5 (diffusers folder or .safetensors)")
    p.add_argument("--config", type=Path, help="with a single-file --checkpoint: a local diffusers SD1.5 folder")
    p.add_argument("--tiny", action="store_true", help="edit with tiny random-weight models (plumbing check only)")
    for name in ABLATIONS:
        p.add_argument(f"--no-{name}", action="store_true", help=f"ablation: the xMGIE edit without {name.upper()}"
                       if name != "region" else "ablation: the whole photo as the region (no localisation)")
    p.add_argument("--dataset-masks", action="store_true", help="the xMGIE edit takes the dataset's mask as its region")
    p.add_argument("--seed", type=int, default=EDIT.seed, help="xMGIE edit settings (checked as `edit` checks them)")
    p.add_argument("--steps", type=int, default=EDIT.steps)
    p.add_argument("--cfg", type=float, default=EDIT.cfg)
    p.add_argument("--denoise", type=float, default=EDIT.denoise)
    p.add_argument("--draws", type=int, default=EDIT.region_draws, help="noise draws of the region prediction")
    p.add_argument("--working-size", type=int, default=EDIT.working_size)
    p.add_argument("--identity", choices=("auto", "dlib", "none"), default="auto",
                   help="face backend for IPS and face protection (auto: dlib when installed)")
    for key, (option, what, _, _) in MODEL_OPTIONS.items():
        p.add_argument(option, type=Path, dest=key, help=f"{what}; without it those metrics are skipped")
    p.add_argument("--metrics", help=f"comma-separated subset of: {', '.join(METRICS)} (default: all that apply)")
    p.add_argument("--sheet-rows", type=int, default=24, help="samples shown on the contact sheet")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when usable)")
    p.add_argument("--out", type=Path, default=Path("eval_runs"), help="folder the run's folder is made in")
    p.add_argument("--name", default="eval", help="the run folder's name (a free one: eval, eval_2, ...)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two run folders instead (paired B - A per metric)")
    p.set_defaults(run=run)


class XmgieEditor:
    """The headless whole edit on an SD1.5 model. Ablations (ABLATIONS): cam / pfb -> EditSettings.cam / .pfb; gb ->
    edge_width 0 (GB's blend zone gone: the region pasted with a hard edge); region -> the whole photo as the region
    (no localisation). `given_masks`: the dataset's mask is the region instead of the predicted one."""

    kind = "xmgie"

    def __init__(self, models, settings, face_backend=None, off: tuple[str, ...] = (), given_masks: bool = False):
        unknown = sorted(set(off) - set(ABLATIONS))
        if unknown:
            raise XMGIEInputError(f"Unknown techniques to switch off: {unknown}; use {', '.join(ABLATIONS)}.")
        if given_masks and "region" in off:
            raise XMGIEInputError("--dataset-masks and --no-region exclude each other: one gives the dataset's "
                                  "region, the other the whole photo.")
        self.models, self.face_backend, self.off, self.given_masks = models, face_backend, tuple(off), given_masks
        self.settings = replace(settings, cam="cam" not in off, pfb="pfb" not in off,
                                edge_width=0.0 if "gb" in off else settings.edge_width)

    def edit(self, sample: Sample, source: torch.Tensor, gt_mask: torch.Tensor | None) -> Edited:
        mask = None
        if "region" in self.off:
            mask = torch.ones(source.shape[:3])
        elif self.given_masks:
            if gt_mask is None:
                raise XMGIEInputError(f"--dataset-masks: sample {sample.id} has no mask in the dataset.")
            mask = gt_mask
        result = edit_photo(self.models, source, replace(self.settings, instruction=sample.instruction), mask,
                            self.face_backend)
        return Edited(result.image, result.mask, result.notes, result.report(self.settings, self.models))

    def describe(self) -> dict:
        settings = asdict(self.settings)
        settings.pop("instruction")
        return {"kind": self.kind, "checkpoint": self.models.source, "tiny_random_models": self.models.tiny,
                "switched_off": list(self.off), "region": "whole photo" if "region" in self.off else
                "dataset mask" if self.given_masks else "predicted", "settings": settings}


def check_editor(args: argparse.Namespace) -> EditSettings | None:
    """The editor's options, checked before any work: the xMGIE edit's settings, or None for --edits."""
    off = [name for name in ABLATIONS if getattr(args, f"no_{name}")]
    if args.edits is not None:
        if args.checkpoint or args.tiny or off or args.dataset_masks:
            raise XMGIEInputError("--edits scores edits made elsewhere; --checkpoint/--tiny, --no-* and "
                                  "--dataset-masks choose how xMGIE edits. Give one or the other.")
        return None
    if args.checkpoint is None and not args.tiny:
        raise XMGIEInputError(NO_EDITOR)
    if args.checkpoint is not None and args.tiny:
        raise XMGIEInputError("--tiny and --checkpoint exclude each other: --tiny uses tiny random-weight models.")
    return replace(EDIT, seed=args.seed, steps=args.steps, cfg=args.cfg, denoise=args.denoise,
                   region_draws=args.draws, working_size=args.working_size)  # EditSettings checks every range


def _editor(args: argparse.Namespace, settings: EditSettings | None, device, tokenizer_dir: Path, faces):
    if settings is None:
        return PrecomputedEdits(args.edits)
    from ..hosts.diffusers import models as sd15

    off = tuple(name for name in ABLATIONS if getattr(args, f"no_{name}"))
    models = sd15.tiny_sd15(tokenizer_dir, device) if args.tiny else sd15.load_sd15(args.checkpoint, args.config,
                                                                                     device)
    return XmgieEditor(models, settings, faces, off, args.dataset_masks)


def run_compare(args: argparse.Namespace) -> list[Path]:
    out = check_out_dir(args.out)
    a, b = args.compare
    stem = unused_stem(out, f"compare_{a.name}_vs_{b.name}", ("",))
    with staged([out / stem]) as [stage]:
        stage.mkdir()
        print(compare(a, b, stage))
    return [out / stem / name for name in ("compare.md", "compare.json", "compare.html")]


def run(args: argparse.Namespace) -> list[Path]:
    if args.compare:
        return run_compare(args)
    if args.dataset is None:
        raise XMGIEInputError("eval needs --dataset (the samples to edit and score), or --compare RUN_A RUN_B.")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else None
    settings = check_editor(args)
    out = check_out_dir(args.out)
    data = ds.open_dataset(args.dataset, args.format, args.split, args.limit)
    device = resolve_device(args.device)
    faces = face_backend_for(args.identity)
    models = Models({key: getattr(args, key) for key in MODEL_OPTIONS}, faces, device)
    stem = unused_stem(out, args.name, ("",))
    with tempfile.TemporaryDirectory() as tokenizer_dir, staged([out / stem]) as [stage]:
        editor = _editor(args, settings, device, Path(tokenizer_dir), faces)
        stage.mkdir()
        outcome = evaluate(data, editor, models, stage, names, log, keep=args.sheet_rows)
        run_info = {"dataset": {"format": data.format, "root": str(data.root), "split": data.split,
                                "samples": len(data.samples)},
                    "editor": editor.describe(), "models": models.sources, "model_notes": models.notes,
                    "metrics": {n: METRICS[n].source for n in (names or METRICS)}}
        write_run(outcome, run_info, stage)
        print((stage / "summary.md").read_text())
    return [out / stem / name for name in ("summary.md", "samples.jsonl", "samples.csv", "contact_sheet.png",
                                           "index.html")]


def main(argv: list[str] | None = None) -> int:
    """The command on its own (`python -m xmgie_core eval` reaches `run` through apps/cli.py): 0, or 2 with the
    error on stderr."""
    parser = argparse.ArgumentParser(prog="python -m xmgie_core eval", description=__doc__)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
        written = run(args)
    except SystemExit as e:  # --help, or a bad option (argparse reported it)
        return int(e.code or 0)
    except XMGIEInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {path}" for path in written))
    return 0
