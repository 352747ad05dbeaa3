"""SIGKILL a training run at random moments, resume it each time, and compare with an uninterrupted run.

    python bench/kill_resume.py --kills 20 [--seed 0] [--out DIR]

One uninterrupted `diffpolicy train` (tiny trajectory2d U-Net, 1200 steps, a checkpoint every 40) is the
reference. The same command is then started, killed with SIGKILL and started again `--kills` times: most
kills come at a random moment (uniform over the next few seconds, so they land in start-up, training steps
and checkpoint saves), every fourth inside a checkpoint swap (the child kills itself at a random rename of
the save). After each kill the script records the step the kill interrupted (the last logged step,
train.log_every=1) and the step the run resumes from; after the last kill the run completes. It prints one
line per trial and whether the final weights (raw and EMA) equal the reference bit for bit; exit 1 if any
resume lost more than one checkpoint interval, restarted from 0 over a checkpoint, or ended different.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

STEPS, EVERY = 1200, 40
TRAIN_ARGS = [
    "--preset",
    "trajectory2d_lowdim_unet",
    "policy.unet.down_dims=[16,32]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=16",
    "train.batch_size=32",
    f"train.num_steps={STEPS}",
    "train.warmup_steps=4",
    "train.log_every=1",
    "train.val_every=0",
    f"train.checkpoint_every={EVERY}",
    "eval.n_episodes=0",
]
# The child of a swap trial: SIGKILL itself at rename number KILL_AT_RENAME of a checkpoint save.
SWAP_KILLER = """
import os, signal, sys
import diffpolicy.checkpoint as c
real, n, at = os.replace, [0], int(os.environ["KILL_AT_RENAME"])
def replace(src, dst):
    n[0] += 1
    if n[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
c.os.replace = replace
from diffpolicy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def command(run: Path, data: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffpolicy.cli",
        "train",
        "--run-dir",
        str(run),
        f"data.path={data}",
        *TRAIN_ARGS,
    ]


def checkpoint_step(run: Path) -> int:
    """The step of the checkpoint a resume would start from, read without changing the folder."""
    ckpt = run / "checkpoints"
    for name in (".latest.new", "latest", "previous"):  # the order in which start-up recovery trusts them
        meta = ckpt / name / "config.yaml"
        if meta.exists():
            import yaml

            return int(yaml.safe_load(meta.read_text())["step"])
    return 0


def last_logged_step(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip().endswith("}")]
    return max((r["step"] for r in rows), default=0)


def resumed_from(run: Path, seen: int) -> tuple[int | None, int]:
    """The step named by the newest 'resumed from' line after the first `seen` lines of train.log."""
    lines = (run / "train.log").read_text().splitlines() if (run / "train.log").exists() else []
    found = [line for line in lines[seen:] if "resumed from" in line]
    return (int(found[-1].rsplit(" ", 1)[1]) if found else None), len(lines)


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / "latest"
    state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    ema = load_file(str(ckpt / "model.safetensors"))
    return {**{f"raw.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out or tempfile.mkdtemp(prefix="kill_resume-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if (root / "reference").exists() or (root / "killed").exists():
        parser.error(f"{root} holds runs of an earlier trial (they would be resumed): use an empty --out")
    data = root / "demos.zarr"
    if not data.exists():
        subprocess.run(
            [sys.executable, "-m", "diffpolicy.cli", "collect", "--task", "trajectory2d", "--episodes", "12"]
            + ["--out", str(data)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    t0 = time.perf_counter()
    subprocess.run(command(root / "reference", data), env=env, check=True, stdout=subprocess.DEVNULL)
    duration = time.perf_counter() - t0
    print(f"reference: {STEPS} steps, checkpoint every {EVERY}, {duration:.1f} s uninterrupted")

    run, ok, log_lines = root / "killed", True, 0
    for trial in range(1, args.kills + 1):
        swap = trial % 4 == 0
        if swap:  # a save's renames: .new in place, latest -> previous, previous -> trash, .new -> latest
            rename = rng.randint(1, 12)
            proc = subprocess.Popen(
                [sys.executable, "-c", SWAP_KILLER, *command(run, data)[3:]],
                env={**env, "KILL_AT_RENAME": str(rename)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
            how = f"inside a save, at rename {rename}"
        else:
            delay = rng.uniform(0.5, 9.0)  # start-up takes a few seconds: some kills land there
            proc = subprocess.Popen(
                command(run, data), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            how = f"at {delay:.2f} s"
        finished = proc.returncode == 0
        interrupted, saved = last_logged_step(run), checkpoint_step(run)
        start, log_lines = resumed_from(run, log_lines)
        lost = max(0, interrupted - saved)
        bad = lost > EVERY
        ok &= not bad
        print(
            f"trial {trial:2d}: kill {how:28s} "
            + (
                "no resume logged (fresh start or killed in start-up); "
                if start is None
                else f"resumed at step {start:4d}; "
            )
            + f"killed at step {interrupted:3d}, checkpoint at {saved:3d} -> {lost:2d} steps to redo"
            + (" (the run had already finished)" if finished else "")
            + ("  LOST MORE THAN ONE INTERVAL" if bad else "")
        )
        if finished:
            break
    done = subprocess.run(command(run, data), env=env, capture_output=True, text=True)
    if done.returncode != 0 and "holds a finished run" not in done.stderr:
        print(done.stderr)
        return 1
    start, _ = resumed_from(run, log_lines)
    a, b = weights(root / "reference"), weights(run)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diff = (
        max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        if a.keys() == b.keys()
        else float("inf")
    )
    print(f"final attempt resumed from step {start}; the run ended at step {checkpoint_step(run)}")
    print(f"final weights identical to the uninterrupted run: {same} (max |difference| {diff:.3g})")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    print(f"hidden leftovers in checkpoints/: {leftovers or 'none'}")
    return 0 if ok and same and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
