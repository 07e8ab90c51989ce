"""The ablation study's tables and figures (benchmarks/ablation.py writes the numbers).

    python benchmarks/ablation_report.py RESULTS.json

prints the study's two tables as Markdown, as docs/results.md shows them (a test keeps them equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HEADS = ("cls", "dist", "joint")


def fmt(stat: dict[str, Any] | None) -> str:
    if not stat:
        return ""
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat["std"] is not None else "")


def print_table(report: dict[str, Any], console: Console) -> None:
    n = report["settings"]["seeds"]
    table = Table(title=f"ablation: top-1 (%) on the synthetic val split, mean ± std over {n} seed(s)")
    for col in ("arm", "question", "cls", "dist", "joint", "train img/s", "wall s"):
        table.add_column(col, justify="left" if col in ("arm", "question") else "right")
    questions = {r["arm"]: r["question"] for r in report["runs"]}
    for arm, s in report["arms"].items():
        table.add_row(arm, questions[arm], fmt(s.get("cls")), fmt(s.get("dist")), fmt(s["joint"]),
                      f"{s['train_img_s']['mean']:.0f}", f"{s['wall_s']['mean']:.0f}")
    Console(width=max(120, console.width), stderr=True).print(table)
    for name, t in report["teachers"].items():
        console.print(f"teacher {name}: top-1 {t['top1_joint']:.1f}%, {t['wall_s']:.0f} s")
    for c in report["comparisons"]:
        holds = "a > b" if c["kind"] == "more" else "a = b"
        console.print(f"{c['claim']}: {c['a']} - {c['b']} = {fmt(c)} points ({c['seeds_for']}/{c['n']} seeds {holds})")
    console.print(f"the study's runs took {report['compute_wall_s'] / 60:.0f} min in all "
                  f"({report['sitting_wall_s'] / 60:.0f} min in this sitting)")


def _label(arm: str, run: dict[str, Any], teachers: dict[str, Any]) -> str:
    kind = {"none": "none (DeiT-tiny)", "soft": "soft (τ 3, α 0.1)", "hard": "hard"}[run["distill"]]
    if run["question"] == "recipe":
        return "DeiT III's recipe, " + ("LayerScale DeiT-tiny, no teacher" if run["distill"] == "none" else
                                        "DeiT-tiny-distilled, hard")
    if run["fraction"] != 100:
        return f"{kind.split(' ')[0]}, {run['fraction']}% of the images ({100 / run['fraction']:.3g}× the epochs)"
    if run["targets"] != "live":
        return f"{kind}, {'replayed targets' if run['targets'] == 'replay' else 'label maps'}"
    if run["teacher"] != "convnet" and run["distill"] != "none":
        return f"{kind}, {run['teacher'].split('-')[0]} teacher at {teachers[run['teacher']]['top1_joint']:.1f}%"
    return kind


def markdown(report: dict[str, Any]) -> str:
    """The arms (top-1 per head, mean ± std over seeds; minutes per run) and the claims
    (per-seed differences, mean ± std; the seeds on which each holds), as Markdown tables."""
    first = {}
    for r in report["runs"]:
        first.setdefault(r["arm"], r)
    lines = ["| arm | cls | dist | joint | seeds | min per run |", "| --- | --- | --- | --- | --- | --- |"]
    for arm, s in report["arms"].items():
        lines.append(f"| {_label(arm, first[arm], report['teachers'])} | {fmt(s.get('cls'))} | {fmt(s.get('dist'))} "
                     f"| {fmt(s['joint'])} | {s['joint']['n']} | {s['wall_s']['mean'] / 60:.1f} |")
    lines += ["", "| claim | a − b | points (mean ± std) | seeds where it holds |", "| --- | --- | --- | --- |"]
    for c in report["comparisons"]:
        holds = "a > b" if c["kind"] == "more" else "a = b"
        spread = f" ± {c['std']:.1f}" if c["std"] is not None else ""
        mean = round(c["mean"], 1) or 0.0  # no "-0.0"
        lines.append(f"| {c['claim']} | {c['a']} − {c['b']} | {mean:+.1f}{spread} "
                     f"| {c['seeds_for']} of {c['n']} ({holds}) |")
    return "\n".join(lines) + "\n"


def _errorbars(ax, labels: list[str], series: dict[str, list[dict | None]]) -> None:
    """Grouped bars: one group per label, one bar per series (mean, std as error bar)."""
    width = 0.8 / len(series)
    for k, (name, stats) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, s in enumerate(stats) if s]  # no bar for a head
        stats = [s for s in stats if s]  # an arm lacks (deit_tiny has no dist head)
        ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] or 0.0 for s in stats], capsize=3, label=name,
               color=f"C{k}")
        for x, s in zip(xs, stats):
            ax.text(x, s["mean"] + (s["std"] or 0) + 0.5, f"{s['mean']:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)


def draw(report: dict[str, Any], results: Path) -> list[Path]:
    """One figure per question, beside the results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, n = report["arms"], report["settings"]["seeds"]
    figures = []
    by_question: dict[str, dict[str, None]] = {}  # question -> its arms, in the study's order
    for r in report["runs"]:
        by_question.setdefault(r["question"], {})[r["arm"]] = None
    teacher_of = {r["arm"]: r["teacher"] for r in report["runs"]}
    for question, arms_of in by_question.items():
        names = list(arms_of)
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.8))
        if question == "scarcity":  # the 100% points are the distillation question's none and hard
            for kind, label in (("none", "no distillation"), ("hard", "hard distillation")):
                points = sorted((pct, arms[a]["joint"]) for pct, a in ((10, f"{kind}-10pct"), (30, f"{kind}-30pct"),
                                                                       (100, kind)) if a in arms)
                ax.errorbar([p for p, _ in points], [s["mean"] for _, s in points],
                            yerr=[s["std"] or 0 for _, s in points], marker="o", capsize=3, label=label)
            ax.set_xlabel("% of the training images")
            ax.set_ylabel("top-1 (%), joint head")
            ax.legend(fontsize=8)
        else:
            if question == "teacher" and "hard" in arms:
                names = [*names, "hard"]  # the full convnet teacher, for scale
            if question == "recipe":  # against DeiT's recipe: the distillation question's none and hard
                names = [a for a in ("none", "hard") if a in arms] + names
            labels = [a if question != "teacher" else
                      f"{a}\nteacher {report['teachers'][teacher_of[a]]['top1_joint']:.0f}%" for a in names]
            _errorbars(ax, labels, {h: [arms[a].get(h) for a in names] for h in HEADS})
        what = question + (" (the same number of updates at every size)" if question == "scarcity" else "")
        ax.set_title(f"{what}: mean ± std over {n} seed(s)", fontsize=10)
        fig.tight_layout()
        path = results.with_name(f"{results.stem}-{question}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append(path)
    return figures


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())), end="")
