"""LeRobot robot plugin: a simulated SO-101 follower (`--robot.type=so101_follower_sim`).

Imported by LeRobot at start-up (distribution name prefix `lerobot_robot_`); LeRobot finds the robot class
from the config class name (So101FollowerSimConfig -> So101FollowerSim, `make_device_from_device_class`)."""

from .config_so101_follower_sim import ROBOT_TYPE, So101FollowerSimConfig
from .so101_follower_sim import EpisodeOutcome, So101FollowerSim, joint_features, privileged_features

__all__ = [
    "ROBOT_TYPE",
    "EpisodeOutcome",
    "So101FollowerSim",
    "So101FollowerSimConfig",
    "joint_features",
    "privileged_features",
]
