"""On-policy (DAgger-style) consistency distillation, as an experiment: does the 1-step student fall short
on the states its own rollouts visit, and does distilling on those states help?

    # 1. roll out a 1-step student on training-range seeds, record the observation windows it acts on,
    #    label each with the teacher's own sampler (DDPM-100 for the Push-T teacher)
    python bench/experiments/onpolicy.py collect --teacher runs/pusht_state_v/checkpoints/latest \\
        --student runs/cd_20k/checkpoints/latest --episodes 400 --seed 1000 --out runs/dagger/onpolicy_400.pt
    # 2. fine-tune the student on demonstration windows + those labelled windows (distill.* overrides as
    #    for `diffpolicy distill`); `--extra none` is the control: the same fine-tuning, demonstrations only
    python bench/experiments/onpolicy.py distill --teacher runs/pusht_state_v/checkpoints/latest \\
        --run-dir runs/cd_20k_ft_dagger --extra runs/dagger/onpolicy_400.pt \\
        distill.init_student=runs/cd_20k/checkpoints/latest distill.lr=1e-4 distill.num_steps=4000 \\
        train.batch_size=64 eval.n_episodes=0
    # 3. how far the student is from the teacher's ODE on training windows vs its own rollouts' states
    python bench/experiments/onpolicy.py fit --teacher runs/pusht_state_v/checkpoints/latest \\
        --student runs/cd_20k/checkpoints/latest --episodes 60 --seed 200000

The windows are recorded where the policy is called (every n_action_steps), for every environment of a
vectorized batch, including environments whose episode already ended (gymnasium resets those, so their
windows are still states under the student's control, from fresh start states). Seeds must stay below
the evaluation seeds (100000 onwards), as collection seeds do. Not part of the package: it lives here
until it earns a place in `diffpolicy distill` (docs/research, issue 4).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from diffpolicy.config import EvalConfig
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.distill import DistillTrainer, distill_config, load_teacher
from diffpolicy.evaluation import run_rollouts
from diffpolicy.policy import load_policy
from diffpolicy.tasks import make_task
from diffpolicy.tasks.base import Task
from diffpolicy.training.trainer import make_dataset


def student_windows(
    student: torch.nn.Module, task: Task, episodes: int, seed: int
) -> dict[str, torch.Tensor]:
    """Observation windows a 1-step student acts on in its own closed-loop rollouts."""
    student.eval()
    student.set_sampler("consistency", 1)
    recorded: list[dict[str, torch.Tensor]] = []
    predict = student.predict_action

    def recording(obs: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        recorded.append({k: v.clone() for k, v in obs.items()})
        return predict(obs, generator=generator)

    student.predict_action = recording
    t0 = time.perf_counter()
    try:
        rollouts = run_rollouts(student, task, EvalConfig(n_envs=10), episodes, seed)
    finally:
        del student.predict_action  # the class's method again
    success = sum(r.success for r in rollouts) / len(rollouts)
    print(f"{episodes} rollouts in {time.perf_counter() - t0:.0f} s, success {success:.3f}", flush=True)
    return {k: torch.cat([r[k] for r in recorded]) for k in recorded[0]}


def collect(args: argparse.Namespace) -> None:
    teacher, cfg = load_teacher(args.teacher)
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    obs = student_windows(load_policy(args.student)[0], task, args.episodes, args.seed)
    n = next(iter(obs.values())).shape[0]
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, n, 1024):
        batch = {k: v[i : i + 1024] for k, v in obs.items()}
        chunks.append(teacher.predict_action(batch, generator=generator)["action_pred"])
    print(f"{n} windows labelled by the teacher in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.save({"obs": obs, "action": torch.cat(chunks)}, args.out)


class Labelled(Dataset):
    """Teacher-labelled windows as training samples (every action real: no padding)."""

    def __init__(self, path: str) -> None:
        data = torch.load(path)
        self.obs, self.action = data["obs"], data["action"].float()

    def __len__(self) -> int:
        return self.action.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {
            "obs": {k: v[i] for k, v in self.obs.items()},
            "action": self.action[i],
            "action_is_pad": torch.zeros(self.action.shape[1], dtype=torch.bool),
        }


class OnPolicyDistillTrainer(DistillTrainer):
    """DistillTrainer whose training windows are the demonstrations' plus the labelled ones."""

    extra: str | None = None

    def _build_data(self) -> None:
        super()._build_data()
        if self.extra:
            extra = Labelled(self.extra)
            print(f"{len(self.train_set)} demonstration windows + {len(extra)} on-policy windows", flush=True)
            self.train_set = ConcatDataset([self.train_set, extra])


def distill(args: argparse.Namespace) -> None:
    cfg = distill_config(args.teacher, args.overrides)
    OnPolicyDistillTrainer.extra = None if args.extra == "none" else args.extra
    OnPolicyDistillTrainer(cfg, Path(args.run_dir), resume=True).fit()


def fit(args: argparse.Namespace) -> None:
    teacher, cfg = load_teacher(args.teacher)
    student, _ = load_policy(args.student)
    task = make_task(cfg.task.name, **cfg.task.kwargs)
    rollout_obs = student_windows(student, task, args.episodes, args.seed)
    n = next(iter(rollout_obs.values())).shape[0]
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: args.windows]
    rollout_obs = {k: v[pick] for k, v in rollout_obs.items()}
    windows = make_dataset(cfg, EpisodeStore.open(cfg.data.path), task.shape_meta())
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[: args.windows]
    train_obs = default_collate([windows[i] for i in pick.tolist()])["obs"]
    norm = teacher.normalizer

    def chunk(policy, sampler: str, steps: int, obs, seed: int, spacing: str | None = None) -> torch.Tensor:
        policy.set_sampler(sampler, steps, spacing)
        out = policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))
        return norm.normalize("action", out["action_pred"])

    def mse(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{((a - b) ** 2).mean().item():.5f}"

    print("| windows | student vs DDIM-10 trailing | vs DDIM-100 | DDIM-10 vs DDIM-100 | teacher spread |")
    print("|---|---|---|---|---|")
    for name, obs in (("training", train_obs), ("student's rollouts", rollout_obs)):
        t10 = chunk(teacher, "ddim", 10, obs, 1, "trailing")
        t100 = chunk(teacher, "ddim", 100, obs, 1)
        one = chunk(student, "consistency", 1, obs, 1)
        spread = mse(t100, chunk(teacher, "ddim", 100, obs, 2))
        print(f"| {name} | {mse(one, t10)} | {mse(one, t100)} | {mse(t10, t100)} | {spread} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--teacher", required=True)
    c.add_argument("--student", required=True)
    c.add_argument("--episodes", type=int, default=400)
    c.add_argument("--seed", type=int, default=1000)
    c.add_argument("--out", required=True)
    d = sub.add_parser("distill")
    d.add_argument("--teacher", required=True)
    d.add_argument("--run-dir", required=True)
    d.add_argument("--extra", required=True, help="labelled windows from `collect`, or none (the control)")
    d.add_argument("overrides", nargs="*")
    f = sub.add_parser("fit")
    f.add_argument("--teacher", required=True)
    f.add_argument("--student", required=True)
    f.add_argument("--episodes", type=int, default=60)
    f.add_argument("--seed", type=int, default=200000)
    f.add_argument("--windows", type=int, default=1024)
    args = ap.parse_args()
    if args.cmd == "collect" and args.seed + args.episodes > 100_000:
        raise SystemExit("collect seeds must stay below the evaluation seeds (100000 onwards)")
    if args.cmd == "distill":
        distill(args)
        return
    with torch.inference_mode():
        (collect if args.cmd == "collect" else fit)(args)


if __name__ == "__main__":
    main()
