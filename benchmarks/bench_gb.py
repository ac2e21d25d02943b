"""GB compositor speed, memory and accuracy, as ratios against baselines run in this process.

  composite vs uniform feather: the same edit/source/mask (a large head-and-shoulders silhouette,
  and a small local edit) blended with a mask blurred once at
  sigma_max (the project's own uniform Gaussian blur) and a lerp. Target <= 3x time.
  fast variable blur vs the exact per-pixel reference (tests/gb_reference.py). Target >= 20x
  faster, <= 1/255 max error.
  blur mode (eq 19) on an adversarial mask (an 8-px checkerboard: every tile is near a border) at
  sigma_max 16: peak memory in copies of the image (target: a few, whatever the mask) and time
  against the uniform feather.

Run: python benchmarks/bench_gb.py [--sizes 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402
from gb_reference import exact_variable_blur  # noqa: E402
from xmgie_core import gb  # noqa: E402
from xmgie_core.gaussian import gaussian_blur, variable_gaussian_blur  # noqa: E402


def person_like_mask(n: int) -> torch.Tensor:
    """Head + shoulders silhouette: an ellipse over a wide rounded block (smooth, large)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    head = ((xx / 0.28) ** 2 + ((yy + 0.35) / 0.36) ** 2) < 1
    body = ((xx / 0.75) ** 4 + ((yy - 0.75) / 0.55) ** 4) < 1
    return (head | body).float()[None]


def local_edit_mask(n: int) -> torch.Tensor:
    """A scarf-sized region: an ellipse covering about 4% of the image."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    return ((((xx - 0.1) / 0.35) ** 2 + ((yy - 0.3) / 0.12) ** 2) < 1).float()[None]


def uniform_feather(edit: torch.Tensor, src: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    alpha = gaussian_blur(mask[:, None], sigma)[:, 0, ..., None]
    return src * (1 - alpha) + edit * alpha


def composite_calls(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    src, edit = torch.rand(2, 1, n, n, 3, generator=g)
    person, local = person_like_mask(n), local_edit_mask(n)
    return {
        "feather": lambda: uniform_feather(edit, src, person, gb.SIGMA_MAX),
        "composite": lambda: gb.gb_composite(edit, src, person),
        "blur": lambda: gb.gb_blur(edit, person),
        "feather_local": lambda: uniform_feather(edit, src, local, gb.SIGMA_MAX),
        "composite_local": lambda: gb.gb_composite(edit, src, local),
    }


def checkerboard_mask(n: int, cell: int = 8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (((yy // cell) + (xx // cell)) % 2).float()[None]


def adversarial_calls(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    src, edit = torch.rand(2, 1, n, n, 3, generator=g)
    board = checkerboard_mask(n)
    return {"feather": lambda: uniform_feather(edit, src, board, 16.0),
            "blur": lambda: gb.gb_blur(edit, board, 16.0, gb.SIGMA_SCALE)}


def bench_reference(n: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, n, n))
    m = person_like_mask(n)[0].numpy() > 0.5
    from xmgie_core.distance import distance_to_outside

    d = distance_to_outside(torch.from_numpy(m)[None])[0].numpy()
    sigma = (gb.SIGMA_MAX * np.exp(-(d**2) / (2 * gb.SIGMA_SCALE**2)) * m).astype(np.float32)
    t0 = time.perf_counter()
    ref = exact_variable_blur(x, sigma)
    t_ref = time.perf_counter() - t0
    xt, st = torch.from_numpy(x).float()[None], torch.from_numpy(sigma)[None]
    t_fast = time_calls({"fast": lambda: variable_gaussian_blur(xt, st, gb.SIGMA_MAX)})["fast"]
    err = np.abs(variable_gaussian_blur(xt, st, gb.SIGMA_MAX)[0].double().numpy() - ref).max()
    print(f"{n}x{n} blur (3 ch, person mask)  exact per-pixel reference {t_ref:7.2f} s | fast {t_fast * 1e3:7.1f} ms -> "
          f"x{t_ref / t_fast:.0f} faster, max error {err * 255:.3f}/255")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])  # 4096: about 2 GB peak
    p.add_argument("--reference-size", type=int, default=512)
    p.add_argument("--adversarial-size", type=int, default=2048)  # 4096: about 1 min per call
    a, _ = p.parse_known_args()
    if in_memory_phase():
        results = {n: {k: peak_mb(f, repeats=1) for k, f in composite_calls(n).items()} for n in a.sizes}
        results["adversarial"] = {k: peak_mb(f, repeats=1) for k, f in adversarial_calls(a.adversarial_size).items()}
        memory_phase(results)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_reference(a.reference_size)
    times = {n: time_calls(composite_calls(n), rounds=9) for n in a.sizes}
    t_adv = time_calls(adversarial_calls(a.adversarial_size), rounds=1)
    memory = memory_phase()
    for n in a.sizes:
        t, m = times[n], memory[str(n)]
        print(f"{n}x{n}  uniform feather {t['feather'] * 1e3:8.1f} ms {m['feather']:7.1f} MB | "
              f"GB composite {t['composite'] * 1e3:8.1f} ms {m['composite']:7.1f} MB -> time x"
              f"{t['composite'] / t['feather']:.2f}, mem x{m['composite'] / max(m['feather'], 1e-9):.2f} | "
              f"GB blur (eq 19) {t['blur'] * 1e3:8.1f} ms x{t['blur'] / t['feather']:.2f} time, "
              f"{m['blur']:7.1f} MB")
        print(f"{'':10s}local edit (4% of image): feather {t['feather_local'] * 1e3:8.1f} ms | GB composite "
              f"{t['composite_local'] * 1e3:8.1f} ms -> time x{t['composite_local'] / t['feather_local']:.2f}, "
              f"mem x{m['composite_local'] / max(m['feather_local'], 1e-9):.2f}")
    n, m = a.adversarial_size, memory["adversarial"]
    image_mb = n * n * 3 * 4 / 2**20
    print(f"{n}x{n} 8-px checkerboard, blur mode sigma_max 16: {t_adv['blur']:.1f} s (x{t_adv['blur'] / t_adv['feather']:.0f} "
          f"the feather), peak +{m['blur']:.0f} MB = {m['blur'] / image_mb:.1f} image copies "
          f"(feather: {m['feather'] / image_mb:.1f})")


if __name__ == "__main__":
    main()
