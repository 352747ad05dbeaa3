"""How closely do consistency students' 1-step chunks follow their teacher's DDIM chunks from the same noise?

    python bench/experiments/consistency_fit.py --teacher runs/pusht_state_v/checkpoints/latest \\
        --students runs/pusht_state_v_cd/checkpoints/latest runs/cd_full/checkpoints/latest

Offline and fast (about a minute on one CPU thread): no rollouts. On `--windows` training windows of the
teacher's dataset, each policy samples one chunk from the same initial noise (every sampler's first draw
from a generator seeded alike). Prints mean squared differences in normalized action units ([-1, 1]):
each student against the teacher's DDIM-N with leading and trailing spacing (the student's grid is the
trailing one), against the demonstrated chunk, and, as scales, the teacher's two spacings against each
other and two teacher samples from different noise; each student's two samples from different noise
measure its spread (diversity) against the teacher's, and the roughness column (mean squared second
difference along the chunk) its jitter. Closed-loop success is what counts (diffpolicy eval);
this says whether a student's shortfall is distance from the teacher's map or the map itself.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import default_collate

from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.distill import load_teacher
from diffpolicy.policy import load_policy
from diffpolicy.tasks import make_task
from diffpolicy.training.trainer import make_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--students", nargs="+", required=True)
    ap.add_argument("--windows", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="the teacher's DDIM steps (the students' grid)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    teacher, cfg = load_teacher(args.teacher)
    store = EpisodeStore.open(cfg.data.path)
    shape_meta = make_task(cfg.task.name, **cfg.task.kwargs).shape_meta()
    windows = make_dataset(cfg, store, shape_meta)
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))[: args.windows]
    batch = default_collate([windows[i] for i in pick.tolist()])
    norm = teacher.normalizer

    def chunk(policy, sampler: str, steps: int, noise_seed: int, spacing: str | None = None) -> torch.Tensor:
        policy.set_sampler(sampler, steps, spacing)
        out = policy.predict_action(batch["obs"], generator=torch.Generator().manual_seed(noise_seed))
        return norm.normalize("action", out["action_pred"])

    def mse(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{((a - b) ** 2).mean().item():.5f}"

    def rough(a: torch.Tensor) -> str:  # mean squared second difference along the chunk: jitter
        return f"{((a[:, 2:] - 2 * a[:, 1:-1] + a[:, :-2]) ** 2).mean().item():.5f}"

    leading = chunk(teacher, "ddim", args.steps, 1, "leading")
    trailing = chunk(teacher, "ddim", args.steps, 1, "trailing")
    other = chunk(teacher, "ddim", args.steps, 2, "leading")
    data = norm.normalize("action", batch["action"])
    ddpm = [chunk(teacher, "ddpm", 100, seed) for seed in (1, 2)]  # the stochastic sampler's own spread
    print(f"{len(pick)} windows, normalized action units, mean squared difference")
    print(
        f"teacher DDIM-{args.steps}: leading vs trailing {mse(leading, trailing)}, leading vs another noise "
        f"{mse(leading, other)}, leading vs data {mse(leading, data)}; DDPM-100 vs another noise "
        f"{mse(*ddpm)}; roughness: DDIM-{args.steps} {rough(leading)}, DDPM-100 {rough(ddpm[0])}, "
        f"data {rough(data)}"
    )
    print(
        "| student | vs leading | vs trailing | vs data | vs another noise (spread) | roughness |\n"
        "|---|---|---|---|---|---|"
    )
    for path in args.students:
        student, _ = load_policy(path)
        student.eval()
        one = chunk(student, "consistency", 1, 1)
        spread = mse(one, chunk(student, "consistency", 1, 2))
        cells = [mse(one, leading), mse(one, trailing), mse(one, data), spread, rough(one)]
        print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
