"""Config of the simulated SO-101 follower, registered as LeRobot robot type "so101_follower_sim"."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lerobot.robots import RobotConfig

ROBOT_TYPE = "so101_follower_sim"


@RobotConfig.register_subclass(ROBOT_TYPE)
@dataclass(kw_only=True)
class So101FollowerSimConfig(RobotConfig):
    """The simulated arm and its scene (diffpolicy's so101_grasp task).

    Not named `cameras`: RobotConfig.__post_init__ reads a robot config's `cameras` as a dict of real
    camera configs."""

    n_objects: int = 1  # objects to put into the container per episode (1-3)
    camera_names: list[str] = field(default_factory=lambda: ["top", "side"])  # of top, side, wrist; [] none
    image_height: int = 240
    image_width: int = 320
    # Also observe the objects' poses and the container's position (what a diffpolicy so101_grasp *state*
    # checkpoint observes; no real arm has it). lerobot-rollout passes only scalar observation features
    # whose names end in ".pos" / ".vel" to the policy, so they are named "<object>.<x|y|z|qw|qx|qy|qz>.pos"
    # and "container.<x|y|z>.pos" and come after the joints in observation.state.
    privileged_state: bool = False
    seed: int = 0  # episode k lays out the scene with seed + k (diffpolicy eval's seeds for the same task)
    max_episode_steps: int | None = None  # None: the task's 15 / 20 / 25 s at 30 Hz for 1 / 2 / 3 objects
    # A second get_observation() without an action in between, this long after the last send_action() of a
    # started episode, lays out the next episode: lerobot-rollout's reset phase (--dataset.reset_time_s)
    # observes without acting, so it must last longer than this.
    reset_idle_s: float = 1.0
    results_path: Path | None = None  # JSON lines, one per finished episode (also logged)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reset_idle_s <= 0:
            raise ValueError(f"robot.reset_idle_s must be > 0, got {self.reset_idle_s}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"robot.max_episode_steps must be >= 1, got {self.max_episode_steps}")
