"""An evaluation's files: per-sample JSONL and CSV, the summary table (mean ± 95 % t interval, stats.py) as JSON
and Markdown, a contact sheet PNG (source | edit | mask | drift map, the metrics under each row) and a small
self-contained HTML page; and the side-by-side comparison of two runs (paired differences B - A)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import XMGIEInputError
from ..image_io import to_rgb8
from ..metrics.registry import METRICS, PANELS, Item
from .runner import Outcome, Row
from .stats import Summary, paired, summarise

CI_METHOD = "mean ± half-width of the 95 % confidence interval, Student's t with n-1 degrees of freedom"
THUMB = 128
COLUMNS = ("source", "edit", "mask", "drift map")


def ordered(present: set[str]) -> list[str]:
    """Metric names in registry order (unregistered ones last, sorted)."""
    return [n for n in METRICS if n in present] + sorted(present - set(METRICS))


def metric_names(rows: list[Row]) -> list[str]:
    """The metrics some row has."""
    return ordered({name for row in rows for name in row.metrics})


def summaries(rows: list[Row]) -> dict[str, Summary]:
    return {name: summarise([r.metrics.get(name) for r in rows if name in r.metrics]) for name in metric_names(rows)}


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_rows(rows: list[Row], folder: Path) -> None:
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.as_dict()) + "\n")
    names = metric_names(rows)
    with open(folder / "samples.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "instruction", *names, "error", "notes"])
        for row in rows:
            w.writerow([row.id, row.instruction, *(_fmt(row.metrics.get(n)) for n in names), row.error or "",
                        " | ".join(row.notes)])


def better(name: str) -> str:
    m = METRICS.get(name)
    return "" if m is None else "higher" if m.higher_is_better else "lower"


def source(name: str) -> str:
    return METRICS[name].source if name in METRICS else ""


def summary_table(sums: dict[str, Summary]) -> str:
    """Markdown: metric | mean ± 95 % CI | n | better | source."""
    lines = ["| metric | mean ± 95 % CI | n | better | source |", "|---|---|---|---|---|"]
    for name, s in sums.items():
        lines.append(f"| {name} | {s.text()} | {s.n} | {better(name)} | {source(name)} |")
    return "\n".join(lines)


def _thumb(image: torch.Tensor | None, title: str) -> Image.Image:
    """A THUMB x THUMB tile: the picture fitted in (grey where there is none)."""
    tile = Image.new("RGB", (THUMB, THUMB), (90, 90, 90))
    if image is None:
        ImageDraw.Draw(tile).text((6, THUMB // 2 - 6), f"({title}: none)", fill=(230, 230, 230))
        return tile
    pic = Image.fromarray(to_rgb8(image if image.ndim == 4 else image[..., None])[0])
    scale = THUMB / max(pic.size)
    pic = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))),
                     Image.NEAREST if scale > 1 else Image.BICUBIC)
    tile.paste(pic, ((THUMB - pic.width) // 2, (THUMB - pic.height) // 2))
    return tile


def _panel(item: Item, title: str) -> torch.Tensor | None:
    if title == "source":
        return item.source
    if title == "edit":
        return item.edit
    if title == "mask":
        return item.pred_mask if item.pred_mask is not None else item.gt_mask
    picture = PANELS.get(title)
    return None if picture is None else picture(item)


def contact_sheet(rows: list[Row], items: dict[str, Item]) -> Image.Image:
    """One row per kept item: source | edit | mask | drift map tiles, titles above, metrics under."""
    font = ImageFont.load_default()
    shown = [r for r in rows if r.id in items]
    text_h, head = 44, 16
    sheet = Image.new("RGB", (len(COLUMNS) * THUMB, head + max(1, len(shown)) * (THUMB + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(COLUMNS):
        draw.text((c * THUMB + 4, 2), title, fill="black", font=font)
    for r, row in enumerate(shown):
        y = head + r * (THUMB + text_h)
        for c, title in enumerate(COLUMNS):
            sheet.paste(_thumb(_panel(items[row.id], title), title), (c * THUMB, y))
        values = [f"{k}={v:.3f}" for k, v in row.metrics.items() if v is not None]
        lines = [row.id] + [" ".join(values[i:i + 5]) for i in range(0, len(values), 5)]
        draw.multiline_text((4, y + THUMB + 2), "\n".join(lines[:3]), fill="black", font=font, spacing=2)
    return sheet


def _png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


STYLE = ("<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #bbb;padding:3px 6px;font-size:13px}th{background:#eee}</style>")


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>\n")


def write_run(outcome: Outcome, run: dict, folder: Path) -> dict[str, Summary]:
    """Every file of a run into `folder` (the staging folder of the run)."""
    write_rows(outcome.rows, folder)
    sums = summaries(outcome.rows)
    (folder / "summary.json").write_text(json.dumps({
        "ci": CI_METHOD, "metrics": {n: {**s.as_dict(), "source": source(n)}
                                     for n, s in sums.items()},
        "skipped": outcome.skipped, "not_applicable": outcome.not_applicable}, indent=2) + "\n")
    table = summary_table(sums)
    notes = [f"- {n}: skipped, {why}" for n, why in outcome.skipped.items()] + \
            [f"- {n}: not applicable, {why}" for n, why in outcome.not_applicable.items()] + \
            [f"- {note}" for note in run.get("model_notes", [])]
    failed = [r for r in outcome.rows if r.error]
    notes += [f"- {len(failed)} of {len(outcome.rows)} samples failed (see samples.jsonl: error)"] if failed else []
    (folder / "summary.md").write_text(f"{table}\n\n{CI_METHOD}.\n" + ("\nNotes:\n" + "\n".join(notes) + "\n"
                                                                        if notes else ""))
    (folder / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    sheet = contact_sheet(outcome.rows, outcome.items)
    sheet.save(folder / "contact_sheet.png")
    names = metric_names(outcome.rows)
    parts = [f"<p>{html.escape(run['dataset']['format'])} dataset {html.escape(run['dataset']['root'])}, "
             f"{len(outcome.rows)} samples; editor {html.escape(run['editor']['kind'])}. {CI_METHOD}.</p>",
             _html_table(["metric", "mean ± 95 % CI", "n", "source"],
                         [[n, s.text(), str(s.n), source(n)] for n, s in sums.items()]),
             "".join(f"<p>{html.escape(line[2:])}</p>" for line in notes),
             f"<h2>Contact sheet</h2><img alt='contact sheet' src='{_png_uri(sheet)}'>"
             + ("" if len(outcome.items) == len(outcome.rows) else
                f"<p>(the first {len(outcome.items)} scored samples)</p>"),
             "<h2>Samples</h2>",
             _html_table(["id", "instruction", *names, "error"],
                         [[r.id, r.instruction, *(_fmt(r.metrics.get(n)) for n in names), r.error or ""]
                          for r in outcome.rows])]
    (folder / "index.html").write_text(_page("xMGIE evaluation", parts), encoding="utf-8")
    return sums


def read_rows(run: Path) -> dict[str, dict]:
    """A run folder's samples.jsonl by sample id."""
    path = Path(run) / "samples.jsonl"
    if not path.is_file():
        raise XMGIEInputError(f"--compare: {run} is not an evaluation run folder (no samples.jsonl). Give two folders "
                              "written by `python -m xmgie_core eval`.")
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row
    return rows


def compare(run_a: Path, run_b: Path, folder: Path) -> str:
    """Per metric: A's and B's means and the paired difference B - A over the samples both scored; written as
    compare.json / compare.md / compare.html into `folder`; returns the Markdown table."""
    a, b = read_rows(run_a), read_rows(run_b)
    common = [k for k in a if k in b]
    if not common:
        raise XMGIEInputError(f"--compare: {run_a} and {run_b} share no sample id, so nothing pairs up. Compare two "
                              "runs over the same dataset.")
    names = ordered({n for r in a.values() for n in r["metrics"]} & {n for r in b.values() for n in r["metrics"]})
    result = {}
    for n in names:
        va = {k: a[k]["metrics"].get(n) for k in common if n in a[k]["metrics"]}
        vb = {k: b[k]["metrics"].get(n) for k in common if n in b[k]["metrics"]}
        both = [k for k in va if k in vb]
        result[n] = {"a": summarise([va[k] for k in both]).as_dict(), "b": summarise([vb[k] for k in both]).as_dict(),
                     "b_minus_a": paired(va, vb).as_dict()}
    lines = [f"A = {run_a}", f"B = {run_b}", f"{len(common)} common samples ({len(a)} in A, {len(b)} in B); "
             f"B - A paired over the samples both scored; {CI_METHOD}.", "",
             "| metric | A | B | B - A | better |", "|---|---|---|---|---|"]
    for n, r in result.items():
        lines.append(f"| {n} | {Summary(**r['a']).text()} | {Summary(**r['b']).text()} | "
                     f"{Summary(**r['b_minus_a']).text()} | {better(n)} |")
    table = "\n".join(lines)
    (folder / "compare.json").write_text(json.dumps({"a": str(run_a), "b": str(run_b), "common": len(common),
                                                     "ci": CI_METHOD, "metrics": result}, indent=2) + "\n")
    (folder / "compare.md").write_text(table + "\n")
    body = [[n, Summary(**r["a"]).text(), Summary(**r["b"]).text(), Summary(**r["b_minus_a"]).text()]
            for n, r in result.items()]
    (folder / "compare.html").write_text(_page("xMGIE evaluation: A vs B", [
        f"<p>A = {html.escape(str(run_a))}<br>B = {html.escape(str(run_b))}<br>{html.escape(lines[2])}</p>",
        _html_table(["metric", "A", "B", "B - A"], body)]), encoding="utf-8")
    return table

