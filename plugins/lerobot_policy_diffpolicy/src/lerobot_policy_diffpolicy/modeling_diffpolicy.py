"""A diffpolicy checkpoint as a LeRobot PreTrainedPolicy.

The checkpoint is loaded with `diffpolicy.policy.load_policy` (DDPM, flow and distilled policies alike)
and driven by `diffpolicy.control.RecedingHorizonController`, the code path `diffpolicy eval` uses: the
observation window of n_obs_steps (filled with the first observation at an episode start), a fresh chunk
every n_action_steps, optional temporal ensembling, and the checkpoint's sampler with its `eval.*` settings
(`diffpolicy.evaluation.configure_inference`). This class only renames: LeRobot batches
{feature: (B, ...) tensor, images float in [0, 1] (B, C, H, W)} become the checkpoint's keys, and actions
come back as a (B, action_dim) tensor.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy

from diffpolicy.control import RecedingHorizonController
from diffpolicy.evaluation import configure_inference
from diffpolicy.policy import load_policy

from .configuration_diffpolicy import POLICY_TYPE, DiffpolicyConfig, default_feature_map

# DiffpolicyConfig field -> the checkpoint's EvalConfig field it overrides (None keeps the checkpoint's).
_EVAL_OVERRIDES = (
    "n_action_steps",
    "temporal_ensemble",
    "ensemble_decay",
    "sampler",
    "num_inference_steps",
    "timestep_spacing",
    "noise_scale",
)


class DiffpolicyPolicy(PreTrainedPolicy):
    """Runs a diffpolicy checkpoint folder under LeRobot's policy interface (inference only)."""

    config_class = DiffpolicyConfig
    name = POLICY_TYPE

    def __init__(self, config: DiffpolicyConfig, checkpoint: str | Path | None = None, **_: Any) -> None:
        super().__init__(config)
        path = checkpoint if checkpoint is not None else config.pretrained_path
        if path is None:
            raise ValueError(
                "a diffpolicy policy is loaded from a checkpoint folder (--policy.path=DIR, after "
                "`diffpolicy-lerobot-export DIR`); diffpolicy policies are trained with `diffpolicy train`"
            )
        self.checkpoint = Path(path)
        self.model, self.run_cfg = load_policy(self.checkpoint, device=config.device or "cpu")
        self.eval_cfg = replace(
            self.run_cfg.eval,
            **{k: getattr(config, k) for k in _EVAL_OVERRIDES if getattr(config, k) is not None},
        )
        configure_inference(self.model, self.eval_cfg)
        obs_meta = self.model.shape_meta["obs"]
        self.feature_map = config.feature_map or default_feature_map(self.model.shape_meta, config.task)
        unmapped = sorted(set(obs_meta) - set(self.feature_map))
        if unmapped:
            raise ValueError(
                f"policy.feature_map lacks the checkpoint's observation keys {unmapped} "
                f"(it maps {sorted(self.feature_map)}; the checkpoint observes {sorted(obs_meta)})"
            )
        self._controller: RecedingHorizonController | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | Path,
        *,
        config: DiffpolicyConfig | None = None,
        **kwargs: Any,
    ) -> DiffpolicyPolicy:
        """Load the checkpoint folder (LeRobot's factory calls this with the parsed config; the async
        policy server calls it with the path alone)."""
        path = Path(pretrained_name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is not a folder: a diffpolicy policy loads from a local checkpoint folder"
            )
        if config is None:
            config = PreTrainedConfig.from_pretrained(path)
            if not isinstance(config, DiffpolicyConfig):
                raise ValueError(f"{path}/config.json describes a '{config.type}' policy, not 'diffpolicy'")
        policy = cls(config, checkpoint=path)
        policy.to(config.device)
        policy.eval()
        return policy

    # ------------------------------------------------------------------------------------------ control
    @property
    def controller(self) -> RecedingHorizonController:
        """Built on first use, on the device the policy has been moved to by then (LeRobot's factory calls
        `.to(device)` after construction), so the sampling generator lives there too."""
        if self._controller is None:
            generator = None
            if self.config.seed is not None:
                generator = torch.Generator(device=self.model.device).manual_seed(self.config.seed)
            self._controller = RecedingHorizonController(
                self.model,
                n_action_steps=self.eval_cfg.n_action_steps,
                temporal_ensemble=self.eval_cfg.temporal_ensemble,
                ensemble_decay=self.eval_cfg.ensemble_decay,
                generator=generator,
            )
        return self._controller

    def reset(self) -> None:
        """Forget the observation history and the queued chunk (LeRobot calls it at every episode start)."""
        self.controller.reset()

    def checkpoint_obs(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """LeRobot batch -> {checkpoint key: (B, ...) numpy}, the controller's input.

        Cameras: LeRobot's float frames in [0, 1], (B, C, H, W), go back to the uint8 (B, H, W, C) they were
        rendered as (rounded, so a frame of uint8 origin is restored exactly); uint8 tensors are only
        transposed. Low-dim features are split in the checkpoint's key order when several keys share one."""
        obs_meta = self.model.shape_meta["obs"]
        offsets: dict[str, int] = {}
        widths: dict[str, int] = {}
        out: dict[str, np.ndarray] = {}
        for key, meta in obs_meta.items():
            feature = self.feature_map[key]
            if feature not in batch:
                provided = sorted(k for k in batch if k.startswith("observation"))
                raise KeyError(
                    f"the checkpoint's '{key}' comes from LeRobot feature '{feature}', which the observation "
                    f"lacks (it has {provided}); set --rename_map or policy.feature_map"
                )
            value = torch.as_tensor(batch[feature]).detach()
            if meta.get("type", "low_dim") == "rgb":
                if value.ndim != 4:
                    raise ValueError(
                        f"camera '{feature}' has shape {tuple(value.shape)}; expected (B, C, H, W)"
                    )
                if value.dtype != torch.uint8:
                    value = (value.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
                out[key] = value.permute(0, 2, 3, 1).cpu().numpy()
                continue
            size = int(np.prod(meta["shape"]))
            flat = value.reshape(value.shape[0], -1).float()
            start = offsets.get(feature, 0)
            if start + size > flat.shape[1]:
                raise ValueError(
                    f"'{feature}' has {flat.shape[1]} values; the checkpoint takes {start + size} from it "
                    f"(keys {[k for k in obs_meta if self.feature_map[k] == feature]})"
                )
            offsets[feature] = start + size
            widths[feature] = flat.shape[1]
            out[key] = flat[:, start : start + size].reshape(-1, *meta["shape"]).cpu().numpy()
        for feature, used in offsets.items():
            if used != widths[feature]:
                raise ValueError(
                    f"'{feature}' has {widths[feature]} values but the checkpoint uses {used} of them: the "
                    "feature does not match the checkpoint's observation"
                )
        return out

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **_: Any) -> torch.Tensor:
        """One action per environment, (B, action_dim): the controller's `act` (a fresh chunk every
        n_action_steps, the queued ones in between)."""
        action = self.controller.act(self.checkpoint_obs(batch))
        return torch.from_numpy(np.asarray(action, dtype=np.float32)).to(self.model.device)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], **_: Any) -> torch.Tensor:
        """A fresh chunk's executable part, (B, horizon - n_obs_steps + 1, action_dim), from the observation
        window after adding `batch` (for callers that queue chunks themselves: LeRobot's async server)."""
        chunk = self.controller.fresh_chunk(self.checkpoint_obs(batch))
        return torch.from_numpy(np.asarray(chunk, dtype=np.float32)).to(self.model.device)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict | None]:
        raise NotImplementedError(
            "lerobot-train does not train diffpolicy policies: train with `diffpolicy train` (it reads "
            "LeRobot datasets directly, data.path=<dataset folder>) and evaluate the checkpoint here"
        )

    def get_optim_params(self) -> dict:
        return {"params": list(self.parameters())}
