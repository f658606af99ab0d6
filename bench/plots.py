"""PNG plots of the benches' json results (matplotlib, headless): bench/export.py's throughput and latency
by variant and its mixed-vs-merged ratios; bench/embed.py's texts/s by encoder.

    python bench/plots.py bench/results/export.json     # re-plot a saved run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OURS, PEER, FLOOR = "#1f77b4", "#ff7f0e", "#7f7f7f"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colour(variant: str) -> str:
    if variant.startswith("FLOP floor"):
        return FLOOR
    return PEER if variant.startswith(("ORT HF", "transformers", "sentence-transformers")) else OURS


def _bars(ax, labels, values, title, xlabel, fmt="{:.0f}") -> None:
    ys = range(len(labels))
    ax.barh(ys, values, color=[_colour(v) for v in labels])
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    for y, v in zip(ys, values):
        ax.text(v, y, " " + fmt.format(v), va="center", fontsize=7)
    ax.margins(x=0.18)


def export_plots(data: dict, stem: Path) -> list[Path]:
    """`stem`-throughput.png, -latency.png and -mixed.png from bench/export.py's json."""
    plt = _plt()
    rows = data["rows"]
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
    note = f"MiniLM, CPU, {data.get('threads', '?')} threads; blue: ours (+ {data.get('method', 'adapter')}), " \
           "orange: plain MiniLM peers, grey: FLOP floor"
    out = []
    for kind, key, unit in (("throughput", lambda r: 1000 * r["batch"] / r["ms"], "sequences / s"),
                            ("latency", lambda r: r["ms"], "median ms")):
        fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 0.32 * len(rows) / len(shapes) + 1.8))
        for ax, (b, s) in zip(axes if len(shapes) > 1 else [axes], shapes):
            rs = [r for r in rows if (r["batch"], r["seq"]) == (b, s)]
            _bars(ax, [r["variant"] for r in rs], [key(r) for r in rs], f"batch {b} x seq {s}", unit, "{:.1f}")
        fig.suptitle(f"{kind} by variant ({note})", fontsize=9)
        fig.tight_layout()
        path = Path(f"{stem}-{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    out.append(_mixed(plt, rows, shapes, data.get("method", "unipelt"), Path(f"{stem}-mixed.png")))
    return out


def _mixed(plt, rows, shapes, method, path: Path) -> Path:
    """Time of each shared-graph variant over the merged model of the same precision, per shape."""
    pairs = [("shared, 1 adapter", "ONNX shared, 1 adapter", "ONNX merged"),
             (f"shared, 8 {method} mixed", f"ONNX shared, 8 {method} mixed", "ONNX merged"),
             ("shared, 8 methods mixed", "ONNX shared, 8 methods mixed", "ONNX merged"),
             ("int8 shared, 1 adapter", "ONNX shared int8, 1 adapter", "ONNX merged int8"),
             ("int8 shared, 8 methods mixed", "ONNX shared int8, 8 methods mixed", "ONNX merged int8")]
    by = {(r["batch"], r["seq"], r["variant"]): r["ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(shapes)
    pairs = [p for p in pairs if any((*sh, p[1]) in by for sh in shapes)]
    for i, sh in enumerate(shapes):
        vals = [by.get((*sh, a), float("nan")) / by.get((*sh, b), float("nan")) for _, a, b in pairs]
        xs = [j + i * width for j in range(len(pairs))]
        ax.bar(xs, vals, width, label=f"batch {sh[0]} x seq {sh[1]}")
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(pairs))], [p[0] for p in pairs],
                  fontsize=7, rotation=12)
    ax.set_ylabel("time / merged model's time")
    ax.set_title("mixed vs merged (same precision, same run; 1.0 = merged speed)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embed_plot(runs: dict[str, float], path: Path, title: str) -> Path:
    """texts/s by encoder (bench/embed.py)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(runs) + 1.4))
    _bars(ax, list(runs), list(runs.values()), title, "texts / s", "{:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for f in export_plots(json.loads(Path(arg).read_text()), Path(arg).with_suffix("")):
            print(f)
