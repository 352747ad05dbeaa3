"""Fault injection (issue 33): crashes inside the checkpoint swap, kills at random steps, two writers, a full
disk, read-only folders, bad configs and bad inputs. Each case asserts the message the user sees and that
nothing the user had was lost. The 20-kill acceptance run is bench/kill_resume.py (and the slow test here).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

import diffpolicy.checkpoint as checkpoint_module
import diffpolicy.training.trainer as trainer_module
from diffpolicy.checkpoint import CheckpointError, load_training_state, save_checkpoint
from diffpolicy.cli import main
from diffpolicy.control import RecedingHorizonController
from diffpolicy.data.normalize import Normalizer
from diffpolicy.files import RunFolderBusy, RunLock
from diffpolicy.policy import ObservationMismatch, make_policy
from diffpolicy.training.trainer import ResumeMismatch, RunExists, Trainer

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    """Stands for a process dying at the point where it is raised."""


def make_cfg(store, *extra):
    return tiny_config(f"data.path={store}", "eval.n_episodes=0", "train.val_every=0", *extra)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): what 'nothing was lost' is checked against."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def hidden_leftovers(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("."))


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_training_state(a)["model"], load_training_state(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, traj_store) -> Path:
    """An uninterrupted 24-step run: what every interrupted run must end up identical to."""
    run = tmp_path_factory.mktemp("ref") / "run"
    Trainer(make_cfg(traj_store), run).fit()
    return run / "checkpoints" / "latest"


# ----- kills inside the checkpoint swap -----------------------------------------------------------------


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_crash_at_any_rename_of_the_swap_is_recovered(
    tmp_path, traj_store, reference, monkeypatch, crash_at
):
    """The step-16 save (which replaces latest and previous) dies before its 1st, 2nd or 3rd rename:
    the next run resumes from a complete checkpoint (16 or 8, never 0) and ends identical."""
    real_replace = os.replace
    calls = {"n": 0, "armed": False}

    def replace(src, dst):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash(f"killed before renaming {src} -> {dst}")
        return real_replace(src, dst)

    class CrashingSave(Trainer):
        def save_latest(self, step):
            calls["armed"] = step == 16
            super().save_latest(step)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        CrashingSave(make_cfg(traj_store), run).fit()
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    if crash_at > 1:  # before the first rename the exception itself removes the temporary
        assert hidden_leftovers(run / "checkpoints")  # the crash left the swap half done
    Trainer(make_cfg(traj_store), run).fit()
    log = (run / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed and not resumed[-1].endswith("at step 0")
    assert hidden_leftovers(run / "checkpoints") == []
    assert same_weights(run / "checkpoints" / "latest", reference)


def test_sigkill_inside_the_swap_then_resume(tmp_path, traj_store, reference):
    """A real SIGKILL at the instant `latest` has been moved to `previous` and the new copy is not yet in
    place: no `latest` on disk; the next run puts the complete new copy back and continues from it."""
    run = tmp_path / "run"
    script = textwrap.dedent(
        """
        import os, signal, sys
        import diffpolicy.checkpoint as c
        real = os.replace
        def replace(src, dst):
            meta = os.path.join(src, "config.yaml")
            if str(src).endswith(".latest.new") and "step: 16" in open(meta).read():
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        c.os.replace = replace
        from diffpolicy.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    args = ["train", "--preset", "trajectory2d_lowdim_unet", "--run-dir", str(run)]
    args += [f"data.path={traj_store}", "eval.n_episodes=0", "train.val_every=0"]
    args += [a for a in __import__("conftest").TINY if not a.startswith("eval.n_episodes")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=240)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpt = run / "checkpoints"
    assert not (ckpt / "latest").exists() and (ckpt / ".latest.new").is_dir()
    with pytest.raises(CheckpointError, match="a save was interrupted; the complete copy is"):
        checkpoint_module.read_meta(ckpt / "latest")  # a reader is told where the copy is
    Trainer(make_cfg(traj_store), run).fit()
    assert "completed an interrupted save" in (run / "train.log").read_text()
    assert "resumed from" in (run / "train.log").read_text()
    assert same_weights(ckpt / "latest", reference)


def test_random_kills_resume_exactly(tmp_path, traj_store, reference):
    """Three 'kills' at random optimizer steps (fixed seed): each restart loses at most one checkpoint
    interval and the final weights equal the uninterrupted run's bit for bit."""
    rng = random.Random(33)
    run = tmp_path / "run"
    kill_steps = sorted(rng.sample(range(1, 24), 3))

    for kill in kill_steps:

        class Killed(Trainer):
            kill_at = kill

            def _after_optimizer_step(self, step):
                super()._after_optimizer_step(step)
                if step == self.kill_at:
                    raise Crash(step)

        with pytest.raises(Crash):
            Killed(make_cfg(traj_store), run).fit()
        latest = run / "checkpoints" / "latest"
        saved = load_training_state(latest)["step"] if latest.exists() else 0
        assert kill - saved <= 8  # at most one checkpoint interval (train.checkpoint_every=8) lost
    Trainer(make_cfg(traj_store), run).fit()
    assert same_weights(run / "checkpoints" / "latest", reference)


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments(tmp_path):
    """The acceptance run: bench/kill_resume.py, 20 SIGKILLs, every resume exact."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kill_resume.py"), "--kills", "20", "--out", str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "final weights identical to the uninterrupted run: True" in out.stdout


# ----- SIGINT / SIGTERM ------------------------------------------------------------------------------------

# Runs the CLI with a hook that, at one point, says so on stdout and waits until the test has sent its
# signal and created the file `release` (the signal then arrives mid-step / mid-evaluation, at a known place).
HELD_CLI = """
import sys, time
from pathlib import Path
release = Path(sys.argv[1])
def hold(label):
    print(label, flush=True)
    t = time.time()
    while not release.exists() and time.time() - t < 120:
        time.sleep(0.02)
{patch}
from diffpolicy.cli import main
sys.exit(main(sys.argv[2:]))
"""

HOLD_AT_STEP_13 = """
from diffpolicy.training.trainer import Trainer
real = Trainer._after_optimizer_step
def after(self, step):
    real(self, step)
    if step == 13:
        hold("at step 13")
Trainer._after_optimizer_step = after
"""

HOLD_AT_SECOND_BATCH = """
from diffpolicy.control import RecedingHorizonController
real, calls = RecedingHorizonController.reset, []
def reset(self):  # called by the constructor, then at the start of each batch of episodes
    calls.append(1)
    if len(calls) == 3:
        hold("second batch")
    return real(self)
RecedingHorizonController.reset = reset
"""


def run_held(tmp_path: Path, patch: str, args: list[str], sig: int) -> subprocess.CompletedProcess:
    """Start the CLI with `args`, wait until `patch` holds it, send `sig`, release it, wait for the end."""
    release = tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    script = HELD_CLI.format(patch=patch)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(release), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() in ("at step 13", "second batch"), line + proc.stderr.read()[-2000:]
        proc.send_signal(sig)
        time.sleep(0.3)  # the signal is handled (or kills) before the process goes on
        release.touch()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_train_saves_and_the_run_resumes_exactly(tmp_path, traj_store, reference, sig):
    """Issue 38 item 13: SIGTERM / SIGINT at step 13 of 24 (checkpoints every 8): the run saves a
    checkpoint at the step it stops at (14: the step in progress finishes), says so in one line with no
    traceback, exits 128 + the signal's number, and the rerun ends bit-identical to an uninterrupted run."""
    run = tmp_path / "run"
    args = ["train", "--preset", "trajectory2d_lowdim_unet", "--run-dir", str(run)]
    args += [f"data.path={traj_store}", "eval.n_episodes=0", "train.val_every=0"]
    args += [a for a in __import__("conftest").TINY if not a.startswith("eval.n_episodes")]
    proc = run_held(tmp_path, HOLD_AT_STEP_13, args, sig)
    assert proc.returncode == 128 + sig, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert f"stopped by {sig.name} at step 14" in proc.stdout, proc.stdout
    assert load_training_state(run / "checkpoints" / "latest")["step"] == 14
    assert hidden_leftovers(run / "checkpoints") == []
    Trainer(make_cfg(traj_store), run).fit()
    assert "resumed from" in (run / "train.log").read_text()
    assert same_weights(run / "checkpoints" / "latest", reference)


def test_a_signal_during_eval_keeps_the_finished_episodes(tmp_path, traj_store):
    """Issue 38 item 13: SIGTERM while `diffpolicy eval` runs its second batch of 2 episodes: the report
    keeps the 2 finished episodes, marked as a partial report of 6, and the command exits 143."""
    run = tmp_path / "run"
    Trainer(make_cfg(traj_store, "train.num_steps=8"), run).fit()
    out = tmp_path / "report"
    args = ["eval", "--checkpoint", str(run / "checkpoints" / "latest"), "--out", str(out), "--episodes", "6"]
    args += ["eval.n_envs=2", "eval.max_steps=10", "eval.n_videos=0"]
    proc = run_held(tmp_path, HOLD_AT_SECOND_BATCH, args, signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] == "SIGTERM" and report["n_episodes_planned"] == 6
    assert report["n_episodes"] == 2 and [e["seed"] for e in report["episodes"]] == [100000, 100001]
    assert "interrupted by SIGTERM after 2 of 6 episodes" in (out / "report.md").read_text()
    assert "interrupted by SIGTERM after 2 of 6 episodes" in proc.stdout


# ----- corrupt files, stale temporaries -----------------------------------------------------------------


def test_a_corrupt_latest_falls_back_to_previous(tmp_path, traj_store, reference, caplog):
    run = tmp_path / "run"

    class Killed(Trainer):
        def save_latest(self, step):
            super().save_latest(step)
            if step == 16:
                raise Crash

    with pytest.raises(Crash):
        Killed(make_cfg(traj_store), run).fit()
    bad = run / "checkpoints" / "latest" / "training_state.pt"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated, as by a failing disk
    (run / "checkpoints" / ".latest.tmp-0badc0de").mkdir()  # a stale temporary of an older kill
    Trainer(make_cfg(traj_store), run).fit()
    log = (run / "train.log").read_text()
    assert f"cannot resume from {run / 'checkpoints' / 'latest'}: {bad} is corrupt or truncated" in log
    assert "resuming from" in log and "previous (step 8) instead" in log
    assert hidden_leftovers(run / "checkpoints") == []
    assert same_weights(run / "checkpoints" / "latest", reference)


def test_no_loadable_checkpoint_is_an_error_not_a_restart(tmp_path, traj_store):
    run = tmp_path / "run"
    Trainer(make_cfg(traj_store, "train.num_steps=16"), run).fit()
    for name in ("latest", "previous"):
        (run / "checkpoints" / name / "training_state.pt").write_bytes(b"garbage")
    before = tree_digest(run)
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads: .*Nothing was changed"):
        Trainer(make_cfg(traj_store, "train.num_steps=24"), run).fit()
    after = tree_digest(run)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }


class Payload:
    """A pickle that runs code when loaded: it creates the file `marker` (what an attacker's would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_training_state_is_refused_not_run(tmp_path, traj_store, capsys):
    """Issue 38 item 11: a `training_state.pt` replaced by a pickle whose payload creates a file. Resuming
    refuses it by name, the payload never runs, and nothing in the run folder changes."""
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--preset", "trajectory2d_lowdim_unet", f"data.path={traj_store}"]
    args += [*__import__("conftest").TINY, "eval.n_episodes=0", "train.val_every=0"]
    assert main([*args, "train.num_steps=8"]) == 0
    marker = tmp_path / "payload-ran"
    crafted = run / "checkpoints" / "latest" / "training_state.pt"
    assert torch.load(crafted, weights_only=True)["step"] == 8  # what train writes needs no allowlist
    torch.save({"step": 8, "model": Payload(marker)}, crafted)
    before = tree_digest(run / "checkpoints")
    assert main([*args, "train.num_steps=16"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the crafted pickle's payload ran"
    assert err.count("\n") == 1 and str(crafted) in err and "not written by diffpolicy" in err, err
    assert tree_digest(run / "checkpoints") == before
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain data"):
        load_training_state(crafted.parent)
    assert not marker.exists()


def test_training_state_of_the_old_format_still_loads(tmp_path):
    """Training states written before issue 38 (numpy arrays in the RNG state) load without pickle's
    arbitrary globals: only numpy's array reconstruction is allowed."""
    old = {
        "step": 3,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "topk": [(0.5, "x")],
    }
    (tmp_path / "ckpt").mkdir()
    torch.save(old, tmp_path / "ckpt" / "training_state.pt")
    state = load_training_state(tmp_path / "ckpt")
    assert state["step"] == 3 and state["topk"] == [(0.5, "x")]
    assert np.array_equal(state["rng"]["numpy"][1], old["rng"]["numpy"][1])
    expected = np.random.rand(3)  # what numpy draws next from the saved state
    np.random.seed(1)
    trainer_module._set_rng_state(state["rng"])  # a resume puts the old state back
    assert np.array_equal(np.random.rand(3), expected)


# ----- two writers ----------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, traj_store):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from diffpolicy.files import RunLock; lock = RunLock({str(run)!r}).acquire(); "
            "print('held', flush=True); import time; time.sleep(120)",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"{run} is in use by pid {holder.pid} on \S+ since"):
            Trainer(make_cfg(traj_store), run).fit()
        assert not (run / "config.yaml").exists() and not (run / "train.log").exists()  # wrote nothing
    finally:
        holder.kill()  # a crashed holder: the kernel drops its lock
        holder.wait()
    Trainer(make_cfg(traj_store, "train.num_steps=8"), run).fit()
    assert (run / "checkpoints" / "latest").exists()
    with RunLock(run):  # released after the run
        pass


# ----- overwriting, relabelling, resuming with another config ----------------------------------------


def test_finished_runs_are_never_overwritten_or_relabelled(tmp_path, traj_store):
    run = tmp_path / "run"
    Trainer(make_cfg(traj_store, "train.num_steps=16"), run).fit()
    before = tree_digest(run / "checkpoints")
    with pytest.raises(RunExists, match="already holds a run .* --no-resume refuses"):
        Trainer(make_cfg(traj_store, "train.num_steps=16"), run, resume=False).fit()
    with pytest.raises(RunExists, match="train.num_steps=8 is below the step .* already reached \\(16"):
        Trainer(make_cfg(traj_store, "train.num_steps=8"), run).fit()
    with pytest.raises(RunExists, match="holds a finished run \\(step 16 of train.num_steps=16\\)"):
        Trainer(make_cfg(traj_store, "train.num_steps=16"), run).fit()
    with pytest.raises(ResumeMismatch, match="train.lr: 0.001 -> 0.0005.*cannot change mid-run"):
        Trainer(make_cfg(traj_store, "train.num_steps=16", "train.lr=5e-4"), run).fit()
    assert tree_digest(run / "checkpoints") == before
    # --overwrite moves the old run aside (nothing deleted) and trains again from step 0
    Trainer(make_cfg(traj_store, "train.num_steps=8"), run, overwrite=True).fit()
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and tree_digest(aside[0] / "checkpoints") == before
    assert load_training_state(run / "checkpoints" / "latest")["step"] == 8
    # the new run logs into the run folder, not into the log that moved aside
    assert "moved the previous run's outputs" in (run / "train.log").read_text()
    assert "moved the previous run's outputs" not in (aside[0] / "train.log").read_text()
    # a finished run may be extended (num_steps is one of the keys that may change)
    Trainer(make_cfg(traj_store, "train.num_steps=12"), run).fit()
    assert load_training_state(run / "checkpoints" / "latest")["step"] == 12


def test_cli_no_resume_and_overwrite(tmp_path, traj_store, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--preset", "trajectory2d_lowdim_unet", f"data.path={traj_store}"]
    args += [*__import__("conftest").TINY, "train.num_steps=8", "eval.n_episodes=0", "train.val_every=0"]
    assert main(args) == 0
    before = tree_digest(run / "checkpoints")
    assert main([*args, "--no-resume"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite to move it aside" in err
    assert tree_digest(run / "checkpoints") == before
    assert main([*args, "--overwrite"]) == 0
    (aside,) = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert tree_digest(aside / "checkpoints") == before


# ----- evaluation reports -------------------------------------------------------------------------------


def test_eval_never_writes_inside_a_checkpoint(tmp_path, traj_store, capsys):
    from diffpolicy.cli import eval_output_dir

    run = tmp_path / "run"
    Trainer(make_cfg(traj_store, "train.num_steps=8"), run).fit()
    latest = run / "checkpoints" / "latest"
    out = eval_output_dir(latest, None)
    assert out.parent == (run / "eval_checkpoints").resolve() and out.name.startswith("latest-")
    topk = next((run / "checkpoints" / "topk").iterdir()) if (run / "checkpoints" / "topk").exists() else None
    if topk is not None:
        assert eval_output_dir(topk, None).name.startswith(f"topk_{topk.name}-")
    before = sorted(p.name for p in latest.iterdir())
    assert main(["eval", "--checkpoint", str(latest), "--out", str(latest / "eval"), "--episodes", "1"]) == 2
    assert "lies inside the checkpoint folder" in capsys.readouterr().err
    assert (
        main(["eval", "--checkpoint", str(latest), "--episodes", "1", "eval.n_envs=1", "eval.max_steps=5"])
        == 0
    )
    assert sorted(p.name for p in latest.iterdir()) == before
    (report,) = (run / "eval_checkpoints").glob("latest-*/report.json")
    assert report.exists()


# ----- disk full, read-only folders, permissions -----------------------------------------------------


def in_mount_namespace(tmp_path: Path, setup: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -c script *args` in a private mount namespace after the shell commands `setup` (mounts:
    they vanish with the process, nothing is left mounted). As root `unshare --mount` is enough (how CI
    runs); otherwise a user namespace maps the user to root inside it. Skips, naming what the kernel
    refused, where neither is allowed."""
    if not shutil.which("unshare"):
        pytest.skip(
            "util-linux's unshare is not installed: no private mount namespace for a real file system"
        )
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    shell = f'{setup} || exit 97\nexec "$@"'
    cmd = ["unshare", *userns, "--mount", "--propagation", "private", "sh", "-c", shell, "sh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [*cmd, sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode == 97 or (proc.returncode != 0 and proc.stderr.startswith("unshare:")):
        pytest.skip(
            f"the kernel refused a private mount ({' '.join(cmd[:-4])}): {proc.stderr.strip()[-300:]}"
        )
    return proc


FULL_DISK = """
import errno, json, os, sys
from pathlib import Path
from diffpolicy.checkpoint import load_training_state
from diffpolicy.cli import main
from diffpolicy.training.trainer import Trainer

small, args = Path(sys.argv[1]), sys.argv[2:]
filler = small / "filler"

def fill(leave: int) -> None:
    # the file system full, then `leave` bytes freed again
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    os.truncate(filler, max(0, filler.stat().st_size - leave))

real, filled = Trainer.save_latest, []
def save_latest(self, step):
    if step == 16 and not filled:  # room for config.yaml and the weights, not the training state
        filled.append(step)
        fill(leave=(self.ckpt_dir / "latest" / "model.safetensors").stat().st_size + (1 << 17))
    return real(self, step)
Trainer.save_latest = save_latest

result = {"rc": main(args)}
sys.stderr.flush()
ckpt = small / "run" / "checkpoints"
result["step"] = load_training_state(ckpt / "latest")["step"]
result["hidden"] = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("."))
filler.unlink()
result["rerun_rc"] = main(args)
result["rerun_step"] = load_training_state(ckpt / "latest")["step"]
print(json.dumps(result))
"""


def test_a_real_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, traj_store):
    """Issue 38 item 14: a real full file system (an 8 MB tmpfs, filled before the step-16 save leaves room
    for all but the training state). The CLI prints one line saying the disk is full and naming the file
    (not torch's `inline_container.cc` message), exit 1; the step-8 checkpoint is intact, no temporary is
    left, and once space is freed the same command resumes and finishes."""
    small = tmp_path / "small"
    small.mkdir()
    args = ["train", "--run-dir", str(small / "run"), "--preset", "trajectory2d_lowdim_unet"]
    args += [
        f"data.path={traj_store}",
        *__import__("conftest").TINY,
        "eval.n_episodes=0",
        "train.val_every=0",
    ]
    proc = in_mount_namespace(
        tmp_path, f'mount -t tmpfs -o size=8m tmpfs "{small}"', FULL_DISK, str(small), *args
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    err = [line for line in proc.stderr.splitlines() if line.startswith("diffpolicy train")]
    assert result["rc"] == 1 and len(err) == 1, proc.stderr[-3000:]
    assert "error: the disk is full" in err[0] and "training_state.pt" in err[0], err[0]
    assert "inline_container" not in proc.stderr and "Traceback" not in proc.stderr
    assert result["step"] == 8 and result["hidden"] == []
    assert result["rerun_rc"] == 0 and result["rerun_step"] == 24


def test_a_full_disk_at_any_file_of_a_save_names_it(tmp_path):
    """The same at the first two files of a save on a real full tmpfs: config.yaml (written by Python) and
    model.safetensors (written by safetensors' Rust code): OSError ENOSPC naming the file, nothing left."""
    small = tmp_path / "small"
    small.mkdir()
    script = """
import errno, json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from conftest import tiny_config
from diffpolicy.checkpoint import save_checkpoint
from diffpolicy.policy import make_policy
small = Path(sys.argv[1])
policy = make_policy(tiny_config().policy, {"obs": {"x": {"shape": [2]}}, "action": {"shape": [2]}})
out = []
for leave in (0, 1 << 14):
    filler = small / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(bytes(1 << 16))
    except OSError:
        pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    try:
        save_checkpoint(small / "ckpt", policy, tiny_config())
        out.append("saved")
    except OSError as e:
        out.append([e.errno, Path(e.filename).name if e.filename else None])
    out.append(sorted(p.name for p in small.iterdir()))
    filler.unlink()
print(json.dumps(out))
"""
    setup = f'mount -t tmpfs -o size=2m tmpfs "{small}"'
    proc = in_mount_namespace(tmp_path, setup, script, str(small), str(ROOT / "tests"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == [
        [errno.ENOSPC, "config.yaml"],
        ["filler"],
        [errno.ENOSPC, "model.safetensors"],
        ["filler"],
    ]


def test_read_only_run_folder_is_one_line(tmp_path, traj_store):
    """A run folder on a read-only mount (a read-only bind mount: unlike chmod, it holds for root too)."""
    run = tmp_path / "run"
    run.mkdir()
    setup = f'mount --bind "{run}" "{run}" && mount -o remount,bind,ro "{run}"'
    script = "import sys\nfrom diffpolicy.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["train", "--run-dir", str(run), "--preset", "trajectory2d_lowdim_unet", f"data.path={traj_store}"]
    proc = in_mount_namespace(tmp_path, setup, script, *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"error: read-only file system ({run / '.lock'}): choose a writable folder" in proc.stderr
    assert list(run.iterdir()) == []


def test_permission_errors_are_one_line(tmp_path, traj_store, monkeypatch, capsys):
    """The read-only case where permissions cannot be used (root): the lock file cannot be opened."""
    import builtins

    real_open = builtins.open

    def denied(file, *a, **k):
        if str(file).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", denied)
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--preset", "trajectory2d_lowdim_unet", f"data.path={traj_store}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: permission denied ({run / '.lock'})" in err


def test_checkpoints_follow_the_umask(tmp_path):
    policy = make_policy(tiny_config().policy, {"obs": {"x": {"shape": [2]}}, "action": {"shape": [2]}})
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", policy, tiny_config(), training_state={"step": 0})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == {
        "config.yaml": 0o644,
        "model.safetensors": 0o644,
        "training_state.pt": 0o644,
    }


# ----- bad configs --------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.num_steps=-5", "train.num_steps=-5 must be >= 1"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=nan", "train.lr=nan must be > 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1 must be >= 0"),
    ("train.ema.power=-1", "train.ema.power=-1.0 must be > 0"),
    ("train.betas=[0.9]", "train.betas=[0.9] must be two numbers in [0, 1)"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 2**32)"),
    ("policy.unet.n_groups=3", "policy.unet.down_dims=[16, 32] must be positive multiples of"),
    ("policy.transformer.n_head=3", "policy.transformer.n_emb=32 must be a multiple of"),
    ("policy.scheduler.beta_end=2", "policy.scheduler.beta_end=2.0 must be in (0, 1)"),
    ("eval.max_steps=0", "eval.max_steps=0 must be >= 1 (or null: the task's limit)"),
    ("collect.n_workers=0", "collect.n_workers=0 must be >= 1"),
    ("train.batch_size=abc", "bad value for 'train.batch_size'"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_configs_name_the_key_and_touch_nothing(tmp_path, traj_store, capsys, override, message):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--preset", "trajectory2d_lowdim_unet", f"data.path={traj_store}"]
    args += [*__import__("conftest").TINY, override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not run.exists()


def test_malformed_yaml_preset_is_one_line(tmp_path, capsys):
    preset = tmp_path / "broken.yaml"
    preset.write_text("train:\n  batch_size: 4\n   lr: [1\n")
    assert main(["train", "--preset", str(preset), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"preset {preset} is not valid YAML at line 3" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ----- bad inputs to the policy and the controller -------------------------------------------------------

META = {"obs": {"pos": {"shape": [2], "type": "low_dim"}}, "action": {"shape": [2]}}
IMAGE_META = {"obs": {"cam": {"shape": [3, 16, 16], "type": "rgb"}}, "action": {"shape": [2]}}


def fitted_policy(meta, *overrides):
    cfg = tiny_config(*overrides)
    policy = make_policy(cfg.policy, meta)
    data = {k: torch.rand(64, *v["shape"]) for k, v in meta["obs"].items()} | {"action": torch.randn(64, 2)}
    modes = {k: "image" if v["type"] == "rgb" else "minmax" for k, v in meta["obs"].items()} | {
        "action": "minmax"
    }
    policy.normalizer.load_state_dict(Normalizer.fit(data, modes).state_dict())
    return policy.eval()


VISION = ("policy.vision.backbone=compact", "policy.vision.cnn_channels=[4]", "policy.vision.cnn_strides=[2]")
VISION += ("policy.vision.crop_shape=[12,12]", "policy.vision.num_keypoints=4", "policy.vision.feature_dim=8")

BAD_INPUTS = [
    (
        "numpy",
        lambda: {"pos": np.zeros((1, 2, 2), np.float32)},
        TypeError,
        "'pos' is a ndarray; predict_action takes torch tensors",
    ),
    (
        "float64",
        lambda: {"pos": torch.zeros(1, 2, 2, dtype=torch.float64)},
        ObservationMismatch,
        "'pos' has dtype torch.float64, the policy takes torch.float32",
    ),
    (
        "no batch axis",
        lambda: {"pos": torch.zeros(2, 2)},
        ObservationMismatch,
        r"'pos' has shape \(2, 2\), expected \(B, >= 2, 2\) \(batch, time steps",
    ),
    (
        "short history",
        lambda: {"pos": torch.zeros(1, 1, 2)},
        ObservationMismatch,
        r"'pos' has shape \(1, 1, 2\), expected \(B, >= 2, 2\)",
    ),
    ("wrong size", lambda: {"pos": torch.zeros(1, 2, 3)}, ObservationMismatch, r"expected \(B, >= 2, 2\)"),
]


@pytest.mark.parametrize("name,obs,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_policy_inputs_are_named(name, obs, error, message):
    policy = fitted_policy(META)
    with pytest.raises(error, match=message):
        policy.predict_action(obs())


def test_image_inputs_outside_0_1_and_uint8_are_named():
    policy = fitted_policy(IMAGE_META, *VISION)
    good = torch.rand(1, 2, 3, 16, 16)
    assert policy.predict_action({"cam": good})["action"].shape == (1, 8, 2)
    with pytest.raises(
        ObservationMismatch, match=r"camera observation 'cam' has values in \[255, 255\].*divide"
    ):
        policy.predict_action({"cam": good * 0 + 255})
    with pytest.raises(ObservationMismatch, match="'cam' has dtype torch.uint8.*uint8 / 255"):
        policy.predict_action({"cam": (good * 255).to(torch.uint8)})


def test_bad_controller_inputs_are_named():
    policy = fitted_policy(META)
    ctrl = RecedingHorizonController(policy)
    with pytest.raises(
        ValueError, match=r"'pos' has shape \(2,\); the controller takes one row per environment, \(N, 2\)"
    ):
        ctrl.act({"pos": np.zeros(2)})
    ctrl.reset()
    assert ctrl.act({"pos": np.zeros((4, 2))}).shape == (4, 2)
    with pytest.raises(ValueError, match=r"hold \[3\] environments but this episode began with 4.*reset\(\)"):
        ctrl.act({"pos": np.zeros((3, 2))})
    ctrl.reset()
    assert ctrl.act({"pos": torch.zeros(3, 2)}).shape == (3, 2)  # a tensor from a torch env is fine
    image_ctrl = RecedingHorizonController(fitted_policy(IMAGE_META, *VISION))
    with pytest.raises(ValueError, match=r"camera observation 'cam' has values in \[-1, 1\].*0\.\.255"):
        image_ctrl.act({"cam": np.full((1, 16, 16, 3), -1.0, np.float32) + np.eye(16)[None, :, :, None] * 2})


def test_saved_config_is_what_a_resume_checks(tmp_path, traj_store):
    """Editing the run folder's config.yaml does not let a resume change a fixed key: the checkpoint's own
    config is compared."""
    run = tmp_path / "run"
    Trainer(make_cfg(traj_store, "train.num_steps=8"), run).fit()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["policy"]["horizon"] = 24
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ResumeMismatch, match="policy.horizon: 16 -> 24"):
        Trainer(make_cfg(traj_store, "train.num_steps=16", "policy.horizon=24"), run).fit()
