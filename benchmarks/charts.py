"""Benchmark results files drawn as bar charts (img/s per variant; MFU where the file has it).
`benchmarks/loader.py` and `benchmarks/throughput.py` draw theirs beside their JSON;
`benchmarks/plot.py` redraws any committed results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def bars(report: dict[str, Any]) -> tuple[str, dict[str, float], dict[str, str]]:
    """(title, {variant: img/s}, {variant: annotation}) of a results file."""
    where = f"{report.get('device', '?')}, {report.get('date', '')[:10]}"
    if report.get("benchmark") == "loader":
        return f"data path img/s — {where}", dict(report["img_per_s"]), {}
    section = report.get("section")
    if section == "distill":
        d = report["distill"]
        return f"training img/s by teacher targets — {where}", dict(d["img_per_s"]), {}
    if section == "model":
        values, notes = {}, {}
        for r in report["model"]:
            name = f"{r['model']} {r['img_size']}px b{r['batch']} {r['attn']}/{r['compile']}"
            values[name] = r["train_img_s"]
            if r.get("mfu") is not None:
                notes[name] = f"MFU {100 * r['mfu']:.0f}%"
        return f"training step img/s — {where}", values, notes
    if section == "scaling":
        rows = report["scaling"]
        return (f"img/s by process count — {where}",
                {f"{r.get('procs', r.get('world', '?'))} procs": r.get("img_s", r.get("train_img_s", 0)) for r in rows},
                {})
    raise SystemExit(f"no chart for this results file (benchmark {report.get('benchmark')!r}, section {section!r})")


def plot(results: Path, out: Path | None = None) -> Path:
    """Draw `results` (a JSON file) into `out` (default: the same name, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, values, notes = bars(json.loads(results.read_text()))
    out = out or results.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(values)))
    names = list(values)
    ax.barh(names, [values[n] for n in names], color="C0")
    for k, n in enumerate(names):
        ax.text(values[n], k, f" {values[n]:.0f}" + (f"  {notes[n]}" if n in notes else ""), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("img/s")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def chart(results: Path) -> str:
    """The results drawn beside them; "no chart" for a section with nothing to draw as bars."""
    try:
        return str(plot(results))
    except SystemExit:
        return "no chart"
