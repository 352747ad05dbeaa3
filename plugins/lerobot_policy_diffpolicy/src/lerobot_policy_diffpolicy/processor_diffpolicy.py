"""Pre/post-processors of a diffpolicy checkpoint in LeRobot: no normalizer on either side.

A diffpolicy checkpoint normalizes inside its own policy (its fitted normalizer is part of
model.safetensors), so LeRobot's normalizer steps would normalize twice: the pipelines hold only LeRobot's
bookkeeping steps (rename, batch, device; `lerobot-eval`, `lerobot-record` and the async server pass
overrides to the rename and device steps by name, so both must be there), plus, for Push-T state
checkpoints, `PushTKeypointsStep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.processor import (
    AddBatchDimensionProcessorStep,
    DeviceProcessorStep,
    ObservationProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStepRegistry,
    RenameObservationsProcessorStep,
)
from lerobot.processor.factory import make_policy_processor_pipelines
from lerobot.utils.constants import OBS_ENV_STATE

from .configuration_diffpolicy import DiffpolicyConfig

N_GYM_PUSHT_CORNERS = 8  # gym-pusht's environment_state: the T's two rectangles, 4 corners each


@cache
def _pusht_geometry() -> tuple[np.ndarray, np.ndarray]:
    """(gym-pusht's 8 T corners, our 9 keypoints), both in the block's body frame (float64).

    The corners come from gym-pusht's own `add_tee` / `get_keypoints` on a T placed at the origin, so they
    follow its geometry rather than a copy of it."""
    import pymunk
    from gym_pusht.envs.pusht import PushTEnv

    from diffpolicy.tasks.pusht import BLOCK_KEYPOINTS_LOCAL

    _, shapes = PushTEnv.add_tee(pymunk.Space(), (0.0, 0.0), 0.0)
    corners = np.asarray(PushTEnv.get_keypoints(shapes), dtype=np.float64)
    return corners, np.asarray(BLOCK_KEYPOINTS_LOCAL, dtype=np.float64)


def pusht_corners_to_keypoints(corners: torch.Tensor) -> torch.Tensor:
    """gym-pusht's environment_state (B, 16): the T's 8 corners in workspace pixels -> our Push-T state
    observation `keypoint`, (B, 18): the 9 keypoints of the original Diffusion Policy dataset, flattened.

    Both are fixed points of the rigid block, so the block pose (x, y, angle) is fitted to the corners by
    least squares and the keypoints placed at that pose. The 2-D rigid fit has a closed form (the angle of
    sum l' x w' against sum l' . w' over centred points) that is written here rather than pulled from a
    library for a few lines."""
    local, keypoints = _pusht_geometry()
    w = corners.detach().to("cpu", torch.float64).numpy().reshape(-1, N_GYM_PUSHT_CORNERS, 2)
    lc = local - local.mean(0)
    wc = w - w.mean(1, keepdims=True)
    cross = (lc[None, :, 0] * wc[..., 1] - lc[None, :, 1] * wc[..., 0]).sum(1)
    dot = (lc[None, :, 0] * wc[..., 0] + lc[None, :, 1] * wc[..., 1]).sum(1)
    angle = np.arctan2(cross, dot)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (B, 2, 2)
    shift = w.mean(1) - np.einsum("bij,j->bi", rot, local.mean(0))
    out = np.einsum("bij,kj->bki", rot, keypoints) + shift[:, None, :]
    return torch.from_numpy(out.reshape(len(w), -1)).to(corners.device, torch.float32)


@ProcessorStepRegistry.register(name="diffpolicy_pusht_keypoints")
@dataclass
class PushTKeypointsStep(ObservationProcessorStep):
    """Push-T state: LeRobot's gym-pusht gives the block as 8 corners (observation.environment_state, 16
    values); a diffpolicy Push-T state checkpoint observes the block as 9 keypoints (18 values). Converts
    the former into the latter (an exact function of the block pose); 18 values pass through unchanged
    (an env that already gives our keypoints). Anything else is an error naming the shapes."""

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        if OBS_ENV_STATE not in observation:
            raise KeyError(
                f"a Push-T state checkpoint needs '{OBS_ENV_STATE}' (the block); got {sorted(observation)}. "
                "With LeRobot's Push-T pass --env.obs_type=environment_state_agent_pos"
            )
        value = observation[OBS_ENV_STATE]
        size = value.shape[-1]
        if size == 2 * N_GYM_PUSHT_CORNERS:
            observation[OBS_ENV_STATE] = pusht_corners_to_keypoints(value)
        elif size != 2 * len(_pusht_geometry()[1]):
            raise ValueError(
                f"'{OBS_ENV_STATE}' has {size} values; a Push-T state checkpoint takes gym-pusht's 8 T "
                "corners (16) or its own 9 keypoints (18)"
            )
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        obs = features.get(PipelineFeatureType.OBSERVATION, {})
        if OBS_ENV_STATE in obs:
            obs[OBS_ENV_STATE] = PolicyFeature(type=FeatureType.ENV, shape=(2 * len(_pusht_geometry()[1]),))
        return features


def needs_pusht_keypoints(config: DiffpolicyConfig) -> bool:
    """A Push-T state checkpoint (its `keypoint` observation comes from observation.environment_state)."""
    return config.task == "pusht" and config.feature_map.get("keypoint") == OBS_ENV_STATE


def make_diffpolicy_pre_post_processors(
    config: DiffpolicyConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """Rename -> batch -> [Push-T keypoints] -> device; device(cpu). `dataset_stats` is ignored: the
    checkpoint normalizes with its own statistics."""
    steps: list[Any] = [RenameObservationsProcessorStep(rename_map={}), AddBatchDimensionProcessorStep()]
    if needs_pusht_keypoints(config):
        steps.append(PushTKeypointsStep())
    steps.append(DeviceProcessorStep(device=config.device))
    return make_policy_processor_pipelines(
        input_steps=steps, output_steps=[DeviceProcessorStep(device="cpu")]
    )
