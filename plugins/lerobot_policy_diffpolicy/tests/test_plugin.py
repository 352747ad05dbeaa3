"""The diffpolicy LeRobot plugin: discovery, loading by path through LeRobot's factories, actions equal to
diffpolicy's own controller, Push-T feature mapping, and lerobot-eval end to end."""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from lerobot.configs import PreTrainedConfig
from lerobot.envs.configs import PushtEnv
from lerobot.envs.utils import preprocess_observation
from lerobot.policies import make_policy, make_pre_post_processors
from lerobot.processor import NormalizerProcessorStep, UnnormalizerProcessorStep
from lerobot.utils.import_utils import register_third_party_plugins
from lerobot_policy_diffpolicy.export import LEROBOT_FILES, export_checkpoint
from lerobot_policy_diffpolicy.modeling_diffpolicy import DiffpolicyPolicy
from lerobot_policy_diffpolicy.processor_diffpolicy import PushTKeypointsStep, pusht_corners_to_keypoints

from diffpolicy.control import RecedingHorizonController
from diffpolicy.policy import ConsistencyPolicy, FlowPolicy, load_policy
from diffpolicy.tasks import make_task
from diffpolicy.tasks.pusht import BLOCK_KEYPOINTS_LOCAL, block_pose, to_world

OVERRIDES = {"device_processor": {"device": "cpu"}, "rename_observations_processor": {"rename_map": {}}}


def load_by_path(path: Path, env_cfg: PushtEnv, **cli: str):
    """What lerobot-eval does with --policy.path=path (EvalPipelineConfig.__post_init__ and eval_main)."""
    cfg = PreTrainedConfig.from_pretrained(path, cli_overrides=[f"--{k}={v}" for k, v in cli.items()])
    cfg.pretrained_path = path
    policy = make_policy(cfg, env_cfg=env_cfg)
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(path), preprocessor_overrides=OVERRIDES)
    return policy, pre, post


def test_distribution_is_discovered():
    # LeRobot imports distributions whose metadata Name starts with `lerobot_policy_` (underscores kept)
    name = importlib.metadata.distribution("lerobot_policy_diffpolicy").metadata["Name"]
    assert name.startswith("lerobot_policy_")
    register_third_party_plugins()
    assert "diffpolicy" in PreTrainedConfig.get_known_choices()


@pytest.mark.parametrize("kind", ["ddpm", "flow", "consistency"])
def test_factory_loads_each_kind_by_path(tmp_path, kind):
    path = make_checkpoint(tmp_path / kind, kind=kind)
    assert export_checkpoint(path, device="cpu")
    policy, pre, post = load_by_path(path, PushtEnv(obs_type="environment_state_agent_pos"))
    assert isinstance(policy, DiffpolicyPolicy)
    cls = {"ddpm": type(load_policy(path)[0]), "flow": FlowPolicy, "consistency": ConsistencyPolicy}[kind]
    assert type(policy.model) is cls
    reference, _ = load_policy(path)
    for k, v in reference.state_dict().items():  # the checkpoint's weights, normalizer included
        assert torch.equal(policy.model.state_dict()[k], v), k
    # normalization stays inside the checkpoint: LeRobot's pipelines hold no (un)normalizer
    steps = [*pre.steps, *post.steps]
    assert not any(isinstance(s, NormalizerProcessorStep | UnnormalizerProcessorStep) for s in steps)
    assert any(isinstance(s, PushTKeypointsStep) for s in pre.steps)


def test_export_keeps_checkpoint_and_refuses_to_overwrite(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    written = export_checkpoint(path, device="cpu")
    assert sorted(p.name for p in written) == sorted(LEROBOT_FILES)
    assert all(path.joinpath(n).read_bytes() == b for n, b in before.items())  # ours untouched
    assert export_checkpoint(path, device="cpu") == []  # idempotent
    config = json.loads((path / "config.json").read_text())
    assert config["type"] == "diffpolicy" and config["task"] == "pusht"
    assert config["feature_map"] == {
        "keypoint": "observation.environment_state",
        "agent_pos": "observation.state",
    }
    config["sampler"] = "ddim"  # a user's edit
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileExistsError, match="config.json"):
        export_checkpoint(path, device="cpu")
    assert json.loads((path / "config.json").read_text())["sampler"] == "ddim"
    export_checkpoint(path, device="cpu", overwrite=True)
    assert json.loads((path / "config.json").read_text())["sampler"] is None


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_lerobot_pusht_is_our_pusht(obs_type):
    """LeRobot's `--env.type=pusht` and diffpolicy's Push-T are the same gym-pusht env: the same initial
    state for a seed, and the observations map onto ours (image and agent_pos unchanged, the block's
    corners onto our keypoints)."""
    lerobot_type = "environment_state_agent_pos" if obs_type == "state" else "pixels_agent_pos"
    env_cfg = PushtEnv(obs_type=lerobot_type)
    theirs = gym.make(f"gym_pusht/{env_cfg.task}", **env_cfg.gym_kwargs)
    ours = make_task("pusht", obs_type=obs_type).make_env()
    for seed in (100000, 100001):
        a, _ = theirs.reset(seed=seed)
        b, _ = ours.reset(seed=seed)
        for step in range(6):
            np.testing.assert_allclose(a["agent_pos"], b["agent_pos"], atol=1e-3)
            if obs_type == "image":
                np.testing.assert_array_equal(a["pixels"], b["img"])
            else:
                kp = pusht_corners_to_keypoints(torch.as_tensor(a["environment_state"])[None])
                np.testing.assert_allclose(kp.numpy().reshape(9, 2), b["keypoint"], atol=1e-3)
            action = np.array([200.0 + 20 * step, 300.0 - 10 * step])
            a, *_ = theirs.step(action)
            b, *_ = ours.step(action)
    theirs.close()
    ours.close()


def _lerobot_batch(obs: dict[str, np.ndarray], env_cfg: PushtEnv) -> dict:
    """A raw gym observation batch as lerobot-eval hands it to the preprocessor."""
    batch = preprocess_observation(obs)
    batch["task"] = [""] * len(next(iter(obs.values())))
    return batch


def _run_both(path: Path, env_cfg: PushtEnv, our_obs, steps: int, seed: int = 3, n_envs: int = 2):
    """Actions of the plugin (through LeRobot's pre/post-processors) and of diffpolicy's controller, both
    seeded alike, fed the same episode of gym-pusht observations (driven by the plugin's actions)."""
    policy, pre, post = load_by_path(path, env_cfg, seed=str(seed))
    reference, _ = load_policy(path)
    controller = RecedingHorizonController(reference, generator=torch.Generator().manual_seed(seed))
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(f"gym_pusht/{env_cfg.task}", **env_cfg.gym_kwargs)] * n_envs
    )
    obs, _ = envs.reset(seed=[100 + i for i in range(n_envs)])
    policy.reset()
    controller.reset()
    got, want = [], []
    for _ in range(steps):
        with torch.inference_mode():
            action = post(policy.select_action(pre(_lerobot_batch(obs, env_cfg))))
        got.append(action.numpy())
        want.append(controller.act(our_obs(obs, envs)))
        obs, *_ = envs.step(action.numpy())
    envs.close()
    return np.stack(got), np.stack(want)


def test_state_actions_match_controller(state_ckpt):
    env_cfg = PushtEnv(obs_type="environment_state_agent_pos")

    def our_obs(obs, envs):  # what diffpolicy's Push-T env observes: keypoints from the exact block pose
        poses = [block_pose(e.unwrapped) for e in envs.envs]
        kp = np.stack([to_world(BLOCK_KEYPOINTS_LOCAL, p) for p in poses]).astype(np.float32)
        return {"keypoint": kp, "agent_pos": obs["agent_pos"].astype(np.float32)}

    got, want = _run_both(state_ckpt, env_cfg, our_obs, steps=9)
    # gym-pusht's float corners -> keypoints differ from the exact pose's by < 1e-3 px: equal up to that
    np.testing.assert_allclose(got, want, atol=1e-2)
    assert np.abs(np.diff(got, axis=0)).max() > 0  # the episode moved


def test_state_actions_exact_on_our_keypoints(state_ckpt):
    # An env that gives our 9 keypoints as environment_state (18 values): bit-for-bit the controller's.
    policy, pre, post = load_by_path(state_ckpt, PushtEnv(obs_type="environment_state_agent_pos"), seed="5")
    reference, _ = load_policy(state_ckpt)
    controller = RecedingHorizonController(reference, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(0)
    for _ in range(10):
        kp = (rng.random((3, 9, 2)) * 512).astype(np.float32)
        pos = (rng.random((3, 2)) * 512).astype(np.float32)
        batch = {
            "observation.environment_state": torch.from_numpy(kp.reshape(3, 18)),
            "observation.state": torch.from_numpy(pos),
            "task": [""] * 3,
        }
        with torch.inference_mode():
            got = post(policy.select_action(pre(batch))).numpy()
        assert np.array_equal(got, controller.act({"keypoint": kp, "agent_pos": pos}))


def test_image_actions_match_controller_exactly(image_ckpt):
    env_cfg = PushtEnv(obs_type="pixels_agent_pos")

    def our_obs(obs, envs):  # our Push-T image env observes gym-pusht's own 96x96 uint8 frames
        return {"img": obs["pixels"], "agent_pos": obs["agent_pos"].astype(np.float32)}

    got, want = _run_both(image_ckpt, env_cfg, our_obs, steps=9)
    assert np.array_equal(got, want)


def test_wrong_observation_is_named(state_ckpt):
    policy, pre, _ = load_by_path(state_ckpt, PushtEnv(obs_type="environment_state_agent_pos"))
    batch = {
        "observation.image": torch.zeros(1, 3, 96, 96),
        "observation.state": torch.zeros(1, 2),
        "task": [""],
    }
    with pytest.raises(KeyError, match="environment_state_agent_pos"):
        pre(batch)
    with pytest.raises(KeyError, match="observation.environment_state"):
        policy.select_action({"observation.state": torch.zeros(1, 2)})


def test_predict_action_chunk_is_the_executable_chunk(state_ckpt):
    policy, pre, _ = load_by_path(state_ckpt, PushtEnv(obs_type="environment_state_agent_pos"))
    batch = {
        "observation.environment_state": torch.rand(1, 18) * 512,
        "observation.state": torch.rand(1, 2) * 512,
    }
    chunk = policy.predict_action_chunk(batch)
    model = policy.model
    assert chunk.shape == (1, model.horizon - model.n_obs_steps + 1, 2)


def _lerobot_eval(tmp_path: Path, ckpt: Path, *args: str) -> dict:
    out = tmp_path / "eval"
    exe = Path(sys.executable).parent / "lerobot-eval"
    cmd = [
        str(exe),
        f"--policy.path={ckpt}",
        "--env.type=pusht",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        # LeRobot 0.6.1's async vector env (its default) fails on Push-T: the workers never import gym_pusht
        # ("Namespace gym_pusht not found"), whatever the policy
        "--eval.use_async_envs=false",
        "--policy.device=cpu",
        "--env.episode_length=12",
        f"--output_dir={out}",
        *args,
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=900)
    return json.loads((out / "eval_info.json").read_text())


@pytest.mark.parametrize("obs_type", ["environment_state_agent_pos", "pixels_agent_pos"])
def test_lerobot_eval_end_to_end(tmp_path, state_ckpt, image_ckpt, obs_type):
    ckpt = state_ckpt if obs_type.startswith("environment") else image_ckpt
    info = _lerobot_eval(tmp_path, ckpt, f"--env.obs_type={obs_type}")
    overall = info["overall"]
    assert overall["n_episodes"] == 2
    assert len(info["per_task"][0]["metrics"]["successes"]) == 2
    assert math.isfinite(overall["avg_sum_reward"]) and 0 <= overall["pc_success"] <= 100
    shutil.rmtree(tmp_path / "eval", ignore_errors=True)
