"""GB compositor speed, memory and accuracy, as ratios against baselines run in this process.

  composite vs uniform feather: the same edit/source/mask blended with a mask blurred once at
  sigma_max (the project's own uniform Gaussian blur) and a lerp. Target <= 3x time.
  fast variable blur vs the exact per-pixel reference (tests/gb_reference.py). Target >= 20x
  faster, <= 1/255 max error.

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

from _measure import measure  # noqa: E402
from gb_reference import exact_variable_blur  # noqa: E402
from xmgie_core import gb  # noqa: E402
from xmgie_core.gaussian import gaussian_blur, variable_gaussian_blur  # noqa: E402


def person_like_mask(n: int) -> torch.Tensor:
    """Head + shoulders silhouette: an ellipse over a wide rounded block (smooth, large)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    head = ((xx / 0.28) ** 2 + ((yy + 0.35) / 0.36) ** 2) < 1
    body = ((xx / 0.75) ** 4 + ((yy - 0.75) / 0.55) ** 4) < 1
    return (head | body).float()[None]


def uniform_feather(edit: torch.Tensor, src: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    alpha = gaussian_blur(mask[:, None], sigma)[:, 0, ..., None]
    return src * (1 - alpha) + edit * alpha


def bench_composite(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    src, edit = torch.rand(2, 1, n, n, 3, generator=g)
    mask = person_like_mask(n)
    t_base, m_base = measure(lambda: uniform_feather(edit, src, mask, gb.SIGMA_MAX), repeats=3)
    t_gb, m_gb = measure(lambda: gb.gb_composite(edit, src, mask), repeats=3)
    t_blur, m_blur = measure(lambda: gb.gb_blur(edit, mask), repeats=3)
    print(f"{n}x{n}  uniform feather {t_base * 1e3:8.1f} ms {m_base:7.1f} MB | "
          f"GB composite {t_gb * 1e3:8.1f} ms {m_gb:7.1f} MB  -> time x{t_gb / t_base:.2f}, "
          f"mem x{m_gb / max(m_base, 1e-9):.2f} | GB blur (eq 19) {t_blur * 1e3:8.1f} ms x{t_blur / t_base:.2f}")


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
    t_fast, _ = measure(lambda: variable_gaussian_blur(xt, st, gb.SIGMA_MAX), repeats=5)
    err = np.abs(variable_gaussian_blur(xt, st, gb.SIGMA_MAX)[0].double().numpy() - ref).max()
    print(f"{n}x{n}  exact per-pixel reference {t_ref:8.2f} s | fast {t_fast * 1e3:8.1f} ms -> "
          f"x{t_ref / t_fast:.0f} faster, max error {err * 255:.3f}/255")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--reference-size", type=int, default=160)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_reference(a.reference_size)
    for n in a.sizes:
        bench_composite(n)


if __name__ == "__main__":
    main()
