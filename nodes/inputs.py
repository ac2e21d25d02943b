"""Every node's INT and FLOAT inputs checked against its own widget limits before it runs.

ComfyUI validates a widget's min/max with `<` and `>`, which NaN passes (a NaN cfg samples an all-black image),
and an API client can send any number. Wrapping each node's FUNCTION here closes that for every node, present
and future: a value outside [min, max], NaN or infinite stops the node with a sentence naming the input, its
allowed range and its default.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.validation import check_range

NUMBER_TYPES = ("INT", "FLOAT")


def numeric_specs(node_class: type) -> dict[str, dict]:
    """{input name: widget options} for each INT/FLOAT input of the node (required and optional)."""
    declared = node_class.INPUT_TYPES()
    return {name: (spec[1] if len(spec) > 1 else {})
            for group in ("required", "optional") for name, spec in declared.get(group, {}).items()
            if isinstance(spec[0], str) and spec[0] in NUMBER_TYPES}


def check_number(node: str, name: str, value: Any, options: dict) -> None:
    """`value` must be a number within the widget's [min, max] (NaN fails; every widget declares both limits, so
    infinities fail too: the node contract test checks that)."""
    default = f" (its default is {options['default']})" if "default" in options else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise XMGIEInputError(f"{node}: {name} must be a number, got {value!r}. Set it on the node{default}.")
    meaning = f" {name}: {options['tooltip']}" if options.get("tooltip") else ""
    check_range(value, f"{node}: {name}", options.get("min", -math.inf), options.get("max", math.inf),
                hint=f"Set it on the node within that range{default}.{meaning}")


def with_checked_numbers(node_class: type, display_name: str) -> type:
    """The node class with its FUNCTION checking every INT/FLOAT argument first (wrapped once)."""
    function = getattr(node_class, node_class.FUNCTION)
    if getattr(function, "_xmgie_checked", False):
        return node_class
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        for name, options in numeric_specs(node_class).items():
            if bound.get(name) is not None:
                check_number(display_name, name, bound[name], options)
        return function(self, *args, **kwargs)

    run._xmgie_checked = True
    setattr(node_class, node_class.FUNCTION, run)
    return node_class
