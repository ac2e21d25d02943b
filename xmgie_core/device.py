"""The torch device a command line names (--device), checked before any work: a device this machine does not have
is an XMGIEInputError that says what is missing and what to pass instead, not a RuntimeError from deep inside
torch ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled", "invalid device ordinal")."""

from __future__ import annotations

import torch

from .errors import XMGIEInputError


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """`name` as a torch.device that exists here; None: the first CUDA GPU if there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise XMGIEInputError(f"{option} {name!r} is not a device ({e}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None else
                   "no NVIDIA GPU or driver was found")
            raise XMGIEInputError(f"{option} {name}: no CUDA GPU is usable here ({why}). Pass {option} cpu (much "
                                  "slower), or run on a machine with an NVIDIA GPU and a CUDA build of PyTorch.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise XMGIEInputError(f"{option} {name}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                  f"cuda:{count - 1}; pass one of them.")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise XMGIEInputError(f"{option} {name}: no {device.type} device is usable here; pass {option} cpu"
                                  + (" or cuda." if torch.cuda.is_available() else "."))
    return device
