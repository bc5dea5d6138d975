"""How well cheaper scoring predicts a fully scored sensitivity table (issue 16), offline.

Reads heal.py JSON records whose sensitivity run scored every candidate (`scored=all`): each keeps
the measured Δ table (`sensitivity`) and every probe's output error (`search.output_errors`). For
each scored subset S it hides the Δ of the candidates outside S, fills them as the allocator does
(`ressvd.allocation.sensitivity.extrapolate`: a power law in the output error through the nearest
scored pair, exponent 1 from one scored candidate) and reports
- Spearman's rank correlation and the median ratio of the extrapolated Δ to the measured ones;
- the allocation regret: the knapsack's choice on the extrapolated table, costed on the measured
  table (Σ Δ interpolated), minus the optimum on the measured table. 0 means the cheaper scoring
  chooses as well as full scoring by the allocator's own additive objective.

    python benchmarks/sensitivity_extrapolation.py runs/s12-smollm2.json --scored 0.8 0.4,0.8 0.3,0.6,0.9
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ressvd.allocation.sensitivity import choose_ratios, extrapolate, interpolate, ratio_key


def cost(table: dict, chosen: dict) -> float:
    return sum(interpolate(table[u], r) for u, r in chosen.items())


def evaluate(table: dict, errors: dict, ratio: float, scored: list[float]) -> dict:
    keys = {ratio_key(c) for c in scored}
    filled = {u: extrapolate({k: (v if k in keys else math.nan) for k, v in row.items()}, errors[u])
              for u, row in table.items()}
    measured = [table[u][k] for u in table for k in table[u] if k not in keys]
    predicted = [filled[u][k] for u in table for k in table[u] if k not in keys]
    sizes = {u: 1 for u in table}  # decoder layers of one model have equal sizes
    best = cost(table, choose_ratios(table, sizes, ratio))
    chosen = choose_ratios(filled, sizes, ratio)
    ratios = np.array(predicted) / np.array(measured)
    return {"spearman": float(spearmanr(measured, predicted).correlation),
            "median_ratio": float(np.median(ratios[np.isfinite(ratios)])),
            "regret": cost(table, chosen) - best, "optimum": best,
            "layers": sum(1 for r in chosen.values() if r > 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="heal.py JSON files")
    parser.add_argument("--scored", nargs="+", default=["0.8", "0.4,0.8", "0.3,0.8", "0.5,0.9", "0.4,0.9",
                                                       "0.3,0.6,0.9", "0.2,0.5,0.8"],
                        help="scored subsets, each a comma-separated list of candidates")
    args = parser.parse_args()
    print("| record | ratio | scored | suffix passes per layer | Spearman | median extrapolated / measured | "
          "regret (Σ Δ) | layers compressed |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.json:
        for rec in json.loads(Path(path).read_text()):
            table, search = rec.get("sensitivity"), rec.get("search") or {}
            if not table or "output_errors" not in search:
                continue
            candidates = sorted(float(k) for k in next(iter(table.values())))
            if search.get("scored") != candidates:
                continue  # only fully scored runs can be checked
            full = choose_ratios(table, {u: 1 for u in table}, rec["ratio"])
            print(f"| {rec['model']} {rec['start']} | {rec['ratio']} | all | {len(candidates)} | – | – | 0 "
                  f"(Σ Δ {cost(table, full):.4f}) | {sum(1 for r in full.values() if r > 0)} |")
            for text in args.scored:
                scored = [float(c) for c in text.split(",")]
                if not set(scored) <= set(candidates):
                    continue
                r = evaluate(table, search["output_errors"], rec["ratio"], scored)
                print(f"| | | {text} | {len(scored)} | {r['spearman']:.3f} | {r['median_ratio']:.2f} | "
                      f"{r['regret']:+.4f} | {r['layers']} |")


if __name__ == "__main__":
    main()
