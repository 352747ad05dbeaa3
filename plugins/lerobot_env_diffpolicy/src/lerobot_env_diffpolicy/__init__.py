"""LeRobot env plugin: diffpolicy's simulated tasks as `--env.type=diffpolicy_pusht | diffpolicy_so101_grasp`.

Imported by LeRobot at start-up (distribution name prefix `lerobot_env_`); importing registers the env
configs and the gym env they make."""

from .configs import DiffpolicyEnvConfig, DiffpolicyPushtEnv, DiffpolicySo101GraspEnv
from .gym_env import GYM_ID, LeRobotTaskEnv, register

register()

__all__ = ["GYM_ID", "DiffpolicyEnvConfig", "DiffpolicyPushtEnv", "DiffpolicySo101GraspEnv", "LeRobotTaskEnv"]
