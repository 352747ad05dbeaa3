"""LeRobot plugin: run diffpolicy checkpoints with `--policy.path` in lerobot-eval / lerobot-record /
lerobot-rollout. LeRobot imports this package at start-up (its name starts with `lerobot_policy_`);
importing it registers the "diffpolicy" policy type and the processor steps its checkpoints use."""

from .configuration_diffpolicy import DiffpolicyConfig
from .processor_diffpolicy import PushTKeypointsStep, make_diffpolicy_pre_post_processors

__all__ = ["DiffpolicyConfig", "PushTKeypointsStep", "make_diffpolicy_pre_post_processors"]
