"""A diffpolicy task env seen through LeRobot's gym conventions.

lerobot-eval turns a gym observation into policy features with `lerobot.envs.utils.preprocess_observation`,
which knows fixed gym keys: "agent_pos" -> observation.state, "environment_state" ->
observation.environment_state, "pixels" (an array) -> observation.image, "pixels" (a dict camera -> array)
-> observation.images.<camera>; other array keys pass through as observation.<key>. `LeRobotTaskEnv`
regroups a diffpolicy task env's observation dict under those keys, following the same key -> feature
table that the policy plugin uses to read them back (`lerobot_policy_diffpolicy.configuration_diffpolicy.
default_feature_map`): several low-dim keys of one feature are concatenated, flattened, in the task's
`shape_meta` order, which is the order the policy plugin splits them in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import gymnasium as gym
import numpy as np
from lerobot.utils.constants import OBS_ENV_STATE, OBS_IMAGE, OBS_IMAGES, OBS_STATE, OBS_STR
from lerobot_policy_diffpolicy.configuration_diffpolicy import default_feature_map

from diffpolicy.tasks import make_task

GYM_ID = "lerobot_env_diffpolicy/DiffpolicyTask-v0"
PIXELS = "pixels"
# LeRobot feature -> the gym key that preprocess_observation reads it from (cameras: "pixels/<camera>")
_GYM_KEYS = {OBS_STATE: "agent_pos", OBS_ENV_STATE: "environment_state", OBS_IMAGE: PIXELS}


def gym_key(feature: str) -> str:
    """LeRobot feature name -> gym observation key (a camera of a dict "pixels" as "pixels/<camera>",
    the key form LeRobot's own AlohaEnv config uses in its `features`)."""
    if feature in _GYM_KEYS:
        return _GYM_KEYS[feature]
    if feature.startswith(OBS_IMAGES + "."):
        return f"{PIXELS}/{feature.removeprefix(OBS_IMAGES + '.')}"
    if feature.startswith(OBS_STR + "."):
        return feature.removeprefix(OBS_STR + ".")  # passed through by preprocess_observation
    raise ValueError(f"no gym key for LeRobot feature '{feature}'")


def observation_layout(task_name: str, shape_meta: dict[str, Any]) -> dict[str, list[str]]:
    """gym key -> the task's observation keys it holds, in shape_meta order (several for a concatenated
    low-dim feature, one for a camera)."""
    feature_map = default_feature_map(shape_meta, task_name)
    layout: dict[str, list[str]] = defaultdict(list)
    for key in shape_meta["obs"]:
        layout[gym_key(feature_map[key])].append(key)
    for gkey, keys in layout.items():
        rgb = [shape_meta["obs"][k].get("type", "low_dim") == "rgb" for k in keys]
        if any(rgb) and len(keys) > 1:
            raise ValueError(f"task {task_name}: cameras {keys} would share the gym key '{gkey}'")
    return dict(layout)


class LeRobotTaskEnv(gym.Wrapper):
    """diffpolicy task `task` (made with `task_kwargs`) with LeRobot's gym observation keys.

    The task's own time limit is removed: lerobot's EnvConfig passes `max_episode_steps` to gym.make, which
    adds it back (the task's limit unless --env.episode_length says otherwise). `task` and
    `task_description` are the attributes lerobot-eval reads for language-conditioned policies."""

    def __init__(self, task: str, task_kwargs: dict[str, Any] | None = None) -> None:
        self.diffpolicy_task = make_task(task, **(task_kwargs or {}))
        env = self.diffpolicy_task.make_env()
        if isinstance(env, gym.wrappers.TimeLimit):
            env = env.env
        super().__init__(env)
        self.task = task
        self.task_description = self.diffpolicy_task.description()
        meta = self.diffpolicy_task.shape_meta()
        self.layout = observation_layout(task, meta)
        spaces: dict[str, gym.spaces.Space] = {}
        cameras: dict[str, gym.spaces.Space] = {}
        inner = env.observation_space
        for gkey, keys in self.layout.items():
            if meta["obs"][keys[0]].get("type", "low_dim") == "rgb":
                space = inner[keys[0]]
                if gkey.startswith(PIXELS + "/"):
                    cameras[gkey.removeprefix(PIXELS + "/")] = space
                else:
                    spaces[gkey] = space
                continue
            size = sum(int(np.prod(meta["obs"][k]["shape"])) for k in keys)
            spaces[gkey] = gym.spaces.Box(-np.inf, np.inf, shape=(size,), dtype=np.float32)
        if cameras:
            spaces[PIXELS] = gym.spaces.Dict(cameras)
        self.observation_space = gym.spaces.Dict(spaces)
        self.metadata = {**env.metadata, "render_fps": self.diffpolicy_task.fps}

    def observation(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        """The task's observation dict regrouped under LeRobot's gym keys."""
        out: dict[str, Any] = {}
        cameras: dict[str, np.ndarray] = {}
        for gkey, keys in self.layout.items():
            if gkey.startswith(PIXELS + "/"):
                cameras[gkey.removeprefix(PIXELS + "/")] = obs[keys[0]]
            elif gkey == PIXELS:
                out[PIXELS] = obs[keys[0]]
            else:
                out[gkey] = np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in keys])
        if cameras:
            out[PIXELS] = cameras
        return out

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        return self.observation(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.observation(obs), reward, terminated, truncated, info


def register() -> None:
    """Register GYM_ID once (lerobot's EnvConfig.create_envs calls gym.make on it)."""
    if GYM_ID not in gym.registry:
        gym.register(id=GYM_ID, entry_point=LeRobotTaskEnv, disable_env_checker=True)
