"""Temporal subsampling (data.frame_stride): windows on every k-th frame with every phase kept, the stride
stored with the policy, and the controller acting every k control steps and holding each action."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY
from test_control import RecordingPolicy, obs_at
from test_sequence import LOW_DIM_META, RGB_META, build_store
from toy_grasp import ToyGraspTask

from diffpolicy.cli import main
from diffpolicy.config import ConfigError, EvalConfig, load_config
from diffpolicy.control import RecedingHorizonController, check_frame_stride
from diffpolicy.data.episodes import EpisodeStore
from diffpolicy.data.sequence import SequenceDataset, split_store
from diffpolicy.evaluation import run_rollouts
from diffpolicy.policy import load_policy
from diffpolicy.training.trainer import Trainer


def phase_store(store: EpisodeStore, k: int) -> EpisodeStore:
    """The reference: every episode cut into its k phases (frames p, p+k, ...) as separate episodes."""
    out = EpisodeStore.create(None)
    for i in range(store.n_episodes):
        ep = store.get_episode(i)
        n = len(ep["action"])
        for p in range(min(k, n)):
            out.add_episode({key: v[p::k] for key, v in ep.items()})
    return out


def windows(ds: SequenceDataset) -> list[tuple]:
    items = [ds[i] for i in range(len(ds))]
    return sorted(
        (
            tuple(it["obs"]["state"][:, 0].tolist()),
            tuple(it["action"][:, 0].tolist()),
            tuple(it["action_is_pad"]),
        )
        for it in items
    )


@pytest.mark.parametrize("cache", [True, False])
def test_strided_windows_are_the_windows_of_the_phase_sub_episodes(cache):
    store = build_store([10, 7, 2])  # the 2-step episode has fewer frames than the stride: 2 phases
    kw = dict(horizon=4, n_obs_steps=2, n_action_steps=2, mask_padded_actions=True, cache_in_memory=cache)
    strided = SequenceDataset(store, LOW_DIM_META, frame_stride=3, **kw)
    reference = SequenceDataset(phase_store(store, 3), LOW_DIM_META, **kw)
    assert len(strided) == len(reference) > 0
    assert windows(strided) == windows(reference)
    # an interior window of episode 0 at frame 6: observations at frames 3, 6, actions 3, 6, 9, 9 (padded)
    i = next(i for i in range(len(strided)) if strided.sample_location(i) == (0, 6))
    item = strided[i]
    assert item["obs"]["state"][:, 0].tolist() == [3, 6]
    assert item["action"][:, 0].tolist() == [3, 6, 9, 9]
    assert item["action_is_pad"].tolist() == [False, False, False, True]
    # every frame of every episode is in some window: no data thrown away (values are 100 * episode + step)
    seen = {v for it in windows(strided) for v in it[0] + it[1]}
    assert seen == {100 * e + t for e, n in enumerate([10, 7, 2]) for t in range(n)}


def test_strided_batches_equal_single_windows_with_images():
    ds = SequenceDataset(
        build_store([11, 9]), RGB_META, horizon=4, n_obs_steps=2, n_action_steps=2, frame_stride=2
    )
    idx = np.arange(len(ds))
    batch = ds.get_batch(idx)
    for i in idx:
        item = ds[int(i)]
        torch.testing.assert_close(batch["obs"]["image"][i], item["obs"]["image"])
        torch.testing.assert_close(batch["action"][i], item["action"])
    # images follow the stride too: 10 * episode + step in every channel's base level
    ep, t = ds.sample_location(int(idx[-1]))
    assert batch["obs"]["image"][-1, -1, 0, 0, 0].item() * 255 == pytest.approx(10 * ep + t)


def test_short_episode_rule_counts_subsampled_steps():
    store = build_store([12, 30])
    # horizon 5 at stride 3: the 12-frame episode has 4 subsampled steps, too few; at stride 1 it is long
    train, _, note = split_store(store, 0.0, 0, horizon=5, short_episodes="skip", frame_stride=3)
    assert train.tolist() == [1] and "data.frame_stride=3" in note
    train, _, _ = split_store(store, 0.0, 0, horizon=5, short_episodes="skip", frame_stride=1)
    assert train.tolist() == [0, 1]


def test_controller_acts_every_k_steps_on_every_kth_observation_and_holds():
    policy = RecordingPolicy(horizon=6, n_obs_steps=2, n_action_steps=2)
    policy.frame_stride = 3
    ctrl = RecedingHorizonController(policy)
    actions = [ctrl.act(obs_at(t))[0, 0] for t in range(12)]
    # policy steps at control steps 0, 3, 6, 9; a new chunk every 2 policy steps; each action held 3 steps
    assert actions == [101] * 3 + [102] * 3 + [201] * 3 + [202] * 3
    # the policy's observation window is 3 control steps apart, as in training
    assert [w["pos"][0, :, 0].tolist() for w in policy.windows] == [[0, 0], [3, 6]]
    assert (ctrl.step, ctrl.env_step) == (4, 12)
    ctrl.reset()
    assert ctrl.act(obs_at(50))[0, 0] == 301 and ctrl.env_step == 1


def test_tasks_with_relative_actions_are_refused():
    check_frame_stride(ToyGraspTask(absolute=True), 3)
    check_frame_stride(ToyGraspTask(absolute=False), 1)
    with pytest.raises(ValueError, match="data.frame_stride=3.*absolute actions.*'toy_grasp'"):
        check_frame_stride(ToyGraspTask(absolute=False), 3)
    policy = RecordingPolicy()
    policy.frame_stride = 2
    with pytest.raises(ValueError, match="Task.absolute_actions"):
        run_rollouts(policy, ToyGraspTask(absolute=False), EvalConfig(n_episodes=1, n_envs=1), 1, 0)


def toy_store(path):
    task = ToyGraspTask(n_objects=2)
    store = EpisodeStore.create(path)
    for seed in range(4):
        store.add_episode(
            {k: v for k, v in task.collect_episode(seed)[0].items() if k in ("state", "action")}
        )
    store.attrs["fps"] = 30.0
    return store


STATE_RUN = [
    *TINY,
    "task.name=toy_grasp",
    "data.obs_keys=[state]",
    "policy.horizon=8",
    "policy.n_action_steps=4",
    "train.num_steps=4",
    "train.val_every=0",
    "train.checkpoint_every=4",
    "train.eval_every=0",
    "eval.n_episodes=0",
]


def test_trained_stride_reaches_the_checkpoint_and_the_rollout_holds_actions(tmp_path, monkeypatch):
    store = toy_store(tmp_path / "toy.zarr")
    task = ToyGraspTask(n_objects=2)
    cfg = load_config(
        "trajectory2d_lowdim_unet", [*STATE_RUN, f"data.path={store.path}", "data.frame_stride=3"]
    )
    Trainer(cfg, tmp_path / "run", task=task, show_progress=False).fit()
    policy, saved = load_policy(tmp_path / "run" / "checkpoints" / "latest")
    assert saved.data.frame_stride == 3 and policy.frame_stride == 3
    (rollout,) = run_rollouts(policy, task, EvalConfig(n_episodes=1, n_envs=1, max_steps=12), 1, 100)
    a = rollout.actions
    assert len(a) == 12
    for start in range(0, 12, 3):  # held for 3 control steps, then a new policy step
        np.testing.assert_array_equal(a[start : start + 3], np.repeat(a[start : start + 1], 3, axis=0))
    assert not np.array_equal(a[0], a[3])  # a fresh diffusion sample at each policy step

    # `diffpolicy eval` runs it the same way, in the environment of one mix group (task.kwargs.*)
    import diffpolicy.tasks

    monkeypatch.setattr(diffpolicy.tasks, "make_task", lambda name, **kw: ToyGraspTask(**kw))
    out = tmp_path / "eval3"
    argv = ["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "latest"), "--out", str(out)]
    assert main([*argv, "--episodes", "1", "task.kwargs.n_objects=3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frame_stride"] == 3 and report["mean_episode_length"] == 34  # 10 + 8 * 3 objects
    assert main([*argv[:-1], str(tmp_path / "e"), "policy.horizon=4"]) == 2

    # a run that would evaluate a relative-action task with a stride is refused before training
    bad = load_config(
        "trajectory2d_lowdim_unet", [*STATE_RUN, f"data.path={store.path}", "data.frame_stride=2"]
    )
    bad.eval.n_episodes = 2
    with pytest.raises(ConfigError, match="absolute actions"):
        Trainer(bad, tmp_path / "bad", task=ToyGraspTask(absolute=False), show_progress=False)
    assert not (tmp_path / "bad").exists()
