"""Typed run configuration: dataclasses, YAML presets, dotted command-line overrides.

One `RunConfig` describes a whole run (task, collection, data, policy, training, evaluation). Presets in
`configs/<task>_<obs>_<net>.yaml` override the dataclass defaults; `a.b=value` strings override the preset.
We use OmegaConf structured configs for the merge because it type-checks every value against the
dataclass and rejects unknown keys; everything downstream sees plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A preset, override or config value is wrong; the message names the key."""


@dataclass
class TaskConfig:
    # "" or null (`task.name=` on the command line): no simulator; train on data.path alone, no evaluation
    name: str | None = "trajectory2d"
    # Task-specific constructor arguments (e.g. observation type); each task documents its own.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MixGroup:
    """One group of a collection mix: `n_episodes` episodes of the task built with `task_kwargs` (over
    task.kwargs), e.g. {n_episodes: 50, task_kwargs: {n_objects: 1}}."""

    n_episodes: int = 1
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    # The LeRobot task string of this group's episodes; "" -> the task's own description()
    description: str = ""


@dataclass
class CollectConfig:
    # Episodes to keep. null -> 200, or with a mix the mix's own counts; a number with a mix is the total,
    # split in the mix's proportions (`--episodes 20` on a 50/50/100 mix collects 5/5/10)
    n_episodes: int | None = None
    seed: int = 0  # episodes use seeds seed, seed+1, ...; evaluation seeds must not overlap
    n_workers: int = 1
    keep_failed: bool = False
    output: str = ""  # EpisodeStore path; "" -> <run_dir>/demos.zarr
    # Groups of episodes with different task kwargs, collected one after the other on consecutive seeds
    # (a group starts after the last seed the previous one tried, so no seed is shared); [] -> one group
    # of n_episodes with task.kwargs. See collect.py.
    mix: list[MixGroup] = field(default_factory=list)
    # What `collect` writes: zarr (an EpisodeStore) | lerobot (a LeRobot v3.0 folder, fps = the task's)
    format: str = "zarr"


DEFAULT_COLLECT_EPISODES = 200  # collect.n_episodes=null without a mix


def collect_counts(cc: CollectConfig) -> list[int]:
    """Episodes to keep per group of the mix (one entry without a mix): the mix's own counts, or
    cc.n_episodes split in the mix's proportions (largest remainders, at least one per group)."""
    if not cc.mix:
        return [DEFAULT_COLLECT_EPISODES if cc.n_episodes is None else cc.n_episodes]
    own = [g.n_episodes for g in cc.mix]
    if cc.n_episodes is None or cc.n_episodes == sum(own):
        return own
    total, wanted = sum(own), cc.n_episodes
    if wanted < len(own):
        raise ConfigError(
            f"collect.n_episodes={wanted} (--episodes) cannot keep the {len(own)} groups of collect.mix "
            f"(one episode each at least): ask for >= {len(own)}, or null for the mix's own {own}"
        )
    # every group keeps one episode, the rest is shared by largest remainder (Hamilton's method)
    shares = [1 + (wanted - len(own)) * n / total for n in own]
    counts = [int(x) for x in shares]
    order = sorted(range(len(own)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in order[: wanted - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class DataConfig:
    # What to train on: an EpisodeStore, or a LeRobot folder / robomimic .hdf5 / Minari folder, which is
    # imported once into import_dir (see data/formats); "" -> <run_dir>/demos.zarr
    path: str = ""
    import_dir: str = ""  # "" -> <run_dir>/imported; share one folder between runs to import once
    # Observation keys to train on; None -> the task's, or (task.name="") every key the dataset declares
    obs_keys: list[str] | None = None
    # Minari observations: these vector parts are concatenated into one low-dim key "state"; None
    # (default) flattens goal-style data's observation + desired_goal (PointMaze, as seed 000) and trains
    # any other dataset as it is; [] keeps each part as its own key. Cameras always stay their own inputs.
    flatten_obs: list[str] | None = None
    # [H, W]: resize the cameras of an imported dataset once, at import (e.g. 480x640 LeRobot recordings);
    # None keeps them. EpisodeStores given as data.path are used as they are.
    image_size: list[int] | None = None
    action_key: str = "action"
    val_ratio: float = 0.05
    max_train_episodes: int | None = None
    split_seed: int = 42
    # Steps of edge padding a window may reach past an episode's end; None -> n_action_steps - 1 (the original
    # diffusion_policy's pad_after; see data/sequence.py)
    pad_after: int | None = None
    # Episodes shorter than policy.horizon, one rule for every format: pad (keep them, edge-padded) | skip
    # (leave them out) | error; the log says how many there were
    short_episodes: str = "pad"
    # true: edge-repeated actions past an episode's end are left out of the loss (LeRobot's
    # do_mask_loss_for_padding); false trains on all horizon actions, as the original does
    mask_padded_actions: bool = False
    # Train/validation split: auto uses the dataset's own when it has one (robomimic's mask/train and
    # mask/valid), else random by val_ratio / split_seed; random always splits that way
    split: str = "auto"
    cache_in_memory: bool = True
    # Temporal subsampling (e.g. 3 on a 30 fps recording: the policy sees and acts at 10 Hz): windows take
    # every k-th frame for observations and actions. Every phase offset is kept (each episode acts as k
    # sub-episodes, frames p, p+k, ...), so no frame is thrown away. The policy then acts at fps / k:
    # evaluation holds each action for k control steps (tasks with absolute actions only), and a served
    # policy's config tells its client (data/sequence.py, control.py)
    frame_stride: int = 1


@dataclass
class UnetConfig:
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 256
    cond_predict_scale: bool = True  # FiLM scale and bias (False: bias only)


@dataclass
class TransformerConfig:
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.3
    causal_attn: bool = True
    n_cond_layers: int = 0  # >0: transformer encoder over condition tokens, else an MLP


@dataclass
class NoiseSchedulerConfig:
    num_train_timesteps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"  # epsilon | sample | v_prediction (consistency students use v)
    # ddpm | ddim for diffusion policies, consistency for consistency-distilled ones (inference only;
    # training always uses the DDPM forward process)
    sampler: str = "ddpm"
    num_inference_steps: int = 100
    # Where DDIM / DDPM put num_inference_steps < num_train_timesteps steps (diffusers' timestep_spacing):
    # leading (diffusers' default: 90, 80, ..., 0 for 10 of 100) | trailing (99, 89, ..., 9) | linspace
    timestep_spacing: str = "leading"


@dataclass
class ConsistencyConfig:
    """How a consistency-distilled policy (policy.type=consistency) maps (x_t, t) to a clean chunk.

    Both values are fixed at distillation time and read again at sampling (diffusers' LCMScheduler).
    """

    # N: the distillation's skip grid t_i = i * (T // N) - 1, i = 1..N, over the teacher's T training steps;
    # multi-step sampling picks its timesteps from the same grid.
    original_inference_steps: int = 10  # k = 10 on T = 100: the teacher's DDIM-10 step (0.98 success)
    # l in LCM's boundary-condition scalings c_skip(t) = 0.25 / ((l t)^2 + 0.25), c_out = l t / sqrt(...)
    timestep_scaling: float = 10.0
    # A consistency trajectory model (CTM) student: the network also takes the stop time s and jumps from
    # x_t to x_s, not only to the clean end (set by distill.objective=ctm; LCM's scalings above do not apply).
    ctm: bool = False


@dataclass
class VisionConfig:
    """Camera encoder (models/rgb.py): backbone -> spatial-softmax keypoints -> linear feature."""

    # A torchvision ResNet ("resnet18", ...), "compact" (a small GroupNorm CNN sized for CPUs), or
    # "timm:<model>" (any timm model with forward_intermediates, e.g. "timm:vit_small_patch14_dinov2").
    backbone: str = "resnet18"
    # A local state-dict file (.pth/.pt or .safetensors) for the backbone; never downloaded. Used only when
    # a policy is first built: a checkpoint holds the (fine-tuned) weights itself.
    pretrained_weights: str | None = None
    imagenet_norm: bool = False  # feed the backbone ImageNet-normalized pixels (for pretrained weights)
    freeze_backbone: bool = False  # keep the backbone's weights fixed (train only keypoints and heads)
    use_group_norm: bool = True
    # Precision of the backbone's convolutions (training and inference); keypoints and heads stay fp32.
    # bf16 runs the backbone under autocast: 2.5x faster on CPUs with AVX512 / AMX, and on GPUs, but
    # emulated (~24x slower) on AVX2-only CPUs; "auto" picks bf16 only where it is fast (rgb.backbone_bf16).
    precision: str = "fp32"
    cnn_channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64])  # "compact": per conv layer
    cnn_strides: list[int] = field(default_factory=lambda: [2, 1, 2, 1])  # "compact": per conv layer
    # Resize (antialiased) every frame to [H, W] before cropping, e.g. 640x480 camera frames to 96x96.
    resize_shape: list[int] | None = None
    crop_shape: list[int] | None = field(default_factory=lambda: [84, 84])
    # Training-time brightness / contrast jitter: factors uniform in [1 - x, 1 + x] per sample, shared
    # across its observation window; 0 disables.
    color_jitter: float = 0.0
    share_backbone: bool = False
    num_keypoints: int = 32
    feature_dim: int = 64
    # Training computes the frozen backbone's feature map once per stored frame and camera, caches it on
    # disk (training/feature_cache.py) and trains only the keypoint heads and the noise net on the cached
    # maps. Needs freeze_backbone and color_jitter 0; the crop is the centre crop in training too (one
    # deterministic view per frame). Checkpoints still hold the backbone: inference runs it on the images.
    cache_features: bool = False
    # Where the cache files go (default <run_dir>/feature_cache). The file names hash the dataset, the
    # backbone's weights and the preprocessing, so runs may share a folder and a stale file is never read.
    feature_cache_dir: str | None = None


@dataclass
class FlowConfig:
    """Flow matching (policy.objective=flow): the path, the training times and nothing else.

    The chunk moves on the straight line x_s = (1 - s) x0 + s noise from the clean chunk (s = 0) to
    noise (s = 1), diffusers' FlowMatchEulerDiscreteScheduler convention; the network predicts the
    velocity noise - x0 with the time input s * policy.scheduler.num_train_timesteps, the range the
    DDPM networks see. Sampling is policy.scheduler.sampler (euler | heun) with num_inference_steps
    equal steps in s.
    """

    # Which noise levels s training sees: uniform (rectified flow's) | beta (pi0's: s = 1 - s_max + s_max u,
    # u ~ Beta(beta_alpha, 1), more weight on the noisy end) | logit_normal (SD3's: s = sigmoid(
    # logit_normal_mean + logit_normal_std * z), more weight on the middle). Uniform is the default because
    # it measured best: Push-T state, 10,000 steps, Euler 4, 200 episodes: 0.725 against beta's 0.505
    # (docs/research/flow.md).
    time_sampling: str = "uniform"
    beta_alpha: float = 1.5
    s_max: float = 0.999
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0


@dataclass
class PolicyConfig:
    type: str = "diffusion"  # diffusion | mse_bc | consistency (made by `diffpolicy distill`)
    net: str = "unet"  # unet | transformer
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    obs_as_global_cond: bool = True  # False: inpainting conditioning (obs features inside the trajectory)
    # Training: noised copies of each action chunk per observation encoding (K denoising targets share one
    # pass of the observation encoder; the noise net sees batch_size * K chunks). 1 = the paper's loss.
    noise_samples_per_obs: int = 1
    # policy.type=diffusion's training objective: ddpm (the paper's, samplers ddpm | ddim) | flow (flow
    # matching, samplers euler | heun with few steps and no distillation; see FlowConfig)
    objective: str = "ddpm"
    flow: FlowConfig = field(default_factory=FlowConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    scheduler: NoiseSchedulerConfig = field(default_factory=NoiseSchedulerConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    # Per-key normalization mode override (minmax | gaussian | image | identity); defaults: minmax for
    # low-dim keys and the action, image for rgb keys.
    normalization: dict[str, str] = field(default_factory=dict)


@dataclass
class EmaConfig:
    enabled: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75
    min_value: float = 0.0
    max_value: float = 0.9999
    update_after_step: int = 0


@dataclass
class TrainConfig:
    num_steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6  # noise network (the transformer preset uses 1e-3)
    obs_encoder_weight_decay: float = 1e-6
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # cosine | constant
    grad_clip_norm: float = 1.0  # <= 0 disables clipping
    ema: EmaConfig = field(default_factory=EmaConfig)
    log_every: int = 50
    val_every: int = 500
    eval_every: int = 0  # closed-loop evaluation during training; 0 = only the final one
    eval_episodes: int = 10  # rollouts per periodic evaluation (the final one uses eval.n_episodes)
    # First seed of the periodic evaluations, which rank the top-k checkpoints: a validation range apart
    # from the final evaluation's (eval.seed), so that no checkpoint is picked on the episodes it is then
    # reported on. Both ranges stay above the collection seeds.
    eval_seed: int = 200_000
    checkpoint_every: int = 1000
    # Pausing (0: off). The run saves `latest` and exits without its final evaluation once it has done
    # stop_at_step steps, or once its training time (summed over resumes, as metrics.jsonl's elapsed_min)
    # reaches max_minutes; a rerun with a higher limit (or 0) resumes it, with the same limits it does
    # nothing. The LR schedule still runs to num_steps: these split a run into sessions or compare runs
    # at a step, they do not shorten it.
    stop_at_step: int = 0
    max_minutes: float = 0.0
    top_k: int = 3
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: str = "no"  # no | bf16
    seed: int = 0


@dataclass
class DistillConfig:
    """Consistency distillation of a trained diffusion policy (`diffpolicy distill`, see distill/).

    The distillation run starts from the teacher's own run config; num_steps, lr and warmup_steps here
    replace the teacher's train.num_steps / train.lr / train.warmup_steps (a distillation needs far fewer
    steps and a smaller learning rate than training from scratch). Every other train.* setting (batch,
    EMA, optimizer, checkpoints, evaluation) carries over from the teacher and can be overridden as usual.
    """

    teacher: str = ""  # the teacher's checkpoint folder (set by --teacher)
    num_steps: int = 1500
    lr: float = 3.0e-4
    warmup_steps: int = 100
    # cm: consistency distillation, one time input, every jump to the clean end (LCM) | ctm: consistency
    # trajectory distillation, a two-time student G(x_t, t, s) trained on jumps to any lower grid point s,
    # compared at the clean end through the target network (CTM, Consistency Policy) | dmd: distribution
    # matching of the 1-step chunks against the teacher's (DMD / One-Step Diffusion Policy), best as a
    # fine-tune of a cm student (distill.init_student). See distill/dmd.py.
    objective: str = "cm"
    loss: str = "huber"  # consistency loss: huber (pseudo-Huber, as LCM) | mse
    huber_c: float = 1.0e-3
    denoise_weight: float = 0.1  # weight of the auxiliary denoising loss (student x0 vs the clean chunk)
    target_ema_decay: float = 0.95  # the target network's EMA of the student (LCM's default)
    # How far down the grid the teacher's ODE solver goes before the target network takes over:
    # one (one grid step, LCM) | uniform (1..i steps, uniformly: CTM's soft consistency) | full (to the
    # clean end: the teacher's own DDIM-N result is the target, no bootstrapping). See distill/consistency.py.
    solver_span: str = "one"
    # What the top of the grid (where 1-step sampling starts) learns: ode (the consistency target, the
    # teacher's ODE from t = T - 1) | ddim (the teacher's DDIM-N sampler as `eval.sampler=ddim` runs it,
    # with its policy.scheduler.timestep_spacing, leading by default, same noise). See distill/consistency.py.
    top_target: str = "ode"
    # DDIM sub-steps per grid step of the teacher's solve: 1 (LCM) .. k = T // grid (one per timestep, the
    # ODE as DDIM-T solves it). The targets stay on the grid; each teacher call costs a forward pass.
    solver_substeps: int = 1
    # Start the student from this consistency checkpoint instead of the teacher's weights ("" = the teacher):
    # fine-tune a distilled student with another objective or budget, on a fresh schedule. Its networks
    # and normalizer must match the teacher's.
    init_student: str = ""
    # distill.objective=dmd (distribution matching, DMD / One-Step Diffusion Policy; see distill/dmd.py): the
    # fake score network's optimizer steps per student step and learning rate, and the range of timesteps
    # at which the student's 1-step chunks are noised and scored (DMD's [0.02 T, 0.98 T]).
    dmd_fake_updates: int = 2
    dmd_fake_lr: float = 1.0e-4
    dmd_t_min: int = 2
    dmd_t_max: int = 97
    # DMD's regression term (Yin et al. 2024): weight of ||x - ODE(z)||^2, the student's 1-step chunk from
    # noise z against the teacher's DDIM solve from the same z along the consistency grid (a teacher call
    # per grid point per step, no gradients). It anchors the student to the teacher's noise-to-chunk map
    # while the distribution term moves it; 0 (default) is DMD without it (DMD2, One-Step Diffusion Policy).
    dmd_regression_weight: float = 0.0
    # Which divergence the student's 1-step chunks descend: kl (DMD: the score difference at the noised
    # chunk, no gradient through the score networks) | fisher (Score identity Distillation, Zhou et al.
    # 2024: the Fisher divergence through the score identity, with gradients through the teacher's and the
    # fake network's clean estimates into the chunk; sid_alpha weighs its two terms, the paper's 1.2).
    dmd_divergence: str = "kl"
    sid_alpha: float = 1.2


@dataclass
class EvalConfig:
    n_episodes: int = 50  # 0: train / distill skip their final evaluation
    seed: int = 100_000  # first evaluation seed; collection seeds stay below it
    n_envs: int = 10
    max_steps: int | None = None  # None -> the task's own limit
    n_videos: int = 0
    n_action_steps: int | None = None  # actions executed per chunk; None -> policy.n_action_steps
    temporal_ensemble: bool = False
    # ACT's weights when ensembling: exp(-decay * i), i = 0 the OLDEST covering chunk, so a positive decay
    # favours older chunks (as ACT does) and a negative one the newest (see control.py)
    ensemble_decay: float = 0.1
    sampler: str | None = None  # override policy.scheduler.sampler at evaluation
    num_inference_steps: int | None = None
    timestep_spacing: str | None = None  # override policy.scheduler.timestep_spacing at evaluation
    # Scale of the initial noise x_T (DiffusionPolicy.noise_scale): 1 samples the learned distribution;
    # below 1 is low-temperature sampling (nearer the chunk distribution's modes, less diverse), 0 makes a
    # 1-step consistency policy deterministic. Noise injected later (DDPM steps, chain re-noising) is
    # not scaled. On Push-T below 1 hurt and above 1 did not help (docs/research).
    noise_scale: float = 1.0
    # Inference fast paths (DiffusionPolicy.set_fast_paths): bf16 autocast of the network calls, and
    # torch.compile's mode (reduce-overhead also captures CUDA graphs on GPU); null = eager.
    precision: str = "fp32"
    compile: str | None = None


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = ""  # "" -> runs/<name>-<timestamp>
    task: TaskConfig = field(default_factory=TaskConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        validate(self)


# Inference fast paths (DiffusionPolicy.set_fast_paths): network-call precision and torch.compile mode.
PRECISIONS = ("fp32", "bf16")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")
FLOW_SAMPLERS = ("euler", "heun")  # the samplers of policy.objective=flow
# Each training objective's samplers, and the sampler and step count a config gets when the objective is
# chosen after (above) the sampler: on the command line over a preset's DDPM sampler, or in a preset over
# the dataclass defaults. Flow: 4 Euler steps, pusht_state_flow_cpu's measured setting (docs/research).
OBJECTIVE_SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": FLOW_SAMPLERS}
DEFAULT_SAMPLING = {"ddpm": ("ddpm", 100), "flow": ("euler", 4)}

_CHOICES = {
    "collect.format": ("zarr", "lerobot"),
    "data.short_episodes": ("pad", "skip", "error"),
    "data.split": ("auto", "random"),
    "policy.type": ("diffusion", "mse_bc", "consistency"),
    "policy.net": ("unet", "transformer"),
    "policy.scheduler.prediction_type": ("epsilon", "sample", "v_prediction"),
    "policy.scheduler.sampler": ("ddpm", "ddim", "consistency", "euler", "heun"),
    "policy.objective": ("ddpm", "flow"),
    "policy.flow.time_sampling": ("beta", "uniform", "logit_normal"),
    "policy.scheduler.timestep_spacing": TIMESTEP_SPACINGS,
    "distill.objective": ("cm", "ctm", "dmd"),
    "distill.dmd_divergence": ("kl", "fisher"),
    "distill.loss": ("huber", "mse"),
    "distill.solver_span": ("one", "uniform", "full"),
    "distill.top_target": ("ode", "ddim"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.mixed_precision": ("no", "bf16"),
    "policy.vision.precision": ("fp32", "bf16", "auto"),
    "eval.precision": PRECISIONS,
    "eval.compile": COMPILE_MODES,
}


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _at_least_one(v: Any) -> bool:
    return v >= 1


def _probability(v: Any) -> bool:
    return 0 <= v < 1


def _finite(v: Any) -> bool:
    return math.isfinite(v)


# Numeric keys and the values a run can use (comparisons are False for NaN, so NaN is refused too).
# None stays allowed where the field's default is None ("use the task's / policy's own value").
_NUMERIC_RULES: tuple[tuple[str, Any, str], ...] = (
    ("collect.n_episodes", _at_least_one, ">= 1 (or null: 200, or the mix's own counts)"),
    ("data.frame_stride", _at_least_one, ">= 1"),
    ("collect.seed", _non_negative, ">= 0"),
    ("collect.n_workers", _at_least_one, ">= 1"),
    ("data.max_train_episodes", _at_least_one, ">= 1 (or null: all)"),
    ("data.split_seed", _non_negative, ">= 0"),
    ("data.pad_after", _non_negative, ">= 0 (or null)"),
    ("policy.horizon", _at_least_one, ">= 1"),
    ("policy.unet.kernel_size", _at_least_one, ">= 1"),
    ("policy.unet.n_groups", _at_least_one, ">= 1"),
    ("policy.unet.diffusion_step_embed_dim", _at_least_one, ">= 1"),
    ("policy.transformer.n_layer", _at_least_one, ">= 1"),
    ("policy.transformer.n_head", _at_least_one, ">= 1"),
    ("policy.transformer.n_emb", _at_least_one, ">= 1"),
    ("policy.transformer.p_drop_emb", _probability, "in [0, 1)"),
    ("policy.transformer.p_drop_attn", _probability, "in [0, 1)"),
    ("policy.transformer.n_cond_layers", _non_negative, ">= 0"),
    ("policy.scheduler.num_train_timesteps", _at_least_one, ">= 1"),
    ("policy.scheduler.beta_start", _positive, "> 0"),
    ("policy.scheduler.beta_end", lambda v: 0 < v < 1, "in (0, 1)"),
    ("policy.consistency.timestep_scaling", _positive, "> 0"),
    ("train.num_steps", _at_least_one, ">= 1"),
    ("train.batch_size", _at_least_one, ">= 1"),
    ("train.lr", _positive, "> 0"),
    ("train.weight_decay", _non_negative, ">= 0"),
    ("train.obs_encoder_weight_decay", _non_negative, ">= 0"),
    ("train.warmup_steps", _non_negative, ">= 0"),
    ("train.grad_clip_norm", _finite, "a finite number (<= 0 disables clipping)"),
    ("train.ema.inv_gamma", _positive, "> 0"),
    ("train.ema.power", _positive, "> 0"),
    ("train.ema.min_value", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.ema.max_value", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.ema.update_after_step", _non_negative, ">= 0"),
    ("train.log_every", _at_least_one, ">= 1"),
    ("train.val_every", _non_negative, ">= 0 (0: never)"),
    ("train.eval_every", _non_negative, ">= 0 (0: only the final evaluation)"),
    ("train.eval_episodes", _non_negative, ">= 0"),
    ("train.eval_seed", _non_negative, ">= 0"),
    ("train.checkpoint_every", _non_negative, ">= 0 (0: only the final checkpoint)"),
    ("train.top_k", _non_negative, ">= 0"),
    ("train.stop_at_step", _non_negative, ">= 0 (0: off)"),
    ("train.max_minutes", _non_negative, ">= 0 (0: off)"),
    ("train.num_workers", _non_negative, ">= 0"),
    ("train.seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("eval.seed", _non_negative, ">= 0"),
    ("eval.max_steps", _at_least_one, ">= 1 (or null: the task's limit)"),
    ("eval.n_videos", _non_negative, ">= 0"),
    ("eval.n_action_steps", _at_least_one, ">= 1 (or null: policy.n_action_steps)"),
    ("eval.ensemble_decay", _finite, "a finite number"),
    ("eval.num_inference_steps", _at_least_one, ">= 1 (or null)"),
)


def _value(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    """Reject values no run can use, naming the key (called on every construction)."""
    for dotted, allowed in _CHOICES.items():
        obj = _value(cfg, dotted)
        if obj not in allowed:
            raise ConfigError(f"{dotted}={obj!r} is not one of {allowed}")
    for dotted, ok, rule in _NUMERIC_RULES:
        value = _value(cfg, dotted)
        if value is not None and not ok(value):
            raise ConfigError(f"{dotted}={value!r} must be {rule}")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"train.betas={betas!r} must be two numbers in [0, 1)")
    ema = cfg.train.ema
    if ema.min_value > ema.max_value:
        raise ConfigError(f"train.ema.min_value={ema.min_value} exceeds train.ema.max_value={ema.max_value}")
    sched = cfg.policy.scheduler
    if sched.beta_start > sched.beta_end:
        raise ConfigError(
            f"policy.scheduler.beta_start={sched.beta_start} exceeds "
            f"policy.scheduler.beta_end={sched.beta_end}"
        )
    unet = cfg.policy.unet
    if not unet.down_dims or any(d < 1 or d % unet.n_groups for d in unet.down_dims):
        raise ConfigError(
            f"policy.unet.down_dims={unet.down_dims} must be positive multiples of policy.unet.n_groups="
            f"{unet.n_groups} (GroupNorm splits each into groups)"
        )
    tf = cfg.policy.transformer
    if tf.n_emb % tf.n_head:
        raise ConfigError(
            f"policy.transformer.n_emb={tf.n_emb} must be a multiple of policy.transformer.n_head={tf.n_head}"
        )
    if cfg.data.image_size is not None and (len(cfg.data.image_size) != 2 or min(cfg.data.image_size) < 1):
        raise ConfigError(f"data.image_size must be [H, W] with positive sizes, got {cfg.data.image_size}")
    _validate_mix(cfg.collect)
    p = cfg.policy
    if p.n_obs_steps < 1 or p.n_action_steps < 1:
        raise ConfigError("policy.n_obs_steps and policy.n_action_steps must be >= 1")
    if p.n_obs_steps - 1 + p.n_action_steps > p.horizon:
        raise ConfigError(
            f"policy.horizon={p.horizon} is too short: the executed actions start at offset "
            f"n_obs_steps-1={p.n_obs_steps - 1} and need n_action_steps={p.n_action_steps} steps"
        )
    _validate_vision(p.vision)
    if p.noise_samples_per_obs < 1:
        raise ConfigError(f"policy.noise_samples_per_obs must be >= 1, got {p.noise_samples_per_obs}")
    if (
        p.scheduler.num_inference_steps < 1
        or p.scheduler.num_inference_steps > p.scheduler.num_train_timesteps
    ):
        raise ConfigError("policy.scheduler.num_inference_steps must be in [1, num_train_timesteps]")
    if cfg.eval.sampler is not None and cfg.eval.sampler not in _CHOICES["policy.scheduler.sampler"]:
        raise ConfigError(
            f"eval.sampler={cfg.eval.sampler!r} is not one of {_CHOICES['policy.scheduler.sampler']}"
        )
    if cfg.eval.timestep_spacing is not None and cfg.eval.timestep_spacing not in TIMESTEP_SPACINGS:
        raise ConfigError(
            f"eval.timestep_spacing={cfg.eval.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}"
        )
    consistency = p.type == "consistency"
    if consistency != (p.scheduler.sampler == "consistency"):
        raise ConfigError(
            f"policy.scheduler.sampler={p.scheduler.sampler!r} does not fit policy.type={p.type!r}: "
            "consistency sampling is for (and the only sampler of) consistency-distilled policies"
        )
    flow = p.objective == "flow"
    if flow and p.type != "diffusion":
        raise ConfigError(f"policy.objective=flow is for policy.type=diffusion, not {p.type!r}")
    if flow != (p.scheduler.sampler in FLOW_SAMPLERS):
        raise ConfigError(
            f"policy.scheduler.sampler={p.scheduler.sampler!r} does not fit "
            f"policy.objective={p.objective!r}: "
            f"a flow-matching policy samples with {FLOW_SAMPLERS}, a DDPM-trained one with ddpm | ddim"
        )
    f = p.flow
    if not (f.beta_alpha > 0 and 0 < f.s_max <= 1 and f.logit_normal_std > 0):
        raise ConfigError(
            "policy.flow needs beta_alpha > 0, 0 < s_max <= 1 and logit_normal_std > 0, got "
            f"{f.beta_alpha}, {f.s_max}, {f.logit_normal_std}"
        )
    grid = p.consistency.original_inference_steps
    if not 1 <= grid <= p.scheduler.num_train_timesteps:
        raise ConfigError("policy.consistency.original_inference_steps must be in [1, num_train_timesteps]")
    if consistency and p.scheduler.num_inference_steps > grid:
        raise ConfigError(
            f"policy.scheduler.num_inference_steps={p.scheduler.num_inference_steps} exceeds the consistency "
            f"grid policy.consistency.original_inference_steps={grid}"
        )
    if p.consistency.ctm and p.net != "unet":
        raise ConfigError("policy.consistency.ctm (distill.objective=ctm) needs policy.net=unet")
    d = cfg.distill
    if d.objective == "ctm" and d.top_target != "ode":
        raise ConfigError(
            "distill.objective=ctm trains the top of the grid like every other point: use top_target=ode"
        )
    for key, ok, rule in (
        ("num_steps", d.num_steps >= 1, ">= 1"),
        ("lr", d.lr > 0, "> 0"),
        ("warmup_steps", d.warmup_steps >= 0, ">= 0"),
        ("huber_c", d.huber_c > 0, "> 0"),
        ("denoise_weight", d.denoise_weight >= 0, ">= 0"),
        ("target_ema_decay", 0.0 <= d.target_ema_decay < 1.0, "in [0, 1)"),
        ("dmd_fake_updates", d.dmd_fake_updates >= 1, ">= 1"),
        ("dmd_fake_lr", d.dmd_fake_lr > 0, "> 0"),
        ("dmd_regression_weight", d.dmd_regression_weight >= 0, ">= 0"),
        ("sid_alpha", d.sid_alpha >= 0, ">= 0"),
    ):
        if not ok:
            raise ConfigError(f"distill.{key}={getattr(d, key)!r} must be {rule}")
    if d.dmd_regression_weight > 0 and d.objective != "dmd":
        raise ConfigError(
            f"distill.dmd_regression_weight={d.dmd_regression_weight} is a term of distill.objective=dmd, "
            f"not of {d.objective!r}"
        )
    if d.dmd_divergence != "kl" and d.objective != "dmd":
        raise ConfigError(
            f"distill.dmd_divergence={d.dmd_divergence} chooses the loss of distill.objective=dmd, "
            f"not of {d.objective!r}"
        )
    if not 0 <= d.dmd_t_min <= d.dmd_t_max < p.scheduler.num_train_timesteps:
        raise ConfigError(
            f"distill.dmd_t_min={d.dmd_t_min} / dmd_t_max={d.dmd_t_max} must satisfy 0 <= dmd_t_min <= "
            f"dmd_t_max < policy.scheduler.num_train_timesteps={p.scheduler.num_train_timesteps}"
        )
    skip = p.scheduler.num_train_timesteps // grid
    if d.solver_substeps < 1 or skip % d.solver_substeps:
        raise ConfigError(
            f"distill.solver_substeps={d.solver_substeps} must divide the grid step k = {skip} "
            f"(num_train_timesteps // policy.consistency.original_inference_steps)"
        )
    if d.solver_substeps > 1 and d.top_target == "ddim":
        raise ConfigError(
            "distill.solver_substeps > 1 refines the ODE targets; top_target=ddim regresses the top on the "
            "teacher's DDIM-N sampler as shipped: choose one"
        )
    for key, mode in p.normalization.items():
        if mode not in ("minmax", "gaussian", "image", "identity"):
            raise ConfigError(f"policy.normalization.{key}={mode!r} is not a normalization mode")
    if cfg.train.eval_every and cfg.train.eval_episodes < 1:
        raise ConfigError("train.eval_episodes must be >= 1 when train.eval_every is set")
    tc, ec = cfg.train, cfg.eval
    if tc.eval_every and ec.n_episodes and _overlap(tc.eval_seed, tc.eval_episodes, ec.seed, ec.n_episodes):
        raise ConfigError(
            f"the periodic evaluations' seeds (train.eval_seed={tc.eval_seed}, {tc.eval_episodes} episodes) "
            f"overlap the final evaluation's (eval.seed={ec.seed}, {ec.n_episodes} episodes): checkpoints "
            "would be ranked on the episodes they are reported on"
        )
    if cfg.eval.n_episodes < 0 or cfg.eval.n_envs < 1:
        raise ConfigError(
            f"eval.n_episodes={cfg.eval.n_episodes} must be >= 0 and eval.n_envs={cfg.eval.n_envs} >= 1"
        )
    if not cfg.eval.noise_scale >= 0.0:  # also rejects NaN
        raise ConfigError(f"eval.noise_scale={cfg.eval.noise_scale!r} must be >= 0")
    if not 0.0 <= cfg.data.val_ratio < 1.0:
        raise ConfigError("data.val_ratio must be in [0, 1)")


def _validate_mix(cc: CollectConfig) -> None:
    """Refuse a collection mix that cannot mean what it says (naming the group)."""
    seen: dict[str, int] = {}
    for i, group in enumerate(cc.mix):
        if group.n_episodes < 1:
            raise ConfigError(f"collect.mix[{i}].n_episodes={group.n_episodes} must be >= 1")
        key = repr(sorted(group.task_kwargs.items()))
        if key in seen:
            raise ConfigError(
                f"collect.mix[{seen[key]}] and collect.mix[{i}] have the same task_kwargs "
                f"{dict(group.task_kwargs)}: merge them into one group (n_episodes adds up)"
            )
        seen[key] = i
    if cc.mix:
        collect_counts(cc)  # refuses a total below the number of groups


def _validate_vision(v: VisionConfig) -> None:
    for name in ("resize_shape", "crop_shape"):
        shape = getattr(v, name)
        if shape is not None and (len(shape) != 2 or min(shape) < 1):
            raise ConfigError(f"policy.vision.{name} must be [H, W] with positive sizes, got {shape}")
    if len(v.cnn_channels) != len(v.cnn_strides) or not v.cnn_channels:
        raise ConfigError(
            f"policy.vision.cnn_channels {v.cnn_channels} and cnn_strides {v.cnn_strides} must be "
            "non-empty lists of one length (one entry per convolution)"
        )
    if min(v.cnn_channels) < 1 or min(v.cnn_strides) < 1:
        raise ConfigError("policy.vision.cnn_channels and cnn_strides must be positive")
    if not 0 <= v.color_jitter < 1:
        raise ConfigError(f"policy.vision.color_jitter must be in [0, 1), got {v.color_jitter}")
    if v.num_keypoints < 1 or v.feature_dim < 1:
        raise ConfigError("policy.vision.num_keypoints and policy.vision.feature_dim must be >= 1")
    if v.cache_features and not v.freeze_backbone:
        raise ConfigError(
            "policy.vision.cache_features=true needs policy.vision.freeze_backbone=true: the features of a "
            "backbone that trains change every step and cannot be computed once"
        )
    if v.cache_features and v.color_jitter > 0:
        raise ConfigError(
            f"policy.vision.cache_features=true caches one view per frame, so colour jitter "
            f"(policy.vision.color_jitter={v.color_jitter}) cannot be applied: set it to 0"
        )


def _overlap(start_a: int, n_a: int, start_b: int, n_b: int) -> bool:
    """Whether the seed ranges [start_a, start_a + n_a) and [start_b, start_b + n_b) share a seed."""
    return start_a < start_b + n_b and start_b < start_a + n_a


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _wrap(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{where}: unknown config key '{key}'")
    first = str(err).splitlines()[0]
    return ConfigError(f"{where}: bad value for '{key}': {first}")


def _merge_overrides(merged: Any, overrides: list[str]) -> tuple[Any, set[str]]:
    """`merged` with the dotted overrides applied, and the dotted keys they set."""
    keys: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        try:
            layer = OmegaConf.from_dotlist([item])
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override '{item}'") from None
        keys |= _dotted_keys(OmegaConf.to_container(layer))
    return merged, keys


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """The leaf keys of a nested mapping, dotted ({"a": {"b": 1}} -> {"a.b"})."""
    if not isinstance(data, dict):
        return {prefix} if prefix else set()
    keys: set[str] = set()
    for key, value in data.items():
        keys |= _dotted_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return keys


def _fit_sampler_to_objective(merged: Any, layers: list[set[str]]) -> None:
    """Let the sampler follow the training objective when the objective was set after it.

    `layers` are the keys each source set, lowest first (the preset, then the command line). A sampler
    that does not fit policy.objective and comes from a layer below the objective's (the dataclass default
    or a preset's DDPM sampler under `policy.objective=flow`) becomes the objective's default, with its step
    count unless that was set at or above the objective's layer. A sampler set with or after the objective
    is the user's choice and stays, so validate() refuses a contradiction by name.
    """

    def layer_of(key: str) -> int:  # -1: the dataclass default
        return max((i for i, keys in enumerate(layers) if key in keys), default=-1)

    policy = merged.policy
    objective, sched = policy.objective, policy.scheduler
    if objective not in OBJECTIVE_SAMPLERS or policy.type != "diffusion":
        return  # validate() names a bad objective; consistency / mse_bc policies keep their sampler
    if sched.sampler in OBJECTIVE_SAMPLERS[objective]:
        return
    objective_layer = layer_of("policy.objective")
    if layer_of("policy.scheduler.sampler") >= objective_layer:
        return
    sampler, steps = DEFAULT_SAMPLING[objective]
    sched.sampler = sampler
    if layer_of("policy.scheduler.num_inference_steps") < objective_layer:
        sched.num_inference_steps = steps


def _to_run_config(merged: Any) -> RunConfig:
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, RunConfig)
    return obj


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig: dataclass defaults <- preset YAML (name or path) <- dotted overrides.

    The sampler follows policy.objective where the objective is set above it (_fit_sampler_to_objective).
    """
    merged = OmegaConf.structured(RunConfig)
    layers: list[set[str]] = []
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"preset '{preset}' not found; available: {', '.join(available_presets())}")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"preset {path} is not valid YAML{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"preset {path} must hold a mapping at the top level")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _wrap(e, f"preset {path.name}") from None
        layers.append(_dotted_keys(data))
    merged, keys = _merge_overrides(merged, overrides or [])
    _fit_sampler_to_objective(merged, [*layers, keys])
    return _to_run_config(merged)


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of `cfg` with dotted overrides applied (same checks and sampler rule as load_config; every
    key of `cfg` counts as set below the overrides)."""
    merged, keys = _merge_overrides(OmegaConf.structured(cfg), overrides)
    _fit_sampler_to_objective(merged, [_dotted_keys(to_dict(cfg)), keys])
    return _to_run_config(merged)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from a saved dict (a checkpoint's config), with the same validation."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(data))
    except OmegaConfBaseException as e:
        raise _wrap(e, "saved config") from None
    return _to_run_config(merged)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
