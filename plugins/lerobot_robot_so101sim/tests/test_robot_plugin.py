"""The simulated SO-101 follower: discovery through LeRobot's factory, so101_follower feature names and
units, observations equal to diffpolicy's so101_grasp task, actions, episode bookkeeping (success, step
limit, a new layout after the reset phase), and lerobot-rollout recording a dataset end to end."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.robots import RobotConfig, make_robot_from_config
from lerobot.utils.import_utils import register_third_party_plugins
from lerobot_robot_so101sim import (
    So101FollowerSim,
    So101FollowerSimConfig,
    joint_features,
    privileged_features,
)

from diffpolicy.tasks import make_task
from diffpolicy.tasks.so101_grasp import HOME, So101Expert

SO101_FOLLOWER_JOINTS = [
    "shoulder_pan.pos",
    "shoulder_lift.pos",
    "elbow_flex.pos",
    "wrist_flex.pos",
    "wrist_roll.pos",
    "gripper.pos",
]  # lerobot.robots.so_follower's motor names, in its order


def robot(**kwargs) -> So101FollowerSim:
    kwargs.setdefault("image_height", 48)
    kwargs.setdefault("image_width", 64)
    kwargs.setdefault("reset_idle_s", 1e6)  # no reset phase unless a test wants one (the box may stall)
    r = make_robot_from_config(So101FollowerSimConfig(**kwargs))
    r.connect()
    return r


def test_discovered_and_made_by_lerobot():
    name = importlib.metadata.distribution("lerobot_robot_so101sim").metadata["Name"]
    assert name.startswith("lerobot_robot_")
    register_third_party_plugins()
    assert "so101_follower_sim" in RobotConfig.get_known_choices()
    made = make_robot_from_config(So101FollowerSimConfig())
    assert isinstance(made, So101FollowerSim) and not made.is_connected


def test_features_follow_so101_follower():
    r = robot(privileged_state=True)
    assert joint_features() == SO101_FOLLOWER_JOINTS
    assert list(r.action_features) == SO101_FOLLOWER_JOINTS
    features = r.observation_features
    assert list(features) == [*SO101_FOLLOWER_JOINTS, *privileged_features(), "top", "side"]
    assert features["top"] == (48, 64, 3) and features["shoulder_pan.pos"] is float
    assert all(name.endswith(".pos") for name in privileged_features())  # lerobot-rollout keeps only these
    r.disconnect()


@pytest.mark.parametrize("seed", [0, 7])
def test_observation_is_the_task_s(seed):
    r = robot(n_objects=2, seed=seed, privileged_state=True)
    task = make_task("so101_grasp", n_objects=2, obs_type="image", image_shape=[48, 64])
    env = task.make_env()
    ref, _ = env.reset(seed=seed)
    obs = r.get_observation()
    np.testing.assert_allclose([obs[k] for k in SO101_FOLLOWER_JOINTS], HOME, atol=1e-6)
    np.testing.assert_array_equal(np.float32([obs[k] for k in SO101_FOLLOWER_JOINTS]), ref["state"])
    for cam in ("top", "side"):
        assert obs[cam].dtype == np.uint8
        np.testing.assert_array_equal(obs[cam], ref[cam])
    state_env = make_task("so101_grasp", n_objects=2, obs_type="state").make_env()
    sref, _ = state_env.reset(seed=seed)
    privileged = np.float32([obs[k] for k in privileged_features()])
    np.testing.assert_array_equal(privileged, np.concatenate([sref["object_pose"], sref["container_pos"]]))
    # one action on both: the same next state
    action = HOME + np.array([10.0, 5.0, -5.0, 0.0, 3.0, 40.0])
    sent = r.send_action(dict(zip(SO101_FOLLOWER_JOINTS, action, strict=True)))
    ref, *_ = env.step(action)
    np.testing.assert_array_equal(
        np.float32([r.get_observation()[k] for k in SO101_FOLLOWER_JOINTS]), ref["state"]
    )
    assert list(sent) == SO101_FOLLOWER_JOINTS
    r.disconnect()


def test_actions_partial_and_bad():
    r = robot(camera_names=[])
    assert list(r.observation_features) == SO101_FOLLOWER_JOINTS  # no cameras, no privileged state
    before = r.get_observation()
    for _ in range(15):
        sent = r.send_action({"gripper.pos": 60.0})  # the other joints keep their targets
    after = r.get_observation()
    assert sent["gripper.pos"] == 60.0 and sent["elbow_flex.pos"] == pytest.approx(HOME[2])
    assert after["gripper.pos"] > before["gripper.pos"] + 20
    assert abs(after["shoulder_pan.pos"] - before["shoulder_pan.pos"]) < 1.0
    with pytest.raises(ValueError, match="elbow.pos"):
        r.send_action({"elbow.pos": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        r.send_action({"gripper.pos": float("nan")})
    r.send_action({"bowl.x.pos": 0.1})  # a privileged name (lerobot-rollout's return to start) is ignored
    r.disconnect()
    with pytest.raises(RuntimeError, match="not connected"):
        r.get_observation()


def test_expert_succeeds_and_is_reported(tmp_path, caplog):
    seed = 0
    _, ok = make_task("so101_grasp", n_objects=1).collect_episode(seed)
    assert ok, "the expert is expected to succeed on seed 0"
    results = tmp_path / "results.jsonl"
    r = robot(camera_names=[], seed=seed, results_path=results)
    expert = So101Expert(r.env, seed)
    caplog.set_level(logging.INFO, logger="lerobot_robot_so101sim")
    steps = 0
    while not r.outcomes and steps < 450:
        r.get_observation()
        r.send_action(dict(zip(SO101_FOLLOWER_JOINTS, expert.act(), strict=True)))
        steps += 1
    assert r.outcomes and r.outcomes[0].success and r.outcomes[0].reason == "success"
    assert r.outcomes[0].steps == steps < 450
    r.send_action({"gripper.pos": 0.0})  # the arm still obeys; the outcome stays
    assert len(r.outcomes) == 1 and r.success_rate == 1.0
    r.disconnect()
    assert json.loads(results.read_text().splitlines()[0])["success"] is True
    assert "SUCCESS" in caplog.text and "1/1 episodes succeeded" in caplog.text


def test_step_limit_then_reset_phase_lays_out_next_episode():
    r = robot(camera_names=[], seed=3, max_episode_steps=5, reset_idle_s=0.5, privileged_state=True)
    first = r.get_observation()
    for _ in range(5):
        r.send_action({"gripper.pos": 30.0})
    assert [(o.success, o.reason, o.steps) for o in r.outcomes] == [(False, "step_limit", 5)]
    time.sleep(0.7)
    r.get_observation()  # one observation after an action, however late: a policy step, same episode
    assert r.episode == 0
    second = r.get_observation()  # observing on without acting, 0.7 s after the last action: reset phase
    assert r.episode == 1
    assert second["gripper.pos"] == pytest.approx(HOME[5], abs=1e-6)  # home again
    assert first["bowl.x.pos"] != second["bowl.x.pos"] or first["eraser.x.pos"] != second["eraser.x.pos"]
    r.get_observation()  # the new episode has not started: no further layout
    assert r.episode == 1
    r.send_action({"gripper.pos": 30.0})
    time.sleep(0.7)
    r.get_observation()
    r.get_observation()  # episode 1 cut short by the next reset phase: a failure
    assert r.episode == 2
    assert [o.reason for o in r.outcomes] == ["step_limit", "cut_short"] and r.success_rate == 0.0
    r.disconnect()


def test_lerobot_rollout_records_episodes(tmp_path, so101_state_ckpt):
    """lerobot-rollout's episodic strategy (lerobot-record's loop with a policy) drives the simulated arm
    with a diffpolicy state checkpoint and writes a LeRobot dataset of the episodes."""
    root = tmp_path / "dataset"
    results = tmp_path / "results.jsonl"
    feature_map = {k: "observation.state" for k in ("state", "object_pose", "container_pos")}
    cmd = [
        str(Path(sys.executable).parent / "lerobot-rollout"),
        "--strategy.type=episodic",
        "--robot.type=so101_follower_sim",
        "--robot.privileged_state=true",
        "--robot.camera_names=[top]",
        "--robot.image_height=48",
        "--robot.image_width=64",
        "--robot.max_episode_steps=10",
        "--robot.reset_idle_s=0.5",
        f"--robot.results_path={results}",
        f"--policy.path={so101_state_ckpt}",
        "--policy.device=cpu",
        f"--policy.feature_map={json.dumps(feature_map)}",
        "--dataset.repo_id=local/rollout_so101sim_test",
        f"--dataset.root={root}",
        "--dataset.single_task=grasp the object",
        "--dataset.num_episodes=2",
        "--dataset.episode_time_s=2",
        "--dataset.reset_time_s=2",
        "--dataset.video=false",
        "--dataset.push_to_hub=false",
        "--fps=30",
        "--play_sounds=false",
        "--display_data=false",
        "--return_to_initial_position=false",
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=900)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 2 and info["robot_type"] == "so101_follower_sim"
    names = info["features"]["observation.state"]["names"]
    assert names == [*SO101_FOLLOWER_JOINTS, *privileged_features()]
    assert info["features"]["action"]["names"] == SO101_FOLLOWER_JOINTS
    assert "observation.images.top" in info["features"]
    outcomes = [json.loads(line) for line in results.read_text().splitlines()]
    assert [o["episode"] for o in outcomes] == [0, 1]  # the reset phase laid out a second scene
    assert [o["seed"] for o in outcomes] == [0, 1]
