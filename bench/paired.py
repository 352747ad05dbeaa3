"""Paired comparison of two evaluations on the same seeds: which episodes only one of them wins.

    python bench/paired.py runs/eval200_cd5k/report.json runs/eval200_sub5_1/report.json

Two policies evaluated on the same seeds (`diffpolicy eval --episodes N`, same eval.seed) share every
start state, so the fair test of "A succeeds more often than B" looks only at the discordant episodes
(A wins, B loses, or the reverse): an exact two-sided sign test (McNemar's exact test) on those. With 200
episodes and success rates near 0.7 the unpaired 95% intervals are +-0.065 wide, while a paired test
often separates two policies 0.05 apart. Prints success rates, their ratio A / B, the two discordant
counts and p, and a 95% interval of B / A (B's success as a fraction of A's, e.g. a student's of its
teacher's) from a paired bootstrap over the seeds: evaluation noise only, not training noise.

Either side may be several reports joined by commas (evaluations of one policy on disjoint seed ranges,
e.g. `--episodes 200` at eval.seed=100000 and at eval.seed=100200): they are pooled into one.

    python bench/paired.py A_100000/report.json,A_100200/report.json B_100000/report.json,B_100200/report.json
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

import numpy as np


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial (p = 1/2) test on discordant pairs; 1.0 when there are none."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ratio(a: list[bool], b: list[bool], n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of sum(b) / sum(a), resampling seeds (both evaluations' outcomes together)."""
    pairs = np.array([a, b], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, pairs.shape[1], size=(n, pairs.shape[1]))
    wins_a, wins_b = pairs[0][idx].sum(axis=1), pairs[1][idx].sum(axis=1)
    ratios = wins_b[wins_a > 0] / wins_a[wins_a > 0]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def load(paths: str) -> dict[int, bool]:
    """Per-seed success of one or more comma-separated report.json files (disjoint seeds, pooled)."""
    pooled: dict[int, bool] = {}
    for path in map(Path, paths.split(",")):
        report = json.loads(path.read_text())
        if "episodes" not in report:
            raise SystemExit(f"{path}: no per-episode results (`diffpolicy eval` writes them)")
        episodes = {e["seed"]: bool(e["success"]) for e in report["episodes"]}
        if overlap := pooled.keys() & episodes.keys():
            first = sorted(overlap)[:3]
            raise SystemExit(f"{path}: seeds {first}... already in an earlier report: pool disjoint ranges")
        pooled.update(episodes)
    return pooled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="report.json of the first evaluation (or several, comma-separated)")
    ap.add_argument("b", help="report.json of the second evaluation (or several, comma-separated)")
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
    if a.keys() != b.keys():
        raise SystemExit(
            f"the two evaluations ran different seeds ({len(a)} vs {len(b)}, "
            f"{len(a.keys() & b.keys())} shared): a paired test needs the same ones"
        )
    only_a = sum(a[s] and not b[s] for s in a)
    only_b = sum(b[s] and not a[s] for s in a)
    n = len(a)
    print(f"A {args.a}: success {sum(a.values()) / n:.3f}")
    print(f"B {args.b}: success {sum(b.values()) / n:.3f}")
    if sum(b.values()):
        print(f"A / B = {sum(a.values()) / sum(b.values()):.3f}")
    p = sign_test(only_a, only_b)
    print(f"{n} episodes; only A succeeds: {only_a}, only B: {only_b}; sign test p = {p:.3g}")
    if sum(a.values()):
        seeds = sorted(a)
        lo, hi = bootstrap_ratio([a[s] for s in seeds], [b[s] for s in seeds])
        ratio = sum(b.values()) / sum(a.values())
        print(f"B / A = {ratio:.3f} (95% paired bootstrap over seeds: {lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()
