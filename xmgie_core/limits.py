"""The allowed range of each number a user sets, read by the node widgets (min/max), the command line and the core
checks alike, so a value refused in one place is refused in all of them."""

from __future__ import annotations

SEED = (0, 0xFFFFFFFFFFFFFFFF)
"""ComfyUI's seed widget: any unsigned 64-bit integer."""
STEPS = (1, 10000)
CFG = (0.0, 100.0)
DENOISE = (0.0, 1.0)
DRAWS = (1, 64)
"""Noise draws of the noise-difference region."""
REGION_STRENGTH = (0.05, 1.0)
"""Noise level (fraction of the schedule) of the noise-difference and attention regions."""
UNIT = (0.0, 1.0)
"""Weights and fractions: face protection, outside weight, end fractions, thresholds."""
