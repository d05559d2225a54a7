"""The cosine distance between a layer's gradient g and its quantized copy ĝ over training, per
layer, for several runs side by side (issue 17's diagnostic figure: ui8, daint8, plain int8).

Each run records ``d_c`` per layer in metrics.jsonl's change records (every ``interval``
steps; ``docs/RECIPES.md``, "Gradient cosine distance"). One panel per layer, a line per run.

    python benchmarks/plot_cosine_distance.py --out docs/figures/cosine_distance.png \
        ui8=runs/i17/long-ui8/ui8-s0 daint8=runs/i17/long-daint8/daint8-s0 \
        "plain int8=runs/i17/ui8-plain-s0/ui8-s0"
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def layer_series(run_dir: Path, key: str = "d_c") -> dict[str, list[tuple[int, float]]]:
    """{layer: [(step, value), ...]} from a run's per-layer change records of ``key``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = record.get("metrics", {}).get(key) if record.get("kind") == "metrics" else None
        if isinstance(values, dict):
            for layer, value in values.items():
                series.setdefault(layer, []).append((record["step"], value))
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--key", default="d_c")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    data = {label: layer_series(Path(path), args.key) for label, path in runs.items()}
    layers = list(next(iter(data.values())))
    cols = 3
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), sharex=True, squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        for label, series in data.items():
            points = series.get(layer, [])
            ax.plot([s for s, _ in points], [v for _, v in points], label=label, linewidth=1)
        ax.set_title(layer, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("step")
    fig.supylabel(f"{args.key}: 1 − cos(g, ĝ)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
