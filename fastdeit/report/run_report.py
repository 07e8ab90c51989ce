"""`fastdeit report RUN [RUN ...]`: a run's curves, or several runs' side by side, as one
self-contained HTML page (figures embedded) and a PNG per figure, drawn with matplotlib.

metrics.jsonl is the source: runs still going and runs resumed several times (step records
written again after a resume: the last one of each update wins) read as they are, and a
truncated last line is left out with a note.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdeit.errors import UserError, shown
from fastdeit.report.page import DASHES, RAW_OPACITY, FigureData, Spec, Style, ema, page, run_styles, series_labels
from fastdeit.runtime.atomic import atomic_write_bytes, atomic_write_text
from fastdeit.training.rundir import RunDir

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
    """A run folder's metrics (and config); what it lacks or cannot read is noted, line by line,
    never raised, unless it is not a run folder at all."""
    run = RunDir(path)
    if not run.metrics.is_file():
        raise UserError(f"{path} is not a run folder (no metrics.jsonl): pass the --out folder of a fastdeit train")
    data = RunData(name=Path(path).name)
    try:
        raw = run.metrics.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {run.metrics}: {e.strerror}") from None
    for n, line in enumerate(raw.split(b"\n"), 1):
        why = _add_record(data, line) if line.strip() else None
        if why:
            data.notes.append(f"line {n} of metrics.jsonl {why}: left out")
    data.config = _json_object(run.config, data.notes)
    data.summary = _json_object(run.summary, data.notes)
    if not data.steps:
        data.notes.append("no training step logged yet")
    if not any("top1" in r for r in data.epochs.values()):
        data.notes.append("no evaluation yet")
    return data


# The values of an epoch record that the report reads as numbers: a record holding anything else
# there is left out whole, so a junk line cannot replace the real one of its epoch.
EPOCH_NUMBERS = ("top1", "top5", "top1_cls", "top1_dist", "train_img_s", "data_wait", "target_agreement")


def _add_record(data: RunData, line: bytes) -> str | None:
    """Keep one line's record; else why it is left out."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except ValueError:
        return "is not whole (a run still writing, or cut)"
    if not isinstance(rec, dict):
        return f"is not a record but {type(rec).__name__}"
    kind = rec.get("kind")
    if kind == "step":
        updates = rec.get("updates", len(data.steps))
        if not _is_count(updates):
            return f"has updates = {shown(updates)}, not a count"
        data.steps[updates] = rec
    elif kind == "epoch":
        if not _is_count(rec.get("epoch")):
            return f"is an epoch record with epoch = {shown(rec.get('epoch'))}"
        bad = [k for k in EPOCH_NUMBERS if k in rec and not _is_number(rec[k])]
        if bad:
            return f"has {bad[0]} = {shown(rec[bad[0]])}, not a number"
        data.epochs[rec["epoch"]] = rec
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_object(path: Path, notes: list[str]) -> dict[str, Any]:
    """config.json or summary.json as a JSON object, {} (noted) where it is something else."""
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict):
        notes.append(f"{path.name} is not a JSON object: left out")
        return {}
    return found


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    found = config.get(name)
    return found if isinstance(found, dict) else {}


def summary_row(run: RunData) -> dict[str, Any]:
    c = run.config
    tops = [r["top1"] for r in run.epochs.values() if isinstance(r.get("top1"), (int, float))]
    speeds = [r["train_img_s"] for r in run.epochs.values() if isinstance(r.get("train_img_s"), (int, float))]
    wall = run.summary.get("wall_s")
    return {"run": run.name, "model": _section(c, "model").get("name", "?"),
            "distillation": _section(c, "distill").get("mode", "?"),
            "targets": _section(c, "distill").get("targets", "?"),
            "epochs": len(run.epochs), "best top-1": max(tops) if tops else None,
            "img/s": sum(speeds) / len(speeds) if speeds else None,
            "wall s": wall if _is_number(wall) else None}


def figure_data(runs: list[RunData]) -> dict[str, dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """figure -> run -> series label -> (x, y), for the figures some run has data for."""
    out: dict[str, dict[str, dict[str, tuple[list[float], list[float]]]]] = {}
    for fig, _title, series in FIGURES:
        per_run = {r.name: {label: r.series(kind, key) for kind, key, label in series} for r in runs}
        per_run = {name: {k: v for k, v in s.items() if v[0]} for name, s in per_run.items()}
        if any(per_run.values()):
            out[fig] = {name: s for name, s in per_run.items() if s}
    return out


# Step curves noisy enough to smooth; the learning rate is a schedule, drawn as it is.
SMOOTHED = {"loss", "speed", "data_wait"}
_MPL_DASHES = {"solid": "-", "dash": "--", "dot": ":"}


def specs() -> dict[str, Spec]:
    return {f: Spec(t, "epoch" if all(k == "epoch" for k, _, _ in s) else "update", f in SMOOTHED)
            for f, t, s in FIGURES}


def _draw(data: FigureData, spec: Spec, styles: dict[str, Style], smooth: float) -> bytes:
    """A PNG of one figure, laid out as the page draws it: a panel per series label, one
    line per run in its colour, the legend outside the panels."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = series_labels(data)
    fig, axes = plt.subplots(1, len(labels), figsize=(max(8.0, 2.2 + 4.6 * len(labels)), 3.8), squeeze=False,
                             layout="constrained")
    handles = {}
    for ax, label in zip(axes[0], labels):
        for run, series in data.items():
            if label not in series:
                continue
            x, y = series[label]
            style = dict(color=styles[run].colour, ls=_MPL_DASHES[DASHES[styles[run].dash]])
            if spec.smoothed and smooth > 0:
                ax.plot(x, y, alpha=RAW_OPACITY, lw=0.8, **style)
                y = ema(y, smooth)
            (handles[run],) = ax.plot(x, y, lw=1.6, marker="o" if len(x) < 30 else None, ms=3, **style)
        ax.set_title(label if len(labels) > 1 else "", fontsize=10)
        ax.set_xlabel(spec.xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.25
        ax.grid(alpha=0.3)
    fig.suptitle(spec.title + (f" (smoothed {smooth:g})" if spec.smoothed and smooth > 0 else ""))
    runs = [r for r in data if r in handles]
    fig.legend([handles[r] for r in runs], runs, loc="outside right upper", fontsize=8, frameon=False,
               ncols=1 if len(runs) <= 16 else 2)
    buf = io.BytesIO()
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


def _header(runs: list[RunData], rows: list[dict[str, Any]], notes: list[str], styles: dict[str, Style]) -> str:
    """The page's title, the summary table (each run with its colour) and the notes."""
    names = ", ".join(r.name for r in runs) if len(runs) <= 3 else f"{len(runs)} runs"
    parts = [f"<h1>fastdeit report: {html.escape(names)}</h1>", "<table>",
             "<tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) + "</tr>"]
    for row in rows:
        swatch = f'<span class="sw" style="--c:{styles[row["run"]].colour}"></span>'
        parts.append("<tr>" + "".join(f"<td>{swatch if k == 'run' else ''}{_cell(v)}</td>" for k, v in row.items())
                     + "</tr>")
    parts.append("</table>")
    parts += [f"<p><i>{html.escape(n)}</i></p>" for n in notes]
    return "\n".join(parts)


def write_report(paths: list[Path], out: Path, smooth: float = 0.6) -> dict[str, Any]:
    """report.html at `out` and its PNGs in OUT-figures/; step curves (loss, img/s, data wait)
    smoothed by an EMA of weight `smooth` (0: off), raw points kept faintly. Returns the
    figures' data, the summary rows, the notes and each run's colour."""
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth {smooth}: give a weight in [0, 1) (0: no smoothing; 0.6 by default)")
    runs = [read_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:  # two runs of the same folder name stay apart in the legends
        if names.count(r.name) > 1:
            r.name = str(Path(paths[runs.index(r)]))
    figures = figure_data(runs)
    rows = [summary_row(r) for r in runs]
    notes = [f"{r.name}: {n}" for r in runs for n in r.notes]
    styles = run_styles([r.name for r in runs])
    pngs = out.with_name(out.stem + "-figures")
    check_out(out, pngs)
    pngs.mkdir(parents=True, exist_ok=True)
    for old in pngs.glob("*.png"):  # all its own (checked): figures this report no longer draws go
        old.unlink()
    drawn = {}
    for name, data in figures.items():
        drawn[name] = _draw(data, specs()[name], styles, smooth)
        atomic_write_bytes(drawn[name], pngs / f"{name}.png")
    atomic_write_text(page(_MARK, _header(runs, rows, notes, styles), figures, specs(), styles, smooth, drawn), out)
    return {"figures": figures, "rows": rows, "notes": notes, "pngs": sorted(str(p) for p in pngs.glob("*.png")),
            "colours": {n: s.colour for n, s in styles.items()}}
