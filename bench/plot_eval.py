"""Bar chart of `sled eval` results: greedy vs DoLa vs SLED (and SLED's alpha = 0 control) for
every task, metric and scoring convention in the given result files. Needs matplotlib
(`pip install matplotlib`; the library itself does not).

    .venv/bin/python bench/plot_eval.py results/truthfulqa-*.json results/factor-*.json \
        --out docs/eval-results.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLOURS = {"greedy": "#7f7f7f", "dola": "#1f77b4", "sled": "#d62728", "sled-a0": "#ff9896"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by sled eval")
    p.add_argument("--out", type=Path, default=Path("docs/eval-results.png"))
    p.add_argument("--metrics", nargs="+", default=["MC1", "MC2", "accuracy"],
                   help="which metrics to show (default MC1 MC2 accuracy)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_eval.py needs matplotlib: pip install matplotlib")

    groups, methods = [], []
    for path in args.results:
        report = json.loads(path.read_text())
        config, results = report["config"], report["results"]
        model = Path(config["model"]).name
        for label in results:
            if label not in methods:
                methods.append(label)
        first = next(iter(results.values()))
        for convention, metrics in first.items():
            for metric in metrics:
                if metric in args.metrics:
                    short = "acc." if metric == "accuracy" else metric
                    groups.append((f"{config['task']}\n{model}\n{short} {convention}\n"
                                   f"n={config['items']}",
                                   {m: results[m][convention][metric] for m in results}))
    if not groups:
        raise SystemExit("no matching metrics in those files")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups)), 4.6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(method, float("nan")) for _, values in groups]
        ax.bar(xs, ys, width, label=method, color=COLOURS.get(method))
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(fontsize=8, ncols=len(methods))
    ax.set_title("greedy vs DoLa vs SLED (sled-a0: top-k truncation only)", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
