"""The page `fastdeit report` writes: one colour per run, smoothing of noisy step curves, and
plotly figures (zoom, hover, a shared bar to hide and show runs, a smoothing slider) in one
self-contained HTML file with plotly.js inline, so that it opens offline. Without plotly the
page embeds the matplotlib PNGs instead.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# run -> series label -> (x, y): what one figure draws.
FigureData = dict[str, dict[str, tuple[list[float], list[float]]]]

# 24 colours readable on white, each at least 27 CIELAB units from every other (the first ten
# are matplotlib's, so a report of few runs looks as before; the rest were picked greedily for
# distance): a sweep of up to 24 runs never shares a colour. Past 24 the colours come again
# with another dash (DASHES), so no two runs look alike up to 72.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#0000ff", "#ff22ff", "#224400", "#4411aa", "#ff0077", "#886600", "#77bb88", "#770055",
           "#0077ff", "#ff8888", "#dd00aa", "#bb66ff", "#ccaa77", "#004444")
DASHES = ("solid", "dash", "dot")
RAW_OPACITY = 0.25  # the unsmoothed points, drawn faintly under the smoothed line


@dataclass(frozen=True)
class Style:
    colour: str
    dash: int  # index into DASHES


@dataclass(frozen=True)
class Spec:
    """How a figure is drawn: its title, its x axis, and whether its step curves are smoothed."""

    title: str
    xlabel: str
    smoothed: bool


def run_styles(names: Sequence[str]) -> dict[str, Style]:
    """One style per run, by its place in the command line: the same in every figure."""
    return {n: Style(PALETTE[k % len(PALETTE)], (k // len(PALETTE)) % len(DASHES)) for k, n in enumerate(names)}


def ema(ys: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the first
    points are not pulled toward 0. Non-finite points (a diverged run) pass through and leave
    the average as it was. weight 0 gives the points back."""
    out = []
    last = 0.0
    n = 0
    for y in ys:
        if not math.isfinite(y):
            out.append(y)
            continue
        n += 1
        last = last * weight + (1 - weight) * y
        out.append(last / (1 - weight**n))
    return out


def series_labels(data: FigureData) -> list[str]:
    """The figure's series labels in the order the runs logged them: one panel each."""
    return list(dict.fromkeys(label for series in data.values() for label in series))


def _traces(go: Any, run: str, x: list[float], y: list[float], style: Style, smooth: float | None) -> list[Any]:
    """A run's line in one panel; with smoothing (None: none for this figure) the raw points
    go faintly underneath, and the line keeps them (customdata) for the hover and the slider."""
    line = {"color": style.colour, "dash": DASHES[style.dash], "width": 2}
    mode = "lines+markers" if len(x) < 30 else "lines"
    if smooth is None:
        return [go.Scatter(x=x, y=y, name=run, legendgroup=run, mode=mode, line=line,
                           hovertemplate="%{y:.4g}")]
    raw = go.Scatter(x=x, y=y, name=run, legendgroup=run, mode="lines", opacity=RAW_OPACITY, hoverinfo="skip",
                     line={**line, "width": 1}, showlegend=False, meta="raw")
    return [raw, go.Scatter(x=x, y=ema(y, smooth), customdata=y, name=run, legendgroup=run, mode=mode, line=line,
                            meta="smoothed", hovertemplate="%{y:.4g} (raw %{customdata:.4g})")]


def plotly_figure(data: FigureData, spec: Spec, styles: dict[str, Style], smooth: float) -> Any:
    """One figure, a panel per series label (the loss's parts, top-1's heads) so that each
    panel holds one line per run, whatever the number of runs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = series_labels(data)
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels if len(labels) > 1 else None,
                        horizontal_spacing=0.05)
    for col, label in enumerate(labels, 1):
        for run, series in data.items():
            if label in series:
                for t in _traces(go, run, *series[label], styles[run], smooth if spec.smoothed else None):
                    fig.add_trace(t, row=1, col=col)
        fig.update_xaxes(title_text=spec.xlabel, row=1, col=col)
    if spec.xlabel == "epoch":  # whole epochs on the axis, not 1.5
        last = max(max(x) for series in data.values() for x, _ in series.values())
        fig.update_xaxes(dtick=max(1, math.ceil(last / 10)))
    # The legend is the page's run bar (one for every figure), so the plots keep their width.
    fig.update_layout(title={"text": spec.title, "x": 0.01}, template="plotly_white", showlegend=False,
                      hovermode="x unified", margin={"l": 50, "r": 30, "t": 60, "b": 40})
    return fig


def _run_bar(styles: dict[str, Style], smooth: float | None) -> str:
    """The shared legend: a button per run in its colour (click: hide or show it in every
    figure; double-click: only it), and the smoothing slider where figures are interactive."""
    buttons = "".join(f'<button class="run" data-run="{html.escape(n)}" style="--c:{s.colour}">'
                      f"{html.escape(n)}</button>" for n, s in styles.items())
    slider = "" if smooth is None else (
        f'<label>smoothing <input id="smooth" type="range" min="0" max="0.99" step="0.01" value="{smooth}">'
        f' <span id="smooth-value">{smooth:.2f}</span></label> <button id="all">all runs</button>')
    return f'<div id="bar">{slider}{buttons}</div>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:0 1.5rem 2rem}
table{border-collapse:collapse;font-size:.9rem}td,th{border:1px solid #ccc;padding:2px 8px}
#bar{position:sticky;top:0;z-index:10;background:#fff;padding:.5rem 0;border-bottom:1px solid #ddd}
#bar label{margin-right:1rem}
button.run{border:1px solid #ccc;border-left:14px solid var(--c);background:#fff;margin:2px;cursor:pointer}
button.run.off{opacity:.35}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.4em;background:var(--c)}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(600px,1fr));grid-auto-flow:dense;gap:1rem;margin-top:1rem}
.wide{grid-column:1/-1}.figs img{max-width:100%}
"""

# Hides and shows a run in every figure, and smooths again from the raw points the slider's way.
_JS = """
(function () {
  if (!window.Plotly) return;
  const plots = () => Array.from(document.querySelectorAll('.js-plotly-plot'));
  const buttons = Array.from(document.querySelectorAll('button.run'));
  const hidden = new Set();
  function show() {
    for (const gd of plots()) Plotly.restyle(gd, {visible: gd.data.map(t => !hidden.has(t.legendgroup))});
    for (const b of buttons) b.classList.toggle('off', hidden.has(b.dataset.run));
  }
  for (const b of buttons) {
    b.onclick = () => { hidden.has(b.dataset.run) ? hidden.delete(b.dataset.run) : hidden.add(b.dataset.run); show(); };
    b.ondblclick = () => { hidden.clear(); for (const o of buttons) if (o !== b) hidden.add(o.dataset.run); show(); };
  }
  const all = document.getElementById('all');
  if (all) all.onclick = () => { hidden.clear(); show(); };
  function ema(ys, w) {
    let last = 0, n = 0;
    return ys.map(y => { if (!Number.isFinite(y)) return y; n++; last = last * w + (1 - w) * y;
                         return last / (1 - Math.pow(w, n)); });
  }
  const slider = document.getElementById('smooth');
  if (slider) slider.oninput = () => {
    const w = +slider.value;
    document.getElementById('smooth-value').textContent = w.toFixed(2);
    for (const gd of plots()) {
      const idx = [], ys = [];
      gd.data.forEach((t, i) => {
        if (t.meta === 'smoothed') { idx.push(i); ys.push(ema(Array.from(t.customdata), w)); }
      });
      if (idx.length) Plotly.restyle(gd, {y: ys}, idx);
    }
  };
})();
"""


def _has_plotly() -> bool:
    try:
        import plotly  # noqa: F401
    except ImportError:
        return False
    return True


def page(mark: str, header: str, figures: dict[str, FigureData], specs: dict[str, Spec],
         styles: dict[str, Style], smooth: float, pngs: dict[str, bytes]) -> str:
    """The whole HTML page: `mark` first in its head (what says the file is ours), plotly.js once."""
    import base64

    interactive = _has_plotly()
    cells = []
    for name, data in figures.items():
        wide = " wide" if len(series_labels(data)) > 1 else ""
        if interactive:
            fig = plotly_figure(data, specs[name], styles, smooth)
            body = fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                               default_height="400px", config={"responsive": True, "displaylogo": False})
        else:
            b64 = base64.b64encode(pngs[name]).decode()
            body = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
        cells.append(f'<div class="fig{wide}" data-figure="{html.escape(name)}">{body}</div>')
    lib = ""
    if interactive:
        from plotly.offline import get_plotlyjs

        lib = f'<script id="plotly-js">{get_plotlyjs()}</script>'
    note = "" if interactive else "<p><i>plotly is not installed: static figures (pip install plotly)</i></p>"
    head = f"<!doctype html><html><head><meta charset='utf-8'>{mark}<title>fastdeit report</title>"
    return (f"{head}<style>{_CSS}</style>{lib}</head><body>{header}{_run_bar(styles, smooth if interactive else None)}"
            f"{note}<div class='figs'>{''.join(cells)}</div><script>{_JS}</script></body></html>")
