"""The diffpolicy LeRobot env plugin: discovery, LeRobot-convention observations equal to diffpolicy's own
task observations, success reaching lerobot-eval, the policy plugin acting on them as diffpolicy's own
controller does, and lerobot-eval end to end."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.configs import FeatureType, PreTrainedConfig
from lerobot.envs.configs import EnvConfig
from lerobot.envs.factory import make_env, make_env_config
from lerobot.envs.utils import env_to_policy_features, preprocess_observation
from lerobot.policies import make_policy, make_pre_post_processors
from lerobot.processor.factory import make_policy_processor_pipelines
from lerobot.scripts.lerobot_eval import rollout
from lerobot.utils.import_utils import register_third_party_plugins

from diffpolicy.control import RecedingHorizonController
from diffpolicy.policy import load_policy
from diffpolicy.tasks import make_task
from diffpolicy.tasks.so101_grasp import So101Expert

SMALL = {"observation_height": 48, "observation_width": 64}  # the task's 3:4 at a tenth of the pixels
OVERRIDES = {"device_processor": {"device": "cpu"}, "rename_observations_processor": {"rename_map": {}}}


def vector_env(env_type: str, n_envs: int = 1, **kwargs):
    cfg = make_env_config(env_type, **kwargs)
    return cfg, make_env(cfg, n_envs=n_envs, use_async_envs=False)[cfg.type][0]


def images(batch_value: torch.Tensor) -> np.ndarray:
    """LeRobot's float (B, C, H, W) in [0, 1] back to uint8 (B, H, W, C)."""
    return (batch_value * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_configs_are_discovered():
    name = importlib.metadata.distribution("lerobot_env_diffpolicy").metadata["Name"]
    assert name.startswith("lerobot_env_")  # LeRobot imports distributions with this prefix
    register_third_party_plugins()
    known = EnvConfig.get_known_choices()
    assert "diffpolicy_pusht" in known and "diffpolicy_so101_grasp" in known


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="n_objects"):
        make_env_config("diffpolicy_so101_grasp", n_objects=4)
    with pytest.raises(ValueError, match="unknown camera"):
        make_env_config("diffpolicy_so101_grasp", obs_type="image", cameras=["front"])
    with pytest.raises(ValueError, match="env.task"):
        make_env_config("diffpolicy_pusht", task="PushT-v0")


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_so101_observations_are_the_task_s(obs_type):
    """Two sub-envs, two object counts' worth of layout: LeRobot's features equal our task env's
    observation for the same seeds, step after step, with the declared shapes."""
    cfg, envs = vector_env("diffpolicy_so101_grasp", n_envs=2, n_objects=2, obs_type=obs_type, **SMALL)
    task = make_task("so101_grasp", n_objects=2, obs_type=obs_type, image_shape=[48, 64])
    ours = [task.make_env() for _ in range(2)]
    seeds = [11, 12]
    obs, _ = envs.reset(seed=seeds)
    ref = [env.reset(seed=s)[0] for env, s in zip(ours, seeds, strict=True)]
    declared = env_to_policy_features(cfg)
    assert envs.call("_max_episode_steps")[0] == 600  # the task's 20 s at 30 Hz for two objects
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = preprocess_observation(obs)
        assert set(batch) == set(declared) - {"action"}
        for key, value in batch.items():
            assert tuple(value.shape[1:]) == declared[key].shape, key
        state = np.stack([r["state"] for r in ref])
        np.testing.assert_array_equal(batch["observation.state"].numpy(), state)
        if obs_type == "state":
            assert declared["observation.environment_state"].type is FeatureType.ENV
            env_state = np.stack([np.concatenate([r["object_pose"], r["container_pos"]]) for r in ref])
            np.testing.assert_array_equal(batch["observation.environment_state"].numpy(), env_state)
        else:
            for cam in ("top", "side"):
                got = images(batch[f"observation.images.{cam}"])
                np.testing.assert_array_equal(got, np.stack([r[cam] for r in ref]))
        action = ref[0]["state"] + rng.normal(0, 5, 6).astype(np.float32)
        obs, *_ = envs.step(np.stack([action, action]))
        ref = [env.step(action)[0] for env in ours]
    envs.close()


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_pusht_observations_are_the_task_s(obs_type):
    cfg, envs = vector_env("diffpolicy_pusht", obs_type=obs_type, episode_length=50)
    ours = make_task("pusht", obs_type=obs_type).make_env()
    obs, _ = envs.reset(seed=[100000])
    ref, _ = ours.reset(seed=100000)
    assert envs.call("_max_episode_steps")[0] == 50
    for step in range(3):
        batch = preprocess_observation(obs)
        np.testing.assert_array_equal(batch["observation.state"][0].numpy(), ref["agent_pos"])
        if obs_type == "state":
            np.testing.assert_array_equal(
                batch["observation.environment_state"][0].numpy(), ref["keypoint"].reshape(-1)
            )
        else:
            np.testing.assert_array_equal(images(batch["observation.image"])[0], ref["img"])
        action = np.array([200.0 + 20 * step, 300.0 - 10 * step], dtype=np.float32)
        obs, *_ = envs.step(action[None])
        ref, *_ = ours.step(action)
    envs.close()


class _ExpertPolicy(torch.nn.Module):
    """diffpolicy's scripted SO-101 expert behind the policy calls lerobot-eval's rollout makes."""

    def __init__(self, envs, seed: int) -> None:
        super().__init__()
        self.envs, self.seed, self.expert = envs, seed, None

    def reset(self) -> None:
        self.expert = None

    def select_action(self, batch) -> torch.Tensor:
        if self.expert is None:  # the scene exists after the rollout's reset
            self.expert = So101Expert(self.envs.envs[0].unwrapped, self.seed)
        return torch.from_numpy(self.expert.act().astype(np.float32))[None]


def test_success_reaches_lerobot_eval():
    """The task's `is_success` is what lerobot-eval's rollout counts: the expert's episode (seed 0
    succeeds in diffpolicy's own collection) ends early, as a success."""
    seed = 0
    _, ok = make_task("so101_grasp", n_objects=1).collect_episode(seed)
    assert ok, "the expert is expected to succeed on seed 0"
    cfg, envs = vector_env("diffpolicy_so101_grasp", n_objects=1, obs_type="state")
    env_pre, env_post = cfg.get_env_processors()
    pre, post = make_policy_processor_pipelines(input_steps=[], output_steps=[])
    out = rollout(envs, _ExpertPolicy(envs, seed), env_pre, env_post, pre, post, seeds=[seed])
    envs.close()
    assert out["success"].any(dim=1).item()
    assert out["done"].shape[1] < 450  # terminated on success, before the 15 s limit


def test_policy_plugin_acts_as_our_controller(so101_state_ckpt):
    """Through this env's features, the policy plugin's actions are bit for bit those of diffpolicy's own
    controller on our task's observations (the environment_state concatenation order matches)."""
    cfg, envs = vector_env("diffpolicy_so101_grasp", n_envs=2, n_objects=3, obs_type="state")
    pcfg = PreTrainedConfig.from_pretrained(so101_state_ckpt, cli_overrides=["--seed=3"])
    pcfg.pretrained_path = so101_state_ckpt
    policy = make_policy(pcfg, env_cfg=cfg)
    pre, post = make_pre_post_processors(
        pcfg, pretrained_path=str(so101_state_ckpt), preprocessor_overrides=OVERRIDES
    )
    reference, _ = load_policy(so101_state_ckpt)
    controller = RecedingHorizonController(reference, generator=torch.Generator().manual_seed(3))
    task = make_task("so101_grasp", n_objects=3, obs_type="state")
    ours = [task.make_env() for _ in range(2)]
    obs, _ = envs.reset(seed=[5, 6])
    ref = [env.reset(seed=s)[0] for env, s in zip(ours, [5, 6], strict=True)]
    policy.reset()
    for _ in range(6):
        with torch.inference_mode():
            got = post(policy.select_action(pre(preprocess_observation(obs)))).numpy()
        want = controller.act({k: np.stack([r[k] for r in ref]) for k in ref[0]})
        np.testing.assert_array_equal(got, want)
        obs, *_ = envs.step(got)
        ref = [env.step(a)[0] for env, a in zip(ours, got, strict=True)]
    envs.close()


def _lerobot_eval(tmp_path: Path, ckpt: Path, *args: str) -> dict:
    out = tmp_path / "eval"
    cmd = [
        str(Path(sys.executable).parent / "lerobot-eval"),
        f"--policy.path={ckpt}",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--eval.use_async_envs=false",
        "--policy.device=cpu",
        f"--output_dir={out}",
        *args,
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=900)
    return json.loads((out / "eval_info.json").read_text())


@pytest.mark.parametrize("which", ["so101_state", "so101_image", "pusht_state"])
def test_lerobot_eval_end_to_end(tmp_path, request, which):
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    args = {
        "so101_state": ["--env.type=diffpolicy_so101_grasp", "--env.episode_length=6"],
        "so101_image": [
            "--env.type=diffpolicy_so101_grasp",
            "--env.obs_type=image",
            "--env.observation_height=48",
            "--env.observation_width=64",
            "--env.episode_length=6",
        ],
        "pusht_state": ["--env.type=diffpolicy_pusht", "--env.episode_length=6"],
    }[which]
    info = _lerobot_eval(tmp_path, ckpt, *args)
    assert info["overall"]["n_episodes"] == 2
    assert len(info["per_task"][0]["metrics"]["successes"]) == 2
