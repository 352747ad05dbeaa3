"""The Task interface: the one thing a new environment must implement."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np


def prepare_headless_gl() -> None:
    """Call before importing mujoco in a task that renders: headless OpenGL through EGL by default.

    MUJOCO_GL=egl (Mesa's libEGL, installed by scripts/headless-gl.sh; a user's own MUJOCO_GL wins).
    Mesa's software renderer and triton (pulled in by torch.compile / diffusers) each load their own LLVM;
    loading triton after Mesa's crashes the process (a segfault on `import diffusers` after a first
    render), while the other order works, so triton is loaded first where it is installed.
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        if importlib.util.find_spec("triton") is not None:
            import triton  # noqa: F401


def check_camera_options(
    obs_type: str,
    image_shape: tuple[int, int],
    cameras: tuple[str, ...],
    render_shape: tuple[int, int],
    known_cameras: tuple[str, ...] | list[str] | dict,
) -> None:
    """ValueError naming the option when a MuJoCo task's observation / camera kwargs are out of range:
    obs_type state | image, (height, width) within 8..480 x 8..640, cameras among the scene's."""
    if obs_type not in ("state", "image"):
        raise ValueError(f"unknown obs_type '{obs_type}'; expected 'state' or 'image'")
    for what, shape in (("image_shape", image_shape), ("render_shape", render_shape)):
        if len(shape) != 2 or not all(8 <= int(s) <= 480 for s in shape) or int(shape[1]) > 640:
            raise ValueError(f"{what} must be (height, width) within 8..480 x 8..640, got {shape}")
    if not cameras:
        raise ValueError("cameras must name at least one camera")
    unknown = [c for c in cameras if c not in known_cameras]
    if unknown:
        raise ValueError(f"unknown camera(s) {unknown}; the scene has {list(known_cameras)}")


@dataclass
class Rollout:
    """One closed-loop episode as the evaluator recorded it."""

    seed: int
    success: bool
    length: int
    rewards: np.ndarray  # (T,)
    actions: np.ndarray  # (T, action_dim)
    low_dim_obs: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T+1, ...) low-dim obs only
    frames: list[np.ndarray] | None = None  # RGB frames for video, when recorded
    predicted_chunks: list[tuple[int, np.ndarray]] | None = None  # (step, (N, action_dim)) for drawing

    @property
    def max_reward(self) -> float:
        return float(self.rewards.max()) if len(self.rewards) else 0.0


class Task:
    """A task: environment, observation/action spec, scripted expert and metrics.

    Environments return dict observations whose keys match `shape_meta()["obs"]`; low-dim values are
    float arrays, rgb values are uint8 (H, W, C). `info["is_success"]` says whether the task is solved.
    """

    name: str = ""
    max_episode_steps: int = 0
    # Control steps per second: the rate of the recorded frames (a LeRobot dataset's fps) and of the actions.
    # None: the task does not say (`diffpolicy collect --format lerobot` then refuses, naming it).
    fps: float | None = None
    # True when an action is an absolute target (a position, joint angles) that the robot may keep
    # tracking for several control steps. Only such tasks can run a policy trained on a subsampled dataset
    # (data.frame_stride > 1): the controller holds each action for frame_stride steps, which would move
    # k times as far with relative actions (velocities, deltas), so evaluation refuses those.
    absolute_actions: bool = False
    # LeRobot's robot_type for datasets of this task (e.g. "so101_follower"); None when it has no robot.
    robot_type: str | None = None

    def description(self) -> str:
        """One sentence saying what an episode of this task (as configured) does: the LeRobot task string
        of its recorded episodes (e.g. "grasp 2 objects and place them in the container"). Tasks whose
        constructor arguments change the goal should say so; the default is the task's name."""
        return self.name

    def shape_meta(self) -> dict[str, Any]:
        """{"obs": {key: {"shape": [...], "type": "low_dim" | "rgb"}}, "action": {"shape": [Da]}}."""
        raise NotImplementedError

    def make_env(self, render: bool = False) -> gym.Env:
        """A fresh environment; with render=True, `env.render()` returns an RGB frame for videos."""
        raise NotImplementedError

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        """Run the scripted expert once; returns per-step arrays (obs keys and "action") and success."""
        raise NotImplementedError

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """Task-specific metrics (and plots written into out_dir) beyond success rate and reward."""
        return {}

    def draw_chunk(self, frame: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """Draw a predicted action chunk onto a rendered frame (default: unchanged)."""
        return frame
