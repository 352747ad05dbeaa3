"""Closed-loop evaluation: vectorized gymnasium envs, fixed seeds, success rate with a 95% interval,
mean max reward, videos of the first episodes with the predicted chunk drawn (10 fps in real time: every
video_stride-th step, rendered only in the envs that film), JSON + markdown report.

Inside `interrupt.graceful_stop()` (diffpolicy eval, training runs) a SIGINT / SIGTERM ends the
evaluation early: the episodes finished by then make a partial report, marked `interrupted`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.config import EvalConfig
from diffpolicy.control import RecedingHorizonController, check_frame_stride
from diffpolicy.interrupt import stop_requested
from diffpolicy.tasks.base import Rollout, Task


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (well-behaved at 0% and 100%, unlike p +- 2se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _make_envs(task: Task, n: int, render: bool) -> gym.vector.VectorEnv:
    fns = [lambda: task.make_env(render=render) for _ in range(n)]
    if getattr(task, "vector_mode", "sync") == "async" and n > 1:
        return gym.vector.AsyncVectorEnv(fns, context="spawn")
    return gym.vector.SyncVectorEnv(fns)


VIDEO_FPS = 10  # evaluation videos' frame rate (write_video)


def video_stride(task: Task) -> int:
    """Control steps per video frame: a task at 30 Hz renders every third step, so its 10-fps video plays
    in real time and costs a third of the frames (tasks without an fps, or at <= 10 Hz: every step)."""
    return max(1, round(float(task.fps) / VIDEO_FPS)) if task.fps else 1


def _render(envs: gym.vector.VectorEnv, indices: list[int]) -> dict[int, np.ndarray]:
    """Frames of the envs at `indices`. A SyncVectorEnv renders only those (a so101_grasp frame costs
    ~7 ms on a software renderer, and its GL context ~0.5 s, per env); AsyncVectorEnv can only ask all."""
    if isinstance(envs, gym.vector.SyncVectorEnv):
        return {i: envs.envs[i].render() for i in indices}
    rendered = envs.call("render")
    return {i: rendered[i] for i in indices}


def run_rollouts(
    policy: torch.nn.Module,
    task: Task,
    cfg: EvalConfig,
    n_episodes: int,
    first_seed: int,
    controller: RecedingHorizonController | None = None,
) -> list[Rollout]:
    """Roll the policy out on seeds first_seed .. first_seed+n_episodes-1, n_envs at a time (through
    `controller` if given, e.g. control.AsyncChunkController; by default the eval config's own).
    On `interrupt.stop_requested()` it returns the episodes finished so far (fewer than n_episodes)."""
    max_steps = cfg.max_steps or task.max_episode_steps
    n_envs = max(1, min(cfg.n_envs, n_episodes))
    check_frame_stride(task, controller.frame_stride if controller else getattr(policy, "frame_stride", 1))
    if controller is None:
        generator = torch.Generator(device=policy.device).manual_seed(first_seed)
        controller = RecedingHorizonController(
            policy,
            n_action_steps=cfg.n_action_steps,
            temporal_ensemble=cfg.temporal_ensemble,
            ensemble_decay=cfg.ensemble_decay,
            generator=generator,
        )
    low_dim_keys = [k for k, m in policy.shape_meta["obs"].items() if m.get("type", "low_dim") == "low_dim"]
    rollouts: list[Rollout] = []
    render = cfg.n_videos > 0
    stride = video_stride(task)
    envs = _make_envs(task, n_envs, render)
    try:
        for batch_start in range(0, n_episodes, n_envs):
            seeds = [first_seed + batch_start + i for i in range(n_envs)]
            active = min(n_envs, n_episodes - batch_start)  # envs past `active` only pad the last batch
            obs, _ = envs.reset(seed=seeds)
            controller.reset()
            done = np.zeros(n_envs, dtype=bool)
            done[active:] = True
            success = np.zeros(n_envs, dtype=bool)
            rewards: list[list[float]] = [[] for _ in range(n_envs)]
            actions: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
            traj = {k: [[obs[k][i]] for i in range(n_envs)] for k in low_dim_keys}
            video = [batch_start + i < cfg.n_videos for i in range(n_envs)]
            frames: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
            stopped = False
            for t in range(max_steps):
                if done.all():
                    break
                if stop_requested():
                    stopped = True
                    break
                filming = [i for i in range(n_envs) if video[i] and not done[i]] if t % stride == 0 else []
                rendered = _render(envs, filming) if filming else {}
                action = controller.act(obs)
                offset = (controller.step - 1) % controller.n_action_steps  # position in the newest chunk
                for i, frame in rendered.items():
                    chunk = controller.last_chunk[i, offset:]
                    frames[i].append(task.draw_chunk(np.asarray(frame), chunk))
                obs, reward, terminated, truncated, info = envs.step(action.astype(np.float32))
                step_success = np.asarray(info.get("is_success", np.zeros(n_envs)), dtype=bool)
                for i in np.nonzero(~done)[0]:
                    rewards[i].append(float(reward[i]))
                    actions[i].append(action[i])
                    for k in low_dim_keys:
                        traj[k][i].append(obs[k][i])
                    success[i] |= step_success[i]
                    if terminated[i] or truncated[i]:
                        done[i] = True
            for i in range(active):
                if stopped and not done[i]:  # cut short by a signal: not an episode
                    continue
                rollouts.append(
                    Rollout(
                        seed=seeds[i],
                        success=bool(success[i]),
                        length=len(rewards[i]),
                        rewards=np.asarray(rewards[i], dtype=np.float64),
                        actions=np.asarray(actions[i]),
                        low_dim_obs={k: np.asarray(traj[k][i]) for k in low_dim_keys},
                        frames=frames[i] if video[i] else None,
                    )
                )
            if stopped:
                break
    finally:
        envs.close()
    return rollouts


def controller_steps(policy: torch.nn.Module, cfg: EvalConfig) -> int:
    return cfg.n_action_steps or policy.n_action_steps


def write_video(frames: list[np.ndarray], path: Path, fps: int = 10) -> list[Path]:
    """mp4 (imageio-ffmpeg ships its own ffmpeg) and gif of the same frames."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    mp4, gif = path.with_suffix(".mp4"), path.with_suffix(".gif")
    imageio.mimsave(mp4, frames, fps=fps, macro_block_size=1)
    imageio.mimsave(gif, frames, duration=1000 / fps, loop=0)
    return [mp4, gif]


def configure_inference(policy: torch.nn.Module, cfg: EvalConfig) -> None:
    """Apply eval.* inference settings (sampler, steps, spacing, precision, compile, noise scale) to a
    policy; shared by evaluation and the policy server (`diffpolicy serve`). None keeps the checkpoint's
    own setting; anything else, 0 steps included, goes to the policy's `set_sampler`, which refuses what
    it cannot sample with."""
    sampler, steps, spacing = cfg.sampler, cfg.num_inference_steps, cfg.timestep_spacing
    if hasattr(policy, "set_sampler") and (sampler, steps, spacing) != (None, None, None):
        own = policy.cfg.scheduler
        policy.set_sampler(
            own.sampler if sampler is None else sampler,
            own.num_inference_steps if steps is None else steps,
            spacing,
        )
    if hasattr(policy, "set_fast_paths"):
        policy.set_fast_paths(cfg.precision, cfg.compile)
    if hasattr(policy, "noise_scale"):
        policy.noise_scale = cfg.noise_scale


def evaluate(
    policy: torch.nn.Module,
    task: Task,
    cfg: EvalConfig,
    out_dir: str | Path,
    n_episodes: int | None = None,
    label: str = "policy",
) -> dict[str, Any]:
    """Evaluate in closed loop and write report.json / report.md (and videos, plots) into out_dir.

    Stopped by a signal (see the module docstring), the report holds the finished episodes and says so:
    `interrupted` (the signal's name) and `n_episodes_planned`."""
    n = cfg.n_episodes if n_episodes is None else n_episodes
    if n < 1:
        raise ValueError(f"an evaluation needs at least one episode, got n_episodes={n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = policy.training
    policy.eval()
    configure_inference(policy, cfg)
    t0 = time.perf_counter()
    rollouts = run_rollouts(policy, task, cfg, n, cfg.seed)
    elapsed = time.perf_counter() - t0
    policy.train(was_training)
    interrupted = stop_requested() if len(rollouts) < n else None
    successes = sum(r.success for r in rollouts)
    lo, hi = wilson_interval(successes, len(rollouts))
    videos = []
    for r in rollouts:
        if r.frames:
            videos += [str(p) for p in write_video(r.frames, out_dir / "videos" / f"seed{r.seed}", VIDEO_FPS)]
    report: dict[str, Any] = {
        "label": label,
        "task": task.name,
        "n_episodes": len(rollouts),
        "n_episodes_planned": n,
        "interrupted": interrupted,
        "seeds": [rollouts[0].seed, rollouts[-1].seed] if rollouts else [],
        "success_rate": successes / max(len(rollouts), 1),
        "success_ci95": [lo, hi],
        "mean_max_reward": float(np.mean([r.max_reward for r in rollouts])) if rollouts else 0.0,
        "mean_episode_length": float(np.mean([r.length for r in rollouts])) if rollouts else 0.0,
        "wall_time_s": elapsed,
        "sampler": getattr(policy, "sampler_name", None),
        "num_inference_steps": getattr(policy, "num_inference_steps", None),
        "timestep_spacing": getattr(policy, "timestep_spacing", None),
        "noise_scale": getattr(policy, "noise_scale", None),
        "precision": getattr(policy, "precision", "fp32"),
        "compile": getattr(policy, "compile_mode", None),
        "n_action_steps": controller_steps(policy, cfg),
        # control steps per policy step (data.frame_stride): each action was held this many steps
        "frame_stride": int(getattr(policy, "frame_stride", 1)),
        "temporal_ensemble": cfg.temporal_ensemble,
        # the blend's weighting changes results a lot (BENCHMARKS), so a report names it
        "ensemble_decay": cfg.ensemble_decay if cfg.temporal_ensemble else None,
        "task_metrics": task.summarize(rollouts, out_dir) if rollouts else {},
        "videos": videos,
        "episodes": [
            {"seed": r.seed, "success": r.success, "max_reward": r.max_reward, "length": r.length}
            for r in rollouts
        ],
    }
    with open(out_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    (out_dir / "report.md").write_text(report_markdown(report))
    return report


def interrupted_note(report: dict[str, Any]) -> str:
    """'interrupted by SIGTERM after 2 of 6 episodes' for a report cut short by a signal."""
    return (
        f"interrupted by {report['interrupted']} after {report['n_episodes']} of "
        f"{report['n_episodes_planned']} episodes"
    )


def report_markdown(report: dict[str, Any]) -> str:
    lo, hi = report["success_ci95"]
    lines = [
        f"# Evaluation: {report['label']} on {report['task']}",
        "",
        *([f"**A partial report: {interrupted_note(report)}.**", ""] if report.get("interrupted") else []),
        f"- episodes: {report['n_episodes']} (seeds {report['seeds'][0]}..{report['seeds'][-1]})"
        if report["seeds"]
        else "- episodes: 0",
        f"- success rate: {report['success_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f})",
        f"- mean max reward: {report['mean_max_reward']:.3f}",
        f"- mean episode length: {report['mean_episode_length']:.1f}",
        f"- sampler: {report['sampler']} x {report['num_inference_steps']}"
        + (f" ({report['timestep_spacing']} spacing)" if report["timestep_spacing"] else "")
        + (f", noise scale {report['noise_scale']}" if report.get("noise_scale", 1.0) != 1.0 else "")
        + f", actions per chunk: "
        f"{report['n_action_steps']}, temporal ensembling: {report['temporal_ensemble']}"
        + (f" (decay {report['ensemble_decay']})" if report.get("ensemble_decay") is not None else ""),
        f"- wall time: {report['wall_time_s']:.1f} s",
    ]
    metrics = {k: v for k, v in report["task_metrics"].items() if not isinstance(v, list | dict)}
    if metrics:
        lines += ["", "| task metric | value |", "|---|---|"]
        for k, v in metrics.items():
            if k == "plot":
                continue
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if "plot" in report["task_metrics"]:
        lines += ["", f"![rollouts]({Path(report['task_metrics']['plot']).name})"]
    for v in report["videos"]:
        if v.endswith(".gif"):
            lines.append(f"![video]({Path(v).relative_to(Path(v).parents[1])})")
    return "\n".join(lines) + "\n"
