"""CAM kernel speed and memory as ratios against stock attention run in this process.

Stock = what ComfyUI's pytorch attention does with q/k/v [B, N, heads*d]: split heads,
scaled_dot_product_attention, merge heads. CAM = xmgie_core.cam.masked_cross_attention on the
same tensors with half the queries inside the region, 2 edit tokens and 2 background tokens.
Targets: <= 1.10x stock time, <= 1.2x stock peak memory.

Run: python benchmarks/bench_cam.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _measure import in_memory_phase, memory_phase, peak_mb, time_calls  # noqa: E402
from xmgie_core.attention import stock_attention  # noqa: E402
from xmgie_core.cam import TokenRestriction, masked_cross_attention  # noqa: E402

SHAPES = [  # (label, batch, queries, keys, heads, head dim)
    ("SD1.5 64x64 latent, 320 ch", 2, 4096, 77, 8, 40),
    ("SD1.5 64x64 latent, d 80", 2, 4096, 77, 8, 80),
    ("SD1.5 32x32 latent, d 40", 2, 1024, 77, 8, 40),
    ("SD1.5 32x32 latent, 640 ch", 2, 1024, 77, 8, 80),
    ("SDXL 64x64 latent, 640 ch", 2, 4096, 77, 10, 64),
]


def main() -> None:
    torch.manual_seed(0)
    if not in_memory_phase():
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU")
    restriction = TokenRestriction(torch.tensor([5, 6]), torch.tensor([9, 10]))
    cases = []
    for label, b, nq, nk, heads, d in SHAPES:
        q, k, v = torch.randn(b, nq, heads * d), torch.randn(b, nk, heads * d), torch.randn(b, nk, heads * d)
        region = torch.zeros(1, nq)
        region[:, : nq // 2] = 1
        calls = {"stock": lambda q=q, k=k, v=v, h=heads: stock_attention(q, k, v, h)}
        for mode in ("renormalized", "paper"):
            calls[mode] = lambda q=q, k=k, v=v, h=heads, r=region, m=mode: masked_cross_attention(q, k, v, h, r,
                                                                                                restriction, m)
        cases.append((label, calls))
    with torch.no_grad():
        if in_memory_phase():
            memory_phase([{name: peak_mb(fn) for name, fn in calls.items()} for _, calls in cases])
            return
        times = [time_calls(calls, rounds=60) for _, calls in cases]
    memory = memory_phase()
    for (label, _), t, m in zip(cases, times, memory):
        row = f"{label:28s} stock {t['stock'] * 1e3:7.2f} ms {m['stock']:5.1f} MB"
        for mode in ("renormalized", "paper"):
            row += (f" | {mode} {t[mode] * 1e3:7.2f} ms x{t[mode] / t['stock']:.2f} time, "
                    f"{m[mode]:5.1f} MB x{m[mode] / max(m['stock'], 1e-9):.2f} mem")
        print(row)
    print(sweep_restricted_tokens())


def sweep_restricted_tokens() -> str:
    """Time ratio vs the number of restricted tokens R (the fused call sees 77 + R keys; the CPU
    flash kernel's speed depends on the key count non-monotonically, so the ratio does too)."""
    b, nq, nk, heads, d = 2, 4096, 77, 8, 40
    q, k, v = torch.randn(b, nq, heads * d), torch.randn(b, nk, heads * d), torch.randn(b, nk, heads * d)
    region = torch.zeros(1, nq)
    region[:, : nq // 2] = 1
    calls = {"stock": lambda: stock_attention(q, k, v, heads)}
    for r in (1, 2, 3, 4, 6, 8, 12):
        restriction = TokenRestriction(torch.arange(5, 5 + r), torch.zeros(0, dtype=torch.long))
        calls[r] = lambda rs=restriction: masked_cross_attention(q, k, v, heads, region, rs, "renormalized")
    with torch.no_grad():
        t = time_calls(calls, rounds=30)
    return "SD1.5 4096x77 d40, renormalized, time vs restricted tokens R: " + ", ".join(
        f"R={r} x{t[r] / t['stock']:.2f}" for r in calls if r != "stock")


if __name__ == "__main__":
    main()
