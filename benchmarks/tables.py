"""The tables benchmarks/throughput.py prints, one per section (rows as its JSON holds them)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_model(rows: list[dict], title: str, gpu: bool) -> None:
    table = Table(title=title)
    flops_col = "TFLOP/s" if gpu else "GFLOP/s"  # a CPU reaches GFLOP/s; no peak table for CPUs
    for col in ("model", "px", "batch", "attn", "compile", "accum", "fwd img/s", "train img/s (min-max)", flops_col,
                "MFU", "mem GiB"):
        table.add_column(col, justify="left" if col in ("model", "attn", "compile") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], str(r.get("img_size", "")), str(r["batch"]), r["attn"], r["compile"],
                          str(r.get("accum", 1)), "failed", "", "", "", "")
            continue
        lo, hi = r["train_img_s_spread"]
        achieved = r["train_tflop_s"] if gpu else r["train_tflop_s"] * 1e3
        table.add_row(r["model"], str(r["img_size"]), str(r["batch"]), r["attn"], r["compile"], str(r.get("accum", 1)),
                      f"{r['forward_img_s']:.0f}",
                      f"{r['train_img_s']:.0f} ({lo:.0f}-{hi:.0f})", f"{achieved:.2f}" if gpu else f"{achieved:.1f}",
                      "" if r["mfu"] is None else f"{r['mfu']:.1%}",
                      "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}")
    Console(width=160).print(table)


def print_distill(result: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("targets", "train img/s", "vs none", "step cost over none"):
        table.add_column(col, justify="left" if col == "targets" else "right")
    rates = result["img_per_s"]
    for name, v in rates.items():
        cost = result["step_cost_vs_none"].get(name)
        table.add_row(name, f"{v:.1f}", f"{v / rates['none']:.2f}x", "" if cost is None else f"{cost:+.1%}")
    Console(width=160).print(table)


def print_scaling(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("model", "procs", "batch/rank", "train img/s (min-max)", "speedup", "efficiency", "step ms",
                "all-reduce ms", "grad MB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], str(r["procs"]), "", "failed", "", "", "", "", "")
            continue
        lo, hi = r["img_s_spread"]
        table.add_row(r["model"], str(r["procs"]), str(r["per_rank_batch"]), f"{r['img_s']:.0f} ({lo:.0f}-{hi:.0f})",
                      f"{r.get('speedup', 0):.2f}x", f"{r.get('efficiency', 0):.0%}", f"{r['step_ms']:.0f}",
                      "" if r["allreduce_ms"] is None else f"{r['allreduce_ms']:.1f}", f"{r['grad_mb']:.0f}")
    Console(width=160).print(table)
