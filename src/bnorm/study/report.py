"""The study's report: PNG figures, a self-contained ``report.html`` (figures embedded as
base64 PNG data, inline CSS, no external assets) and ``report.md`` (the same tables, the
PNG files beside it).

The document is built once as a list of blocks (:mod:`bnorm.study.blocks`: headings,
paragraphs, tables, figures) and rendered twice, so the HTML and Markdown reports cannot
drift apart: the introduction and the summary table (one row per experiment, its
headline), then per experiment its title, its ``about`` text, its setup and the section
its kind writes (:attr:`bnorm.study.kinds.base.Kind.section`).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from .blocks import (
    Block,
    Figure,
    Heading,
    Para,
    Table,
    format_accuracy,
    format_speedup,
    norm_label,
)
from .checkpoint import atomic_write
from .kinds import KINDS

__all__ = ["build_document", "summary_rows", "write_report"]


def summary_rows(
    metrics: dict[str, Any], compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per experiment (the experiment's headline). ``compact``
    (for a terminal): experiment names, short measures, no note column."""
    norms: list[str] = list(metrics.get("norms", []))
    base = "none" if "none" in norms else (norms[0] if norms else "")
    # A speed-up column only for the norms some experiment measured one for.
    measured = {n for row in metrics.get("summary", []) for n in row.get("speedup", {})}
    speed_norms = [n for n in norms if n != base and n in measured]
    headers = ["Experiment", "Measured", *(norm_label(n) for n in norms)]
    headers += [f"Speed-up {norm_label(n)} vs {norm_label(base)}" for n in speed_norms]
    if compact:
        headers = [h.replace("Speed-up ", "") if h.startswith("Speed-up") else h for h in headers]
    else:
        headers.append("Note")
    rows = []
    for row in metrics.get("summary", []):
        if compact:
            cells = [row["experiment"], row.get("short", row["measure"])]
        else:
            cells = [row["title"], row["measure"]]
        cells += [format_accuracy(row["values"].get(n)) for n in norms]
        cells += [format_speedup(row["speedup"].get(n)) for n in speed_norms]
        if not compact:
            cells.append(row.get("note") or "")
        rows.append(cells)
    return headers, rows


# ---------------------------------------------------------------------- the document


def _spec_text(spec: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    options = options or {}
    model = spec.get("model", "?")
    if model in ("mlp", "deep-mlp"):
        hidden = spec.get("hidden")
        act = spec.get("activation")
        widths = "×".join(str(h) for h in hidden) if hidden else "default"
        model = f"{model} (hidden {widths}, {act or 'default'} units)"
    epochs = spec.get("epochs")
    length = (
        f"{spec['steps']} steps"
        if spec.get("steps")
        else f"{epochs} epoch{'' if epochs == 1 else 's'}"
    )
    init = (
        "N(0, {:g}²)".format(spec["init_std"]) if spec.get("init") == "normal" else spec.get("init")
    )
    parts = [
        f"model {model}",
        f"init {init}",
        _batch_text(spec, options),
        length,
        (
            "SGD at each learning rate of the grid"
            if options.get("lrs")
            else f"SGD lr {spec.get('lr'):g}"
        )
        + (f", momentum {spec['momentum']:g}" if spec.get("momentum") else ""),
    ]
    if spec.get("weight_decay"):
        parts.append(f"weight decay {spec['weight_decay']:g}")
    if spec.get("lr_milestones"):
        parts.append(
            f"lr ×{spec['lr_gamma']:g} at "
            f"{', '.join(f'{m:g}' for m in spec['lr_milestones'])} of training"
        )
    if spec.get("augment"):
        parts.append("crop + flip augmentation")
    return "; ".join(parts) + "."


def _batch_text(spec: dict[str, Any], options: dict[str, Any]) -> str:
    if options.get("batch_sizes"):
        return "each batch size of the grid"
    if spec.get("micro_batches", 1) > 1:
        return (
            f"{spec['micro_batches']} micro-batches of {spec.get('batch_size')} per SGD step "
            "(gradient accumulation)"
        )
    return f"batch {spec.get('batch_size')}"


def _cpu_text(metrics: dict[str, Any]) -> str:
    cpu = metrics.get("cpu_s")
    return "" if cpu is None else f" (CPU time {cpu:.0f} s)"


def _seeds_text(metrics: dict[str, Any]) -> str:
    """The study's seeds, and those of the experiments that have their own."""
    seeds = list(metrics["seeds"])
    own = [
        f"{name}: {', '.join(map(str, exp['seeds']))}"
        for name, exp in metrics["experiments"].items()
        if exp.get("seeds") is not None and list(exp["seeds"]) != seeds and exp["runs"]
    ]
    text = ", ".join(map(str, seeds))
    return f"{text} ({'; '.join(own)})" if own else text


def build_document(config: dict[str, Any], metrics: dict[str, Any], out: Path) -> list[Block]:
    """Every block of the report, in order; writes the figures into ``out``."""
    norms: list[str] = list(metrics["norms"])
    ds = metrics["dataset"]
    blocks: list[Block] = [Heading("What batch normalization does — measured", 1)]
    intro = (
        f"Dataset {ds['name']} ({ds['train']} training, {ds['test']} test images of "
        f"{'×'.join(map(str, ds['shape']))}, {ds['classes']} classes); seeds "
        f"{_seeds_text(metrics)}; every network trained with and without "
        "normalization from the same initial weights on the same batches. "
        f"Wall time {metrics['wall_s']:.0f} s{_cpu_text(metrics)} on {metrics['device']} "
        f"({metrics['threads']} thread(s))."
    )
    blocks.append(Para(intro))
    if metrics.get("interrupted"):
        blocks.append(
            Para(
                f"Interrupted: {metrics['runs_finished']} of {metrics['runs_planned']} "
                "runs finished; "
                "this report covers those. Resume with `bnorm study --resume "
                + str(metrics.get("out_dir", "DIR"))
                + "`.",
                "warn",
            )
        )
    headers, rows = summary_rows(metrics)
    blocks += [Heading("Summary"), Table(headers, rows)]
    for name, exp in metrics["experiments"].items():
        blocks.append(Heading(exp["title"]))
        if exp.get("about"):
            blocks.append(Para(exp["about"]))
        kind = KINDS.get(exp["kind"])
        if kind is None:
            continue
        if kind.trains:
            blocks.append(Para("Setup: " + _spec_text(exp["spec"], exp["options"])))
        if not exp["runs"] and kind.trains:
            blocks.append(Para("No run of this experiment finished."))
        else:
            blocks += kind.section(name, exp, list(exp.get("norms", norms)), out)
    return blocks


# ------------------------------------------------------------------------ renderers

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1.5em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.8em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
p.warn { background: #fff4e5; border-left: 4px solid #d9730d; padding: 0.6em 0.9em; }
details { margin-top: 2em; } \
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


_NUMBER = re.compile(r"^[\d—.]+[^a-z]*$")


def _td(cell: str) -> str:
    """A table cell; numbers (``97.1 ± 0.4%``, ``12.0×``) do not wrap."""
    css = ' class="num"' if _NUMBER.match(cell) else ""
    return f"<td{css}>{html.escape(cell)}</td>"


def render_html(blocks: list[Block], config: dict[str, Any]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>bnorm study report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.css}"' if b.css else ""
            parts.append(f"<p{cls}>{html.escape(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in b.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
            )
    parts.append("<details><summary>Resolved configuration (config.json)</summary><pre>")
    parts.append(html.escape(json.dumps(config, indent=2)))
    parts.append("</pre></details></body></html>")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [("> **" + b.text + "**") if b.css == "warn" else b.text, ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Figure):
            lines += [f"![{b.caption}]({b.path.name})", "", f"*{b.caption}*", ""]
    lines.append("The resolved configuration is in `config.json`, every number in `metrics.json`.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, config: dict[str, Any], metrics: dict[str, Any]) -> list[Path]:
    """Write the PNGs, ``report.html`` and ``report.md`` into ``out``; returns the paths."""
    out = Path(out)
    blocks = build_document(config, metrics, out)
    html_path = out / "report.html"
    md_path = out / "report.md"
    atomic_write(html_path, render_html(blocks, config).encode())
    atomic_write(md_path, render_markdown(blocks).encode())
    return [html_path, md_path, *(b.path for b in blocks if isinstance(b, Figure))]
