"""Seed-paired differences between recipes of comparisons (launch/compare.py results.csv files).

  python perf/compare/paired.py perf/compare/digits-default.csv perf/compare/digits-ablation.csv \
      irepa-repa irepa-none repa-none mlp-sn-repa

Every recipe of a comparison runs with the same train.seed values and is scored with the
same noise batch; the difference of two recipes seed by seed shows whether a gap has the
same sign for every seed. Prints, per pair A-B and eval
step, the mean and sample sd over seeds of value(A) - value(B) and the per-seed values.
"""
from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict


def load(paths: list[str]) -> dict[tuple[str, int], dict[int, float]]:
    out: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for p in paths:
        for row in csv.DictReader(open(p)):
            out[(row["recipe"], int(row["step"]))][int(row["seed"])] = float(row["value"])
    return out


def main(args: list[str]) -> None:
    files = [a for a in args if a.endswith(".csv")]
    pairs = [a for a in args if not a.endswith(".csv")]
    vals = load(files)
    recipes = {r for r, _ in vals}
    steps = sorted({s for _, s in vals})
    for pair in pairs:
        a, b = next((pair[:i], pair[i + 1:]) for i in range(len(pair)) if pair[i] == "-"
                    and pair[:i] in recipes and pair[i + 1:] in recipes)
        cells = []
        for s in steps:
            seeds = sorted(set(vals.get((a, s), {})) & set(vals.get((b, s), {})))
            d = [vals[(a, s)][k] - vals[(b, s)][k] for k in seeds]
            if len(d) > 1:
                cells.append(f"{s}: {statistics.mean(d):+.0f} ± {statistics.stdev(d):.0f} "
                             f"({', '.join(f'{x:+.0f}' for x in d)})")
        print(f"{a} - {b}: " + "; ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
