"""`python -m xmgie_core.apps.comfy_run`: run an API-format workflow on a running ComfyUI over HTTP.

The workflow is first checked against the server's node types (GET /object_info/{class}) so that a prompt
ComfyUI would reject uploads nothing. Each input image is then uploaded (POST /upload/image) under a name made
from its content's hash, so no file of the server's input folder is ever replaced, put into the workflow's
source LoadImage, queued (POST /prompt) and followed over the websocket (/ws?clientId=...) with a progress bar;
every image in the prompt's history outputs is then downloaded (/view) into the output folder, next to (never
over) earlier results. Ctrl-C or --timeout takes our prompt off the server: POST /queue {"delete": [id]} while
it waits, POST /interrupt {"prompt_id": id} only while it is the one running.

Exit codes: 0 all runs succeeded, 1 a run failed (ComfyUI rejected or failed it), 2 usage error (bad
arguments, missing files, no ComfyUI answering at --url), 130 stopped by Ctrl-C.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from .. import limits
from .comfy_client import (ComfyClient, ProgressView, RunFailed, StoppedWaiting, UsageError, follow,
                           format_execution_error, format_rejection, history_images, output_name,
                           websocket_messages)
from .comfy_workflows import (API_DIR, ASSETS_DIR, apply_overrides, bundled_workflows, check_prompt, expand_images,
                              find_source_loader, load_workflow, other_loader_images, resolve_workflow,
                              set_source_image)

DEFAULT_URL = "http://127.0.0.1:8188"


def run_one(client: ComfyClient, prompt: Mapping[str, dict], workflow: str, image: Path, out_dir: Path,
            timeout: float) -> list[Path]:
    """Upload `image`, run `prompt` on it and download every output image; returns the paths written."""
    import websocket

    job = set_source_image(prompt, client.upload(image), workflow)
    try:
        ws = websocket.create_connection(client.websocket_url(), timeout=30)
    except (websocket.WebSocketException, OSError) as e:
        raise RunFailed(f"cannot open ComfyUI's websocket {client.websocket_url()}: {type(e).__name__}: {e}") from e
    view = None
    try:
        prompt_id = client.queue(job)
        view = ProgressView(image.name, job)
        follow(websocket_messages(ws, prompt_id, timeout), prompt_id, view, job)
        client.queued_id = None
    except RunFailed as e:
        if isinstance(e, StoppedWaiting):  # not left running unwatched
            e = RunFailed(f"{e}; {client.cancel(prompt_id)}.")
        client.queued_id = None
        raise e
    finally:
        if view is not None:
            view.close()
        ws.close()
    entry = client.history(prompt_id)
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            raise RunFailed(format_execution_error(data, job))
    images = history_images(entry)
    if not images:
        raise RunFailed(f"prompt {prompt_id} finished but its outputs hold no images.")
    return [write_new(out_dir / output_name(image.stem, item), client.download(item)) for item in images]


def write_new(path: Path, data: bytes) -> Path:
    """Write `data` to `path`, or to <stem>_2<suffix>, _3, ... if it exists: an earlier result is never replaced.

    A partly written file (Ctrl-C, a full disk) is removed. Returns the path written.
    """
    candidate, n = path, 1
    while True:
        try:
            handle = candidate.open("xb")
            break
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        except OSError as e:
            raise RunFailed(f"cannot write {candidate}: {e}") from e
    try:
        with handle:
            handle.write(data)
    except BaseException as e:
        candidate.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunFailed(f"cannot write {candidate}: {e}") from e
        raise
    return candidate


def companion_images(prompt: Mapping[str, dict], workflow: str, workflow_path: Path) -> dict[str, Path | None]:
    """{file name: local file or None} for the LoadImage nodes other than the source (masks, second images).

    Files are looked for in workflows/assets/ and next to the workflow file; None = not found here.
    """
    found: dict[str, Path | None] = {}
    for name in other_loader_images(prompt, find_source_loader(prompt, workflow)).values():
        candidates = [folder / name for folder in (ASSETS_DIR, workflow_path.parent) if (folder / name).is_file()]
        found[name] = candidates[0] if candidates else None
    return found


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def comfy_url(text: str) -> str:
    """--url: http(s)://host[:port][/path]; a bare host:port is taken as http://host:port."""
    url = text.strip()
    url = url if "://" in url else "http://" + url
    parts = urlsplit(url)
    example = f"give it as {DEFAULT_URL} or host:port"
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r}: scheme {parts.scheme!r} is not http or https (ComfyUI's "
                                         f"HTTP API); {example}")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} names no host; {example}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number from 1 to 65535; {example}")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: a ?query or #fragment is not part of ComfyUI's address; "
                                         f"{example} (a path prefix behind a proxy is fine)")
    return url.rstrip("/")


def int_from(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (the ComfyUI widget's limits)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        return value
    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (NaN, inf, 0 and negative numbers refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xmgie_core.apps.comfy_run",
        description="Run an API-format workflow (a bundled one such as xmgie_edit, or a file) on a running "
                    "ComfyUI, once per input image, and download the output images.")
    p.add_argument("--url", type=comfy_url, default=DEFAULT_URL,
                   help=f"the running ComfyUI, http(s)://host:port or host:port (default {DEFAULT_URL})")
    p.add_argument("--workflow", required=True,
                   help=f"bundled API workflow name ({', '.join(bundled_workflows())}) or path to an API-format JSON")
    p.add_argument("--image", nargs="+", action="extend", required=True, metavar="IMAGE",
                   help="image files, folders or glob patterns; several images run one after another")
    p.add_argument("--instruction", help="sets every literal `instruction` input")
    p.add_argument("--seed", type=int_from(*limits.SEED),
                   help=f"sets the samplers' seed / noise_seed ({limits.SEED[0]}..{limits.SEED[1]})")
    p.add_argument("--steps", type=int_from(*limits.STEPS),
                   help=f"sets the samplers' / scheduler's steps ({limits.STEPS[0]}..{limits.STEPS[1]})")
    p.add_argument("--checkpoint", help="CheckpointLoaderSimple's ckpt_name (a file in ComfyUI/models/checkpoints)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out/)")
    p.add_argument("--timeout", type=seconds, default=3600.0,
                   help="seconds to wait for each image's run, then cancel it (default 3600)")
    return p


def prepare(client: ComfyClient, prompt: dict[str, dict], workflow: str,
            companions: Mapping[str, Path | None]) -> dict[str, dict]:
    """Check `prompt` against the server's node types, then upload the companion images (masks) found here.

    Returns the prompt with the companions' stored names. Raises RunFailed (nothing uploaded) when ComfyUI
    would reject the workflow.
    """
    object_info = client.object_info(n["class_type"] for n in prompt.values())
    if object_info is None:
        print(f"note: could not check the workflow before uploading (GET /object_info gave no node list at "
              f"{client.url}); ComfyUI checks it when it is queued.", file=sys.stderr)
    elif node_errors := check_prompt(prompt, object_info):
        raise RunFailed(format_rejection(
            {"error": "nothing was uploaded or queued", "node_errors": node_errors},
            lead=f"ComfyUI at {client.url} would reject this workflow (checked before uploading anything)"))
    stored = {}
    for name, local in companions.items():
        if local is None:
            print(f"note: {workflow} also loads {name!r}, found neither in {ASSETS_DIR} nor next to the "
                  "workflow; it must already be in ComfyUI's input folder.", file=sys.stderr)
        else:
            stored[name] = client.upload(local)
    out = copy.deepcopy(prompt)
    for node in out.values():
        if node["class_type"] == "LoadImage" and node["inputs"].get("image") in stored:
            node["inputs"]["image"] = stored[node["inputs"]["image"]]
    return out


def interrupted(client: ComfyClient, done: int, total: int, out: Path) -> str:
    """The one line printed on Ctrl-C: what was cancelled on the server and how far the queue got."""
    try:
        what = client.cancel(client.queued_id) if client.queued_id else "nothing was queued on ComfyUI"
    except KeyboardInterrupt:
        what = f"cancelling prompt {client.queued_id} was itself interrupted: it may still run in ComfyUI"
    line = f"interrupted (Ctrl-C): {what}"
    if total:
        line += f"; {done} of {total} image{'s' if total != 1 else ''} done"
        line += f", results in {out}" if done else ""
    return line + "."


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 a run failed, 2 usage error, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    client = ComfyClient(args.url)
    images: list[Path] = []
    done = failed = 0
    try:
        try:
            path = resolve_workflow(args.workflow)
            workflow = path.stem if path.parent == API_DIR else str(path)
            prompt = apply_overrides(load_workflow(path), workflow, instruction=args.instruction, seed=args.seed,
                                     steps=args.steps, checkpoint=args.checkpoint)
            companions = companion_images(prompt, workflow, path)
            images = expand_images(args.image)
            client.check()
            try:
                args.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out {args.out}: cannot make the output folder: {e}") from e
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            prompt = prepare(client, prompt, workflow, companions)
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for image in images:
            try:
                for written in run_one(client, prompt, workflow, image, args.out, args.timeout):
                    print(f"wrote {written}", flush=True)
            except RunFailed as e:
                failed += 1
                print(f"error: {image}: {e}", file=sys.stderr, flush=True)
            done += 1
    except KeyboardInterrupt:
        print(interrupted(client, done, len(images), args.out), file=sys.stderr, flush=True)
        return 130
    if len(images) > 1:
        print(f"{len(images) - failed} succeeded, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
