"""Draw a benchmark results file as a bar chart (img/s per variant; MFU where the file has
it), as PNG next to it or where --out says (the drawing is benchmarks/charts.py).

    python benchmarks/plot.py benchmarks/results/loader-cpu-2core.json [--out chart.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charts import bars, plot  # noqa: F401  (bars: what a results file draws)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="results JSON files")
    p.add_argument("--out", type=Path, default=None, help="the PNG (one results file only)")
    a = p.parse_args(argv)
    if a.out and len(a.results) > 1:
        p.error("--out goes with one results file")
    for r in a.results:
        print(plot(r, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
