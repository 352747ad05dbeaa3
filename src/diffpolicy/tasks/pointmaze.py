"""PointMaze (gymnasium-robotics, MuJoCo): drive a point mass through a maze to a goal (seed 000's task).

Observations as D4RL/Minari's PointMaze: `observation` = (x, y, vx, vy) and `desired_goal` = (gx, gy),
2-D force action in [-1, 1]. Start and goal are drawn by the environment from the maze's open cells on
`reset(seed)`; success is the env's own (distance to the goal <= 0.45), and an episode ends there.
`obs_type="image"` replaces the goal vector by a top-down render (the goal is the red ball in it) beside
the agent's own position and velocity, like Push-T's image variant.

The scripted expert is the D4RL recipe: breadth-first search over maze cells for the shortest cell path,
then a PD controller towards each cell centre in turn (the goal itself last). Demonstrations execute the
expert's action plus Gaussian noise while recording the clean action (DART), so the data show how to
recover from small drifts. `python -m diffpolicy.tasks.pointmaze minari OUT` writes the same expert's
episodes as a Minari dataset through minari's own DataCollector (`diffpolicy train data.path=OUT` reads it).
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.tasks.base import Rollout, Task, prepare_headless_gl

MAZES = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3", "large": "PointMaze_Large-v3"}
SUCCESS_DISTANCE = 0.45  # the env's own threshold (gymnasium_robotics MazeEnv)
FAR_CELLS = 4  # episodes whose shortest cell path has at least this many moves count as "far"


def _register() -> None:
    prepare_headless_gl()
    try:
        import gymnasium_robotics
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{e}: the pointmaze task needs gymnasium-robotics (pip install -e '.[pointmaze]')"
        ) from e
    gym.register_envs(gymnasium_robotics)


class PointMazeTaskEnv(gym.Wrapper):
    """The gymnasium-robotics PointMaze env with this task's observation dict and `info["is_success"]`."""

    def __init__(
        self,
        maze: str = "medium",
        obs_type: str = "state",
        image_size: int = 96,
        render: bool = False,
        render_size: int = 256,
    ) -> None:
        _register()
        if maze not in MAZES:
            raise ValueError(f"unknown maze '{maze}'; choose one of {sorted(MAZES)}")
        if obs_type not in ("state", "image"):
            raise ValueError(f"obs_type must be 'state' or 'image', got '{obs_type}'")
        needs_pixels = render or obs_type == "image"
        env = gym.make(
            MAZES[maze],
            continuing_task=False,
            render_mode="rgb_array" if needs_pixels else None,
            width=image_size if obs_type == "image" else render_size,  # videos of state runs: larger
            height=image_size if obs_type == "image" else render_size,
        )
        super().__init__(env)
        self.obs_type = obs_type
        self.image_size = image_size
        spaces: dict[str, gym.Space] = {
            "observation": gym.spaces.Box(-np.inf, np.inf, (4,), np.float64),
        }
        if obs_type == "state":
            spaces["desired_goal"] = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        else:
            spaces["image"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    @property
    def maze(self) -> Any:
        return self.env.unwrapped.maze

    @property
    def goal(self) -> np.ndarray:
        return np.asarray(self.env.unwrapped.goal, dtype=np.float64)

    def _obs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {"observation": np.asarray(raw["observation"], dtype=np.float64)}
        if self.obs_type == "state":
            obs["desired_goal"] = np.asarray(raw["desired_goal"], dtype=np.float64)
        else:
            obs["image"] = np.ascontiguousarray(self.env.render())
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, info = self.env.reset(seed=seed, options=options)
        info["is_success"] = False
        return self._obs(raw), info

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"pointmaze: non-finite action {action}")
        raw, reward, terminated, truncated, info = self.env.step(np.clip(action, -1.0, 1.0))
        info["is_success"] = bool(info.get("success", False))
        return self._obs(raw), float(reward), bool(terminated), bool(truncated), info


def cell_path(
    maze_map: list[list[Any]], start: tuple[int, int], goal: tuple[int, int]
) -> list[tuple[int, int]]:
    """Shortest 4-connected path of open cells from start to goal (both included), by breadth-first search."""
    rows, cols = len(maze_map), len(maze_map[0])
    parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        r, c = cell
        for nxt in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            inside = 0 <= nxt[0] < rows and 0 <= nxt[1] < cols
            if inside and maze_map[nxt[0]][nxt[1]] != 1 and nxt not in parent:
                parent[nxt] = cell
                queue.append(nxt)
    if goal not in parent:
        raise ValueError(f"no path of open cells from {start} to {goal}")
    path = [goal]
    while parent[path[-1]] is not None:
        path.append(parent[path[-1]])
    return path[::-1]


class WaypointExpert:
    """BFS cell path + PD control towards each cell centre, then the goal (D4RL's waypoint controller)."""

    def __init__(self, kp: float = 10.0, kd: float = 1.0, switch_distance: float = 0.3) -> None:
        self.kp, self.kd, self.switch_distance = kp, kd, switch_distance
        self.waypoints: list[np.ndarray] = []

    def reset(self, env: PointMazeTaskEnv) -> None:
        maze = env.maze
        pos = np.asarray(env.env.unwrapped.point_env.data.qpos[:2], dtype=np.float64)
        start = tuple(int(v) for v in maze.cell_xy_to_rowcol(pos))
        goal = tuple(int(v) for v in maze.cell_xy_to_rowcol(env.goal))
        cells = cell_path(maze.maze_map, start, goal)
        self.n_moves = len(cells) - 1
        self.waypoints = [
            np.asarray(maze.cell_rowcol_to_xy(np.array(c)), dtype=np.float64) for c in cells[1:-1]
        ]
        self.waypoints.append(env.goal.copy())

    def act(self, observation: np.ndarray) -> np.ndarray:
        pos, vel = observation[:2], observation[2:4]
        while len(self.waypoints) > 1 and np.linalg.norm(self.waypoints[0] - pos) < self.switch_distance:
            self.waypoints.pop(0)
        return np.clip(self.kp * (self.waypoints[0] - pos) - self.kd * vel, -1.0, 1.0)


class PointMazeTask(Task):
    name = "pointmaze"

    def __init__(
        self,
        maze: str = "medium",
        obs_type: str = "state",
        image_size: int = 96,
        max_steps: int | None = None,
        expert_noise: float = 0.1,
    ) -> None:
        if maze not in MAZES:
            raise ValueError(f"unknown maze '{maze}'; choose one of {sorted(MAZES)}")
        self.maze_name, self.obs_type, self.image_size = maze, obs_type, image_size
        self.max_episode_steps = max_steps or {"umaze": 300, "medium": 600, "large": 800}[maze]
        self.expert_noise = expert_noise

    def shape_meta(self) -> dict[str, Any]:
        obs: dict[str, Any] = {"observation": {"shape": [4], "type": "low_dim"}}
        if self.obs_type == "state":
            obs["desired_goal"] = {"shape": [2], "type": "low_dim"}
        else:
            obs["image"] = {"shape": [3, self.image_size, self.image_size], "type": "rgb"}
        return {"obs": obs, "action": {"shape": [2]}}

    def make_env(self, render: bool = False) -> gym.Env:
        env = PointMazeTaskEnv(self.maze_name, self.obs_type, self.image_size, render=render)
        return gym.wrappers.TimeLimit(env, self.max_episode_steps)

    def collect_episode(self, seed: int) -> tuple[dict[str, np.ndarray], bool]:
        env = self.make_env()
        rng = np.random.default_rng([seed, 7])  # the noise stream, apart from the env's start/goal draw
        expert = WaypointExpert()
        obs, info = env.reset(seed=seed)
        expert.reset(_task_env(env))
        steps: dict[str, list[np.ndarray]] = {k: [] for k in (*obs, "action")}
        for _ in range(self.max_episode_steps):
            action = expert.act(obs["observation"])
            for key, value in obs.items():
                steps[key].append(value)
            steps["action"].append(action.astype(np.float32))
            executed = action + self.expert_noise * rng.standard_normal(2)
            obs, _, terminated, truncated, info = env.step(executed)
            if terminated or truncated:
                break
        env.close()
        return {k: np.stack(v) for k, v in steps.items()}, bool(info["is_success"])

    def summarize(self, rollouts: list[Rollout], out_dir: Path) -> dict[str, Any]:
        """Success on far start-goal pairs (>= FAR_CELLS cell moves apart), steps to the goal, a maze plot."""
        env = PointMazeTaskEnv(self.maze_name, "state")
        moves = []
        for r in rollouts:
            env.reset(seed=r.seed)
            maze = env.maze
            pos = np.asarray(env.env.unwrapped.point_env.data.qpos[:2])
            start = tuple(int(v) for v in maze.cell_xy_to_rowcol(pos))
            goal = tuple(int(v) for v in maze.cell_xy_to_rowcol(env.goal))
            moves.append(len(cell_path(maze.maze_map, start, goal)) - 1)
        far = [r.success for r, m in zip(rollouts, moves, strict=True) if m >= FAR_CELLS]
        steps = [r.length for r in rollouts if r.success]
        summary: dict[str, Any] = {
            "far_pairs": len(far),
            "far_success_rate": float(np.mean(far)) if far else float("nan"),
            "mean_cell_moves": float(np.mean(moves)) if moves else float("nan"),
            "mean_steps_to_goal": float(np.mean(steps)) if steps else float("nan"),
        }
        if rollouts and "observation" in rollouts[0].low_dim_obs:
            out_dir.mkdir(parents=True, exist_ok=True)
            summary["plot"] = str(plot_rollouts(env, rollouts, out_dir / "rollouts.png"))
        env.close()
        return summary


def _task_env(env: gym.Env) -> PointMazeTaskEnv:
    """The PointMazeTaskEnv inside the wrappers (TimeLimit, the evaluator's)."""
    while not isinstance(env, PointMazeTaskEnv):
        env = env.env
    return env


def plot_rollouts(env: PointMazeTaskEnv, rollouts: list[Rollout], path: Path) -> Path:
    """Walls, each rollout's path (green: reached the goal, red: not), starts (dots) and goals (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maze = env.maze
    fig, ax = plt.subplots(figsize=(6, 6))
    s = maze.maze_size_scaling
    for r, row in enumerate(maze.maze_map):
        for c, cell in enumerate(row):
            if cell == 1:
                x, y = maze.cell_rowcol_to_xy(np.array([r, c]))
                ax.add_patch(plt.Rectangle((x - s / 2, y - s / 2), s, s, color="0.3"))
    for r in rollouts:
        xy = r.low_dim_obs["observation"][:, :2]
        ax.plot(xy[:, 0], xy[:, 1], color="tab:green" if r.success else "tab:red", lw=0.8, alpha=0.7)
        ax.plot(xy[:1, 0], xy[:1, 1], "k.", ms=3)
        env.reset(seed=r.seed)
        ax.plot(*env.goal, "*", color="gold", ms=6, mec="k", mew=0.3)
    ax.set_aspect("equal")
    ax.set_xlim(-maze.x_map_center, maze.x_map_center)
    ax.set_ylim(-maze.y_map_center, maze.y_map_center)
    ok = sum(r.success for r in rollouts)
    ax.set_title(f"{ok}/{len(rollouts)} reached the goal (green)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_minari(
    out: str | os.PathLike, n_episodes: int, seed: int = 0, maze: str = "medium", expert_noise: float = 0.1
) -> Path:
    """Run the expert through minari's DataCollector into a new local Minari dataset folder `out`.

    The dataset holds the task's observation dict (observation, desired_goal: D4RL's PointMaze keys less
    achieved_goal, which repeats the position) and the executed (noisy) actions, since that is what a
    DataCollector records; failed episodes are kept (the expert rarely fails).
    """
    import shutil
    import tempfile

    import minari

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder")
    task = PointMazeTask(maze=maze, expert_noise=expert_noise)
    inner = task.make_env()
    env = minari.DataCollector(inner, record_infos=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as root:
        previous = os.environ.get("MINARI_DATASETS_PATH")
        os.environ["MINARI_DATASETS_PATH"] = root
        try:
            for k in range(n_episodes):
                obs, _ = env.reset(seed=seed + k)
                expert = WaypointExpert()
                expert.reset(_task_env(inner))
                rng = np.random.default_rng([seed + k, 7])
                while True:
                    action = expert.act(obs["observation"]) + expert_noise * rng.standard_normal(2)
                    obs, _, terminated, truncated, _ = env.step(np.clip(action, -1, 1))
                    if terminated or truncated:
                        break
            env.create_dataset(
                dataset_id=f"diffpolicy/pointmaze-{maze}-v0",
                algorithm_name="diffpolicy WaypointExpert (BFS + PD, DART noise)",
                author="diffpolicy",
                description=f"PointMaze {maze}: scripted expert, seeds {seed}..{seed + n_episodes - 1}",
            )
        finally:
            if previous is None:
                os.environ.pop("MINARI_DATASETS_PATH", None)
            else:
                os.environ["MINARI_DATASETS_PATH"] = previous
            env.close()
        shutil.move(str(Path(root) / "diffpolicy" / f"pointmaze-{maze}-v0"), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PointMaze expert data as a Minari dataset")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("minari", help="write the expert's episodes as a local Minari dataset folder")
    p.add_argument("out")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maze", default="medium", choices=sorted(MAZES))
    p.add_argument("--noise", type=float, default=0.1)
    args = parser.parse_args(argv)
    out = write_minari(args.out, args.episodes, args.seed, args.maze, args.noise)
    print(f"wrote {args.episodes} episodes to {out} (Minari)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
