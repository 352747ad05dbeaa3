"""A cheap stand-in for a multi-object grasp task, for the collection-mix, LeRobot and frame-stride tests.

Like the SO-101 grasp task's interface (n_objects 1-3 sets the goal, the time limit and the task string;
30 control steps per second; absolute position targets; a top and a side camera of different sizes),
but the "arm" is a point that the expert drives to a goal, and the cameras are smooth synthetic images
whose brightness encodes the step, so a frame read back can be matched to the step it belongs to.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.tasks.base import Task

TOP, SIDE = (16, 20), (12, 16)  # camera sizes (H, W): different on purpose


def frame_level(step: int) -> int:
    """A camera's base level at `step`: distinct for the first 40 steps (>= 4 levels apart, neighbouring
    steps 52 apart), so a decoded frame (within ~1-2 levels of the original) names its step."""
    return 4 * ((step * 13) % 40)


def camera(step: int, size: tuple[int, int], channel_offset: int) -> np.ndarray:
    h, w = size
    base = frame_level(step) + np.arange(w)[None, :] * 2 + np.arange(h)[:, None]
    img = np.stack([base + channel_offset * c for c in range(3)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


class ToyGraspEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, n_objects: int, max_steps: int, absolute: bool) -> None:
        self.n_objects, self.max_steps, self.absolute = n_objects, max_steps, absolute
        self.observation_space = gym.spaces.Dict(
            {
                "state": gym.spaces.Box(-2, 2, (2,), np.float32),
                "top": gym.spaces.Box(0, 255, (*TOP, 3), np.uint8),
                "side": gym.spaces.Box(0, 255, (*SIDE, 3), np.uint8),
            }
        )
        self.action_space = gym.spaces.Box(-2, 2, (2,), np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "state": self.pos.astype(np.float32),
            "top": camera(self.t, TOP, 20),
            "side": camera(self.t, SIDE, 15),
        }

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = np.random.default_rng(seed)
        self.pos = rng.uniform(-0.2, 0.2, 2)
        self.goal = np.array([0.3 * self.n_objects, -0.2])
        self.t = 0
        return self._obs(), {"is_success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        target = action if self.absolute else self.pos + action
        self.pos = self.pos + np.clip(target - self.pos, -0.05, 0.05)
        self.t += 1
        success = bool(np.linalg.norm(self.pos - self.goal) < 0.02)
        return self._obs(), float(success), success, self.t >= self.max_steps, {"is_success": success}

    def render(self):
        return camera(self.t, TOP, 20)


class ToyGraspTask(Task):
    """n_objects sets the goal and the time limit (10 + 8 n control steps); `fail_every` > 0 makes the
    expert fail on seeds divisible by it (to test that failed seeds are replaced, never reused)."""

    name = "toy_grasp"
    fps = 30.0
    robot_type = "toy_arm"

    def __init__(self, n_objects: int = 1, fail_every: int = 0, absolute: bool = True) -> None:
        if not 1 <= n_objects <= 3:
            raise ValueError(f"n_objects={n_objects} must be 1, 2 or 3")
        self.n_objects, self.fail_every, self.absolute = n_objects, fail_every, absolute
        self.absolute_actions = absolute
        self.max_episode_steps = 10 + 8 * n_objects

    def description(self) -> str:
        objects = "1 object" if self.n_objects == 1 else f"{self.n_objects} objects"
        return f"grasp {objects} and place them in the container"

    def shape_meta(self) -> dict[str, Any]:
        return {
            "obs": {
                "state": {"shape": [2], "type": "low_dim"},
                "top": {"shape": [3, *TOP], "type": "rgb"},
                "side": {"shape": [3, *SIDE], "type": "rgb"},
            },
            "action": {"shape": [2]},
        }

    def make_env(self, render: bool = False) -> gym.Env:
        return ToyGraspEnv(self.n_objects, self.max_episode_steps, self.absolute)

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        env = self.make_env()
        obs, _ = env.reset(seed=seed)
        steps: dict[str, list[np.ndarray]] = {"state": [], "top": [], "side": [], "action": []}
        for _ in range(self.max_episode_steps):
            action = (env.goal if self.absolute else env.goal - env.pos).astype(np.float32)
            for key in ("state", "top", "side"):
                steps[key].append(obs[key])
            steps["action"].append(action)
            obs, _, _, truncated, _ = env.step(action)
            if truncated:
                break
        ok = not (self.fail_every and seed % self.fail_every == 0)
        return {k: np.stack(v) for k, v in steps.items()}, ok
