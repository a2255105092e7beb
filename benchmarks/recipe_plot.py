"""
The quick start's digit distance against training time, a line per training run, from the
rows of benchmarks/recipe.csv: recipe, train_seed, step, minutes (the run's log.csv at that
step), sample_seed, distance (fid.py --features digits, 1000 images, the default sampler).
A point is the mean over its sampling seeds. The rows come from train.py --keep-every
snapshots scored with fid.py --ckpt "out/snapshots/*.pt" (benchmarks/recipe.md).

    python benchmarks/recipe_plot.py                       # writes assets/recipe.png
"""
import argparse
import collections
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def curves(rows):
    """{(recipe, train_seed): [(minutes, mean distance), ...] by step}."""
    points = collections.defaultdict(list)
    for r in rows:
        points[r["recipe"], r["train_seed"], int(r["step"])].append((float(r["minutes"]), float(r["distance"])))
    runs = collections.defaultdict(list)
    for (recipe, seed, step), scores in sorted(points.items(), key=lambda item: item[0][2]):
        runs[recipe, seed].append((scores[0][0], sum(d for _, d in scores) / len(scores)))
    return runs


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours = {}
    for (recipe, seed), points in curves(rows).items():
        first = recipe not in colours  # one legend entry a recipe
        colour = colours.setdefault(recipe, f"C{len(colours)}")
        ax.plot(*zip(*points), "o-", color=colour, ms=3, lw=1.2, label=recipe if first else None)
    ax.set(xlabel="training minutes (2 CPU cores)", ylabel="digit distance (lower is better)",
           title="python train.py: quality against training time", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=os.path.join(HERE, "recipe.csv"), help="the measured rows")
    p.add_argument("--out", default=os.path.normpath(os.path.join(HERE, "..", "assets", "recipe.png")), help="the PNG to write")
    args = p.parse_args(argv)
    try:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"error: --csv {args.csv}: {e.strerror}")
    if not rows:
        sys.exit(f"error: --csv {args.csv} has no rows")
    print(plot(rows, args.out))


if __name__ == "__main__":
    main()
