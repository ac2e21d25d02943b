"""Summaries of per-sample values: the mean with a 95 % confidence interval from Student's t distribution,

  mean +- t_{0.975, n-1} * s / sqrt(n)        s = the sample standard deviation (n - 1 in the denominator)

and, for two runs, the same interval on the paired differences d_i = B_i - A_i over the samples both runs scored
(a paired t interval). Values that are None or not finite (PSNR of identical images) are left out and counted."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    ci: float | None
    """Half-width of the 95 % interval; None below two values."""
    left_out: int
    """Values that were None or not finite."""

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 4) -> str:
        if self.mean is None:
            return "n/a"
        body = f"{self.mean:.{digits}f}" + (f" ± {self.ci:.{digits}f}" if self.ci is not None else "")
        return body + f" (n={self.n})"


def usable(value) -> bool:
    return value is not None and math.isfinite(value)


def summarise(values: list[float | None]) -> Summary:
    """Mean and t-interval half-width of the usable values (module docstring)."""
    kept = [float(v) for v in values if usable(v)]
    n = len(kept)
    if n == 0:
        return Summary(0, None, None, len(values))
    mean = math.fsum(kept) / n
    if n < 2:
        return Summary(n, mean, None, len(values) - n)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / (n - 1))
    return Summary(n, mean, float(stats.t.ppf((1 + LEVEL) / 2, n - 1)) * sd / math.sqrt(n), len(values) - n)


def paired(a: dict[str, float | None], b: dict[str, float | None]) -> Summary:
    """The t interval of B - A over the ids both score usably."""
    common = [k for k in a if k in b]
    diffs = [b[k] - a[k] for k in common if usable(a[k]) and usable(b[k])]
    s = summarise(diffs)
    return Summary(s.n, s.mean, s.ci, len(common) - s.n)
