import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

from diffpolicy.checkpoint import load_training_state
from diffpolicy.config import ConfigError
from diffpolicy.evaluation import evaluate
from diffpolicy.policy import load_policy
from diffpolicy.tasks import make_task
from diffpolicy.training.trainer import EpochBatchSampler, ResumeMismatch, Trainer, TrainingDiverged


def make_cfg(store, *extra):
    return tiny_config(f"data.path={store}", "eval.n_episodes=2", "eval.n_envs=2", *extra)


def test_run_folder_holds_everything(tmp_path, traj_store):
    report = Trainer(make_cfg(traj_store), tmp_path / "run").fit()
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "train.log",
        "metrics.jsonl",
        "tb",
        "training_curves.png",
        "checkpoints/latest/model.safetensors",
        "checkpoints/latest/training_state.pt",
        "eval/report.json",
        "eval/report.md",
        "eval/rollouts.png",
    ):
        assert (run / name).exists(), name
    assert report["n_episodes"] == 2 and [e["seed"] for e in report["episodes"]] == [100_000, 100_001]
    assert report["success_rate"] == sum(e["success"] for e in report["episodes"]) / 2
    # issue 38 item 15: without periodic evaluations (train.eval_every=0) nothing is ranked: a top-k entry
    # would be chosen on the final evaluation's seeds, the episodes it is reported on
    assert not (run / "checkpoints" / "topk").exists()
    policy, cfg = load_policy(run / "checkpoints" / "latest")
    assert cfg.train.num_steps == 24 and not policy.training
    # the final report is the saved policy's: evaluating `latest` again gives the same episodes
    again = evaluate(policy, make_task(cfg.task.name, **cfg.task.kwargs), cfg.eval, tmp_path / "again")
    assert again["episodes"] == report["episodes"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in rows) and any("train/loss" in r for r in rows)


def test_periodic_evaluations_rank_checkpoints_on_validation_seeds(tmp_path, traj_store):
    """train.eval_every: evaluations on train.eval_seed's range (val/...) pick the top k, the last step's
    included; the final evaluation runs on eval.seed's range (eval/...) and picks nothing."""
    periodic_args = ("train.eval_every=8", "train.eval_episodes=2", "train.top_k=5")
    cfg = make_cfg(traj_store, "train.num_steps=12", *periodic_args)
    Trainer(cfg, tmp_path / "run").fit()
    run = tmp_path / "run"
    periodic = sorted(p.name for p in (run / "eval_during_training").iterdir())
    assert periodic == ["step0000008", "step0000012"]
    for name in periodic:
        report = json.loads((run / "eval_during_training" / name / "report.json").read_text())
        assert [e["seed"] for e in report["episodes"]] == [200_000, 200_001]
    final = json.loads((run / "eval" / "report.json").read_text())
    assert final["episodes"][0]["seed"] == 100_000 and final["n_episodes"] == 2
    topk = sorted(p.name[:12] for p in (run / "checkpoints" / "topk").iterdir())
    assert topk == ["step=0000008", "step=0000012"]  # two validation entries, not a third from the final
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/success_rate" in r] == [8, 12]
    assert [r["step"] for r in rows if "eval/success_rate" in r] == [12]


class Interrupted(Exception):
    pass


class KilledAfterCheckpoint(Trainer):
    """Dies right after writing the checkpoint at `kill_at`, as a killed process would."""

    kill_at = 16

    def save_latest(self, step):
        super().save_latest(step)
        if step == self.kill_at:
            raise Interrupted


def test_zero_eval_episodes_skip_the_final_evaluation(tmp_path, traj_store):
    """eval.n_episodes=0 ends training after the last checkpoint (evaluate separately later)."""
    from diffpolicy.evaluation import evaluate

    cfg = make_cfg(traj_store, "train.num_steps=4", "eval.n_episodes=0")
    report = Trainer(cfg, tmp_path / "run").fit()
    assert report == {"n_episodes": 0}
    assert (tmp_path / "run" / "checkpoints" / "latest").exists() and not (tmp_path / "run" / "eval").exists()
    with pytest.raises(ValueError, match="at least one episode"):
        evaluate(None, None, cfg.eval, tmp_path / "ev")  # type: ignore[arg-type]
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("net", ["unet", "transformer"])
def test_resume_continues_exactly(tmp_path, traj_store, net):
    cfg = make_cfg(traj_store, f"policy.net={net}")
    Trainer(cfg, tmp_path / "straight").fit()
    with pytest.raises(Interrupted):
        KilledAfterCheckpoint(cfg, tmp_path / "resumed").fit()
    killed = load_training_state(tmp_path / "resumed" / "checkpoints" / "latest")
    assert killed["step"] == 16 and killed["elapsed_s"] > 0
    Trainer(cfg, tmp_path / "resumed").fit()
    a = load_training_state(tmp_path / "straight" / "checkpoints" / "latest")
    b = load_training_state(tmp_path / "resumed" / "checkpoints" / "latest")
    assert a["step"] == b["step"] == 24
    # training time adds up over the two processes; every metrics row carries it
    assert b["elapsed_s"] > killed["elapsed_s"]
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    after = [r["elapsed_min"] for r in rows if r["step"] > 16]
    assert after and min(after) >= killed["elapsed_s"] / 60 - 1e-3 and after == sorted(after)
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()


def test_pause_at_a_step_or_a_time_budget_then_resume_exactly(tmp_path, traj_store):
    """train.stop_at_step / train.max_minutes pause the run (checkpoint, no final evaluation, not
    finished); the same command without them resumes and ends with the weights of an unpaused run."""
    cfg = make_cfg(traj_store)
    Trainer(cfg, tmp_path / "straight").fit()
    paused = Trainer(make_cfg(traj_store, "train.stop_at_step=10"), tmp_path / "paused").fit()
    assert paused == {"paused_at_step": 10}
    state = load_training_state(tmp_path / "paused" / "checkpoints" / "latest")
    assert state["step"] == 10 and not (tmp_path / "paused" / "eval").exists()
    assert "paused at step 10 of 24" in (tmp_path / "paused" / "train.log").read_text()
    # issue 38 item 15: the same command again does nothing (it advanced one step per rerun) and says so;
    # so does a time budget already spent
    latest = (tmp_path / "paused" / "checkpoints" / "latest" / "training_state.pt").read_bytes()
    for pause in ("train.stop_at_step=10", "train.max_minutes=1e-6"):
        again = Trainer(make_cfg(traj_store, pause), tmp_path / "paused").fit()
        assert again == {"paused_at_step": 10, "already_paused": True}, pause
        assert (tmp_path / "paused" / "checkpoints" / "latest" / "training_state.pt").read_bytes() == latest
    log = (tmp_path / "paused" / "train.log").read_text()
    assert "the run is already paused at step 10 of 24 (train.stop_at_step=10" in log
    assert "the run is already paused at step 10 of 24 (train.stop_at_step=0, train.max_minutes=1e-06" in log
    report = Trainer(cfg, tmp_path / "paused").fit()
    assert report["n_episodes"] == 2
    a = load_training_state(tmp_path / "straight" / "checkpoints" / "latest")
    b = load_training_state(tmp_path / "paused" / "checkpoints" / "latest")
    assert a["step"] == b["step"] == 24
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    with pytest.raises(ConfigError, match="train.max_minutes"):
        make_cfg(traj_store, "train.max_minutes=-1")


def test_killed_process_resumes_from_latest(tmp_path, traj_store):
    """A real SIGKILL mid-run, then the same command again: it continues from the last checkpoint."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "diffpolicy.cli",
        "train",
        "--preset",
        "trajectory2d_lowdim_unet",
        "--run-dir",
        str(run),
        f"data.path={traj_store}",
        "train.num_steps=400",
        "train.checkpoint_every=20",
        "train.val_every=0",
        "eval.n_episodes=2",
        "eval.n_envs=2",
        "eval.max_steps=20",
        "policy.unet.down_dims=[16,32]",
        "policy.unet.n_groups=4",
        "train.batch_size=16",
        "policy.scheduler.num_inference_steps=4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run / "checkpoints" / "latest" / "training_state.pt"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), (
        proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in time"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_training_state(run / "checkpoints" / "latest")["step"]
    assert 20 <= step < 400
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run / 'checkpoints' / 'latest'} at step" in (run / "train.log").read_text()
    assert load_training_state(run / "checkpoints" / "latest")["step"] == 400


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, traj_store, monkeypatch):
    from diffpolicy.policy import DiffusionPolicy

    calls = {"n": 0}
    original = DiffusionPolicy.compute_loss

    def flaky(self, batch, **kwargs):
        calls["n"] += self.training  # validation calls (eval mode) do not count
        loss = original(self, batch, **kwargs)
        return loss * float("nan") if self.training and calls["n"] == 13 else loss

    monkeypatch.setattr(DiffusionPolicy, "compute_loss", flaky)
    expected = "loss became nan at step 12; training stopped before the update.*checkpoints/latest"
    with pytest.raises(TrainingDiverged, match=expected):
        Trainer(make_cfg(traj_store), tmp_path / "run").fit()
    state = load_training_state(tmp_path / "run" / "checkpoints" / "latest")
    assert state["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_refuses_a_different_config(tmp_path, traj_store):
    with pytest.raises(Interrupted):
        KilledAfterCheckpoint(make_cfg(traj_store), tmp_path / "run").fit()
    with pytest.raises(ResumeMismatch, match="policy.horizon: 16 -> 24"):
        Trainer(make_cfg(traj_store, "policy.horizon=24"), tmp_path / "run").fit()


def test_resume_reads_keys_added_since_the_run_began_as_defaults(tmp_path, traj_store):
    """A run saved before a config field existed resumes (the field at its default, as from_pretrained
    reads the checkpoint); a non-default value for it is still a different config."""
    import yaml

    with pytest.raises(Interrupted):
        KilledAfterCheckpoint(make_cfg(traj_store), tmp_path / "run").fit()
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["policy"]["scheduler"]["timestep_spacing"]  # as in a config written before the field existed
    # issue 38 changed data.flatten_obs's default; it shapes Minari imports only, so a run on other data that
    # began before the change resumes (its checkpoint holds the old default)
    ckpt_config = tmp_path / "run" / "checkpoints" / "latest" / "config.yaml"
    meta = yaml.safe_load(ckpt_config.read_text())
    meta["run"]["data"]["flatten_obs"] = ["observation", "desired_goal"]
    ckpt_config.write_text(yaml.safe_dump(meta))
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(ResumeMismatch, match="policy.scheduler.timestep_spacing: 'leading' -> 'trailing'"):
        Trainer(make_cfg(traj_store, "policy.scheduler.timestep_spacing=trailing"), tmp_path / "run").fit()
    Trainer(make_cfg(traj_store), tmp_path / "run").fit()
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    path.write_text(yaml.safe_dump({**saved, "no_such_key": 1}))
    with pytest.raises(ResumeMismatch, match="no longer loads as a run config"):
        Trainer(make_cfg(traj_store), tmp_path / "run").fit()


def test_epoch_sampler_is_a_pure_function_of_the_step():
    full = EpochBatchSampler(n=50, batch_size=8, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(20)]
    resumed = iter(EpochBatchSampler(n=50, batch_size=8, seed=3, start_step=13))
    assert [next(resumed) for _ in range(7)] == batches[13:]
    epoch0 = sum(batches[:6], [])
    assert len(set(epoch0)) == 48  # no repeats inside an epoch
    ranks = [iter(EpochBatchSampler(n=50, batch_size=4, seed=3, rank=r, world_size=2)) for r in range(2)]
    first = [next(r) for r in ranks]
    assert first[0] + first[1] == batches[0]  # ranks split the global batch
    tiny = iter(EpochBatchSampler(n=3, batch_size=8, seed=0))
    assert sorted(set(next(tiny))) == [0, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        EpochBatchSampler(n=0, batch_size=8, seed=0)
