"""Average the weights of several policies of one architecture ("uniform model soup", Wortsman et al. 2022).

    python bench/experiments/soup.py --out runs/cd_soup \\
        runs/cd_20k/checkpoints/latest runs/cd_30k/checkpoints/latest ...
    diffpolicy eval --checkpoint runs/cd_soup --episodes 200 eval.num_inference_steps=1

Soups help fine-tunes of one pretrained network that stay in its loss basin; consistency students
distilled from one teacher are such fine-tunes. Every checkpoint must be the same policy class with the
same parameter names and shapes, and the same normalizer statistics (averaging those would silently
change what the network sees); the first checkpoint's config goes with the soup.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffpolicy.checkpoint import save_checkpoint
from diffpolicy.policy import load_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        raise SystemExit("a soup needs at least two checkpoints")
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists; choose another --out (nothing is overwritten)")
    first, cfg = load_policy(args.checkpoints[0])
    base = first.state_dict()
    total = {k: v.double().clone() for k, v in base.items()}
    for path in args.checkpoints[1:]:
        policy, _ = load_policy(path)
        if type(policy) is not type(first):
            raise SystemExit(f"{path} is a {type(policy).__name__}, the first a {type(first).__name__}")
        state = policy.state_dict()
        if state.keys() != base.keys() or any(state[k].shape != base[k].shape for k in base):
            raise SystemExit(f"{path} has other parameters than {args.checkpoints[0]}")
        differs = policy.normalizer.first_difference(first.normalizer)
        if differs:
            raise SystemExit(f"{path} has other normalizer statistics (normalizer.{differs})")
        for k, v in state.items():
            total[k] += v.double()
    n = len(args.checkpoints)
    first.load_state_dict({k: (v / n).to(base[k].dtype) for k, v in total.items()})
    save_checkpoint(args.out, first, cfg, metrics={"soup_members": n})
    print(f"soup of {n} checkpoints -> {args.out}")


if __name__ == "__main__":
    main()
