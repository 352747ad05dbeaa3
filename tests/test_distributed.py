"""torchrun with 2 CPU processes (gloo) trains exactly like one process with the same global batch."""

import os
import subprocess
import sys

import torch

from diffpolicy.checkpoint import load_training_state

ARGS = [
    "--preset",
    "trajectory2d_lowdim_unet",
    "train.num_steps=6",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.val_every=3",
    "train.checkpoint_every=3",
    "policy.unet.down_dims=[16,32]",
    "policy.unet.n_groups=4",
    "policy.unet.diffusion_step_embed_dim=16",
    "policy.scheduler.num_inference_steps=4",
    "eval.n_episodes=2",
    "eval.n_envs=2",
    "eval.max_steps=20",
]


def launch_cmd(nproc):
    launch = [sys.executable, "-m", "diffpolicy.cli"]
    if nproc > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "diffpolicy.cli",
        ]
    return launch


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def train(run_dir, store, nproc, *extra):
    run(launch_cmd(nproc) + ["train", "--run-dir", str(run_dir), f"data.path={store}", *ARGS, *extra])
    return load_training_state(run_dir / "checkpoints" / "latest")


def test_two_processes_match_one(tmp_path, traj_store):
    one = train(tmp_path / "one", traj_store, 1)
    two = train(tmp_path / "two", traj_store, 2)
    assert one["step"] == two["step"] == 6
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], atol=1e-5, rtol=1e-4), key
    # rank 0 alone wrote the run folder's log and report
    assert (tmp_path / "two" / "eval" / "report.json").exists()
    assert (tmp_path / "two" / "train.log").read_text().count("policy diffusion/unet") == 1


def test_dmd_distillation_runs_under_torchrun(tmp_path, traj_store):
    """distill.objective=dmd trains a fake score network inside the student's loss; under DDP it has its own
    wrapper (the student's would otherwise wait for its gradients), so 2 processes must run it through."""
    train(tmp_path / "teacher", traj_store, 1, "policy.scheduler.prediction_type=v_prediction")
    teacher = tmp_path / "teacher" / "checkpoints" / "latest"
    args = ["distill.objective=dmd", "distill.num_steps=4", "train.log_every=1", "eval.n_episodes=0"]
    run(launch_cmd(2) + ["distill", "--teacher", str(teacher), "--run-dir", str(tmp_path / "dmd"), *args])
    state = load_training_state(tmp_path / "dmd" / "checkpoints" / "latest")
    assert state["step"] == 4 and "fake" in state
    assert all(torch.isfinite(v).all() for v in state["fake"]["model"].values())
