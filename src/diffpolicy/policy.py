"""Policies: Diffusion Policy and an MSE behaviour-cloning baseline that shares its networks.

Both take observation windows `{key: (B, n_obs_steps, *shape)}` (images float in [0, 1], (C, H, W)) and
return action chunks in the environment's units. Inside, everything is normalized to [-1, 1]:

    normalize -> ObsEncoder (once per chunk) -> condition -> noise network -> sampler -> unnormalize

Training uses the DDPM forward process from `diffusers`; inference uses DDPM or DDIM from `diffusers`
with a configurable number of steps, or, for consistency-distilled policies (`diffpolicy distill`),
diffusers' LCMScheduler with 1-3 steps. Nothing about the samplers is re-implemented here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from torch import Generator, Tensor, nn

from diffpolicy.checkpoint import CheckpointError, load_weights, read_config
from diffpolicy.config import (
    COMPILE_MODES,
    FLOW_SAMPLERS,
    PRECISIONS,
    TIMESTEP_SPACINGS,
    ConsistencyConfig,
    NoiseSchedulerConfig,
    PolicyConfig,
    RunConfig,
    TrainConfig,
)
from diffpolicy.data.normalize import Normalizer
from diffpolicy.data.sequence import features_key
from diffpolicy.models.vision import ObsEncoder


class NonFiniteActionError(RuntimeError):
    """The policy produced NaN/inf actions; they must never reach an environment."""


# NoiseSchedulerConfig fields every diffusers scheduler takes, under the same names
SCHEDULER_FIELDS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "clip_sample",
    "prediction_type",
)


class ObservationMismatch(ValueError):
    """An observation's keys, shapes, types or values do not match what the checkpoint was trained on."""


def check_observation_shapes(obs: dict[str, Any], obs_meta: dict[str, Any], n_obs_steps: int) -> int:
    """Check that every policy key is there with shape (B, >= n_obs_steps, *shape) and one B for all
    keys (numpy arrays or tensors); returns B, or raises ObservationMismatch naming the key."""
    missing = [k for k in obs_meta if k not in obs]
    if missing:
        expected = {k: ["B", f">={n_obs_steps}", *obs_meta[k]["shape"]] for k in missing}
        raise ObservationMismatch(
            f"observation lacks key(s) {missing} (expected shapes {expected}); got keys {sorted(obs)}"
        )
    batch = None
    for key, meta in obs_meta.items():
        a = obs[key]
        shape = tuple(meta["shape"])
        want = f"(B, >= {n_obs_steps}, {', '.join(map(str, shape))})"
        if a.ndim != 2 + len(shape) or tuple(a.shape[2:]) != shape or a.shape[1] < n_obs_steps:
            raise ObservationMismatch(
                f"observation '{key}' has shape {tuple(a.shape)}, expected {want} (batch, time steps, ...)"
            )
        if batch is None:
            batch = a.shape[0]
        elif a.shape[0] != batch:
            raise ObservationMismatch(f"observation '{key}' has batch size {a.shape[0]}, other keys {batch}")
    if not batch:
        raise ObservationMismatch("observation batch is empty")
    return batch


def check_camera_range(obs: dict[str, Any], obs_meta: dict[str, Any]) -> None:
    """Check that camera frames (numpy arrays or tensors) are floats in [0, 1], as the policy takes them;
    raises ObservationMismatch naming the key and the range found."""
    for key, meta in obs_meta.items():
        if meta.get("type", "low_dim") == "rgb":
            lo, hi = float(obs[key].min()), float(obs[key].max())
            if lo < 0.0 or hi > 1.0 + 1e-3:
                raise ObservationMismatch(
                    f"camera observation '{key}' has values in [{lo:.4g}, {hi:.4g}]; the policy takes "
                    "float frames in [0, 1] (divide 0..255 frames by 255)"
                )


def make_scheduler(
    cfg: NoiseSchedulerConfig, sampler: str | None = None, consistency: ConsistencyConfig | None = None
) -> DDPMScheduler | DDIMScheduler | LCMScheduler:
    """The diffusers scheduler for `sampler`: "ddpm" (training and DDPM sampling), "ddim", or "consistency"
    (LCMScheduler over the distillation grid of `consistency`, which fixes its own timesteps)."""
    common = {name: getattr(cfg, name) for name in SCHEDULER_FIELDS}
    sampler = sampler or cfg.sampler
    if sampler == "consistency":
        consistency = consistency or ConsistencyConfig()
        return LCMScheduler(
            **common,
            original_inference_steps=consistency.original_inference_steps,
            timestep_scaling=consistency.timestep_scaling,
            set_alpha_to_one=True,
            steps_offset=0,
        )
    spacing = cfg.timestep_spacing
    if sampler == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    return DDPMScheduler(**common, variance_type="fixed_small", timestep_spacing=spacing)


def normalizer_spec(shape_meta: dict[str, Any], overrides: dict[str, str]) -> dict[str, tuple[str, int]]:
    """key -> (mode, feature_dim): minmax for low-dim keys and the action, image for cameras."""
    spec: dict[str, tuple[str, int]] = {}
    for key, meta in shape_meta["obs"].items():
        default = "image" if meta.get("type") == "rgb" else "minmax"
        # low-dim keys are normalized per flattened feature (e.g. Push-T's 9 x 2 keypoints -> 18)
        spec[key] = (overrides.get(key, default), math.prod(meta["shape"]) if default == "minmax" else 1)
    spec["action"] = (overrides.get("action", "minmax"), int(shape_meta["action"]["shape"][0]))
    return spec


def build_noise_net(cfg: PolicyConfig, action_dim: int, obs_feature_dim: int) -> nn.Module:
    """The noise network for `cfg.net`, wired for global (default) or inpainting conditioning."""
    inpaint = not cfg.obs_as_global_cond
    traj_dim = action_dim + obs_feature_dim if inpaint else action_dim
    if cfg.net == "unet":
        from diffpolicy.models.unet1d import ConditionalUnet1D

        u = cfg.unet
        return ConditionalUnet1D(
            input_dim=traj_dim,
            global_cond_dim=None if inpaint else obs_feature_dim * cfg.n_obs_steps,
            diffusion_step_embed_dim=u.diffusion_step_embed_dim,
            down_dims=tuple(u.down_dims),
            kernel_size=u.kernel_size,
            n_groups=u.n_groups,
            cond_predict_scale=u.cond_predict_scale,
            stop_time_embed=cfg.type == "consistency" and cfg.consistency.ctm,
        )
    if cfg.type == "consistency" and cfg.consistency.ctm:
        raise ValueError("a CTM student (policy.consistency.ctm) needs policy.net=unet")
    from diffpolicy.models.transformer import TransformerForDiffusion

    t = cfg.transformer
    return TransformerForDiffusion(
        input_dim=traj_dim,
        output_dim=traj_dim,
        horizon=cfg.horizon,
        n_obs_steps=0 if inpaint else cfg.n_obs_steps,
        cond_dim=0 if inpaint else obs_feature_dim,
        n_layer=t.n_layer,
        n_head=t.n_head,
        n_emb=t.n_emb,
        p_drop_emb=t.p_drop_emb,
        p_drop_attn=t.p_drop_attn,
        causal_attn=t.causal_attn,
        n_cond_layers=t.n_cond_layers,
    )


class BasePolicy(nn.Module):
    """What every policy shares: normalizer, observation encoder, noise network, checkpoint I/O."""

    def __init__(self, cfg: PolicyConfig, shape_meta: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape_meta = shape_meta
        self.action_dim = int(shape_meta["action"]["shape"][0])
        self.horizon = cfg.horizon
        self.n_obs_steps = cfg.n_obs_steps
        # Control steps per policy step (data.frame_stride of the run): a policy trained on every k-th frame
        # acts at the data's rate / k, and controllers hold each of its actions for k steps. Set by the
        # trainer and load_policy from the run's config (not a weight).
        self.frame_stride = 1
        self.n_action_steps = cfg.n_action_steps
        self.normalizer = Normalizer(normalizer_spec(shape_meta, cfg.normalization))
        self.obs_encoder = ObsEncoder(shape_meta["obs"], cfg.vision)
        self.net = build_noise_net(cfg, self.action_dim, self.obs_encoder.output_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def default_stop(self) -> int | None:
        """The stop time `call_net` uses when given none: None (a network without a stop-time input)."""
        return None

    # ----- conditioning -------------------------------------------------------------------------
    def encode_obs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalize and encode the last n_obs_steps observations: (B, To, F).

        A camera key may come as its cached backbone feature maps instead (`obs[features_key(key)]`,
        (B, T, C', h, w), policy.vision.cache_features in training): those skip the normalizer and the
        backbone."""
        window, features = {}, {}
        for key in self.shape_meta["obs"]:
            if key not in obs and features_key(key) in obs:
                features[key] = obs[features_key(key)][:, -self.n_obs_steps :]
                continue
            if key not in obs:
                raise KeyError(f"observation key '{key}' is missing (got {sorted(obs)})")
            x = obs[key]
            if x.dim() < 2 or x.shape[1] < self.n_obs_steps:
                raise ValueError(
                    f"observation '{key}' needs shape (B, >= {self.n_obs_steps}, ...), got {tuple(x.shape)}"
                )
            x = x[:, -self.n_obs_steps :]  # the most recent To steps
            if self.shape_meta["obs"][key].get("type", "low_dim") == "low_dim":
                x = x.reshape(*x.shape[:2], -1)  # multi-dimensional low-dim keys become flat features
            # contiguous: bf16 convolutions round differently per memory layout, and a policy's actions
            # must not depend on how the caller laid out its arrays (channels-last frames, a served copy)
            window[key] = x.contiguous()
        return self.obs_encoder(self.normalizer.normalize_obs(window), features)

    def check_inputs(self, obs: dict[str, Any]) -> None:
        """Check an observation window handed to predict_action, in the caller's terms: torch tensors on
        the policy's device and dtype, (B, >= n_obs_steps, *shape) per key, camera frames in [0, 1]."""
        if not isinstance(obs, dict):
            raise TypeError(f"predict_action takes a dict of observation tensors, got {type(obs).__name__}")
        param = next(self.parameters())
        if any(key not in obs for key in self.shape_meta["obs"]):
            return  # encode_obs names the missing key (KeyError)
        for key, meta in self.shape_meta["obs"].items():
            x = obs[key]
            rgb = meta.get("type", "low_dim") == "rgb"
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"observation '{key}' is a {type(x).__name__}; predict_action takes torch tensors "
                    "(torch.from_numpy(a).to(policy.device)). RecedingHorizonController takes an "
                    "environment's numpy observations and converts them."
                )
            if x.dtype != param.dtype:
                hint = " (camera frames: float in [0, 1], i.e. uint8 / 255)" if rgb else ""
                raise ObservationMismatch(
                    f"observation '{key}' has dtype {x.dtype}, the policy takes {param.dtype}{hint}: "
                    f"convert it with .to({param.dtype})"
                )
            if x.device != param.device:
                raise ObservationMismatch(
                    f"observation '{key}' is on {x.device}, the policy on {param.device}: "
                    "move it with .to(policy.device)"
                )
        check_observation_shapes(obs, self.shape_meta["obs"], self.n_obs_steps)
        check_camera_range(obs, self.shape_meta["obs"])  # NaN is caught on the actions (check_actions)

    def global_cond(self, features: torch.Tensor) -> torch.Tensor:
        """The condition the noise net expects: flat (B, To*F) for the U-Net, tokens for the transformer."""
        return features.flatten(1) if self.cfg.net == "unet" else features

    def call_net(
        self,
        sample: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor | None,
        net: Any = None,
        stop: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The noise network (or `net`, a compiled form of it) on (sample, t, condition); `stop` is the
        stop time of a CTM student's jump (policy.consistency.ctm), None for every other network; a
        network that takes one gets `default_stop` when called without it."""
        net = net or self.net
        stop = self.default_stop if stop is None else stop
        if self.cfg.net == "unet":
            if stop is not None:
                return net(sample, t, global_cond=cond, stop_timestep=stop)
            return net(sample, t, global_cond=cond)
        return net(sample, t, cond=cond)

    # ----- optimisation -------------------------------------------------------------------------
    def optim_groups(self, train: TrainConfig) -> list[dict]:
        """AdamW groups: the noise net's own split (transformer) or one group, plus the obs encoder."""
        if hasattr(self.net, "get_optim_groups"):
            groups = self.net.get_optim_groups(train.weight_decay)
        else:
            groups = [{"params": list(self.net.parameters()), "weight_decay": train.weight_decay}]
        enc = list(self.obs_encoder.parameters())
        if enc:
            groups.append({"params": enc, "weight_decay": train.obs_encoder_weight_decay})
        return groups

    def check_actions(self, actions: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(actions).all():
            raise NonFiniteActionError(
                "the policy produced non-finite actions; refusing to pass them to the environment "
                "(check the checkpoint and the observations for NaN)"
            )
        return actions

    def select_executed(self, action_pred: torch.Tensor) -> dict[str, torch.Tensor]:
        """The executed actions start at offset n_obs_steps-1 of the chunk (the current step)."""
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start : start + self.n_action_steps], "action_pred": action_pred}

    def masked_mse(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Squared error where mask is True (padding contributes zero), averaged over all entries.

        Dividing by the entry count rather than the unmasked count makes the mean over DDP ranks equal
        the loss of the whole global batch exactly, whatever padding each rank's slice holds.
        """
        return (F.mse_loss(pred, target, reduction="none") * mask).mean()

    def forward(self, batch: dict[str, Any], **kwargs: Any) -> torch.Tensor:
        """The training loss; `forward` so that DistributedDataParallel can wrap the policy."""
        return self.compute_loss(batch, **kwargs)

    # ----- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> BasePolicy:
        """Rebuild a policy from a checkpoint folder (config + normalizer + safetensors weights)."""
        policy, _ = load_policy(path, device=device)
        if not isinstance(policy, cls):
            raise TypeError(f"{path} holds a {type(policy).__name__}, not a {cls.__name__}")
        return policy


class DiffusionPolicy(BasePolicy):
    """Denoises an action chunk conditioned on encoded observations (Chi et al. 2023)."""

    def __init__(self, cfg: PolicyConfig, shape_meta: dict[str, Any]) -> None:
        super().__init__(cfg, shape_meta)
        self.noise_scheduler = make_scheduler(cfg.scheduler, "ddpm")
        self.set_sampler(cfg.scheduler.sampler, cfg.scheduler.num_inference_steps)
        self.precision, self.compile_mode, self._inference_net = "fp32", None, None  # eager fp32
        self.noise_scale = 1.0  # initial noise x_T's scale (eval.noise_scale); 1 = the learned distribution

    def set_sampler(
        self, sampler: str, num_inference_steps: int, timestep_spacing: str | None = None
    ) -> None:
        """Choose the inference sampler (ddpm | ddim), its number of steps and, if given, where those steps
        lie (leading | trailing | linspace; default policy.scheduler.timestep_spacing)."""
        if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(
                f"sampler {sampler!r} is not one of ('ddpm', 'ddim') for a diffusion policy "
                "(consistency sampling needs a distilled policy: diffpolicy distill)"
            )
        if not 1 <= num_inference_steps <= self.cfg.scheduler.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.cfg.scheduler.num_train_timesteps}]")
        scheduler_cfg = replace(
            self.cfg.scheduler, timestep_spacing=timestep_spacing or self.cfg.scheduler.timestep_spacing
        )
        self.sampler = make_scheduler(scheduler_cfg, sampler)
        self.num_inference_steps = num_inference_steps

    @property
    def sampler_name(self) -> str:
        """What samples the chunks, for reports: the diffusers scheduler's class name."""
        return type(self.sampler).__name__

    @property
    def timestep_spacing(self) -> str | None:
        """Where the current sampler's steps lie (None for a consistency policy: its distillation grid)."""
        return self.sampler.config.timestep_spacing

    def set_fast_paths(self, precision: str = "fp32", compile_mode: str | None = None) -> None:
        """How `predict_action` runs the noise network: fp32 or bf16 autocast, eager or torch.compile'd.

        bf16 autocasts only the network calls; the scheduler's arithmetic and the sample stay fp32 (a
        bf16 sample would lose the small per-step updates). compile_mode is torch.compile's mode:
        "default", "max-autotune", or "reduce-overhead", which on CUDA also captures the network's kernels
        as CUDA graphs (inductor's cudagraph trees) and replays them at every denoising step. The
        compiled function is kept outside the module tree, so state dicts and checkpoints do not change.
        Training (`compute_loss`) always runs the eager module; train.mixed_precision is its bf16 switch.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {compile_mode!r} is not one of {COMPILE_MODES}")
        if compile_mode != self.compile_mode:  # an unchanged mode keeps the already compiled network
            # A compiled bound method is a plain function attribute: not a submodule, not in the state dict.
            self._inference_net = (
                torch.compile(self.net.forward, mode=compile_mode, dynamic=False) if compile_mode else None
            )
        self.precision, self.compile_mode = precision, compile_mode

    def _denoise_call(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        stop: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One network call of the sampling loop, through the fast paths chosen by `set_fast_paths`."""
        bf16 = self.precision == "bf16"
        with torch.autocast(sample.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.call_net(sample, t, cond, net=self._inference_net, stop=stop)
        return out.to(sample.dtype)

    def set_sampling_timesteps(self, device: torch.device) -> None:
        """Put the sampler's timesteps for one chunk (the scheduler's own spacing of num_inference_steps)."""
        self.sampler.set_timesteps(self.num_inference_steps, device=device)

    def _trajectory(self, nactions: torch.Tensor, features: torch.Tensor):
        """Returns (trajectory, cond, condition_mask) for global or inpainting conditioning."""
        if self.cfg.obs_as_global_cond:
            return nactions, self.global_cond(features), None
        B, H = nactions.shape[:2]
        obs_part = torch.zeros(B, H, features.shape[-1], device=nactions.device, dtype=nactions.dtype)
        obs_part[:, : self.n_obs_steps] = features
        traj = torch.cat([nactions, obs_part], dim=-1)
        cond_mask = torch.zeros_like(traj, dtype=torch.bool)
        cond_mask[:, : self.n_obs_steps, self.action_dim :] = True
        return traj, None, cond_mask

    @property
    def trajectory_dim(self) -> int:
        """Width of the denoised trajectory: the action, plus obs features with inpainting."""
        return self.action_dim + (0 if self.cfg.obs_as_global_cond else self.obs_encoder.output_dim)

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean-chunk estimate from the network's output at per-sample timesteps t, (B,).

        Written out because diffusers' schedulers step one scalar timestep per call, while distillation
        needs a different timestep per sample; same formula as their step() (before clipping).
        """
        kind = self.cfg.scheduler.prediction_type
        if kind == "sample":
            return model_output
        alpha_bar = self.noise_scheduler.alphas_cumprod.to(sample.device)[t].to(sample.dtype)
        alpha_bar = alpha_bar.view(-1, *([1] * (sample.dim() - 1)))
        if kind == "v_prediction":
            return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
        return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()

    def ddim_jump(
        self,
        sample: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The deterministic DDIM move from x_t to x_s, per-sample timesteps (B,); s < 0 is the clean end
        (abar = 1: returns x0).

        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, eps by default the noise x0 implies,
        (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (then s = t returns x_t): diffusers'
        DDIMScheduler.step (eta = 0) for one scalar step, written out for per-sample steps.
        """
        alphas = self.noise_scheduler.alphas_cumprod.to(sample.device, sample.dtype)
        a_s = torch.where(s >= 0, alphas[s.clamp(min=0)], torch.ones_like(alphas[0]))
        a_s = a_s.view(-1, *([1] * (sample.dim() - 1)))
        eps = self.implied_noise(sample, x0, t) if eps is None else eps
        return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps

    def implied_noise(self, sample: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise eps with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per-sample timesteps t >= 0."""
        a_t = self.noise_scheduler.alphas_cumprod.to(sample.device, sample.dtype)[t]
        a_t = a_t.view(-1, *([1] * (sample.dim() - 1)))
        return (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()

    def loss_mask(
        self, batch: dict[str, Any], traj: torch.Tensor, cond_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Where a loss on the trajectory counts: not inpainted observation features, not padded actions."""
        mask = torch.ones_like(traj, dtype=torch.bool)
        if cond_mask is not None:
            mask &= ~cond_mask
        if "action_is_pad" in batch:
            pad = batch["action_is_pad"].to(torch.bool)[..., None]
            mask[..., : self.action_dim] &= ~pad
        return mask

    def sample_training_noise(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Noise and diffusion steps for a whole (global) batch from `generator`.

        The trainer draws these per step and gives each DDP rank its slice, so training with N
        processes sees exactly the noise one process would see for the same global batch. With
        policy.noise_samples_per_obs = K > 1 each sample gets K draws: shapes (B, K, ...).
        """
        k = self.cfg.noise_samples_per_obs
        lead = (batch_size,) if k == 1 else (batch_size, k)
        noise = torch.randn((*lead, self.horizon, self.trajectory_dim), generator=generator, device=device)
        return {"noise": noise, "timesteps": self.draw_training_times(lead, generator, device)}

    def draw_training_times(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Training diffusion steps, uniform over the DDPM's integer steps [0, num_train_timesteps)."""
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, shape, generator=generator, device=device)

    def noised_and_target(
        self, traj: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input, regression target, the network's time input) for clean chunks at times t: the
        DDPM forward process; the target by prediction_type (epsilon: noise, sample: chunk, v: v)."""
        noisy = self.noise_scheduler.add_noise(traj, noise, t)
        kind = self.cfg.scheduler.prediction_type
        if kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(traj, noise, t)
        else:
            target = noise if kind == "epsilon" else traj
        return noisy, target, t

    def compute_loss(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoising objective (`noised_and_target`): DDPM here, predict the noise (or the clean chunk,
        or v) of a randomly noised action chunk; flow matching in FlowPolicy.

        `noise` / `timesteps` default to fresh draws from the global RNG. With
        policy.noise_samples_per_obs = K > 1 every chunk is noised K times against one encoding of its
        observations: the encoder's cost is shared by K denoising targets (`noise` (B, K, H, D),
        `timesteps` (B, K)).
        """
        nactions = self.normalizer.normalize("action", batch["action"])
        features = self.encode_obs(batch["obs"])
        traj, cond, cond_mask = self._trajectory(nactions, features)
        mask = self.loss_mask(batch, traj, cond_mask)
        k = self.cfg.noise_samples_per_obs
        lead = (traj.shape[0],) if k == 1 else (traj.shape[0], k)
        if noise is None:
            noise = torch.randn((*lead, *traj.shape[1:]), device=traj.device, dtype=traj.dtype)
        if timesteps is None:
            timesteps = self.draw_training_times(lead, None, traj.device)
        if noise.shape != (*lead, *traj.shape[1:]) or timesteps.shape != lead:
            raise ValueError(
                f"noise {tuple(noise.shape)} / timesteps {tuple(timesteps.shape)} do not fit "
                f"the trajectory {tuple(traj.shape)} with {k} noise sample(s) per observation"
            )
        if k > 1:  # K noised copies of each chunk share its condition (views of one encoding)
            traj, mask = traj.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
            cond = None if cond is None else cond.repeat_interleave(k, 0)
            cond_mask = None if cond_mask is None else cond_mask.repeat_interleave(k, 0)
            noise, timesteps = noise.flatten(0, 1), timesteps.flatten(0, 1)
        noise = noise.to(traj.device, traj.dtype)
        noisy, target, net_t = self.noised_and_target(traj, noise, timesteps.to(traj.device))
        if cond_mask is not None:
            noisy = torch.where(cond_mask, traj, noisy)
        return self.masked_mse(self.call_net(noisy, net_t, cond), target, mask)

    def _sample_loop(
        self,
        sample: torch.Tensor,
        cond: torch.Tensor | None,
        cond_traj: torch.Tensor,
        cond_mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """From the initial noise to a clean normalized trajectory with the sampler's timesteps."""
        self.set_sampling_timesteps(sample.device)
        for t in self.sampler.timesteps:
            if cond_mask is not None:
                sample = torch.where(cond_mask, cond_traj, sample)
            sample = self._sampler_step(sample, t, cond, generator)
        return sample

    def _sampler_step(
        self, sample: Tensor, t: Tensor, cond: Tensor | None, generator: Generator | None
    ) -> Tensor:
        """One step of the sampling loop: a network call and the sampler's move to its next timestep."""
        out = self._denoise_call(sample, t, cond)
        return self.sampler.step(out, t, sample, generator=generator).prev_sample

    @torch.inference_mode()
    def predict_action(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Sample an action chunk: {"action": (B, n_action_steps, Da), "action_pred": (B, horizon, Da)}."""
        self.check_inputs(obs)
        features = self.encode_obs(obs)  # once per chunk, never per denoising step
        B = features.shape[0]
        dim = self.action_dim + (0 if self.cfg.obs_as_global_cond else features.shape[-1])
        zeros = torch.zeros(B, self.horizon, self.action_dim, device=features.device, dtype=features.dtype)
        cond_traj, cond, cond_mask = self._trajectory(zeros, features)
        sample = self.noise_scale * torch.randn(
            B, self.horizon, dim, device=features.device, dtype=features.dtype, generator=generator
        )
        sample = self._sample_loop(sample, cond, cond_traj, cond_mask, generator)
        action_pred = self.normalizer.unnormalize("action", sample[..., : self.action_dim])
        return self.select_executed(self.check_actions(action_pred))


class FlowPolicy(DiffusionPolicy):
    """Diffusion Policy trained by flow matching (policy.objective=flow): few-step sampling, no distillation.

    Same networks, encoders and conditioning as DiffusionPolicy; only the objective and the sampler
    differ. Training puts the clean chunk x0 at a noise level s on the straight path
    x_s = (1 - s) x0 + s noise and regresses the network's output on the velocity noise - x0 (rectified
    flow / conditional flow matching, as pi0's action expert); the network's time input is
    s * num_train_timesteps, so it sees the same range as a DDPM network. Sampling integrates the ODE
    dx/ds = v(x, s) from s = 1 (noise) to 0 over num_inference_steps equal steps: `euler` is diffusers'
    FlowMatchEulerDiscreteScheduler on that grid (one network call per step); `heun` is Heun's
    second-order method on the same grid (two calls per step, the last step into s = 0 Euler), written
    here because diffusers' FlowMatchHeunDiscreteScheduler accepts no custom grid and spends its last step
    between s = 1/T and 0.
    The training times follow policy.flow.time_sampling (see FlowConfig).
    """

    def set_sampler(
        self, sampler: str, num_inference_steps: int, timestep_spacing: str | None = None
    ) -> None:
        """Euler or Heun with `num_inference_steps` equal steps in s (timestep_spacing does not apply)."""
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(
                f"sampler {sampler!r} is not one of {FLOW_SAMPLERS} for a flow-matching policy "
                "(ddpm / ddim sample DDPM-trained policies)"
            )
        if timestep_spacing is not None:
            raise ValueError("timestep_spacing applies to ddpm / ddim sampling, not to flow matching")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.sampler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.cfg.scheduler.num_train_timesteps, shift=1.0
        )
        self.flow_sampler, self.num_inference_steps = sampler, num_inference_steps

    @property
    def sampler_name(self) -> str:
        return "flow Euler" if self.flow_sampler == "euler" else "flow Heun"

    @property
    def timestep_spacing(self) -> str | None:
        return None  # always equal steps in s

    @property
    def network_calls(self) -> int:
        """Network evaluations per chunk: one per Euler step; two per Heun step but the last (Euler)."""
        n = self.num_inference_steps
        return 2 * n - 1 if self.flow_sampler == "heun" else n

    def set_sampling_timesteps(self, device: torch.device) -> None:
        # s = 1, 1 - 1/n, ..., 1/n (the scheduler appends the terminal 0); its timesteps are s * T
        n = self.num_inference_steps
        self.sampler.set_timesteps(sigmas=[1 - i / n for i in range(n)], device=device)

    def draw_training_times(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Noise levels s in [0, 1] from policy.flow.time_sampling, drawn from `generator` (uniforms or
        normals only, so that DDP ranks can share one draw, see `sample_training_noise`)."""
        f = self.cfg.flow
        if f.time_sampling == "logit_normal":
            z = torch.randn(shape, generator=generator, device=device)
            return torch.sigmoid(f.logit_normal_mean + f.logit_normal_std * z)
        u = torch.rand(shape, generator=generator, device=device)
        if f.time_sampling == "uniform":
            return u
        # Beta(alpha, 1) by its inverse CDF u^(1/alpha), then s_max keeps s = 0 (a zero velocity target
        # scale) out of reach as pi0 does
        return 1 - f.s_max + f.s_max * u.pow(1 / f.beta_alpha)

    def noised_and_target(
        self, traj: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The point x_s of the straight path, its velocity noise - x0, and the network's time s * T."""
        s = t.to(traj.dtype).view(-1, *([1] * (traj.dim() - 1)))
        noisy = (1 - s) * traj + s * noise
        return noisy, noise - traj, t * self.cfg.scheduler.num_train_timesteps

    def _sample_loop(
        self,
        sample: torch.Tensor,
        cond: torch.Tensor | None,
        cond_traj: torch.Tensor,
        cond_mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Integrate from s = 1 to 0; inpainted observation features are put back before every call."""

        def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            if cond_mask is not None:
                x = torch.where(cond_mask, cond_traj, x)
            return self._denoise_call(x, timestep, cond)

        sample = self.integrate(sample, velocity)
        if cond_mask is not None:
            sample = torch.where(cond_mask, cond_traj, sample)
        return sample

    def integrate(
        self, sample: torch.Tensor, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Integrate dx/ds = velocity(x, s * num_train_timesteps) from s = 1 to 0 with the policy's sampler
        (Euler or Heun), clipped to [-1, 1] with policy.scheduler.clip_sample: sampling and real-time
        chunking's guided sampling (control.guided_chunk, which passes a guided velocity) share it."""
        self.set_sampling_timesteps(sample.device)
        sigmas, T = self.sampler.sigmas, self.cfg.scheduler.num_train_timesteps
        for i, t in enumerate(self.sampler.timesteps):
            v = velocity(sample, t)
            if self.flow_sampler == "euler":
                sample = self.sampler.step(v, t, sample).prev_sample
                continue
            # Heun: an Euler predictor to the next level, then the mean of the two velocities; the step
            # into s = 0 stays Euler (as in Karras et al.'s Heun sampler): training rarely sees s near 0,
            # and a correction evaluated there cost all success on Push-T (0/200 at 2 steps, see
            # docs/research/flow.md)
            ds = sigmas[i + 1] - sigmas[i]
            sample_next = sample + ds * v
            if sigmas[i + 1] > 0:
                sample_next = sample + ds * 0.5 * (v + velocity(sample_next, sigmas[i + 1] * T))
            sample = sample_next
        clip = self.cfg.scheduler.clip_sample
        return sample.clamp(-1.0, 1.0) if clip else sample


class ConsistencyPolicy(DiffusionPolicy):
    """A consistency-distilled Diffusion Policy (made by `diffpolicy distill`): 1-3 network calls per chunk.

    Same networks, normalizer and conditioning as its teacher. The network output is read as v
    (policy.scheduler.prediction_type=v_prediction, set by distillation): x0(x, t) = sqrt(abar) x -
    sqrt(1 - abar) v stays well-conditioned at the last training step, where an epsilon reading would
    divide by sqrt(abar_99) ~ 5e-4 (squaredcos_cap_v2, T = 100). That estimate goes through LCM's
    consistency parameterization with boundary condition f(x, 0) = x:

        f(x, t) = c_skip(t) x + c_out(t) x0(x, t),  c_skip = 0.25 / ((l t)^2 + 0.25),
        c_out = l t / sqrt((l t)^2 + 0.25),  l = policy.consistency.timestep_scaling,

    which maps any point of the teacher's probability-flow ODE trajectory to its clean end. Sampling is
    diffusers' LCMScheduler (the same c_skip / c_out): one step from pure noise, or chained steps that
    re-noise the estimate to a lower time of the distillation grid and map it again. A chain of n steps
    runs from the top of the grid to its bottom, evenly spaced (`consistency_chain`): LCMScheduler's own
    spacing stops at t = 39 for 3 steps on a grid of 10, and chains that stop at mid noise lose most of the
    1-step student's success (trajectory2d, 3000-step student: 1 step 0.68; 3 steps [99, 69, 39] 0.32,
    [99, 39, 9] 0.74, [99, 49, 9] 0.66).
    `compute_loss` stays the DDPM loss (the trainer's validation loss); distillation is in distill/.

    A CTM student (policy.consistency.ctm, from `distill.objective=ctm`) has a network with a second time
    input, the stop time s, and jumps from x_t to any x_s (`jump`): G(x_t, t, s) is the DDIM move from t
    to s with its own clean estimate g(x_t, t, s) (v reading as above), so G(x_t, t, t) = x_t and
    G(x_t, t, -1) = g, the jump to the clean end (s = -1 stands for abar = 1). It samples the same chain
    as above with g(x, t, -1) as the clean estimate (LCMScheduler's step with c_skip = 0, c_out = 1).
    """

    @property
    def is_ctm(self) -> bool:
        return self.cfg.consistency.ctm

    @property
    def sampler_name(self) -> str:
        # a CTM student's chain steps are `_sampler_step`'s own (its clean jumps have no LCM scalings)
        return "CTM jumps" if self.is_ctm else super().sampler_name

    @property
    def default_stop(self) -> int | None:
        """A CTM student called without a stop time jumps to the clean end (s = -1), so its DDPM loss
        (`compute_loss`, the trainer's validation loss) reads the same output as a CM student's."""
        return -1 if self.is_ctm else None

    def jump(
        self, sample: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A CTM student's (G(x_t, t, s), g(x_t, t, s)) for per-sample timesteps t >= 0 and stop times
        s <= t, (B,); s = -1 is the clean end."""
        if not self.is_ctm:
            raise ValueError("jump() needs a CTM student (policy.consistency.ctm); use consistency_output")
        x0 = self.predict_x0(self.call_net(sample, t, cond, stop=s), sample, t)
        return self.ddim_jump(sample, x0, t, s), x0

    def _sampler_step(
        self, sample: Tensor, t: Tensor, cond: Tensor | None, generator: Generator | None
    ) -> Tensor:
        """A CTM student's step: its clean jump g(x, t, -1), re-noised to the chain's next time (none after
        the last); a CM student's is LCMScheduler's step."""
        if not self.is_ctm:
            return super()._sampler_step(sample, t, cond, generator)
        sched = self.noise_scheduler.config
        t_b = torch.full((sample.shape[0],), int(t), device=sample.device, dtype=torch.long)
        x0 = self.predict_x0(self._denoise_call(sample, t_b, cond, stop=-1), sample, t_b)
        if sched.clip_sample:
            x0 = x0.clamp(-sched.clip_sample_range, sched.clip_sample_range)
        later = self.sampler.timesteps[self.sampler.timesteps < t]
        if not len(later):
            return x0
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.noise_scheduler.add_noise(x0, noise, torch.full_like(t_b, int(later[0])))

    def set_sampler(
        self, sampler: str, num_inference_steps: int, timestep_spacing: str | None = None
    ) -> None:
        """Consistency sampling with 1 .. policy.consistency.original_inference_steps steps."""
        if timestep_spacing is not None:
            raise ValueError(
                "a consistency policy's timesteps are its distillation grid (consistency_chain); "
                "timestep_spacing applies to ddpm / ddim sampling only"
            )
        if sampler != "consistency":
            raise ValueError(
                f"a consistency-distilled policy samples with sampler='consistency' only, not {sampler!r}"
            )
        grid = self.cfg.consistency.original_inference_steps
        if not 1 <= num_inference_steps <= grid:
            raise ValueError(
                f"num_inference_steps must be in [1, {grid}] (the distillation grid, "
                "policy.consistency.original_inference_steps)"
            )
        self.sampler = make_scheduler(self.cfg.scheduler, "consistency", self.cfg.consistency)
        self.num_inference_steps = num_inference_steps

    @property
    def timestep_spacing(self) -> str | None:
        return None  # the chain is fixed by the distillation grid (consistency_chain)

    def consistency_chain(self) -> list[int]:
        """The n-step chain: grid points t_i = i k - 1 for i evenly spaced from N down to 1."""
        grid = self.cfg.consistency.original_inference_steps
        k = self.cfg.scheduler.num_train_timesteps // grid
        n = self.num_inference_steps
        if n == 1:
            return [grid * k - 1]
        return [round(grid - j * (grid - 1) / (n - 1)) * k - 1 for j in range(n)]

    def set_sampling_timesteps(self, device: torch.device) -> None:
        self.sampler.set_timesteps(device=device, timesteps=self.consistency_chain())

    def consistency_output(
        self, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x, t), x0(x, t)) for per-sample timesteps t, (B,): LCMScheduler.step's denoised output, batched
        over timesteps and without its x0 clipping (which would stop gradients during distillation).
        For a CTM student, (G(x, t, -1), g(x, t, -1)): its jump to the clean end."""
        if self.is_ctm:
            return self.jump(sample, t, torch.full_like(t, -1), cond)
        x0 = self.predict_x0(self.call_net(sample, t, cond), sample, t)
        c_skip, c_out = self.sampler.get_scalings_for_boundary_condition_discrete(t.to(sample.dtype))
        shape = (-1, *([1] * (sample.dim() - 1)))
        return c_skip.view(shape) * sample + c_out.view(shape) * x0, x0


class MseBCPolicy(BasePolicy):
    """Plain regression with the same networks (fixed timestep 0, zero input): shows mode averaging."""

    def __init__(self, cfg: PolicyConfig, shape_meta: dict[str, Any]) -> None:
        if not cfg.obs_as_global_cond:
            raise ValueError("MseBCPolicy needs policy.obs_as_global_cond=true")
        super().__init__(cfg, shape_meta)

    def _regress(self, features: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(
            features.shape[0], self.horizon, self.action_dim, device=features.device, dtype=features.dtype
        )
        return self.call_net(zeros, 0, self.global_cond(features))

    def compute_loss(self, batch: dict[str, Any], **_: Any) -> torch.Tensor:
        """Plain regression of the normalized action chunk (diffusion noise arguments are ignored)."""
        nactions = self.normalizer.normalize("action", batch["action"])
        pred = self._regress(self.encode_obs(batch["obs"]))
        mask = torch.ones_like(nactions, dtype=torch.bool)
        if "action_is_pad" in batch:
            mask &= ~batch["action_is_pad"].to(torch.bool)[..., None]
        return self.masked_mse(pred, nactions, mask)

    @torch.inference_mode()
    def predict_action(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        self.check_inputs(obs)
        action_pred = self.normalizer.unnormalize("action", self._regress(self.encode_obs(obs)))
        return self.select_executed(self.check_actions(action_pred))


# The one registry of policy classes: config `policy.type` -> class, and for policy.type=diffusion its
# `policy.objective` -> class. make_policy builds from it, and load_policy finds a checkpoint's class (saved
# by name) in it. A new policy class is added here only.
POLICY_TYPES: dict[str, type[BasePolicy]] = {
    "diffusion": DiffusionPolicy,
    "mse_bc": MseBCPolicy,
    "consistency": ConsistencyPolicy,
}
OBJECTIVES: dict[str, type[DiffusionPolicy]] = {"ddpm": DiffusionPolicy, "flow": FlowPolicy}


def policy_class(name: str) -> type[BasePolicy] | None:
    """The registered class for a config `policy.type` ("diffusion") or a saved class name ("MseBCPolicy")."""
    if name in POLICY_TYPES:
        return POLICY_TYPES[name]
    classes = [*POLICY_TYPES.values(), *OBJECTIVES.values()]
    return next((cls for cls in classes if cls.__name__ == name), None)


def make_policy(cfg: PolicyConfig, shape_meta: dict[str, Any]) -> BasePolicy:
    """A fresh policy of `cfg.type` (a diffusion policy's class follows `cfg.objective`)."""
    cls = OBJECTIVES[cfg.objective] if cfg.type == "diffusion" else POLICY_TYPES[cfg.type]
    return cls(cfg, shape_meta)


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> tuple[BasePolicy, RunConfig]:
    """Rebuild the policy stored at `path` (no optimizer or trainer needed) and return it with its config."""
    meta, run_cfg = read_config(path)
    cls = policy_class(meta["policy_class"])
    if cls is None:
        raise CheckpointError(f"{path}: unknown policy class '{meta['policy_class']}'")
    # The weights come from the checkpoint: the backbone's pretrained file need not exist here any more.
    policy_cfg = replace(run_cfg.policy, vision=replace(run_cfg.policy.vision, pretrained_weights=None))
    policy = cls(policy_cfg, meta["shape_meta"])
    load_weights(policy, path)
    policy.frame_stride = run_cfg.data.frame_stride
    return policy.to(device).eval(), run_cfg
