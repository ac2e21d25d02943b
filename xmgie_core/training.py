"""What the two trainers (region/train.py, mgie/train.py) share: JSONL records, resumable safetensors checkpoints
(module + AdamW + RNG state, the data position and the run's settings), the step log, and torchrun/DDP."""

from __future__ import annotations

import json
import os
import sys
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from . import limits
from .device import resolve_device
from .errors import XMGIEInputError
from .weight_files import read_safetensors, safetensors_metadata

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
T = TypeVar("T")


def resolve(value: str, base: Path) -> Path:
    """A record's path: absolute as given, relative against `base` (the folder of the file that names it)."""
    return Path(os.path.normpath(Path(base) / value))


def field_error(source: Path, line: int, field: str, problem: str) -> XMGIEInputError:
    return XMGIEInputError(f"{source}, line {line}, field {field!r}: {problem}.")

def read_jsonl(path: Path, parse: Callable[[Any, Path, int], T], missing: str) -> list[T]:
    """parse(object, path, line) for each line of a JSONL file (blank lines skipped); `missing` says how to make
    the file when it is absent or empty."""
    path = Path(path)
    if not path.is_file():
        raise XMGIEInputError(f"Training data not found: {path}. {missing}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise XMGIEInputError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); write "
                                      "one JSON object per line.") from None
            records.append(parse(data, path, number))
    if not records:
        raise XMGIEInputError(f"{path} holds no records. {missing}")
    return records


@dataclass(frozen=True)
class RunSettings:
    """What every training run sets (the trainers' settings extend it): steps, batch size per process, AdamW's
    learning rate and weight decay, the seed, the checkpoint interval."""

    steps: int = 20000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 500

    def problems(self, counts: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> list[str]:
        """The flags no run can use: steps, batch size, save-every and `counts` below 1, a learning rate not above
        0, weight decay and `non_negative` below 0, a NaN or infinite number, a seed out of range."""
        flag = lambda name: f"--{name.replace('_', '-')} {getattr(self, name)}"  # noqa: E731
        bad = [flag(k) for k in ("steps", "batch_size", "save_every", *counts) if getattr(self, k) < 1]
        bad += [flag("lr")] if not self.lr > 0 else []
        bad += [flag(k) for k in ("weight_decay", *non_negative) if not getattr(self, k) >= 0]
        return bad + unusable_numbers(self)


def add_run_arguments(p: Any, defaults: RunSettings, seed_help: str) -> None:
    """The command-line options of RunSettings, shown with the trainer's defaults."""
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps in all (a resume may raise it)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=defaults.seed, help=seed_help)
    p.add_argument("--save-every", type=int, default=defaults.save_every, help="checkpoint every N steps")


def unusable_numbers(settings: Any) -> list[str]:
    """The CLI flags of a settings dataclass whose numbers no run can use: a float that is NaN or infinite, or a seed
    outside ComfyUI's seed range (0..2^64-1)."""
    bad = [f"--{f.name.replace('_', '-')} {getattr(settings, f.name)}" for f in fields(settings)
           if isinstance(getattr(settings, f.name), float) and not math.isfinite(getattr(settings, f.name))]
    seed = getattr(settings, "seed", 0)
    return bad + ([f"--seed {seed}"] if not limits.SEED[0] <= seed <= limits.SEED[1] else [])


def run_signature(settings: Any, changeable: tuple[str, ...]) -> dict[str, Any]:
    """A settings dataclass as the dict a resumed run must match, without the fields a resume may change."""
    return {k: v for k, v in asdict(settings).items() if k not in changeable}


@dataclass(frozen=True)
class Position:
    """Where training is: steps done, and the next batch (epoch, batch index within the epoch)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0

    def advanced(self, batches_per_epoch: int) -> "Position":
        wrap = self.batch + 1 == batches_per_epoch
        return Position(self.step + 1, self.epoch + wrap, 0 if wrap else self.batch + 1)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, position: Position,
                    run: dict[str, Any], fmt: str) -> None:
    """The trained module + AdamW state + RNG state as tensors; the format, step, data position and the run in the
    header."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v.detach().cpu().contiguous() for k, v in values.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"format": fmt, "position": json.dumps(asdict(position)), "run": json.dumps(run),
            "param_groups": json.dumps(state["param_groups"])}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run: dict[str, Any], fmt: str,
                    what: str) -> Position:
    """Restore what save_checkpoint wrote into `model` and `optimizer` (and the RNG); the format and run must match.
    `what` names the trainer in errors (e.g. "region")."""
    label, fix = f"the {what} training checkpoint", "resume from another checkpoint or start a new --out"
    meta = safetensors_metadata(path, label, fix)
    tensors = read_safetensors(path, label, fix)
    if meta.get("format") != fmt:
        raise XMGIEInputError(f"{path} is not an xMGIE {what} training checkpoint; give the {CHECKPOINT} of a {what} "
                              "training run.")
    saved = json.loads(meta["run"])
    differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
    if differ:
        raise XMGIEInputError(f"{path} belongs to a run with other settings or data ({', '.join(differ)}: "
                              f"{[saved.get(k) for k in differ]} there, {[run.get(k) for k in differ]} now); resume "
                              "with the same data and settings (only --steps, --save-every, --workers may change), "
                              "or start a new --out.")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return Position(**json.loads(meta["position"]))


def checkpoint_to_resume(out: Path, resume: bool | Path) -> Path | None:
    """The checkpoint to continue from (`resume` True: <out>/checkpoint.safetensors), or None for a fresh run; a
    fresh run into a folder that already holds one is refused rather than overwritten."""
    existing = Path(out) / CHECKPOINT
    if resume is False:
        if existing.exists():
            raise XMGIEInputError(f"{out} already holds a training run ({CHECKPOINT}); pass --resume to continue it "
                                  "or choose another --out.")
        return None
    path = existing if resume is True else Path(resume)
    if not path.is_file():
        raise XMGIEInputError(f"No checkpoint to resume from at {path}; train without --resume first (it writes "
                              f"{CHECKPOINT} every --save-every steps).")
    return path


def distributed() -> tuple[int, int]:
    """(rank, world size); one process unless torchrun set up a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `values` over the DDP processes (for the log)."""
    if world > 1:
        dist.all_reduce(values)
        values = values / world
    return values


def logged_step(line: str) -> int | None:
    """The step of a log line; None for a line cut short (by a crash while writing it)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def keep_log_until(path: Path, step: int) -> None:
    """Keep the log lines of steps 1..`step` only: what a resume continues from (or nothing for a fresh run)."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if (n := logged_step(line)) is not None and n <= step]
    path.write_text("".join(line + "\n" for line in kept))


def setup_distributed(device: str | None) -> torch.device:
    """--device checked (xmgie_core.device); under torchrun (WORLD_SIZE > 1): init the process group (NCCL on GPUs,
    else Gloo) and pick this rank's GPU."""
    chosen = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = chosen.type == "cuda"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if world > 1 and cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return chosen


def run_cli(body: Callable[[], None]) -> int:
    """A trainer's command line: run `body`; a user error prints 'error: ...' and gives exit code 2; the torchrun
    process group is always closed."""
    try:
        body()
    except XMGIEInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def epoch_sampler(dataset: Dataset, batch_size: int, seed: int) -> tuple[DistributedSampler, int]:
    """This process's shuffled share of the data (seeded, the same on every rank) and its batches per epoch."""
    rank, world = distributed()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch < 1:
        raise XMGIEInputError(f"{len(dataset)} records are too few for --batch-size {batch_size} on {world} "
                              f"process(es); give at least {batch_size * world} records or a smaller batch.")
    return sampler, per_epoch


def remaining_batches(sampler: DistributedSampler, position: Position, batch_size: int, per_epoch: int,
                      steps: int) -> list[list[int]]:
    """The batches (record indices) left in the current epoch from the data position, no more than `steps` needs:
    a resumed run continues with exactly the batches the interrupted one would have seen."""
    sampler.set_epoch(position.epoch)
    order = list(sampler)
    todo = [order[i * batch_size:(i + 1) * batch_size] for i in range(position.batch, per_epoch)]
    return todo[:steps - position.step]


class StepLog:
    """Rank 0's bookkeeping per step: one log.jsonl line with every term, running means in the progress bar, and
    whether a checkpoint is due."""

    def __init__(self, out: Path, terms: tuple[str, ...], short: dict[str, str], steps: int, save_every: int,
                 start: int, desc: str, writer: bool, digits: int = 3):
        from tqdm import tqdm

        self.out, self.terms, self.short, self.steps, self.save_every = out, terms, short, steps, save_every
        self.writer, self.digits = writer, digits
        if writer:
            out.mkdir(parents=True, exist_ok=True)
            keep_log_until(out / LOG, start)
        self.bar = tqdm(total=steps, initial=start, desc=desc, disable=not writer)
        self.running: dict[str, float] = {}

    def record(self, position: Position, values: list[float], seconds: float, **extra: Any) -> bool:
        """Log a finished step; True when a checkpoint is due (every save_every steps and at the end)."""
        if not self.writer:
            return False
        line = {"step": position.step, "epoch": position.epoch, **dict(zip(self.terms, values)), **extra,
                "seconds": seconds}
        with (self.out / LOG).open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.running = {k: 0.9 * self.running.get(k, v) + 0.1 * v for k, v in zip(self.terms, values)}
        self.bar.set_postfix({self.short[k]: f"{self.running[k]:.{self.digits}f}" for k in self.short}, refresh=False)
        self.bar.update()
        return position.step % self.save_every == 0 or position.step == self.steps

    def close(self) -> None:
        self.bar.close()
