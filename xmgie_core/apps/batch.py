"""Batch editing (`python -m xmgie_core batch`): the headless xMGIE edit (apps/edit.py, diffusers host) of every item
of a list, in this process or spread over Ray Data actors, one loaded pipeline per actor (one per GPU where the
cluster has GPUs).

  items    rows of a CSV or JSONL list: id, source, instruction, optional mask and seed (paths relative to the list)
  done     an item whose record says "ok" and whose outputs exist; a rerun skips it. Every file is written under a
           temporary name and renamed, so a run killed mid-write never leaves a file that counts
  record   records/<id>.json: "ok" with the output files and the edit's report, or "failed" with the error; one
           item's failure never stops the run (a failed item is tried again by the next run)
  report   report.jsonl: the records in list order without their timings. Each item's randomness comes from its own
           seed (torch.Generator, no global RNG), so equal seeds give the same files however the run was spread.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import XMGIEInputError
from ..training import read_jsonl

COLUMNS = ("id", "source", "instruction")
"""Required columns of a list; `mask` and `seed` are optional."""
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PARTIAL = ".partial"
"""Infix of a file being written (renamed when complete; left-overs of a killed run are removed by the next)."""
REPORT = "report.jsonl"
RECORDS = "records"
NO_RAY = ('--ray needs Ray, which is not installed here. Install it with: pip install "ray[data]" (or the pack\'s '
          'extra: pip install "comfyui-xmgie[ray]"); or leave out --ray to edit in this process.')
SHARED = ("checkpoint", "config", "tiny", "seed", "steps", "cfg", "denoise", "draws", "context_factor",
          "working_size", "face_protection", "identity", "insightface_root", "insightface_pack", "device", "out")
"""The `edit` command's options that `batch` takes too (same flags, checks and defaults)."""
HELP = "The whole edit of each item of a CSV/JSONL list (--ray: over Ray Data workers)."
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------------- the list

def items(path: Path) -> list[dict[str, Any]]:
    """The items of a list file (.csv with a header row, or .jsonl with one object a line), or of the single such file
    in a folder: dicts with id, source, instruction, mask (None when absent) and seed (None: the --seed default);
    source and mask resolved against the list's folder. Whole-list faults (no file, a missing column, a repeated or
    unusable id) are errors before any work; an item's own faults (a missing image, a bad seed) fail that item only."""
    path = list_file(Path(path)).resolve()
    rows = list(_read_rows(path))
    if not rows:
        raise XMGIEInputError(f"{path} lists no items. Add rows with the columns {', '.join(COLUMNS)} "
                              "(mask and seed optional).")
    seen: dict[str, int] = {}
    out = []
    for line, row in rows:
        missing = [c for c in COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            raise XMGIEInputError(f"{path} line {line}: no {', '.join(missing)}. Every item needs "
                                  f"{', '.join(COLUMNS)} (mask and seed are optional).")
        item_id = str(row["id"]).strip()
        if not ID.fullmatch(item_id):
            raise XMGIEInputError(f"{path} line {line}: id {item_id!r} cannot name output files. Use letters, digits, "
                                  "'.', '_' and '-' only, starting with a letter or digit.")
        if item_id in seen:
            raise XMGIEInputError(f"{path} line {line}: id {item_id!r} is used again (first on line "
                                  f"{seen[item_id]}). Give every item its own id: outputs are named after it.")
        seen[item_id] = line
        mask, seed = row.get("mask"), row.get("seed")
        out.append({"id": item_id, "source": str(path.parent / str(row["source"]).strip()),
                    "instruction": str(row["instruction"]),
                    "mask": str(path.parent / str(mask).strip()) if str(mask or "").strip() else None,
                    "seed": seed if seed not in (None, "") else None})
    return out


def list_file(path: Path) -> Path:
    """`path` itself, or the one .csv / .jsonl file in the folder `path`."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
        if len(found) != 1:
            raise XMGIEInputError(f"--data {path} holds {len(found)} .csv/.jsonl files "
                                  f"({', '.join(p.name for p in found) or 'none'}); pass the list file itself.")
        return found[0]
    if not path.is_file():
        raise XMGIEInputError(f"--data {path} not found. Give a .csv or .jsonl list (columns {', '.join(COLUMNS)}, "
                              "optional mask and seed) or the folder holding it.")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise XMGIEInputError(f"--data {path} is neither .csv nor .jsonl. Save the list as CSV with a header row, or "
                              "as JSON Lines (one object a line).")
    return path


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (header on line 1) or JSONL list (training.read_jsonl: blank lines skipped)."""
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, _json_row, f"Write one object a line with {', '.join(COLUMNS)} (mask and seed "
                                           "optional).")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise XMGIEInputError(f"{path} has no column {', '.join(absent)} (its header: "
                                  f"{', '.join(reader.fieldnames or []) or 'empty'}). The first row must name "
                                  f"the columns {', '.join(COLUMNS)} (mask and seed optional).")
        return [(reader.line_num, row) for row in reader]


def _json_row(row: Any, path: Path, line: int) -> tuple[int, dict]:
    if not isinstance(row, dict):
        raise XMGIEInputError(f"{path}, line {line}: a JSON {type(row).__name__}, not an object. Write one object a "
                              'line, e.g. {"id": "a", "source": "a.png", "instruction": "..."}.')
    return line, row


# --------------------------------------------------------------------------------------------- editing one item

@dataclass(frozen=True)
class BatchConfig:
    """What every worker needs to load the pipeline and edit an item (plain values: it travels to Ray actors)."""

    out: str
    checkpoint: str | None
    config: str | None
    tiny: bool
    device: str | None
    identity: str
    insightface_root: str | None
    insightface_pack: str
    settings: dict
    threads: int
    """CPU threads of every worker: torch's CPU kernels (convolutions, matmuls) sum in another order with another
    thread count, so every worker takes this one count, and equal counts give equal files bit for bit."""
    tiny_tag: str

    def item_settings(self, item: dict):
        """The edit's settings for `item`: its instruction and its seed (else the --seed default)."""
        from .edit import EditSettings

        seed = self.settings["seed"] if item.get("seed") is None else _seed(item["seed"])
        return EditSettings(**{**self.settings, "instruction": item["instruction"], "seed": seed})


def _seed(value: Any) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise XMGIEInputError(f"seed {value!r} is not a whole number from 0 to 2^64-1. Write one, or leave the cell "
                              "empty for the --seed default.")
    return int(text)


class EditActor:
    """One loaded pipeline (models and face backend, loaded once) that edits items into config.out: the in-process
    run holds one; Ray Data's map_batches makes one per actor and calls it with batches of JSON-encoded items."""

    def __init__(self, config: BatchConfig):
        import torch

        from ..device import resolve_device
        from ..hosts.diffusers import models as sd15
        from .edit import face_backend_for

        self.config, self.out = config, Path(config.out)
        torch.set_num_threads(self.config.threads)
        device = resolve_device(config.device)
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            self.models = (sd15.tiny_sd15(Path(tokenizer_dir), device) if config.tiny else
                           sd15.load_sd15(Path(config.checkpoint), config.config and Path(config.config), device))
        self.backend = face_backend_for(config.identity, config.insightface_root and Path(config.insightface_root),
                                        config.insightface_pack)

    def __call__(self, batch: dict) -> dict:
        return {"record": [json.dumps(self.edit(json.loads(str(text)))) for text in batch["item"]]}

    def edit(self, item: dict) -> dict:
        """Edit one item, write its outputs then its record; a failure is the record (the run goes on)."""
        record = {"id": item["id"], "source": item["source"], "mask": item.get("mask"),
                  "instruction": item["instruction"]}
        start = time.perf_counter()
        try:
            record.update(self._edit(item))
        except Exception as e:  # noqa: BLE001 - any fault of one item is that item's record, never the run's end
            error = str(e) if isinstance(e, XMGIEInputError) else f"{type(e).__name__}: {e}"
            record.update(status="failed", error=error)
        record["seconds"] = round(time.perf_counter() - start, 3)
        write_atomic(record_path(self.out, item["id"]), lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
        return record

    def _edit(self, item: dict) -> dict:
        from ..image_io import load_image, load_mask, save_image
        from .edit import edit_photo

        settings = self.config.item_settings(item)
        photo = load_image(Path(item["source"]))[0]
        mask = load_mask(Path(item["mask"])) if item.get("mask") else None
        result = edit_photo(self.models, photo, settings, mask, self.backend)
        stem = item["id"] + (f"_{self.config.tiny_tag}" if self.models.tiny else "")
        outputs = {"edit": f"{stem}_edit.png", "mask": f"{stem}_mask.png"}
        for name, image in (("edit", result.image), ("mask", result.mask)):
            write_atomic(self.out / outputs[name], lambda p, image=image: save_image(image, p))
        report = result.report(settings, self.models)
        return {"seed": settings.seed, "status": "ok", "outputs": outputs, "timings_s": report.pop("timings_s"),
                "report": report}


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write` to a temporary name beside `path`, then rename it there (atomic on one file system)."""
    partial = path.with_name(f"{path.stem}{PARTIAL}{path.suffix}")
    write(partial)
    os.replace(partial, path)
    return path


def record_path(out: Path, item_id: str) -> Path:
    return out / RECORDS / f"{item_id}.json"


def read_record(out: Path, item_id: str) -> dict | None:
    path = record_path(out, item_id)
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(out: Path, item_id: str) -> bool:
    """The item's record says ok and every output it names exists."""
    record = read_record(out, item_id)
    return bool(record) and record["status"] == "ok" and all((out / f).is_file() for f in record["outputs"].values())


# ------------------------------------------------------------------------------------------------------- the run

def run_batch(args: argparse.Namespace, no_model: str, tiny_tag: str) -> list[Path]:
    """The `batch` command; `no_model` is the edit command's message for a missing model, `tiny_tag` its mark on the
    names of files made with the tiny models."""
    if args.checkpoint is None and not args.tiny:
        raise XMGIEInputError(no_model)
    if args.checkpoint is not None and args.tiny:
        raise XMGIEInputError("--tiny and --checkpoint exclude each other: --tiny uses tiny random-weight models.")
    if not args.ray and (args.ray_address or args.workers):
        raise XMGIEInputError("--ray-address and --workers spread the batch over Ray: add --ray (or leave them out).")
    if args.ray:
        ray_with_data()
        if args.device not in (None, "cpu", "cuda"):
            raise XMGIEInputError(f"--device {args.device} with --ray: every Ray worker gets its own GPU, so name no "
                                  "index; pass --device cuda or cpu, or leave it out (cuda where workers have GPUs).")
    import torch

    from ..image_io import check_out_dir
    from .edit import face_backend_for, settings_from_args

    settings = settings_from_args(args, "")
    face_backend_for(args.identity, args.insightface_root, args.insightface_pack)  # a missing backend fails now
    out = check_out_dir(args.out)
    data = items(args.data)
    config = BatchConfig(str(out.resolve()), args.checkpoint and str(args.checkpoint), args.config and str(args.config),
                         args.tiny, args.device, args.identity, args.insightface_root and str(args.insightface_root),
                         args.insightface_pack, {k: v for k, v in asdict(settings).items() if k != "instruction"},
                         args.threads or torch.get_num_threads(), tiny_tag)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with ray_workers(args.ray_address, args.workers, config.threads, log) if args.ray else nullcontext() as on_ray:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
        for left_over in [*out.glob(f"*{PARTIAL}*"), *(out / RECORDS).glob(f"*{PARTIAL}*")]:
            left_over.unlink()
        todo = [item for item in data if not is_done(out, item["id"])]
        log(f"{len(data)} items: {len(data) - len(todo)} done already (skipped), {len(todo)} to edit "
            f"({config.threads} CPU thread(s) a worker)")
        start = time.perf_counter()
        if todo and on_ray:
            on_ray(todo, config)
        elif todo:
            actor = EditActor(config)
            for item in todo:
                log_record(actor.edit(item), log)
    report = write_report(out, data)
    failed = [r["id"] for r in map(json.loads, report.read_text().splitlines()) if r["status"] != "ok"]
    log(f"{len(todo)} edited in {time.perf_counter() - start:.1f} s; {len(data) - len(failed)} of {len(data)} ok"
        + (f", failed: {', '.join(failed)} (errors in {report})" if failed else ""))
    return [report]


@contextmanager
def ray_workers(address: str | None, workers: int | None, threads: int,
                log: Log) -> Iterator[Callable[[list[dict], BatchConfig], None]]:
    """A Ray session (started here unless one runs) and the function that edits items on it with Ray Data: one
    EditActor (one loaded pipeline) per worker, one item a batch; one GPU per actor where the cluster has GPUs (as
    many actors as GPUs unless --workers), else `threads` CPUs per actor (--workers, default 1). The workers must
    fit the CPUs: more threads than cores would make the run crawl, fewer would change the arithmetic."""
    ray = ray_with_data()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # one log line an item instead
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        actors = workers or max(gpus, 1)
        if not gpus and actors * threads > cpus:
            raise XMGIEInputError(
                f"--workers {actors} with {threads} CPU thread(s) each need {actors * threads} CPUs; this Ray has "
                f"{cpus}. Pass --threads {max(1, cpus // actors)} (and the same --threads to any run you compare "
                "with: the thread count changes the last bits of the arithmetic), or fewer --workers.")
        log(f"Ray: {actors} worker(s), " + ("one GPU each" if gpus else f"{threads} CPU(s) each"))

        def run(todo: list[dict], config: BatchConfig) -> None:
            data = ray.data.from_items([{"item": json.dumps(item)} for item in todo], override_num_blocks=len(todo))
            edited = data.map_batches(EditActor, fn_constructor_args=(config,), batch_size=1,
                                      concurrency=min(actors, len(todo)),
                                      **({"num_gpus": 1} if gpus else {"num_cpus": threads}))
            for row in edited.iter_rows():
                log_record(json.loads(row["record"]), log)

        yield run
    finally:
        if started:
            ray.shutdown()


def ray_with_data():
    """The ray module with Ray Data loaded, or the sentence saying how to install it."""
    try:
        import ray.data
    except ImportError:
        raise XMGIEInputError(NO_RAY) from None
    return ray


def log_record(record: dict, log: Log) -> None:
    log(f"{record['id']}: " + ("ok" if record["status"] == "ok" else f"FAILED: {record['error']}")
        + f" ({record['seconds']:.1f} s)")


def write_report(out: Path, data: list[dict]) -> Path:
    """report.jsonl: each item's record in list order, without its timings (the same for the same seeds)."""
    lines = []
    for item in data:
        record = read_record(out, item["id"]) or {"id": item["id"], "status": "not run"}
        lines.append(json.dumps({k: v for k, v in record.items() if k not in ("seconds", "timings_s")}))
    return write_atomic(out / REPORT, lambda p: p.write_text("\n".join(lines) + "\n"))


# ------------------------------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser, edit: argparse.ArgumentParser, no_model: str, tiny_tag: str) -> None:
    """The `batch` command's options: its own, and `edit`'s model and settings options (SHARED) as they are; the edit
    command's missing-model message and tiny-model file mark (passed in: this module does not import the CLI)."""
    p.add_argument("--data", type=Path, required=True,
                   help="a .csv (header row) or .jsonl list with id, source, instruction, optional mask and seed "
                        "(paths relative to the list), or the folder holding it")
    p.add_argument("--ray", action="store_true",
                   help='spread the items over Ray Data workers, one loaded pipeline each (pip install "ray[data]")')
    p.add_argument("--ray-address", help="with --ray: a running cluster's address (default: a local Ray)")
    p.add_argument("--workers", type=positive, help="with --ray: workers (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--threads", type=positive,
                   help="CPU threads of each worker (default: torch's default here, all cores); runs with equal "
                        "--threads write the same files bit for bit")
    for action in edit._actions:  # noqa: SLF001 - argparse's own list of a parser's options
        if action.dest in SHARED:
            p._add_action(action)  # noqa: SLF001
    p.set_defaults(run=partial(run_batch, no_model=no_model, tiny_tag=tiny_tag))


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)
