"""A simulated SO-101 follower arm behind LeRobot's Robot interface (robot type "so101_follower_sim").

The arm is diffpolicy's so101_grasp scene (MuJoCo): the same joint names and units as LeRobot's
`so101_follower` with `use_degrees=True` (`shoulder_pan.pos` ... `wrist_roll.pos` in degrees,
`gripper.pos` 0 closed .. 100 open), cameras as H x W x 3 uint8 frames, so `lerobot-rollout` (and anything
else that drives a LeRobot Robot) runs a policy on it as on the real arm.

Time: every send_action() is one 30 Hz control step of the simulation (the position servos move towards
the targets for 1/30 s); get_observation() reads the current state and renders the cameras. A real arm
keeps moving while the policy thinks; this one waits, so a slow policy sees the same episode as a fast one.

Episodes: LeRobot's recording loops end an episode by wall-clock time (--dataset.episode_time_s) and then
run a reset phase that sends no action (--dataset.reset_time_s); a robot is not told either. This one:
- lays out episode k with seed `seed + k` (objects, container) at connect() and, once an episode has
  started, on the second get_observation() without a send_action() in between that comes more than
  `reset_idle_s` after the last send_action() (the reset phase: the recording loops observe once per
  action, the reset loop observes on and on), the arm at the task's home pose;
- decides each episode's outcome as diffpolicy's evaluator does: success as soon as every object rests in
  the container (touching neither jaw), failure when the task's step limit passes first (or when the next
  episode starts before either, i.e. episode_time_s was too short for the limit at this machine's speed:
  logged as a warning). The arm keeps obeying actions after the outcome is decided;
- logs each outcome and the running success rate (logger "lerobot_robot_so101sim"), and appends it to
  `results_path` (JSON lines) when one is given; `outcomes` holds them too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from lerobot.robots import Robot

from diffpolicy.tasks.so101_grasp import (
    JOINTS,
    OBJECTS,
    So101GraspEnv,
    So101GraspTask,
    episode_steps,
)

from .config_so101_follower_sim import ROBOT_TYPE, So101FollowerSimConfig

logger = logging.getLogger("lerobot_robot_so101sim")

POSE_COORDS = ("x", "y", "z", "qw", "qx", "qy", "qz")
CONTAINER_COORDS = ("x", "y", "z")


@dataclass
class EpisodeOutcome:
    """One episode's result as the simulated robot saw it."""

    episode: int
    seed: int
    success: bool
    n_placed: int
    n_objects: int
    steps: int  # control steps (send_action calls) when the outcome was decided
    reason: str  # "success" | "step_limit" | "cut_short" (the next episode started first)


def joint_features() -> list[str]:
    return [f"{joint}.pos" for joint in JOINTS]


def privileged_features() -> list[str]:
    """Scalar names of the objects' poses and the container's position, in the order of diffpolicy's
    so101_grasp state observation (object_pose: bowl, eraser, tape, 7 each; then container_pos)."""
    names = [f"{obj.name}.{c}.pos" for obj in OBJECTS for c in POSE_COORDS]
    return names + [f"container.{c}.pos" for c in CONTAINER_COORDS]


class So101FollowerSim(Robot):
    """The so101_grasp scene as a LeRobot Robot (see the module docstring for time and episodes)."""

    config_class = So101FollowerSimConfig
    name = ROBOT_TYPE

    def __init__(self, config: So101FollowerSimConfig) -> None:
        super().__init__(config)
        self.config = config
        names = list(config.camera_names)
        shape = [config.image_height, config.image_width]
        # the task's own checks name a bad n_objects, camera or image size
        So101GraspTask(
            n_objects=config.n_objects,
            obs_type="image" if names else "state",
            cameras=names or ("top",),
            image_shape=shape,
        )
        self.image_shape = (int(config.image_height), int(config.image_width))
        self.cameras: dict[str, tuple[int, int, int]] = {c: (*self.image_shape, 3) for c in names}
        self.max_episode_steps = int(config.max_episode_steps or episode_steps(config.n_objects))
        self.env: So101GraspEnv | None = None
        self.outcomes: list[EpisodeOutcome] = []
        self.episode = -1
        self._steps = 0
        self._decided = False
        self._last_action_t: float | None = None
        self._obs_since_action = 0
        self._target = np.zeros(len(JOINTS))

    # ------------------------------------------------------------------------------------------ features
    @property
    def observation_features(self) -> dict[str, Any]:
        features: dict[str, Any] = dict.fromkeys(joint_features(), float)
        if self.config.privileged_state:
            features.update(dict.fromkeys(privileged_features(), float))
        features.update(self.cameras)
        return features

    @property
    def action_features(self) -> dict[str, type]:
        return dict.fromkeys(joint_features(), float)

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def is_connected(self) -> bool:
        return self.env is not None

    @property
    def is_calibrated(self) -> bool:
        return True  # the simulation's joint zeros are LeRobot's calibrated zeros

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def connect(self, calibrate: bool = True) -> None:
        if self.env is not None:
            raise RuntimeError(f"{self} is already connected")
        names = tuple(self.cameras) or ("top",)
        self.env = So101GraspEnv(
            n_objects=self.config.n_objects,
            obs_type="state",  # cameras are rendered in get_observation only
            cameras=names,
            image_shape=self.image_shape,
            terminate_on_success=False,
        )
        self.new_episode()

    def disconnect(self) -> None:
        if self.env is None:
            return
        self._finish(cut_short=True)
        n = len(self.outcomes)
        if n:
            wins = sum(o.success for o in self.outcomes)
            logger.info("%s: %d/%d episodes succeeded (%.1f%%)", self.name, wins, n, 100.0 * wins / n)
        self.env.close()
        self.env = None

    # ------------------------------------------------------------------------------------------ episodes
    def new_episode(self) -> None:
        """Decide the current episode (if it started) and lay out the next one, the arm at home."""
        env = self._require_env()
        self._finish(cut_short=True)
        self.episode += 1
        env.reset(seed=self.config.seed + self.episode)
        self._target = env.joint_positions()
        self._steps = 0
        self._decided = False
        self._last_action_t = None
        logger.info(
            "%s: episode %d laid out with seed %d", self.name, self.episode, self.config.seed + self.episode
        )

    def _finish(self, cut_short: bool) -> None:
        """Record the current episode's outcome if it has not been decided (and has started)."""
        if self._decided or self._steps == 0 or self.env is None:
            return
        placed = self.env.n_placed()
        n = len(self.env.layout.present)
        if placed == n:
            reason = "success"
        elif cut_short:
            reason = "cut_short"
            logger.warning(
                "%s: episode %d ended after %d of its %d steps before succeeding: it counts as a failure "
                "(raise --dataset.episode_time_s to give the policy the task's whole time limit)",
                self.name,
                self.episode,
                self._steps,
                self.max_episode_steps,
            )
        else:
            reason = "step_limit"
        outcome = EpisodeOutcome(
            episode=self.episode,
            seed=self.config.seed + self.episode,
            success=placed == n,
            n_placed=int(placed),
            n_objects=n,
            steps=self._steps,
            reason=reason,
        )
        self._decided = True
        self.outcomes.append(outcome)
        wins = sum(o.success for o in self.outcomes)
        logger.info(
            "%s: episode %d (seed %d) %s after %d steps, %d/%d placed; success so far %d/%d (%.1f%%)",
            self.name,
            outcome.episode,
            outcome.seed,
            "SUCCESS" if outcome.success else "failure",
            outcome.steps,
            outcome.n_placed,
            n,
            wins,
            len(self.outcomes),
            100.0 * wins / len(self.outcomes),
        )
        if self.config.results_path is not None:
            with open(self.config.results_path, "a") as f:
                f.write(json.dumps(asdict(outcome)) + "\n")

    @property
    def success_rate(self) -> float | None:
        """Fraction of decided episodes that succeeded (None before the first)."""
        return sum(o.success for o in self.outcomes) / len(self.outcomes) if self.outcomes else None

    # ------------------------------------------------------------------------------------------ I/O
    def _require_env(self) -> So101GraspEnv:
        if self.env is None:
            raise RuntimeError(f"{self} is not connected: call connect() first")
        return self.env

    def get_observation(self) -> dict[str, Any]:
        """Joint positions (so101_follower units), [privileged state], camera frames (H, W, 3) uint8.

        Lays out the next episode first when the reset phase has passed (see the module docstring)."""
        env = self._require_env()
        last = self._last_action_t
        self._obs_since_action += 1
        # the second observation without an action in between, long after the last one: the reset phase (a
        # policy step observes once per action, so a stall inside an episode cannot look like it)
        if (
            last is not None
            and self._obs_since_action >= 2
            and time.perf_counter() - last > self.config.reset_idle_s
        ):
            self.new_episode()
        obs: dict[str, Any] = dict(zip(joint_features(), map(float, env.joint_positions()), strict=True))
        if self.config.privileged_state:
            values = [
                env.object_pose(i) if i in env.layout.present else np.zeros(7) for i in range(len(OBJECTS))
            ]
            values.append(env.container_pos())
            flat = np.concatenate(values).astype(np.float32)  # as the task's float32 observation
            obs.update(zip(privileged_features(), map(float, flat), strict=True))
        for camera in self.cameras:
            obs[camera] = env.render_camera(camera, self.image_shape)
        return obs

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        """Set the joints' position targets (any subset of `<joint>.pos`; the others keep theirs) and run one
        control step. Privileged `.pos` names are ignored (lerobot-rollout sends every `.pos` observation
        back when it returns the arm to its start pose). Returns the joint targets sent."""
        env = self._require_env()
        names = joint_features()
        unknown = sorted(set(action) - set(names) - set(privileged_features()))
        if unknown:
            raise ValueError(f"{self.name} has no action(s) {unknown}; its actions are {names}")
        for i, name in enumerate(names):
            if name in action:
                value = float(action[name])
                if not np.isfinite(value):
                    raise ValueError(f"{self.name} received a non-finite {name}: {value}")
                self._target[i] = value
        env.apply(self._target)
        self._steps += 1
        self._last_action_t = time.perf_counter()
        self._obs_since_action = 0
        done = env.n_placed() == len(env.layout.present) or self._steps >= self.max_episode_steps
        if done and not self._decided:
            self._finish(cut_short=False)
        return dict(zip(names, map(float, self._target), strict=True))
