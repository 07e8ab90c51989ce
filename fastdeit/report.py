"""`fastdeit report RUN [RUN ...]`: a run's curves, or several runs' side by side, as one
self-contained HTML page (figures embedded) and a PNG per figure, drawn with matplotlib.

metrics.jsonl is the source: runs still going and runs resumed several times (step records
written again after a resume: the last one of each update wins) read as they are, and a
truncated last line is left out with a note.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdeit.errors import UserError
from fastdeit.rundir import RunDir

# Marks the pages and PNGs `write_report` writes: only files bearing it are written over, so
# a mistyped --out (a checkpoint, someone's figures) is refused instead of lost.
GENERATOR = "fastdeit report"
_MARK = f'<meta name="generator" content="{GENERATOR}">'

# (figure, title, [(record kind, key, label)]): what each figure draws, per run.
FIGURES = [
    ("loss", "training loss", [("step", "loss", "loss"), ("step", "loss_base", "base"),
                               ("step", "loss_distill", "distillation")]),
    ("lr", "learning rate", [("step", "lr", "lr")]),
    ("top1", "top-1 (%) per head", [("epoch", "top1", "joint"), ("epoch", "top1_cls", "cls"),
                                     ("epoch", "top1_dist", "dist")]),
    ("top5", "top-5 (%)", [("epoch", "top5", "joint")]),
    ("speed", "training img/s", [("step", "img_s", "img/s")]),
    ("data_wait", "fraction of the step waiting for data", [("step", "data_wait", "data wait")]),
    ("agreement", "cached targets: agreement with the live teacher", [("epoch", "target_agreement", "agreement")]),
]


@dataclass
class RunData:
    name: str
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)  # updates -> the last step record
    epochs: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> the last epoch record
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json, once the run has ended
    notes: list[str] = field(default_factory=list)

    def series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        """x (updates for steps, epoch + 1 for epochs) and the values where the key was logged."""
        rows = self.steps if kind == "step" else self.epochs
        pts = [(x if kind == "step" else x + 1, r[key]) for x, r in sorted(rows.items())
               if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]


def read_run(path: Path) -> RunData:
    """A run folder's metrics (and config); what it lacks is noted, never raised, unless it is
    not a run folder at all."""
    run = RunDir(path)
    if not run.metrics.is_file():
        raise UserError(f"{path} is not a run folder (no metrics.jsonl): pass the --out folder of a fastdeit train")
    data = RunData(name=Path(path).name)
    lines = run.metrics.read_text().splitlines()
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            data.notes.append(f"line {n + 1} of metrics.jsonl is not whole (a run still writing, or cut): left out")
            continue
        if rec.get("kind") == "step":
            data.steps[int(rec.get("updates", len(data.steps)))] = rec
        elif rec.get("kind") == "epoch":
            data.epochs[int(rec["epoch"])] = rec
    for attr, path in (("config", run.config), ("summary", run.summary)):
        try:
            setattr(data, attr, json.loads(path.read_text()) if path.is_file() else {})
        except ValueError:
            data.notes.append(f"{path.name} is not valid JSON")
    if not data.steps:
        data.notes.append("no training step logged yet")
    if not any("top1" in r for r in data.epochs.values()):
        data.notes.append("no evaluation yet")
    return data


def summary_row(run: RunData) -> dict[str, Any]:
    c = run.config
    tops = [r["top1"] for r in run.epochs.values() if isinstance(r.get("top1"), (int, float))]
    speeds = [r["train_img_s"] for r in run.epochs.values() if isinstance(r.get("train_img_s"), (int, float))]
    return {"run": run.name, "model": c.get("model", {}).get("name", "?"),
            "distillation": c.get("distill", {}).get("mode", "?"), "targets": c.get("distill", {}).get("targets", "?"),
            "epochs": len(run.epochs), "best top-1": max(tops) if tops else None,
            "img/s": sum(speeds) / len(speeds) if speeds else None, "wall s": run.summary.get("wall_s")}


def figure_data(runs: list[RunData]) -> dict[str, dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """figure -> run -> series label -> (x, y), for the figures some run has data for."""
    out: dict[str, dict[str, dict[str, tuple[list[float], list[float]]]]] = {}
    for fig, _title, series in FIGURES:
        per_run = {r.name: {label: r.series(kind, key) for kind, key, label in series} for r in runs}
        per_run = {name: {k: v for k, v in s.items() if v[0]} for name, s in per_run.items()}
        if any(per_run.values()):
            out[fig] = {name: s for name, s in per_run.items() if s}
    return out


def _draw(fig_name: str, data: dict[str, dict[str, tuple[list[float], list[float]]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    title = next(t for f, t, _ in FIGURES if f == fig_name)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (run, series) in enumerate(data.items()):
        color = f"C{k % 10}"
        for s, (label, (x, y)) in enumerate(series.items()):
            name = run if len(series) == 1 else f"{run} ({label})"
            ax.plot(x, y, styles[s % len(styles)], color=color, label=name, marker="o" if len(x) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("epoch" if fig_name in ("top1", "top5", "agreement") else "update")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": GENERATOR})
    plt.close(fig)
    return buf.getvalue()


def _cell(v: Any) -> str:
    return "" if v is None else f"{v:.2f}" if isinstance(v, float) else html.escape(str(v))


def _ours(path: Path, png: bool) -> bool:
    """Whether `path` is a page (or a PNG) that `write_report` wrote: it bears the mark."""
    try:
        if png:
            from PIL import Image

            with Image.open(path) as img:
                return img.format == "PNG" and img.info.get("Software") == GENERATOR
        with path.open("rb") as f:
            return _MARK.encode() in f.read(512)
    except (OSError, ValueError, SyntaxError):  # unreadable, a folder, not an image
        return False


def check_out(out: Path, pngs: Path) -> None:
    """Refuse, before writing anything, an `out` or a figures folder holding what this
    command did not write; its own earlier report is written over."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the HTML file to write (e.g. {out / 'report.html'})")
    if out.exists() and not _ours(out, png=False):
        raise UserError(f"--out {out} exists and is not a report fastdeit wrote: name a new file (nothing written)")
    if pngs.exists() and not pngs.is_dir():
        raise UserError(f"{pngs}, where the figures of --out {out} go, is a file: name another --out (nothing written)")
    foreign = [p.name for p in sorted(pngs.iterdir()) if not _ours(p, png=True)] if pngs.is_dir() else []
    if foreign:
        raise UserError(f"{pngs}, where the figures of --out {out} go, holds files fastdeit report did not write "
                        f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): name another --out "
                        f"(nothing written)")


def write_report(paths: list[Path], out: Path) -> dict[str, Any]:
    """report.html at `out` and its PNGs in OUT-figures/; returns the figures' data, the
    summary rows and the notes."""
    runs = [read_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:  # two runs of the same folder name stay apart in the legends
        if names.count(r.name) > 1:
            r.name = str(Path(paths[runs.index(r)]))
    figures = figure_data(runs)
    rows = [summary_row(r) for r in runs]
    notes = [f"{r.name}: {n}" for r in runs for n in r.notes]
    pngs = out.with_name(out.stem + "-figures")
    check_out(out, pngs)
    pngs.mkdir(parents=True, exist_ok=True)
    for old in pngs.glob("*.png"):  # all its own (checked): figures this report no longer draws go
        old.unlink()
    parts = [f"<h1>fastdeit report: {html.escape(', '.join(r.name for r in runs))}</h1>", "<table border=1>",
             "<tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows]
    parts.append("</table>")
    parts += [f"<p><i>{html.escape(n)}</i></p>" for n in notes]
    for name, data in figures.items():
        png = _draw(name, data)
        (pngs / f"{name}.png").write_bytes(png)
        parts.append(f'<h2>{html.escape(name)}</h2><img src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    page = f"<!doctype html><html><head><meta charset='utf-8'>{_MARK}<title>fastdeit report</title></head><body>"
    out.write_text(page + "\n".join(parts) + "</body></html>")
    return {"figures": figures, "rows": rows, "notes": notes, "pngs": sorted(str(p) for p in pngs.glob("*.png"))}
