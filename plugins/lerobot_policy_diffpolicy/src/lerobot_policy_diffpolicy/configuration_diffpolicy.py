"""LeRobot policy config for a diffpolicy checkpoint folder, registered under the type "diffpolicy".

LeRobot finds a policy from `--policy.path=DIR` by reading DIR/config.json and its "type" field
(`PreTrainedConfig.from_pretrained`), then the policy class and processors by naming convention from the
config's module (`configuration_diffpolicy` -> `modeling_diffpolicy.DiffpolicyPolicy`,
`processor_diffpolicy.make_diffpolicy_pre_post_processors`, see lerobot/policies/factory.py). A diffpolicy
checkpoint folder holds config.yaml + model.safetensors, so `diffpolicy-lerobot-export DIR` (export.py)
writes that config.json and the two processor files beside them once; everything else (network, sampler,
n_obs_steps, normalizer) is read from the checkpoint itself at load time.

The fields here are inference settings in the spirit of `diffpolicy eval`'s `eval.*` overrides; None keeps
the checkpoint's own value, e.g. `--policy.sampler=ddim --policy.num_inference_steps=10`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lerobot.configs import PreTrainedConfig
from lerobot.optim import AdamWConfig
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGE, OBS_IMAGES, OBS_STATE

from diffpolicy.data.formats.lerobot import key_to_feature

POLICY_TYPE = "diffpolicy"

# Our native tasks whose observation keys have a LeRobot counterpart other than the generic rule below.
# Push-T: LeRobot's gym-pusht env (`--env.type=pusht`) gives the agent position as observation.state, the
# block as observation.environment_state (gym-pusht's 8 T corners; processor_diffpolicy turns them into our
# 9 keypoints) and the 96x96 camera as observation.image.
# SO-101 grasp: the joint positions are observation.state (as a real so101_follower's); a state
# checkpoint's privileged object poses and container position are observation.environment_state,
# concatenated in that order (the env plugin lerobot_env_diffpolicy builds it from this same table).
TASK_FEATURES: dict[str, dict[str, str]] = {
    "pusht": {"agent_pos": OBS_STATE, "keypoint": OBS_ENV_STATE, "img": OBS_IMAGE},
    "so101_grasp": {"state": OBS_STATE, "object_pose": OBS_ENV_STATE, "container_pos": OBS_ENV_STATE},
}


def default_feature_map(shape_meta: dict[str, Any], task_name: str | None) -> dict[str, str]:
    """Checkpoint observation key -> LeRobot feature name, from the checkpoint's metadata.

    A task listed in TASK_FEATURES uses its table. Otherwise a key maps through the LeRobot dataset
    importer's naming (`diffpolicy.data.formats.lerobot.key_to_feature`: a checkpoint trained on a
    LeRobot dataset gets its features back) when that gives a standard LeRobot name; any other low-dim key
    goes into observation.state, several of them concatenated in the checkpoint's key order."""
    table = TASK_FEATURES.get(task_name or "", {})
    out = {}
    for key, meta in shape_meta["obs"].items():
        rgb = meta.get("type", "low_dim") == "rgb"
        if key in table:
            out[key] = table[key]
            continue
        name = key_to_feature(key, is_image=rgb)
        standard = name in (OBS_STATE, OBS_ENV_STATE, OBS_IMAGE) or name.startswith(OBS_IMAGES + ".")
        out[key] = name if standard or rgb else OBS_STATE
    return out


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class DiffpolicyConfig(PreTrainedConfig):
    """A diffpolicy checkpoint seen by LeRobot. n_obs_steps and the features are copied from the
    checkpoint by the export (informational: the checkpoint's own values are used at load time)."""

    # Actions executed per chunk (receding horizon); None: the checkpoint's eval.n_action_steps, else its
    # policy.n_action_steps.
    n_action_steps: int | None = None
    temporal_ensemble: bool | None = None  # None: the checkpoint's eval.temporal_ensemble
    ensemble_decay: float | None = None
    sampler: str | None = None  # e.g. "ddim"; None: the checkpoint's sampler
    num_inference_steps: int | None = None
    timestep_spacing: str | None = None
    noise_scale: float | None = None
    # Seed of the policy's own sampling generator, seeded once when the policy is built (as `diffpolicy
    # eval` seeds it once with eval.seed); None: torch's global RNG, which lerobot-eval seeds with --seed.
    seed: int | None = None
    # Checkpoint observation key -> LeRobot feature (default_feature_map); keys sharing a feature are
    # concatenated, flattened, in the checkpoint's key order.
    feature_map: dict[str, str] = field(default_factory=dict)
    # The diffpolicy task the checkpoint was trained on (informational; selects processor steps).
    task: str | None = None
    push_to_hub: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ValueError(f"policy.n_action_steps must be >= 1, got {self.n_action_steps}")

    @property
    def observation_delta_indices(self) -> list[int]:
        return list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> None:
        return None  # training happens in diffpolicy (`diffpolicy train`), not in lerobot-train

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        # Required by the base class; lerobot-train is not supported (DiffpolicyPolicy.forward says so).
        return AdamWConfig(lr=1e-4)

    def get_scheduler_preset(self) -> None:
        return None

    def validate_features(self) -> None:
        if self.output_features and ACTION not in self.output_features:
            raise ValueError(
                f"a diffpolicy checkpoint outputs '{ACTION}'; got {sorted(self.output_features)}"
            )
