"""diffpolicy's simulated tasks as LeRobot env configs (`--env.type=diffpolicy_pusht`,
`--env.type=diffpolicy_so101_grasp`), registered in LeRobot 0.6.1's EnvConfig ChoiceRegistry.

Declared as LeRobot declares its own (lerobot/envs/configs.py, e.g. AlohaEnv / PushtEnv): `features` keyed
by gym observation key with their shapes (cameras H x W x 3), `features_map` from those keys to LeRobot
feature names, and `gym_kwargs` for gym.make. lerobot-eval builds the policy's input features from these
(`env_to_policy_features`) and the env through `EnvConfig.create_envs`, which gym.makes `gym_id` with
`gym_kwargs`. Here every config makes the same registered env, `gym_env.LeRobotTaskEnv`, with its task's
name and keyword arguments; the features are computed from the task's own `shape_meta`, so they cannot
drift from what the env returns.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from diffpolicy.tasks import make_task

from .gym_env import GYM_ID, PIXELS, observation_layout

PACKAGE = "lerobot_env_diffpolicy"


def _feature_type(gkey: str) -> FeatureType:
    if gkey == PIXELS or gkey.startswith(PIXELS + "/"):
        return FeatureType.VISUAL
    return FeatureType.STATE if gkey == "agent_pos" else FeatureType.ENV


def _lerobot_name(gkey: str) -> str:
    """gym key -> LeRobot feature (the inverse of gym_env.gym_key)."""
    names = {"agent_pos": OBS_STATE, "environment_state": OBS_ENV_STATE, PIXELS: OBS_IMAGE}
    if gkey in names:
        return names[gkey]
    if gkey.startswith(PIXELS + "/"):
        return f"{OBS_IMAGES}.{gkey.removeprefix(PIXELS + '/')}"
    return f"observation.{gkey}"


@dataclass
class DiffpolicyEnvConfig(EnvConfig, abc.ABC):
    """A diffpolicy task as a LeRobot env. `episode_length` None keeps the task's own time limit."""

    TASK: ClassVar[str]
    episode_length: int | None = None

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = self.TASK
        if self.task != self.TASK:
            raise ValueError(
                f"--env.type={self.type} runs the diffpolicy task '{self.TASK}', not --env.task={self.task}"
            )
        if self.episode_length is not None and self.episode_length < 1:
            raise ValueError(f"env.episode_length must be >= 1, got {self.episode_length}")
        task = make_task(self.TASK, **self.task_kwargs())  # checks the options, naming a bad one
        meta = task.shape_meta()
        features = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=tuple(meta["action"]["shape"]))}
        features_map = {ACTION: ACTION}
        for gkey, keys in observation_layout(self.TASK, meta).items():
            first = meta["obs"][keys[0]]
            if first.get("type", "low_dim") == "rgb":
                c, h, w = first["shape"]
                shape: tuple[int, ...] = (h, w, c)  # LeRobot declares env cameras channel-last
            else:
                shape = (sum(int(np.prod(meta["obs"][k]["shape"])) for k in keys),)
            features[gkey] = PolicyFeature(type=_feature_type(gkey), shape=shape)
            features_map[gkey] = _lerobot_name(gkey)
        self.features = features
        self.features_map = features_map
        self.max_steps = int(self.episode_length or task.max_episode_steps)

    @abc.abstractmethod
    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the diffpolicy task (`make_task(TASK, **kwargs)`)."""

    @property
    def package_name(self) -> str:
        return PACKAGE  # imported by create_envs when GYM_ID is not registered yet

    @property
    def gym_id(self) -> str:
        return GYM_ID

    @property
    def gym_kwargs(self) -> dict[str, Any]:
        return {"task": self.TASK, "task_kwargs": self.task_kwargs(), "max_episode_steps": self.max_steps}


@EnvConfig.register_subclass("diffpolicy_pusht")
@dataclass
class DiffpolicyPushtEnv(DiffpolicyEnvConfig):
    """diffpolicy's Push-T (gym-pusht underneath, as LeRobot's `pusht`; ours observes the block as the
    9 keypoints of the Diffusion Policy dataset). obs_type "state": observation.state = agent position (2),
    observation.environment_state = keypoints (18); "image": observation.state + observation.image (96x96)."""

    TASK: ClassVar[str] = "pusht"
    fps: int = 10
    obs_type: str = "state"

    def task_kwargs(self) -> dict[str, Any]:
        return {"obs_type": self.obs_type}


@EnvConfig.register_subclass("diffpolicy_so101_grasp")
@dataclass
class DiffpolicySo101GraspEnv(DiffpolicyEnvConfig):
    """diffpolicy's SO-101 grasp task (1-3 objects into a container; joint targets in so101_follower units,
    degrees and gripper 0..100). observation.state = the 6 joint positions, as a real so101_follower's;
    obs_type "image": observation.images.<camera> (240x320 by default) per camera; obs_type "state":
    observation.environment_state = the 3 objects' poses (3 x 7) and the container's position (3)."""

    TASK: ClassVar[str] = "so101_grasp"
    fps: int = 30
    n_objects: int = 1
    obs_type: str = "state"
    cameras: list[str] = field(default_factory=lambda: ["top", "side"])
    observation_height: int = 240
    observation_width: int = 320

    def task_kwargs(self) -> dict[str, Any]:
        return {
            "n_objects": self.n_objects,
            "obs_type": self.obs_type,
            "cameras": list(self.cameras),
            "image_shape": [self.observation_height, self.observation_width],
        }
