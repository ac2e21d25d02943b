"""`python -m xmgie_core.mgie <command> [options]`: MGIE tools.

Each command lives in its own module with a `main(argv) -> int` (optionally `main(argv, prog=...)`, for its usage
line); the module is imported only when its command runs. A new command is one more line in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

PROG = "python -m xmgie_core.mgie"
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("xmgie_core.mgie.convert", "turn ml-mgie's released files into an MGIE folder for "
                "ComfyUI/models/LLM/ and a U-Net file for ComfyUI/models/diffusion_models/"),
    "train": ("xmgie_core.mgie.train", "train MGIE (L_ins + 0.5 L_edit): the edit head and [IMG] rows, optionally "
              "LoRA on the LLM and the U-Net; writes an MGIE folder"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="MGIE tools. `%s <command> --help` shows a command's options."
                                % PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(f"  {n:10s} {h}" for n, (_, h) in COMMANDS.items()))
    p.add_argument("command", choices=sorted(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command_main = importlib.import_module(COMMANDS[args.command][0]).main
    if "prog" in inspect.signature(command_main).parameters:
        return command_main(args.args, prog=f"{PROG} {args.command}")
    return command_main(args.args)


if __name__ == "__main__":
    sys.exit(main())
