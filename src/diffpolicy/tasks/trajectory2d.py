"""trajectory2d: a point traces a figure-eight in one of two directions. The multimodal toy.

The path is the lemniscate of Gerono, (x, y) = (sin th, sin th cos th), which crosses itself at the origin.
Every episode starts in a small disk around the origin. The scripted expert traverses the whole
figure-eight once, in a direction chosen at random per episode; both directions start into the right lobe:

- "forward": the right lobe clockwise, leaving the origin towards (+1, +1) (over the top), then the left
  lobe anticlockwise;
- "reverse": the mirror image, y -> -y: the right lobe anticlockwise, leaving towards (+1, -1) (underneath),
  then the left lobe clockwise.

At the start both modes are equally likely, so a regressor trained with MSE averages "up-right" and
"down-right" into "straight right", through the middle of the lobe where no demonstration goes (the
tree-in-the-road example of the Diffusion Policy paper), while a diffusion policy commits to one side.
Observation: the point's position and its last displacement (velocity per step, zero at the start); action:
the absolute position the point is commanded to (it moves
there at up to `max_speed` per step). An episode succeeds when the point has passed both lobe tips
(|x| > 0.8) and returned to the origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.tasks.base import Rollout, Task

BOUND = 1.5
LOBE_TIP = 0.8  # |x| beyond which a lobe counts as visited
RETURN_RADIUS = 0.08  # success once both lobes are visited and the point is this close to the origin
MODE_X = (
    0.5  # a rollout's mode is the side (y > 0: forward, y < 0: reverse) it is on when x first passes this
)
# A rollout "follows" a mode when it completes the figure-eight and never strays farther than this from
# the path: 30% of a lobe's half-height (0.5). Cutting straight through a lobe, as mode averaging does,
# strays 0.25-0.35; starting anywhere in the start disk costs at most its radius, 0.1; the expert's
# largest distance is that initial offset.
FOLLOW_MAX_DISTANCE = 0.15
# The mean distance to the path that counts as "close": 5% of a lobe's width; the expert's is ~0.001.
CLOSE_MEAN_DISTANCE = 0.05


def figure_eight(theta: np.ndarray | float, direction: int = 1) -> np.ndarray:
    """Points of the path; direction -1 is the mirror image (y -> -y), i.e. the reverse traversal."""
    theta = np.asarray(theta, dtype=np.float64)
    return np.stack([np.sin(theta), direction * np.sin(theta) * np.cos(theta)], axis=-1)


_CURVE = figure_eight(np.linspace(0.0, 2 * np.pi, 4001))


def distance_to_path(points: np.ndarray) -> np.ndarray:
    """Euclidean distance of each (…, 2) point to the nearest point of the figure-eight."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    d = np.sqrt(((pts[:, None, :] - _CURVE[None, :, :]) ** 2).sum(-1)).min(axis=1)
    return d.reshape(np.shape(points)[:-1])


class Trajectory2DEnv(gym.Env):
    """A point commanded to absolute target positions in [-1.5, 1.5]^2."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        max_steps: int = 150,
        start_radius: float = 0.1,
        max_speed: float = 0.12,
        render_size: int = 96,
        render_mode: str | None = None,
    ) -> None:
        self.max_steps = max_steps
        self.start_radius = start_radius
        self.max_speed = max_speed
        self.render_size = render_size
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Dict(
            {
                "pos": gym.spaces.Box(-BOUND, BOUND, shape=(2,), dtype=np.float32),
                "vel": gym.spaces.Box(-max_speed, max_speed, shape=(2,), dtype=np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-BOUND, BOUND, shape=(2,), dtype=np.float32)
        self.pos = np.zeros(2)
        self.vel = np.zeros(2)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"pos": self.pos.astype(np.float32), "vel": self.vel.astype(np.float32)}

    def _info(self) -> dict[str, Any]:
        return {"is_success": self.success}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        r = self.start_radius * np.sqrt(self.np_random.uniform())
        a = self.np_random.uniform(0, 2 * np.pi)
        self.pos = np.array([r * np.cos(a), r * np.sin(a)])
        self.vel = np.zeros(2)
        self.t = 0
        self.visited = {+1: False, -1: False}  # right / left lobe tip passed
        self.success = False
        return self._obs(), self._info()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"trajectory2d received a non-finite action {action}")
        delta = np.clip(action, -BOUND, BOUND) - self.pos
        norm = np.linalg.norm(delta)
        if norm > self.max_speed:
            delta *= self.max_speed / norm
        self.pos = self.pos + delta
        self.vel = delta
        self.t += 1
        for side in (+1, -1):
            if side * self.pos[0] > LOBE_TIP:
                self.visited[side] = True
        self.success = all(self.visited.values()) and np.linalg.norm(self.pos) < RETURN_RADIUS
        reward = float(self.success)
        return self._obs(), reward, self.success, self.t >= self.max_steps, self._info()

    def render(self) -> np.ndarray:
        """A small RGB frame: the path in grey, the point in red."""
        s = self.render_size
        frame = np.full((s, s, 3), 255, dtype=np.uint8)
        px = world_to_pixel(_CURVE[::8], s)
        frame[px[:, 1], px[:, 0]] = (170, 170, 170)
        _dot(frame, world_to_pixel(self.pos[None], s)[0], (220, 30, 30), 2)
        return frame


def world_to_pixel(points: np.ndarray, size: int) -> np.ndarray:
    uv = (np.asarray(points) + BOUND) / (2 * BOUND) * (size - 1)
    uv[:, 1] = size - 1 - uv[:, 1]
    return np.clip(np.round(uv), 0, size - 1).astype(int)


def _dot(frame: np.ndarray, center: np.ndarray, color: tuple[int, int, int], radius: int) -> None:
    x, y = center
    frame[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = color


class FigureEightExpert:
    """Leads the point along the figure-eight at a per-episode speed, in a per-episode direction."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.direction = int(rng.choice([1, -1]))
        self.loop_steps = int(rng.integers(80, 101))

    def act(self, step: int) -> np.ndarray:
        theta = 2 * np.pi * min(1.0, (step + 1) / self.loop_steps)
        return figure_eight(theta, self.direction).astype(np.float32)


class Trajectory2DTask(Task):
    name = "trajectory2d"
    fps = 10.0  # nominal (the render rate): a toy without physical time
    absolute_actions = True  # the commanded position

    def __init__(self, max_steps: int = 150, start_radius: float = 0.1, max_speed: float = 0.12) -> None:
        self.max_episode_steps = max_steps
        self.env_kwargs = dict(max_steps=max_steps, start_radius=start_radius, max_speed=max_speed)

    def shape_meta(self) -> dict[str, Any]:
        return {
            "obs": {"pos": {"shape": [2], "type": "low_dim"}, "vel": {"shape": [2], "type": "low_dim"}},
            "action": {"shape": [2]},
        }

    def make_env(self, render: bool = False) -> gym.Env:
        return Trajectory2DEnv(**self.env_kwargs, render_mode="rgb_array" if render else None)

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        env = self.make_env()
        expert = FigureEightExpert(seed)
        obs, info = env.reset(seed=seed)
        steps: dict[str, list[np.ndarray]] = {"pos": [], "vel": [], "action": []}
        for k in range(self.max_episode_steps):
            action = expert.act(k)
            for key in ("pos", "vel"):
                steps[key].append(obs[key])
            steps["action"].append(action)
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        return {k: np.stack(v) for k, v in steps.items()}, bool(info["is_success"])

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """Which mode each rollout followed, its distance to the path, and a plot coloured by mode."""
        modes, mean_dists, max_dists = [], [], []
        for r in rollouts:
            traj = r.low_dim_obs["pos"]
            dist = distance_to_path(traj)
            follows = r.success and dist.max() < FOLLOW_MAX_DISTANCE
            modes.append(("forward" if mode_side(traj) > 0 else "reverse") if follows else "none")
            mean_dists.append(float(dist.mean()))
            max_dists.append(float(dist.max()))
        n = max(len(rollouts), 1)
        summary = {
            "forward_fraction": modes.count("forward") / n,
            "reverse_fraction": modes.count("reverse") / n,
            "no_mode_fraction": modes.count("none") / n,
            "mean_distance_to_path": float(np.mean(mean_dists)) if rollouts else float("nan"),
            "median_max_distance_to_path": float(np.median(max_dists)) if rollouts else float("nan"),
            "follow_max_distance": FOLLOW_MAX_DISTANCE,
            "close_mean_distance": CLOSE_MEAN_DISTANCE,
            "modes": modes,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        summary["plot"] = str(plot_rollouts(rollouts, modes, out_dir / "rollouts.png"))
        return summary

    def draw_chunk(self, frame: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        frame = frame.copy()
        for p in world_to_pixel(chunk, frame.shape[0]):
            _dot(frame, p, (30, 90, 220), 0)
        return frame


def mode_side(traj: np.ndarray) -> int:
    """+1 if the trajectory entered the right lobe over the top (forward), -1 underneath, 0 never."""
    hits = np.nonzero(traj[:, 0] > MODE_X)[0]
    return int(np.sign(traj[hits[0], 1])) if len(hits) else 0


MODE_COLOURS = {"forward": "tab:blue", "reverse": "tab:orange", "none": "tab:red"}


def plot_rollouts(rollouts: list[Rollout], modes: list[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(_CURVE[:, 0], _CURVE[:, 1], color="0.8", lw=6, zorder=0, label="demonstrated path")
    for r, mode in zip(rollouts, modes, strict=True):
        xy = r.low_dim_obs["pos"]
        ax.plot(xy[:, 0], xy[:, 1], color=MODE_COLOURS[mode], lw=0.8, alpha=0.7)
        ax.plot(xy[:1, 0], xy[:1, 1], "k.", ms=3)
    for mode, colour in MODE_COLOURS.items():
        ax.plot([], [], color=colour, label=f"{mode} ({modes.count(mode)})")
    ax.set_aspect("equal")
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-0.8, 0.8)
    ax.legend(loc="upper center", ncol=4, fontsize=7, bbox_to_anchor=(0.5, 1.12))
    if title:
        ax.set_title(title, fontsize=9, pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
